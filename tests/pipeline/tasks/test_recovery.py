"""No job stuck, and transient faults handed back instead of failing work.

Review findings H5 (a lost route message left shards pending forever), M14
(routing profiled the whole input first, and was re-sent every sweep), M8 (a
broker error after the submit's commit made a retried schedule submit twice), M9
(an input changed after submit: a livelock), M13 (a hung engine kept its lease
forever) and M2 (one storage or database blip failed a shard for good); and a
checkpoint whose commit went through but whose reply was lost.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

import workers.checkpoint as checkpoint_module
from pipeline.jobs.submit import JobRequest, submit
from pipeline.routing.router import route_job, route_lease
from pipeline.runtime import Runtime
from pipeline.store import claims, leases, transitions
from pipeline.store.db import session_scope
from pipeline.tasks.finalize import finalize_job
from pipeline.tasks.reaper import reap
from schemas.errors import TransientError
from schemas.records import RouteJob, RunShard
from schemas.status import AttemptOutcome, JobStatus, LedgerKind, ShardStatus
from schemas.tables import BackendStats, Checkpoint, CostLedgerEntry, ShardAttempt
from tests.support import write_prompts
from tests.support.jobs import job_row, model_folder, run_queued, shards, stub_runtime
from workers.runner import ShardRunner

FAST = {"requeue_after_seconds": 0.1}


def _job(runtime: Runtime, tmp_path: Path, rows: int = 20, **request: object) -> str:
    return submit(
        runtime, JobRequest(str(write_prompts(tmp_path / f"in{rows}.parquet", rows)), model_folder(tmp_path), **request)
    )  # type: ignore[arg-type]


def _run(runtime: Runtime, shard_id: int, runner: ShardRunner | None = None) -> ShardStatus | None:
    with session_scope(runtime.engine) as session:
        record = transitions.run_record(session, shard_id)
    return (runner or ShardRunner(runtime)).run(record)


def test_a_rerouted_shard_whose_route_message_was_lost_is_routed_by_the_reaper(store_url: str, tmp_path: Path) -> None:
    """H5: a pending shard of a running job was never routed again."""
    runtime, sent = stub_runtime(store_url, worker=FAST)
    job_id = _job(runtime, tmp_path, rows_per_shard=10)
    route_job(runtime, job_id)
    first = shards(runtime, job_id)[0]
    with session_scope(runtime.engine) as session:
        claim = claims.claim_shard(session, first.id, "w:1:t", 60, "local")
        assert claim is not None and claims.reroute_shard(session, claim, "the pool broke")
    sent.clear()  # ... and its route_job message never arrived

    time.sleep(0.2)
    assert reap(runtime).rerouted == 1 and [r.job_id for r in sent.of("spotlane.route_job")] == [job_id]  # type: ignore[attr-defined]

    # While a router holds the job, the reaper sends nothing (no duplicate profiling).
    assert leases.take(runtime.engine, route_lease(job_id), "router:1:x", 60)
    sent.clear()
    assert reap(runtime).rerouted == 0 and sent.of("spotlane.route_job") == []
    leases.release(runtime.engine, route_lease(job_id), "router:1:x")
    route_job(runtime, job_id)
    assert shards(runtime, job_id)[0].status is ShardStatus.FAILED  # its only backend failed it: no backend left


def test_a_hand_back_that_died_half_way_is_completed_by_the_reaper(store_url: str, tmp_path: Path) -> None:
    """H5: a worker killed between 'preempted' and 'queued' left the shard preempted forever."""
    runtime, sent = stub_runtime(store_url, worker=FAST)
    job_id = _job(runtime, tmp_path, rows_per_shard=20)
    route_job(runtime, job_id)
    (shard,) = shards(runtime, job_id)
    with session_scope(runtime.engine) as session:
        claim = claims.claim_shard(session, shard.id, "w:1:t", 60, "local")
        assert claim is not None
        assert claims.end_shard(session, claim, ShardStatus.PREEMPTED, outcome=AttemptOutcome.PREEMPTED)
    sent.clear()

    time.sleep(0.2)
    report = reap(runtime)

    assert report.handed_back == 1
    (record,) = sent.of("spotlane.run_shard")
    assert ShardRunner(runtime).run(record) is ShardStatus.DONE  # type: ignore[arg-type]
    assert finalize_job(runtime, job_id) is JobStatus.SUCCEEDED


def test_routing_queues_the_first_shard_after_reading_only_its_rows(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """M14: route_job profiled (and tokenized) every row before queueing anything."""
    import pipeline.routing.router as router

    runtime, sent = stub_runtime(store_url)
    job_id = _job(runtime, tmp_path, rows=500, rows_per_shard=10)
    profiled: list[int] = []
    real = router.profile_rows
    monkeypatch.setattr(router, "profile_rows", lambda *a, **k: profiled.append(1) or real(*a, **k))
    at_first_send: list[int] = []
    record = runtime.send

    def send(name: str, message: object, queue: str) -> bool:
        if name == "spotlane.run_shard" and not at_first_send:
            at_first_send.append(len(profiled))
        return record(name, message, queue)  # type: ignore[arg-type]

    runtime.send = send  # type: ignore[method-assign]
    assert route_job(runtime, job_id) == 50
    assert at_first_send == [1] and len(profiled) == 50


def test_a_submit_whose_broker_is_down_still_records_one_job_the_reaper_routes(tmp_path: Path) -> None:
    """M8: the send raised after the commit; a scheduled run retried it into a second job."""
    from pipeline.tasks.scheduler import run_schedule

    runtime = Runtime.open(
        broker={"url": "redis://127.0.0.1:9/0"},
        worker=FAST,
        schedules=[
            {
                "name": "nightly",
                "cron": "0 2 * * *",
                "input": str(write_prompts(tmp_path / "in.parquet", 4)),
                "model": model_folder(tmp_path),
            }
        ],
    )

    job_id = _job(runtime, tmp_path, rows=4)  # no exception: the job is recorded
    report = run_schedule(runtime, "nightly")
    again = run_schedule(runtime, "nightly")

    assert job_row(runtime, job_id).status is JobStatus.PENDING
    assert report.status == "submitted" and report.job_id is not None
    assert again.job_id == report.job_id and not again.new
    with runtime.engine.connect() as conn:
        assert conn.exec_driver_sql("select count(*) from jobs").scalar_one() == 2
    sent: list[str] = []
    runtime.send = lambda name, record, queue: sent.append(record.job_id) or True  # type: ignore[method-assign,attr-defined]
    time.sleep(0.2)
    assert reap(runtime).rerouted == 2 and sorted(sent) == sorted([job_id, report.job_id])


@pytest.mark.parametrize("change", ["shorter", "same size, other rows"])
def test_an_object_store_input_changed_after_submit_fails_the_job_with_a_clear_error(
    store_url: str, s3_bucket: str, tmp_path: Path, change: str
) -> None:
    """M9: a shorter file made its shards hand themselves back forever (a model load each)."""
    import fsspec

    runtime, sent = stub_runtime(store_url, worker=FAST)
    fs, bucket = fsspec.core.url_to_fs(s3_bucket)
    url = f"{s3_bucket}/inputs/in.parquet"
    fs.put_file(str(write_prompts(tmp_path / "in.parquet", 20)), f"{bucket}/inputs/in.parquet")
    job_id = submit(runtime, JobRequest(url, model_folder(tmp_path), rows_per_shard=10))
    rows = 5 if change == "shorter" else 20
    fs.put_file(
        str(write_prompts(tmp_path / "other.parquet", rows, prompt=[f"another question {i}" for i in range(rows)])),
        f"{bucket}/inputs/in.parquet",
    )

    assert run_queued(runtime, job_id) is JobStatus.FAILED

    job = job_row(runtime, job_id)
    assert "changed since the job was submitted" in (job.error or "") and url in (job.error or "")
    assert [s.attempts for s in shards(runtime, job_id)] == [1, 1]  # one try each: no loop
    assert len(sent.of("spotlane.run_shard")) == 2  # nothing handed back and sent again


def test_a_local_input_is_copied_at_submit_so_changing_it_afterwards_changes_nothing(
    store_url: str, tmp_path: Path
) -> None:
    """First hours 6: a local file overwritten after submit was answered in place of the validated one."""
    runtime, _ = stub_runtime(store_url)
    path = write_prompts(tmp_path / "in.parquet", 20)
    job_id = submit(runtime, JobRequest(str(path), model_folder(tmp_path), rows_per_shard=10))
    write_prompts(path, 5, id=[f"other-{i}" for i in range(5)])  # the user regenerates the file ...
    path.unlink()  # ... or deletes it

    assert run_queued(runtime, job_id) is JobStatus.SUCCEEDED

    job = job_row(runtime, job_id)
    assert job.source_url == str(path) and job.input_url.startswith(runtime.storage.job_url(job_id, "hot"))
    from pipeline import api

    assert api.job_status(runtime, job_id).input_url == str(path)  # status shows what the user gave
    assert api.export_results(runtime, job_id, str(tmp_path / "out.parquet")).rows == 20


def test_a_hung_engine_stops_heartbeating_and_hands_its_shard_back(store_url: str, tmp_path: Path) -> None:
    """M13: the heartbeat thread renewed the lease whatever generate() was doing."""
    runtime, sent = stub_runtime(
        store_url,
        worker={
            "checkpoint_rows": 3,
            "stub_seconds_per_row": 1.0,
            "hang_min_seconds": 1.0,
            "hang_factor": 1.5,
            "heartbeat_seconds": 0.2,
            "lease_seconds": 5.0,
            "reap_interval_seconds": 1.0,
        },
    )
    job_id = _job(runtime, tmp_path, rows=6, rows_per_shard=6, max_tokens=8)
    route_job(runtime, job_id)
    (shard,) = shards(runtime, job_id)
    hung = threading.Event()
    stuck: list[ShardStatus | None] = []
    with session_scope(runtime.engine) as session:
        record = transitions.run_record(session, shard.id)
    thread = threading.Thread(target=lambda: stuck.append(ShardRunner(runtime, on_hung=hung.set).run(record)))
    sent.clear()
    thread.start()

    assert hung.wait(10)
    (again,) = shards(runtime, job_id)
    assert again.status is ShardStatus.QUEUED and again.rows_done == 0
    with session_scope(runtime.engine) as session:
        attempt = session.execute(select(ShardAttempt)).scalar_one()
        assert attempt.outcome is AttemptOutcome.LOST and "engine hung" in (attempt.error or "")
    (resend,) = sent.of("spotlane.run_shard")
    thread.join()
    assert stuck == [None]  # the stuck chunk came back late: its fenced commit was refused
    fast, _ = stub_runtime(store_url)
    assert ShardRunner(fast).run(resend) is ShardStatus.DONE  # type: ignore[arg-type]


def test_a_storage_or_database_blip_at_a_checkpoint_is_retried(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """M2: one ENOSPC or one dropped connection failed the shard for good."""
    runtime, _ = stub_runtime(store_url, worker={"checkpoint_rows": 5})
    job_id = _job(runtime, tmp_path, rows=20, rows_per_shard=20)
    route_job(runtime, job_id)
    real_write, real_commit = checkpoint_module.write_parquet, claims.commit_checkpoint
    faults = {"write": 1, "commit": 1}

    def full_disk_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        if faults["write"]:
            faults["write"] -= 1
            raise TransientError("could not write part: [Errno 28] No space left on device")
        return real_write(*args, **kwargs)

    def dropped_connection_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        if faults["commit"]:
            faults["commit"] -= 1
            raise OperationalError("UPDATE shards", {}, Exception("server closed the connection unexpectedly"))
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "write_parquet", full_disk_once)
    monkeypatch.setattr(claims, "commit_checkpoint", dropped_connection_once)

    assert _run(runtime, shards(runtime, job_id)[0].id) is ShardStatus.DONE
    assert faults == {"write": 0, "commit": 0}
    assert finalize_job(runtime, job_id) is JobStatus.SUCCEEDED


def test_a_checkpoint_committed_whose_reply_was_lost_is_not_committed_or_charged_again(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server committed the checkpoint, then the connection dropped before its reply:
    the retry found its guard failed (rows_done had moved), took it for a lost lease,
    stopped the shard and charged the chunk a second time."""
    runtime, _ = stub_runtime(store_url, worker={"checkpoint_rows": 5})
    job_id = _job(runtime, tmp_path, rows=20, rows_per_shard=20)
    route_job(runtime, job_id)
    real_commit = claims.commit_checkpoint
    faults = {"reply": 1}

    def reply_lost_once(session, claim, stats, lease_seconds):  # type: ignore[no-untyped-def]
        if not faults["reply"]:
            return real_commit(session, claim, stats, lease_seconds)
        faults["reply"] -= 1
        with session_scope(runtime.engine) as own:  # the server's COMMIT went through ...
            real_commit(own, claim, stats, lease_seconds)
        raise OperationalError(
            "COMMIT", {}, Exception("server closed the connection unexpectedly")
        )  # ... its reply did not

    monkeypatch.setattr(claims, "commit_checkpoint", reply_lost_once)

    assert _run(runtime, shards(runtime, job_id)[0].id) is ShardStatus.DONE
    assert faults == {"reply": 0}
    (shard,) = shards(runtime, job_id)
    assert shard.attempts == 1 and shard.rows_done == 20
    with session_scope(runtime.engine) as session:
        parts = session.execute(select(func.count()).select_from(Checkpoint)).scalar_one()
        charges = session.execute(
            select(func.count()).select_from(CostLedgerEntry).where(CostLedgerEntry.kind == LedgerKind.CHARGE)
        ).scalar_one()
    assert parts == 4 and charges == 4  # one charge a part: none for the retried one
    assert finalize_job(runtime, job_id) is JobStatus.SUCCEEDED


def test_storage_that_stays_down_hands_the_shard_back_without_blaming_the_backend(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, sent = stub_runtime(store_url, worker={"checkpoint_rows": 5, "transient_retry_seconds": 0.5})
    job_id = _job(runtime, tmp_path, rows=20, rows_per_shard=20)
    route_job(runtime, job_id)

    def down(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise TransientError("could not write part: 503 SlowDown")

    monkeypatch.setattr(checkpoint_module, "write_parquet", down)
    sent.clear()

    assert _run(runtime, shards(runtime, job_id)[0].id) is ShardStatus.QUEUED

    (shard,) = shards(runtime, job_id)
    assert shard.status is ShardStatus.QUEUED and shard.backend == "local" and not shard.excluded_backends
    assert len(sent.of("spotlane.run_shard")) == 1
    with session_scope(runtime.engine) as session:
        attempt = session.execute(select(ShardAttempt)).scalar_one()
        assert attempt.outcome is AttemptOutcome.PREEMPTED and "transient fault" in (attempt.error or "")
        assert session.execute(select(BackendStats)).scalars().all() == []  # not counted against the pool
    assert isinstance(sent[0][1], RunShard) and not isinstance(sent[0][1], RouteJob)
