"""Prometheus metrics: a worker process's counters, and the job store's gauges.

Counters and histograms live in the process's default registry; a worker serves
them on ``metrics.port`` (``/metrics``) when that is set. Their labels are
low-cardinality by design: backend and outcome, never job or shard ids.

``StoreCollector`` reads the job store at each scrape (one process registers it:
``spotlane scheduler``, one per deployment): per job not yet finished, its rows,
budget, spend and seconds since its last committed part (so the number of series
is bounded by the jobs running); per backend, whether it is cooling down and its
observed preemption rate against its prior; per queue, the shards waiting in it and
the live workers consuming it; per batch lane, its open provider batches. The alert
rules in ``infra/prometheus/alerts.yml`` and the Grafana dashboard read these.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pipeline.runtime import Runtime

__all__ = [
    "CACHE_ROWS",
    "CHECKPOINT_SECONDS",
    "COST_USD",
    "LEASE_EXPIRIES",
    "QUEUE_WAIT_SECONDS",
    "ROWS",
    "SCHEDULE_RUNS",
    "SHARDS",
    "STORAGE_ACTIONS",
    "STORAGE_BYTES",
    "TOKENS",
    "StoreCollector",
    "observe_checkpoint",
    "serve",
    "watch_store",
]

ROWS = Counter("spotlane_rows", "Rows answered, by backend and outcome (ok or error).", ["backend", "outcome"])
TOKENS = Counter(
    "spotlane_tokens", "Tokens processed, by backend and direction (input or output).", ["backend", "direction"]
)
COST_USD = Counter("spotlane_cost_usd", "Cost charged, USD, by backend.", ["backend"])
SHARDS = Counter("spotlane_shards", "Shard runs ended, by backend and outcome.", ["backend", "outcome"])
CHECKPOINT_SECONDS = Histogram(
    "spotlane_checkpoint_seconds",
    "Seconds to generate, write and commit one checkpoint of rows.",
    ["backend"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)
QUEUE_WAIT_SECONDS = Histogram(
    "spotlane_queue_wait_seconds",
    "Seconds a shard waited queued before a worker claimed it.",
    ["backend"],
    buckets=(0.1, 1, 5, 15, 60, 300, 900, 3600, 14400),
)

STORAGE_ACTIONS = Counter(
    "spotlane_storage_actions", "Lifecycle actions ended, by action and status (done or failed).", ["action", "status"]
)
STORAGE_BYTES = Counter("spotlane_storage_bytes", "Bytes moved or deleted by the lifecycle, by action.", ["action"])
SCHEDULE_RUNS = Counter(
    "spotlane_schedule_runs",
    "Scheduled runs recorded, by schedule and status (submitted, skipped, failed).",
    ["schedule", "status"],
)

LEASE_EXPIRIES = Counter(
    "spotlane_lease_expiries", "Shards taken back from a holder whose lease ran out or whose process is gone."
)
CACHE_ROWS = Counter(
    "spotlane_cache_rows", "Rows answered without being sent (the answer cache, or a repeat), by backend.", ["backend"]
)

_SERVING: set[int] = set()


def serve(port: int, address: str = "127.0.0.1") -> None:
    """Serve ``/metrics`` on ``address``:``port`` (once per process; port 0 does nothing)."""
    if port and port not in _SERVING:
        start_http_server(port, addr=address)
        _SERVING.add(port)


def observe_checkpoint(
    backend: str, rows: int, rows_failed: int, input_tokens: int, output_tokens: int, cost_usd: float, seconds: float
) -> None:
    """Count one committed checkpoint."""
    ROWS.labels(backend, "ok").inc(rows - rows_failed)
    ROWS.labels(backend, "error").inc(rows_failed)
    TOKENS.labels(backend, "input").inc(input_tokens)
    TOKENS.labels(backend, "output").inc(output_tokens)
    COST_USD.labels(backend).inc(cost_usd)
    CHECKPOINT_SECONDS.labels(backend).observe(seconds)


class StoreCollector(Collector):
    """Gauges read from the job store at each scrape (see the module doc)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from pipeline.store.db import db_now, session_scope
        from pipeline.store.gauges import read_gauges

        with session_scope(self.runtime.engine) as session:
            gauges = read_gauges(session, self.runtime.settings, db_now(session))
        for gauge in gauges:
            family = GaugeMetricFamily(gauge.name, gauge.help, labels=gauge.labels)
            for labels, value in gauge.samples:
                family.add_metric(labels, value)
            yield family


_WATCHED: set[int] = set()


def watch_store(runtime: Runtime) -> None:
    """Register the job store's gauges in this process's registry (once)."""
    if id(runtime) not in _WATCHED:
        REGISTRY.register(StoreCollector(runtime))
        _WATCHED.add(id(runtime))
