"""Fencing: nothing a worker writes after losing its shard reaches the results.

Review findings H1 (a stale worker overwrote a committed part), M1 (a stale
message claimed a shard for a backend it was moved away from), M3 (a live worker
on another machine with the same host name was judged dead) and M4 (leases judged
by two different clocks), attacked with real processes and real stores.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select, text

from pipeline import api
from pipeline.jobs.submit import JobRequest, submit
from pipeline.routing.router import route_job
from pipeline.storage.objects import filesystem, write_parquet
from pipeline.store import claims, identity, transitions
from pipeline.store.db import db_now, session_scope
from pipeline.tasks.finalize import finalize_job
from pipeline.tasks.reaper import reap
from schemas.records import RunShard
from schemas.status import JobStatus, ShardStatus
from schemas.tables import Checkpoint, ShardAttempt
from tests.support import stop_process, write_prompts
from tests.support.jobs import job_row, model_folder, run_queued, shards, stub_runtime, worker_process
from workers.runner import ShardRunner


def _wait(condition, seconds: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_worker_frozen_past_its_lease_writes_nothing_into_the_results(tmp_path: Path, spotlane_home: Path) -> None:
    """H1, as it happens: worker A (checkpoints of 4) is SIGSTOPped mid-chunk past its
    lease; worker B (checkpoints of 8) takes the shard over and finishes it; A wakes,
    finishes its chunk and writes its part. Before, A's part replaced B's committed
    part-4: rows 8-11 went missing from a 'succeeded' job whose manifest said
    rows_missing 0."""
    lease = {"lease_seconds": 3.0, "heartbeat_seconds": 1.0, "reap_interval_seconds": 1.0}
    store = f"sqlite:///{spotlane_home / 'spotlane.db'}"
    runtime_b, _ = stub_runtime(store, worker={"checkpoint_rows": 8, **lease}, deliver=True)
    job_id = submit(
        runtime_b,
        JobRequest(str(write_prompts(tmp_path / "in.parquet", 16)), model_folder(tmp_path), rows_per_shard=16),
    )
    route_job(runtime_b, job_id)  # the message reaches A's queue
    (shard,) = shards(runtime_b, job_id)
    env = {
        "SPOTLANE_WORKER__ENGINE": "stub",
        "SPOTLANE_WORKER__STUB_SECONDS_PER_ROW": "0.5",
        "SPOTLANE_WORKER__CHECKPOINT_ROWS": "4",
        "SPOTLANE_WORKER__LEASE_SECONDS": "3",
        "SPOTLANE_WORKER__HEARTBEAT_SECONDS": "1",
        "SPOTLANE_WORKER__REAP_INTERVAL_SECONDS": "1",
    }
    worker_a = worker_process(env, tmp_path / "a.log", "--queues", "gpu.local", "--no-reaper")
    try:
        _wait(lambda: shards(runtime_b, job_id)[0].rows_done >= 4)  # A committed rows 0-3 ...
        time.sleep(0.8)  # ... and is generating rows 4-7 (2 s of stub "compute") ...
        os.kill(worker_a.pid, signal.SIGSTOP)  # ... when it freezes
        time.sleep(3.5)
        assert reap(runtime_b).expired == 1
        with session_scope(runtime_b.engine) as session:
            record = transitions.run_record(session, shard.id)
        assert ShardRunner(runtime_b).run(record) is ShardStatus.DONE  # B: rows 4-11, 12-15
        os.kill(worker_a.pid, signal.SIGCONT)
        _wait(lambda: "lease lost" in (tmp_path / "a.log").read_text(), 20)
    finally:
        os.kill(worker_a.pid, signal.SIGCONT)
        stop_process(worker_a)

    stale = [
        p
        for p in filesystem(runtime_b.storage.checkpoints_url(job_id))[0].find(
            filesystem(runtime_b.storage.checkpoints_url(job_id))[1]
        )
        if "-a1-" in p
    ]
    assert len(stale) == 2  # A wrote its second part after all, under a name of its own
    assert finalize_job(runtime_b, job_id) is JobStatus.SUCCEEDED
    info = api.results(runtime_b, job_id)
    table = pq.read_table(filesystem(info.files[0])[1])
    assert table.column("id").to_pylist() == [f"row-{i:05d}" for i in range(16)]
    assert table.column("attempt").to_pylist() == [1] * 4 + [2] * 12
    assert info.manifest["rows"] == 16 and info.manifest["rows_missing"] == 0
    with session_scope(runtime_b.engine) as session:  # L9: A's lost chunk was paid for, and is on the ledger
        charged = session.execute(text("select input_tokens from cost_ledger where kind = 'charge'")).scalars().all()
    assert len(charged) == 1 + 2 + 1 and sum(charged) == (16 + 4) * 11  # 11 stub tokens a prompt; rows 4-7 twice


def test_a_part_that_does_not_match_its_checkpoint_fails_the_job_loudly(store_url: str, tmp_path: Path) -> None:
    """H1's second half: the finalizer trusted the checkpoint row and never looked at the file."""
    runtime, _ = stub_runtime(store_url, worker={"checkpoint_rows": 4})
    job_id = submit(
        runtime, JobRequest(str(write_prompts(tmp_path / "in.parquet", 12)), model_folder(tmp_path), rows_per_shard=12)
    )
    run_queued(runtime, job_id, finalize=False)
    with session_scope(runtime.engine) as session:
        second = session.execute(select(Checkpoint).where(Checkpoint.first_row == 4)).scalar_one()
        url = second.url
    part = pq.read_table(filesystem(url)[1])
    write_parquet(part.slice(0, 3), url)  # a shorter part where the committed one was

    assert finalize_job(runtime, job_id) is JobStatus.FAILED

    job = job_row(runtime, job_id)
    assert job.status is JobStatus.FAILED and job.result_url is None
    assert "checkpoint at input row 4" in (job.error or "") and "has 3 rows, its checkpoint says 4" in (job.error or "")
    write_parquet(
        part.set_column(0, "id", pa.array([f"row-{i:05d}" for i in (5, 4, 6, 7)])), url
    )  # right rows, wrong ids
    with session_scope(runtime.engine) as session:
        transitions.set_job_status(session, job_id, JobStatus.RUNNING, expected=(JobStatus.FAILED,))
    assert finalize_job(runtime, job_id) is JobStatus.FAILED
    assert "ids do not match the input at row 4" in (job_row(runtime, job_id).error or "")


