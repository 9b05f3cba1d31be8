"""A provider's batch API as a lane, against a local Files + Batches server.

The real router, shard runner, poller and finalizer run in this process on a real
job store; the provider is ``tests.support.openai_server`` completing, failing,
expiring and holding batches on a script. What is asserted is what a user relies
on: every row exactly once, in input order; the discount charged from ``usage``;
nothing spent past the budget; one provider batch per shard, never two.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select, update

from pipeline.jobs.control import cancel
from pipeline.jobs.plan import plan
from pipeline.jobs.submit import JobRequest, submit
from pipeline.routing.router import route_job
from pipeline.runtime import Runtime
from pipeline.serve.keys import create_key
from pipeline.store.db import session_scope
from pipeline.store.transitions import run_record
from pipeline.tasks.finalize import finalize_job
from pipeline.tasks.reaper import reap
from schemas.base import utcnow
from schemas.jobspec import JobSpec
from schemas.status import JobStatus, LedgerKind, ProviderBatchStatus, ShardStatus
from schemas.tables import ProviderBatch, Shard
from tests.support.jobs import job_row, ledger_sum, model_folder, provider_runtime, run_queued, shards, stub_runtime
from tests.support.openai_server import FakeOpenAI
from tests.support.serve import serving
from workers.batch_lane import poll
from workers.runner import ShardRunner

PRICE = 100.0  # USD per 1M tokens, in and out: big enough to see


@pytest.fixture
def provider() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def lane_runtime(store_url: str, url: str, rows_per_shard: int = 20, **batch: Any) -> Runtime:
    return provider_runtime(
        store_url,
        url,
        usd_per_1m=PRICE,
        batch={"poll_seconds": 0.05, **batch},
        jobs={"rows_per_shard": rows_per_shard},
    )


def prompts(path: Path, n: int) -> str:
    pq.write_table(
        pa.table({"id": [f"r{i:03d}" for i in range(n)], "prompt": [f"question {i}" for i in range(n)]}), path
    )
    return str(path)


def drive(runtime: Runtime, job_id: str, seconds: float = 30.0, within: float | None = None) -> JobStatus | None:
    """What the workers and the poller do: route, run queued shards, poll, until every shard
    is final; ``within``: reserved + spent is checked against it at every turn."""
    runner = ShardRunner(runtime)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if within is not None:
            assert ledger_sum(runtime, job_id) <= within + 1e-9
        route_job(runtime, job_id)
        for shard in shards(runtime, job_id):
            if shard.status is ShardStatus.QUEUED:
                with session_scope(runtime.engine) as session:
                    record = run_record(session, shard.id)
                runner.run(record)
        poll(runtime, job_id)
        states = {s.status for s in shards(runtime, job_id)}
        if states <= {ShardStatus.DONE, ShardStatus.FAILED}:
            return finalize_job(runtime, job_id)
        if job_row(runtime, job_id).status is JobStatus.CANCELLED and ShardStatus.RUNNING not in states:
            return JobStatus.CANCELLED
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not settle: {[(s.shard_index, s.status) for s in shards(runtime, job_id)]}")


def results(runtime: Runtime, job_id: str) -> list[dict[str, Any]]:
    job = job_row(runtime, job_id)
    assert job.result_url is not None
    return pq.read_table(job.result_url).to_pylist()


def provider_batches(runtime: Runtime, job_id: str) -> list[ProviderBatch]:
    with session_scope(runtime.engine) as session:
        found = list(session.execute(select(ProviderBatch).where(ProviderBatch.job_id == job_id)).scalars())
        for row in found:
            session.expunge(row)
        return found


def test_without_a_deadline_the_discounted_lane_answers_every_row_once_charged_from_usage(
    store_url: str, tmp_path: Path, provider: FakeOpenAI
) -> None:
    runtime = lane_runtime(store_url, provider.url)
    job_id = submit(runtime, JobRequest(prompts(tmp_path / "in.parquet", 50), "m", max_tokens=8))

    assert drive(runtime, job_id) is JobStatus.SUCCEEDED
    rows = results(runtime, job_id)
    assert [r["id"] for r in rows] == [f"r{i:03d}" for i in range(50)]
    assert {r["backend"] for r in rows} == {"prov.batch"}
    assert rows[7]["output"] == "echo: question 7"
    # usage (2 prompt words + 3, 5 out) at half the synchronous price
    assert rows[7]["cost_usd"] == pytest.approx((5 + 5) / 1e6 * PRICE * 0.5)
    assert provider.requests == 0  # nothing went to the synchronous endpoint
    assert len(provider.batches) == 3  # one per shard of 20, 20 and 10 rows
    assert ledger_sum(runtime, job_id, LedgerKind.CHARGE) == pytest.approx(sum(r["cost_usd"] for r in rows))
    assert ledger_sum(runtime, job_id) == pytest.approx(sum(r["cost_usd"] for r in rows))  # nothing left held
    recorded = provider_batches(runtime, job_id)
    assert {r.status for r in recorded} == {ProviderBatchStatus.COLLECTED}
    assert {r.provider_status for r in recorded} == {"completed"}


def test_an_expired_batch_keeps_its_answers_and_sends_the_rest_to_the_synchronous_lane(
    store_url: str, tmp_path: Path, provider: FakeOpenAI
) -> None:
    provider.batch_script = ["expire"]  # every other request answered, the rest batch_expired
    runtime = lane_runtime(store_url, provider.url, rows_per_shard=12)
    job_id = submit(runtime, JobRequest(prompts(tmp_path / "in.parquet", 12), "m", max_tokens=8))

    assert drive(runtime, job_id) is JobStatus.SUCCEEDED
    rows = results(runtime, job_id)
    assert [r["id"] for r in rows] == [f"r{i:03d}" for i in range(12)]
    assert [r["backend"] for r in rows] == ["prov.batch", "prov"] * 6
    assert all(r["error"] is None and r["output"] == f"echo: question {i}" for i, r in enumerate(rows))
    assert provider.requests == 6 and len(provider.batches) == 1  # the lane was not asked again
    parts = shards(runtime, job_id)
    assert len(parts) == 12 and {s.status for s in parts} == {ShardStatus.DONE}
    assert sorted((s.row_start, s.row_end) for s in parts) == [(i, i + 1) for i in range(12)]
    assert job_row(runtime, job_id).shard_count == 12
    spent = ledger_sum(runtime, job_id, LedgerKind.CHARGE)
    assert spent == pytest.approx(sum(r["cost_usd"] for r in rows))
    assert ledger_sum(runtime, job_id) == pytest.approx(spent)


def test_many_holes_are_cut_into_at_most_max_runs_shards_and_no_row_is_lost(
    store_url: str, tmp_path: Path, provider: FakeOpenAI
) -> None:
    provider.batch_script = ["expire"]
    runtime = lane_runtime(store_url, provider.url, rows_per_shard=60)
    job_id = submit(runtime, JobRequest(prompts(tmp_path / "in.parquet", 60), "m", max_tokens=8))

    assert drive(runtime, job_id) is JobStatus.SUCCEEDED
    rows = results(runtime, job_id)
    assert [r["id"] for r in rows] == [f"r{i:03d}" for i in range(60)]
    assert len(shards(runtime, job_id)) <= 16  # 60 alternating rows, cut into at most MAX_RUNS
    answered_at_lane = sum(r["backend"] == "prov.batch" for r in rows)
    assert 0 < answered_at_lane < 30 and provider.requests == 60 - answered_at_lane


def test_a_failed_batch_sends_every_row_to_another_lane(store_url: str, tmp_path: Path, provider: FakeOpenAI) -> None:
    provider.batch_script = ["fail"]
    runtime = lane_runtime(store_url, provider.url)
    job_id = submit(runtime, JobRequest(prompts(tmp_path / "in.parquet", 20), "m", max_tokens=8))

    assert drive(runtime, job_id) is JobStatus.SUCCEEDED
    rows = results(runtime, job_id)
    assert {r["backend"] for r in rows} == {"prov"} and len(rows) == 20
    (shard,) = shards(runtime, job_id)
    assert shard.excluded_backends == ["prov.batch"]
    assert ledger_sum(runtime, job_id, LedgerKind.CHARGE) == pytest.approx(sum(r["cost_usd"] for r in rows))


def test_a_batch_still_open_when_the_deadline_is_at_risk_is_cancelled_and_its_rows_move(
    store_url: str, tmp_path: Path, provider: FakeOpenAI
) -> None:
    provider.batch_script = ["hold"]  # never ends by itself
    # a 36 s window fits a 62 s deadline; a minute's fallback gives up on it after 2 s
    runtime = lane_runtime(store_url, provider.url, window_hours=0.01, fallback_minutes=1.0)
    deadline = utcnow() + timedelta(seconds=62)
    job_id = submit(runtime, JobRequest(prompts(tmp_path / "in.parquet", 20), "m", max_tokens=8, deadline=deadline))

    assert drive(runtime, job_id) is JobStatus.SUCCEEDED
    rows = results(runtime, job_id)
    assert [r["id"] for r in rows] == [f"r{i:03d}" for i in range(20)]
    assert provider.cancels == 1
    # Every other row finished before the cancel and is kept, but for the shortest runs
    # (the first three): 20 runs are cut into at most MAX_RUNS (16) shards.
    assert [r["backend"] for r in rows] == ["prov"] * 6 + ["prov.batch", "prov"] * 7
    (recorded,) = provider_batches(runtime, job_id)
    assert recorded.provider_status == "cancelled" and recorded.rows_returned == 13


def test_cancelling_the_job_cancels_its_provider_batches(store_url: str, tmp_path: Path, provider: FakeOpenAI) -> None:
    provider.batch_script = ["hold"]
    runtime = lane_runtime(store_url, provider.url)
    job_id = submit(runtime, JobRequest(prompts(tmp_path / "in.parquet", 20), "m", max_tokens=8))
    route_job(runtime, job_id)
    (shard,) = shards(runtime, job_id)
    with session_scope(runtime.engine) as session:
        record = run_record(session, shard.id)
    assert ShardRunner(runtime).run(record) is ShardStatus.RUNNING  # at the provider; the worker is free
    assert len(provider.batches) == 1

    cancel(runtime, job_id)
    reap(runtime)  # the reaper sees a cancelled job's open batch is due at once
    poll(runtime, job_id)
    assert provider.cancels == 1
    time.sleep(0.1)  # poll_seconds
    poll(runtime, job_id)  # the provider ended it: what finished is kept, the rest waits for a resume
    (recorded,) = provider_batches(runtime, job_id)
    assert recorded.status is ProviderBatchStatus.COLLECTED and recorded.rows_answered == 7
    now = shards(runtime, job_id)
    assert sum(s.rows_done for s in now if s.status is ShardStatus.DONE) == 7
    pending = [s for s in now if s.status is ShardStatus.PENDING]
    assert sum(s.row_end - s.row_start for s in pending) == 13
    assert all("prov.batch" not in s.excluded_backends for s in pending)  # the lane did not fail


def test_spotlane_serve_is_a_real_batch_lane_for_another_spotlane(
    tmp_path: Path, provider: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One spotlane (SQLite) routes to the batch API of another (``spotlane serve`` over its
    own job store and stub workers): Files + Batches as OpenAI's clients know them."""
    far, _ = stub_runtime(f"sqlite:///{tmp_path / 'far.db'}", jobs={"rows_per_shard": 100})
    _, secret = create_key(far, "near")
    folder = model_folder(tmp_path)
    with serving(far) as url:
        near = provider_runtime(
            f"sqlite:///{tmp_path / 'near.db'}",
            url,
            usd_per_1m=PRICE,
            batch={"poll_seconds": 0.05},
            jobs={"rows_per_shard": 25},
        )
        near.settings.api_providers[0].models = {"m": folder}  # the far side's model
        monkeypatch.setenv("SPOTLANE_TEST_PROVIDER_KEY", secret)
        job_id = submit(near, JobRequest(prompts(tmp_path / "in.parquet", 25), "m", max_tokens=8))
        route_job(near, job_id)
        (shard,) = shards(near, job_id)
        with session_scope(near.engine) as session:
            record = run_record(session, shard.id)
        assert ShardRunner(near).run(record) is ShardStatus.RUNNING
        (recorded,) = provider_batches(near, job_id)
        far_job = (recorded.batch_id or "").removeprefix("batch_")
        assert job_row(far, far_job).batch_metadata == {"spotlane_marker": recorded.marker, "spotlane_job": job_id}
        assert run_queued(far, far_job) is JobStatus.SUCCEEDED  # the far side's workers answer it
        assert drive(near, job_id) is JobStatus.SUCCEEDED
    rows = results(near, job_id)
    assert [r["id"] for r in rows] == [f"r{i:03d}" for i in range(25)]
    assert {r["backend"] for r in rows} == {"prov.batch"} and all(r["error"] is None for r in rows)
    assert provider.requests == 0


