"""Prometheus metrics of a worker process.

Counters and histograms live in the process's default registry; a worker serves
them on ``metrics.port`` (``/metrics``) when that is set. Labels are low-cardinality
by design: backend and outcome, never job or shard ids.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

__all__ = [
    "CHECKPOINT_SECONDS",
    "COST_USD",
    "QUEUE_WAIT_SECONDS",
    "ROWS",
    "SCHEDULE_RUNS",
    "SHARDS",
    "STORAGE_ACTIONS",
    "STORAGE_BYTES",
    "TOKENS",
    "observe_checkpoint",
    "serve",
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