def test_a_done_shard_whose_checkpoints_do_not_cover_it_fails_the_job(store_url: str, tmp_path: Path) -> None:
    runtime, _ = stub_runtime(store_url, worker={"checkpoint_rows": 4})
    job_id = submit(
        runtime, JobRequest(str(write_prompts(tmp_path / "in.parquet", 8)), model_folder(tmp_path), rows_per_shard=8)
    )
    run_queued(runtime, job_id, finalize=False)
    with session_scope(runtime.engine) as session:
        session.execute(Checkpoint.__table__.delete().where(Checkpoint.first_row == 4))

    assert finalize_job(runtime, job_id) is JobStatus.FAILED
    assert "cover input rows 0-4, not 0-8" in (job_row(runtime, job_id).error or "")


def test_a_stale_message_for_another_backend_or_attempt_claims_nothing(store_url: str, tmp_path: Path) -> None:
    """M1: a duplicate run_shard for backend a ran the shard on a after it was rerouted to b."""
    pools = [{"name": "a", "price_per_hour": 1.0}, {"name": "b", "price_per_hour": 2.0}]
    runtime, sent = stub_runtime(store_url, gpu_pools=pools)
    job_id = submit(runtime, JobRequest(str(write_prompts(tmp_path / "in.parquet", 4)), model_folder(tmp_path)))
    route_job(runtime, job_id)
    (first,) = sent.of("spotlane.run_shard")
    assert isinstance(first, RunShard) and first.backend == "a" and first.attempt == 0
    with session_scope(runtime.engine) as session:  # pool a fails the shard; the router moves it to b
        claim = claims.claim_shard(session, first.shard_id, "w:1:t", 60, "a", 0)
        assert claim is not None and claims.reroute_shard(session, claim, "pool a is broken")
    route_job(runtime, job_id)
    assert shards(runtime, job_id)[0].backend == "b"

    assert ShardRunner(runtime).run(first) is None  # the old message, delivered again
    assert ShardRunner(runtime).run(RunShard(job_id=job_id, shard_id=first.shard_id, backend="b", attempt=0)) is None

    (shard,) = shards(runtime, job_id)
    assert (shard.status, shard.backend, shard.attempts) == (ShardStatus.QUEUED, "b", 1)
    fresh = sent.of("spotlane.run_shard")[-1]
    assert ShardRunner(runtime).run(fresh) is ShardStatus.DONE  # type: ignore[arg-type]
    with session_scope(runtime.engine) as session:
        backends = session.execute(select(ShardAttempt.backend).order_by(ShardAttempt.attempt)).scalars().all()
    assert backends == ["a", "b"]