def test_a_provider_that_lies_about_usage_is_charged_no_more_than_each_request_can_cost(
    store_url: str, tmp_path: Path, provider: FakeOpenAI
) -> None:
    provider.usage = (10**7, 10**7)  # every answer claims ten million tokens each way
    runtime = lane_runtime(store_url, provider.url)
    job_id = submit(runtime, JobRequest(prompts(tmp_path / "in.parquet", 20), "m", max_tokens=8))
    assert drive(runtime, job_id) is JobStatus.SUCCEEDED
    rows = results(runtime, job_id)
    assert {r["output_tokens"] for r in rows} == {8}  # clamped to max_tokens
    assert max(r["input_tokens"] for r in rows) < 100  # clamped to the prompt's byte bound
    spent = ledger_sum(runtime, job_id, LedgerKind.CHARGE)
    assert spent == pytest.approx(sum(r["cost_usd"] for r in rows))
    assert spent < 20 * 110 / 1e6 * PRICE * 0.5


def test_a_budget_that_covers_part_of_a_shard_sends_those_rows_and_never_more(
    store_url: str, tmp_path: Path, provider: FakeOpenAI
) -> None:
    runtime = lane_runtime(store_url, provider.url, rows_per_shard=40)
    path = prompts(tmp_path / "in.parquet", 40)
    worst = plan(runtime, path, JobSpec(model="m", max_tokens=8)).worst_case_usd
    budget = worst * 0.3  # a third of the shard's worst case
    job_id = submit(runtime, JobRequest(path, "m", max_tokens=8, budget_usd=budget))
    route_job(runtime, job_id)
    (shard,) = shards(runtime, job_id)
    with session_scope(runtime.engine) as session:
        record = run_record(session, shard.id)
    assert ShardRunner(runtime).run(record) is ShardStatus.RUNNING
    (recorded,) = provider_batches(runtime, job_id)
    assert 0 < recorded.requests < 40 and recorded.row_end - recorded.first_row == recorded.requests
    assert ledger_sum(runtime, job_id) <= budget + 1e-9  # reserved (the sent rows' worst case) within it
    cut = shards(runtime, job_id)
    assert sorted((s.row_start, s.row_end) for s in cut) == [(0, recorded.row_end), (recorded.row_end, 40)]

    # Answers cost far less than their worst case: what comes back pays for the rest.
    assert drive(runtime, job_id, within=budget) is JobStatus.SUCCEEDED
    assert [r["id"] for r in results(runtime, job_id)] == [f"r{i:03d}" for i in range(40)]
    assert len(provider.batches) >= 2


