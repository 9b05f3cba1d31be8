"""A running job's live numbers: rate, ETA, cost so far and projected, and stalls."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import text, update

from pipeline.jobs.export import export_results
from pipeline.jobs.queries import job_status, results
from pipeline.jobs.submit import JobRequest, submit
from pipeline.routing.router import route_job
from pipeline.store.db import session_scope
from pipeline.store.transitions import run_record
from schemas.base import utcnow
from schemas.status import JobStatus, LedgerKind, ShardStatus
from schemas.tables import Job, Shard
from tests.support import write_prompts
from tests.support.jobs import ledger_sum, model_folder, provider_runtime, run_queued, shards, stub_runtime
from tests.support.openai_server import FakeOpenAI
from workers.runner import ShardRunner


@pytest.fixture
def provider() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def test_halfway_the_rate_eta_and_projection_come_from_the_rows_done(
    store_url: str, tmp_path: Path, provider: FakeOpenAI
) -> None:
    runtime = provider_runtime(store_url, provider.url, usd_per_1m=100.0, jobs={"rows_per_shard": 20})
    job_id = submit(runtime, JobRequest(str(write_prompts(tmp_path / "in.parquet", 40)), "m", max_tokens=8))
    before = job_status(runtime, job_id).live
    assert before is not None and before.basis == "estimate" and before.eta is None and before.spent_usd == 0

    route_job(runtime, job_id)
    first = shards(runtime, job_id)[0]
    with session_scope(runtime.engine) as session:
        record = run_record(session, first.id)
    assert ShardRunner(runtime).run(record) is ShardStatus.DONE

    live = job_status(runtime, job_id).live
    assert live is not None and live.basis == "observed"
    assert live.rows_per_second > 0 and live.eta is not None and live.eta > utcnow().isoformat()
    assert live.spent_usd == pytest.approx(ledger_sum(runtime, job_id, LedgerKind.CHARGE)) and live.spent_usd > 0
    # the rows are alike: the 20 left cost what the 20 done did
    assert live.projected_usd == pytest.approx(2 * live.spent_usd, rel=0.05)
    assert live.projected_low_usd <= live.projected_usd <= live.projected_high_usd
    assert [(b.backend, b.rows_done) for b in live.by_backend] == [("prov", 20)]
    assert not live.stalled
    with runtime.engine.connect() as conn:  # the same, for SQL users (rate over a fixed five minutes)
        view = conn.execute(
            text(
                "select rows_done, spent_usd, rows_per_second, seconds_left, last_commit_at "
                "from job_progress where job_id = :id"
            ),
            {"id": job_id},
        ).one()
    assert view.rows_done == 20 and view.spent_usd == pytest.approx(live.spent_usd)
    assert view.rows_per_second == pytest.approx(20 / 300) and view.seconds_left == pytest.approx(20 / (20 / 300))
    assert view.last_commit_at is not None

    assert run_queued(runtime, job_id) is JobStatus.SUCCEEDED
    done = job_status(runtime, job_id).live
    assert done is not None and done.eta is None and done.projected_usd == pytest.approx(done.spent_usd)


def test_a_job_with_no_worker_on_its_queue_shows_as_stalled_with_the_reason(
    store_url: str, redis_url: str, tmp_path: Path
) -> None:
    runtime, _ = stub_runtime(store_url, broker={"url": redis_url})  # distributed: workers announce
    job_id = submit(runtime, JobRequest(str(write_prompts(tmp_path / "in.parquet", 10)), model_folder(tmp_path)))
    route_job(runtime, job_id)
    live = job_status(runtime, job_id).live
    assert live is not None and not live.stalled  # just queued: not yet

    with session_scope(runtime.engine) as session:  # ten minutes later, nothing committed
        earlier = utcnow() - timedelta(minutes=10)
        session.execute(update(Job).where(Job.id == job_id).values(started_at=earlier, created_at=earlier))
    live = job_status(runtime, job_id).live
    assert live is not None and live.stalled
    assert live.stalled_reason == "no live worker consumes queue 'gpu.local'"

    with session_scope(runtime.engine) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(status=JobStatus.PAUSED, error="paused: the budget is spent")
        )
        session.execute(update(Shard).where(Shard.job_id == job_id).values(status=ShardStatus.BLOCKED))
    live = job_status(runtime, job_id).live
    assert live is not None and live.stalled and live.stalled_reason == "paused: the budget is spent"


def test_a_running_jobs_committed_rows_export_in_input_order_and_say_what_is_missing(
    store_url: str, tmp_path: Path, provider: FakeOpenAI
) -> None:
    runtime = provider_runtime(store_url, provider.url, usd_per_1m=100.0, jobs={"rows_per_shard": 20})
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    job_id = submit(
        runtime,
        JobRequest(str(write_prompts(tmp_path / "in.parquet", 60)), "m", max_tokens=8, response_schema=schema),
    )
    route_job(runtime, job_id)
    middle = shards(runtime, job_id)[1]  # rows 20-39 are committed, the rest not yet
    with session_scope(runtime.engine) as session:
        record = run_record(session, middle.id)
    ShardRunner(runtime).run(record)

    exported = export_results(runtime, job_id, str(tmp_path / "so-far.parquet"), partial=True)
    assert exported.rows == 20 and exported.missing == [(0, 20), (40, 60)]
    table = pq.read_table(tmp_path / "so-far.parquet")
    assert table.column("id").to_pylist() == [f"row-{i:05d}" for i in range(20, 40)]
    assert "parsed" in table.column_names  # the results' columns (the echo server answers no JSON: null)

    assert run_queued(runtime, job_id) is JobStatus.SUCCEEDED_WITH_ERRORS  # echoes are not JSON
    final = export_results(runtime, job_id, str(tmp_path / "all.parquet"), partial=True)
    assert final.rows == 60 and final.missing == []
    first_file = results(runtime, job_id).files[0]
    assert pq.read_table(tmp_path / "all.parquet").schema.names == pq.read_table(first_file).schema.names