def test_a_live_worker_elsewhere_with_the_same_host_name_keeps_its_shard(store_url: str, tmp_path: Path) -> None:
    """M3: 'same host name, PID not here' counted as dead; containers with host networking
    and cloned VMs stole each other's live leases every sweep."""
    runtime, _ = stub_runtime(store_url)
    job_id = submit(runtime, JobRequest(str(write_prompts(tmp_path / "in.parquet", 4)), model_folder(tmp_path)))
    route_job(runtime, job_id)
    mine = identity.owner_id()
    host, pid, tag = mine.split(":")
    elsewhere = f"{host}:4194000:0123456789ab.4026531836.{tag.rsplit('.', 1)[1]}"  # another kernel
    gone_here = f"{host}:4194000:{tag}"  # this kernel and namespace: PID 4194000 does not exist
    shard = shards(runtime, job_id)[0]
    with session_scope(runtime.engine) as session:
        assert claims.claim_shard(session, shard.id, elsewhere, 600, "local") is not None

    assert reap(runtime).expired == 0
    assert shards(runtime, job_id)[0].status is ShardStatus.RUNNING
    assert not identity.dead_here(elsewhere) and identity.dead_here(gone_here) and not identity.dead_here(mine)


@pytest.mark.postgres
def test_leases_are_judged_by_the_database_clock_not_the_workers(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """M4: a worker whose clock is 90 s behind wrote leases that had already run out by the
    reaper's clock; one 10 minutes ahead kept a dead worker's shard for 11 minutes."""
    runtime, _ = stub_runtime(postgres_url)
    job_id = submit(runtime, JobRequest(str(write_prompts(tmp_path / "in.parquet", 4)), model_folder(tmp_path)))
    route_job(runtime, job_id)
    shard = shards(runtime, job_id)[0]
    import schemas.base

    real = schemas.base.utcnow
    slow = lambda: real() - timedelta(seconds=90)  # noqa: E731  the worker's clock, wherever it reads it
    for module in (schemas.base, transitions):
        monkeypatch.setattr(module, "utcnow", slow, raising=False)
    with session_scope(runtime.engine) as session:
        claim = claims.claim_shard(session, shard.id, "w:1:t", 60, "local")
        assert claim is not None and claims.heartbeat(session, claim, 60)
    monkeypatch.undo()

    assert reap(runtime).expired == 0
    with session_scope(runtime.engine) as session:
        left = session.execute(text("select lease_expires_at - clock_timestamp() from shards")).scalar_one()
        assert timedelta(seconds=55) < left <= timedelta(seconds=60)
        assert abs((db_now(session) - real()).total_seconds()) < 5
