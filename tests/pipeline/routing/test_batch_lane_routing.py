"""Routing with a provider's batch lane: its discount, its turnaround and the deadline."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from pipeline.jobs.submit import JobRequest, submit
from pipeline.routing import observations as learning
from pipeline.routing.router import route_job
from pipeline.runtime import Runtime
from pipeline.store import db
from pipeline.store.db import session_scope
from schemas.base import utcnow
from schemas.errors import ConfigError
from schemas.settings import load_settings
from schemas.status import ProviderBatchStatus
from schemas.tables import ProviderBatch, Shard
from tests.support import write_prompts

POOLS = [{"name": "slow", "price_per_hour": 3.6, "tokens_per_second": 10, "max_workers": 1}]


def _providers(**batch: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": "api",
            "base_url": "http://127.0.0.1:9/v1",
            "models": {"tiny": "remote-tiny"},
            "input_usd_per_1m": 1.0,
            "output_usd_per_1m": 200.0,
            "max_concurrency": 16,
            "batch": {"discount": 0.5, **batch},
        }
    ]


def _runtime(store_url: str, **batch: Any) -> Runtime:
    if not store_url.startswith("sqlite"):
        db.upgrade(db.engine_for(store_url))
    return Runtime.open(database={"url": store_url}, gpu_pools=POOLS, api_providers=_providers(**batch))


def _job(runtime: Runtime, tmp_path: Path, **request: Any) -> str:
    path = write_prompts(tmp_path / "in.parquet", 200)
    return submit(runtime, JobRequest(str(path), "tiny", rows_per_shard=10, max_tokens=100, **request))


def _backends(runtime: Runtime, job_id: str) -> list[str | None]:
    with session_scope(runtime.engine) as session:
        return list(session.execute(select(Shard.backend).where(Shard.job_id == job_id)).scalars())


def _seen(runtime: Runtime, job_id: str, hours: list[float]) -> None:
    """Provider batches of the lane that took ``hours`` each, as if observed."""
    with session_scope(runtime.engine) as session:
        shard = session.execute(select(Shard.id).where(Shard.job_id == job_id).limit(1)).scalar_one()
        now = utcnow()
        for n, took in enumerate(hours):
            session.add(
                ProviderBatch(
                    job_id=job_id,
                    shard_id=shard,
                    attempt=1,
                    backend="api.batch",
                    model="tiny",
                    marker=f"seen-{job_id}-{n}",
                    status=ProviderBatchStatus.COLLECTED,
                    provider_status="completed",
                    first_row=0,
                    row_end=1,
                    requests=1,
                    input_tokens=1,
                    created_at=now - timedelta(hours=took),
                    submitted_at=now - timedelta(hours=took),
                    ended_at=now,
                    give_up_at=now,
                    next_poll_at=now,
                    rows_answered=1,
                    rows_returned=0,
                    cost_usd=0.0,
                )
            )


def test_the_batch_lane_is_a_backend_of_its_own_for_rules_on_the_control_queue() -> None:
    settings = load_settings(
        api_providers=_providers(), routing={"rules": [{"tag": "team=a", "backends": ["api.batch"]}]}
    )
    lane = settings.backend("api.batch")
    assert lane.queue == settings.control_queue and lane.kind == "batch"
    assert settings.queues.count(settings.control_queue) == 1
    with pytest.raises(ConfigError, match="no backend named 'nope.batch'"):
        load_settings(api_providers=_providers(), routing={"rules": [{"backends": ["nope.batch"]}]})
    with pytest.raises(ConfigError, match="api_providers.0.batch.discount"):
        load_settings(api_providers=_providers(discount=0))


def test_without_a_deadline_the_cheapest_lane_is_the_discounted_one(store_url: str, tmp_path: Path) -> None:
    runtime = _runtime(store_url)
    job_id = _job(runtime, tmp_path)
    route_job(runtime, job_id)
    assert set(_backends(runtime, job_id)) == {"api.batch"}


def test_a_deadline_inside_the_window_keeps_the_lane_out_until_its_turnaround_is_learnt(
    store_url: str, tmp_path: Path
) -> None:
    runtime = _runtime(store_url)  # a 24 h window, nothing observed yet
    first = _job(runtime, tmp_path, deadline=utcnow() + timedelta(hours=10))
    route_job(runtime, first)
    assert "api.batch" not in _backends(runtime, first)

    _seen(runtime, first, [0.5] * 9 + [2.0])  # a p90 of half an hour
    second = _job(runtime, tmp_path, deadline=utcnow() + timedelta(hours=10))
    route_job(runtime, second)
    assert set(_backends(runtime, second)) == {"api.batch"}


def test_the_router_plans_with_a_high_percentile_of_the_turnaround_not_the_mean(store_url: str, tmp_path: Path) -> None:
    runtime = _runtime(store_url)
    job_id = _job(runtime, tmp_path, deadline=utcnow() + timedelta(hours=10))
    _seen(runtime, job_id, [0.5] * 8 + [20.0] * 2)  # a mean of 4.4 h, a p90 of 20 h
    with session_scope(runtime.engine) as session:
        p90 = learning.turnaround(session, "api.batch", 90.0)
        p50 = learning.turnaround(session, "api.batch", 50.0)
    assert p90 == pytest.approx(20 * 3600, rel=1e-3) and p50 == pytest.approx(1800, rel=1e-3)
    route_job(runtime, job_id)
    assert "api.batch" not in _backends(runtime, job_id)


def test_a_lane_full_of_enqueued_tokens_takes_no_more(store_url: str, tmp_path: Path) -> None:
    runtime = _runtime(store_url, max_enqueued_tokens=10_000)
    job_id = _job(runtime, tmp_path)
    with session_scope(runtime.engine) as session:
        shard = session.execute(select(Shard.id).where(Shard.job_id == job_id).limit(1)).scalar_one()
        now = utcnow()
        session.add(
            ProviderBatch(
                job_id=job_id,
                shard_id=shard,
                attempt=1,
                backend="api.batch",
                model="tiny",
                marker="open-one",
                status=ProviderBatchStatus.SUBMITTED,
                first_row=0,
                row_end=10,
                requests=10,
                input_tokens=9_990,  # the provider holds almost all the lane may enqueue
                created_at=now,
                give_up_at=now + timedelta(hours=24),
                next_poll_at=now + timedelta(hours=1),
                rows_answered=0,
                rows_returned=0,
                cost_usd=0.0,
            )
        )
    route_job(runtime, job_id)
    assert "api.batch" not in _backends(runtime, job_id)