def test_a_shard_larger_than_the_lanes_limits_is_cut_into_provider_batches_that_fit(
    store_url: str, tmp_path: Path, provider: FakeOpenAI
) -> None:
    runtime = lane_runtime(store_url, provider.url, rows_per_shard=25, max_requests=10, max_bytes=2048)
    job_id = submit(runtime, JobRequest(prompts(tmp_path / "in.parquet", 25), "m", max_tokens=8))
    assert drive(runtime, job_id) is JobStatus.SUCCEEDED
    assert [r["id"] for r in results(runtime, job_id)] == [f"r{i:03d}" for i in range(25)]
    sizes = [len(provider.files[b["input_file_id"]]) for b in provider.batches.values()]
    counts = [provider.files[b["input_file_id"]].count(b"\n") for b in provider.batches.values()]
    assert max(sizes) <= 2048 and max(counts) <= 10 and sum(counts) == 25


def test_a_poller_away_past_the_lease_loses_nothing_the_next_attempt_adopts_the_batch(
    store_url: str, tmp_path: Path, provider: FakeOpenAI
) -> None:
    runtime = lane_runtime(store_url, provider.url)
    job_id = submit(runtime, JobRequest(prompts(tmp_path / "in.parquet", 20), "m", max_tokens=8))
    route_job(runtime, job_id)
    (shard,) = shards(runtime, job_id)
    with session_scope(runtime.engine) as session:
        record = run_record(session, shard.id)
    assert ShardRunner(runtime).run(record) is ShardStatus.RUNNING
    held = ledger_sum(runtime, job_id)
    with session_scope(runtime.engine) as session:  # nobody polled until the provider's lease ran out
        session.execute(
            update(Shard).where(Shard.id == shard.id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    assert reap(runtime).expired == 1  # queued again on the lane, as a lost attempt

    assert drive(runtime, job_id) is JobStatus.SUCCEEDED
    assert len(provider.batches) == 1  # adopted, not created again
    (recorded,) = provider_batches(runtime, job_id)
    assert recorded.attempt == 2 and recorded.status is ProviderBatchStatus.COLLECTED
    rows = results(runtime, job_id)
    assert [r["id"] for r in rows] == [f"r{i:03d}" for i in range(20)]
    spent = ledger_sum(runtime, job_id, LedgerKind.CHARGE)
    assert spent == pytest.approx(sum(r["cost_usd"] for r in rows)) and 0 < spent < held
    assert ledger_sum(runtime, job_id) == pytest.approx(spent)  # the lost attempt's hold moved, then came back
