"""The storage lifecycle over real jobs: warm -> cold moves, checkpoint cleanup,
retention, crash recovery, and results readable by pyarrow and duckdb.

Jobs are run in-process (submit, route, the real shard runner, the finalizer) on
the tiny model; storage tiers are local folders or buckets on the S3 server; the
job store is SQLite or PostgreSQL. The sweep's clock is injected.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from fsspec.core import url_to_fs
from sqlalchemy import select, update

from pipeline import api
from pipeline.jobs.control import resume
from pipeline.jobs.submit import JobRequest, submit
from pipeline.routing.router import route_job
from pipeline.runtime import Runtime
from pipeline.storage import lifecycle, moving
from pipeline.storage.objects import MANIFEST, sha256_of
from pipeline.store import claims
from pipeline.store.db import session_scope
from pipeline.tasks.finalize import finalize_job
from schemas.errors import StoreError
from schemas.records import RunShard
from schemas.status import ActionStatus, JobStatus
from schemas.tables import Job, Shard, StorageAction
from tests.support import spotlane, write_prompts
from tests.support.jobs import job_row
from workers.runner import ShardRunner


def _runtime(store_url: str, root: str, **storage: Any) -> Runtime:
    from pipeline.store import db

    if not store_url.startswith("sqlite"):
        db.upgrade(db.engine_for(store_url))
    tiers = {tier: f"{root}/{tier}" for tier in ("hot", "warm", "cold")}
    return Runtime.open(
        database={"url": store_url},
        storage={**tiers, **storage},
        worker={"checkpoint_rows": 5, "checkpoint_max_rows": 5},
    )


def _finished_job(runtime: Runtime, tmp_path: Path, tiny_model: Path, rows: int = 24) -> str:
    """A real job run to the end in this process: parts in hot, results in warm."""
    job_id = submit(
        runtime,
        JobRequest(
            str(write_prompts(tmp_path / f"in-{rows}.parquet", rows)), str(tiny_model), rows_per_shard=10, max_tokens=3
        ),
    )
    route_job(runtime, job_id)
    runner = ShardRunner(runtime, wid="lifecycle-test")
    with session_scope(runtime.engine) as session:
        shards = [(s.id, s.backend) for s in session.execute(select(Shard).where(Shard.job_id == job_id)).scalars()]
    for shard_id, backend in shards:
        runner.run(RunShard(job_id=job_id, shard_id=shard_id, backend=backend or "local"))
    assert finalize_job(runtime, job_id) in (JobStatus.SUCCEEDED, None)
    assert api.job_status(runtime, job_id).status == "succeeded"
    return job_id


_job = job_row


def _results(runtime: Runtime, job_id: str) -> str:
    """Where SQL says the job's results are now."""
    url = _job(runtime, job_id).result_url
    assert url is not None
    return url


def _in_cold(runtime: Runtime, warm_url: str) -> str:
    """Where the lifecycle moves a warm results folder to."""
    return runtime.storage.tier("cold") + warm_url[len(runtime.storage.tier("warm")) :]


def _exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    fs.invalidate_cache()
    return bool(fs.exists(path))


def _actions(runtime: Runtime, job_id: str) -> list[tuple[str, str]]:
    with session_scope(runtime.engine) as session:
        return [
            (a.action.value, a.status.value)
            for a in session.execute(
                select(StorageAction).where(StorageAction.job_id == job_id).order_by(StorageAction.id)
            ).scalars()
        ]


def _verify_against_manifest(url: str) -> int:
    manifest = json.loads(url_to_fs(f"{url}/{MANIFEST}")[0].cat_file(url_to_fs(f"{url}/{MANIFEST}")[1]))
    for entry in manifest["files"]:
        assert sha256_of(f"{url}/{entry['name']}") == entry["sha256"]
    return int(manifest["rows"])


def test_results_age_from_warm_to_cold_to_deleted_and_sql_always_points_at_them(
    store_url: str, tier_root: str, tmp_path: Path, tiny_model: Path
) -> None:
    s3 = tier_root.startswith("s3://")
    runtime = _runtime(
        store_url,
        tier_root,
        cold_after_days=30,
        retention_days=90,
        checkpoint_grace_hours=24,
        **(
            {
                "hot_storage_class": "REDUCED_REDUNDANCY",
                "warm_storage_class": "ONEZONE_IA",
                "cold_storage_class": "STANDARD_IA",
            }
            if s3
            else {}
        ),
    )
    job_id = _finished_job(runtime, tmp_path, tiny_model)
    if s3:  # every tier's objects carry its class: parts in hot, results and manifest in warm
        for tier, cls in (("hot", "REDUCED_REDUNDANCY"), ("warm", "ONEZONE_IA")):
            fs, root = url_to_fs(runtime.storage.job_url(job_id, tier))
            fs.invalidate_cache()
            assert {fs.info(p)["StorageClass"] for p in fs.find(root)} == {cls}, tier
    ended = _job(runtime, job_id).finished_at
    assert ended is not None
    warm_results = _results(runtime, job_id)
    assert warm_results.startswith(runtime.storage.job_url(job_id, "warm") + "/results-")
    assert _exists(runtime.storage.checkpoints_url(job_id))

    # Within every grace period: nothing happens.
    assert lifecycle.sweep(runtime, now=ended + timedelta(hours=1)).actions == []

    # After the checkpoint grace: parts go, results stay in warm, the job can no longer resume.
    report = lifecycle.sweep(runtime, now=ended + timedelta(hours=25))
    assert [(a.action, a.status) for a in report.actions] == [("purge_checkpoints", "done")]
    assert report.actions[0].files == 5  # shards of 10, 10 and 4 rows in parts of at most 5: 2 + 2 + 1
    assert not _exists(runtime.storage.checkpoints_url(job_id))
    assert _job(runtime, job_id).checkpoints_purged_at is not None
    assert _verify_against_manifest(warm_results) == 24

    # A dry run says what it would move, and moves nothing.
    plan = lifecycle.sweep(runtime, now=ended + timedelta(days=31), dry_run=True)
    assert [(a.action, a.status) for a in plan.actions] == [("move_to_cold", "planned")]
    assert plan.actions[0].files == 2 and plan.actions[0].bytes > 0  # one result file + the manifest
    assert _job(runtime, job_id).result_tier == "warm" and _exists(warm_results)

    # After cold_after_days: copied, verified, switched in SQL, warm deleted.
    report = lifecycle.sweep(runtime, now=ended + timedelta(days=31))
    assert [(a.action, a.status) for a in report.actions] == [("move_to_cold", "done")]
    cold_results = _in_cold(runtime, warm_results)
    job = _job(runtime, job_id)
    assert (job.result_url, job.result_tier) == (cold_results, "cold")
    assert not _exists(runtime.storage.job_url(job_id, "warm"))
    assert _verify_against_manifest(cold_results) == 24
    info = api.results(runtime, job_id)
    assert info.tier == "cold" and all(u.startswith(cold_results) for u in info.files)
    assert api.export_results(runtime, job_id, str(tmp_path / "export.parquet")).rows == 24

    # Readable where it lies, as a dataset (the manifest's leading '_' keeps it out).
    fs, path = url_to_fs(cold_results)
    table = ds.dataset(path, filesystem=fs, format="parquet").to_table()
    assert sorted(table.column("id").to_pylist()) == [f"row-{i:05d}" for i in range(24)]
    if s3:
        fs.invalidate_cache()
        assert {fs.info(p)["StorageClass"] for p in fs.find(path)} == {"STANDARD_IA"}
    else:
        count, distinct = duckdb.sql(
            f"select count(*), count(distinct id) from read_parquet('{path}/*.parquet')"
        ).fetchall()[0]
        assert (count, distinct) == (24, 24)
        assert pq.read_table(path).num_rows == 24

    # Past retention: everything of the job goes, and SQL and the CLI say so.
    report = lifecycle.sweep(runtime, now=ended + timedelta(days=91))
    assert [(a.action, a.status) for a in report.actions] == [("delete_results", "done")]
    job = _job(runtime, job_id)
    assert (job.result_url, job.result_tier) == (None, "deleted") and job.results_deleted_at is not None
    for tier in ("hot", "warm", "cold"):
        assert not _exists(runtime.storage.job_url(job_id, tier))  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="deleted .*retention_days"):
        api.results(runtime, job_id)
    assert _actions(runtime, job_id) == [
        ("purge_checkpoints", "done"),
        ("move_to_cold", "done"),
        ("delete_results", "done"),
    ]
    assert lifecycle.sweep(runtime, now=ended + timedelta(days=200)).actions == []


def test_a_failed_job_resumes_within_the_grace_and_is_refused_after_the_purge(
    runtime: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    job_id = _finished_job(runtime, tmp_path, tiny_model, rows=6)
    with session_scope(runtime.engine) as session:
        session.get(Job, job_id).status = JobStatus.FAILED  # type: ignore[union-attr]
    ended = _job(runtime, job_id).finished_at
    assert ended is not None
    lifecycle.sweep(runtime, now=ended + timedelta(hours=25))
    with pytest.raises(StoreError, match="checkpoints were deleted"):
        resume(runtime, job_id)
    assert _job(runtime, job_id).status is JobStatus.FAILED


def test_a_sweep_leaves_what_its_time_budget_cannot_cover_to_the_next(
    store_url: str, tmp_path: Path, tiny_model: Path
) -> None:
    runtime = _runtime(store_url, (tmp_path / "tiers").as_uri(), sweep_max_seconds=1e-9)
    jobs = [_finished_job(runtime, tmp_path, tiny_model, rows=rows) for rows in (4, 6)]
    later = max(_job(runtime, j).finished_at for j in jobs) + timedelta(hours=25)  # type: ignore[type-var]
    first = lifecycle.sweep(runtime, now=later)
    assert (len(first.actions), first.deferred) == (1, 1)
    second = lifecycle.sweep(runtime, now=later)
    assert (len(second.actions), second.deferred) == (1, 0)
    assert {a.job_id for a in first.actions + second.actions} == set(jobs)
    assert all(_job(runtime, j).checkpoints_purged_at is not None for j in jobs)


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing records it."""


def test_a_crash_mid_move_loses_nothing_and_the_next_sweep_completes_it(
    store_url: str, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = _runtime(store_url, (tmp_path / "tiers").as_uri())
    job_id = _finished_job(runtime, tmp_path, tiny_model)
    ended = _job(runtime, job_id).finished_at
    assert ended is not None
    later = ended + timedelta(days=31)
    warm = _results(runtime, job_id)

    # 1. Dies after copying the first file: SQL still points at the intact warm copy.
    real_copy = moving.copy_file
    copies: list[str] = []

    def copy_then_die(source: str, target: str, storage_class: str = "") -> tuple[int, str]:
        result = real_copy(source, target, storage_class)
        copies.append(target)
        if len(copies) == 1:
            raise Crash()
        return result

    monkeypatch.setattr(moving, "copy_file", copy_then_die)
    with pytest.raises(Crash):
        lifecycle.sweep(runtime, now=later)
    assert _actions(runtime, job_id)[-1] == ("move_to_cold", "started")
    assert _job(runtime, job_id).result_url == warm
    assert _verify_against_manifest(warm) == 24
    assert api.export_results(runtime, job_id, str(tmp_path / "during.parquet")).rows == 24

    # 2. The next sweep finishes it, then dies after switching SQL, before deleting warm.
    monkeypatch.setattr(moving, "copy_file", real_copy)
    real_remove = lifecycle.remove_tree

    def die_before_delete(url: str) -> None:
        raise Crash()

    monkeypatch.setattr(lifecycle, "remove_tree", die_before_delete)
    monkeypatch.setattr(moving, "remove_tree", die_before_delete)
    with pytest.raises(Crash):
        lifecycle.sweep(runtime, now=later)
    cold = _in_cold(runtime, warm)
    assert _job(runtime, job_id).result_url == cold
    assert _exists(warm) and _verify_against_manifest(cold) == 24

    # 3. A normal sweep deletes the warm copy and closes the action: one move, done.
    monkeypatch.setattr(lifecycle, "remove_tree", real_remove)
    monkeypatch.setattr(moving, "remove_tree", real_remove)
    report = lifecycle.sweep(runtime, now=later)
    assert ("move_to_cold", "done") in [(a.action, a.status) for a in report.actions]
    assert not _exists(runtime.storage.job_url(job_id, "warm"))
    assert [a for a in _actions(runtime, job_id) if a[0] == "move_to_cold"] == [("move_to_cold", "done")]
    assert api.export_results(runtime, job_id, str(tmp_path / "after.parquet")).rows == 24


def test_a_damaged_warm_file_is_reported_not_archived(tier_root: str, tmp_path: Path, tiny_model: Path) -> None:
    """Streamed (local) or copied server-side (S3), a copy that does not match the
    manifest stops the move: SQL keeps pointing at warm, nothing is deleted."""
    runtime = _runtime(f"sqlite:///{tmp_path / 'store.db'}", tier_root)
    job_id = _finished_job(runtime, tmp_path, tiny_model)
    ended = _job(runtime, job_id).finished_at
    assert ended is not None
    warm = _results(runtime, job_id)
    fs, part = url_to_fs(f"{warm}/part-00000.parquet")
    data = bytearray(fs.cat_file(part))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(part, bytes(data))

    report = lifecycle.sweep(runtime, now=ended + timedelta(days=31))
    moves = [a for a in report.actions if a.action == "move_to_cold"]
    assert [a.status for a in moves] == ["failed"]
    assert "part-00000.parquet does not match its manifest" in (moves[0].error or "")
    job = _job(runtime, job_id)
    assert (job.result_url, job.result_tier) == (warm, "warm")
    with session_scope(runtime.engine) as session:
        action = session.execute(select(StorageAction).where(StorageAction.action == "move_to_cold")).scalar_one()
        assert action.status is ActionStatus.FAILED and "does not match" in (action.error or "")
    assert _exists(f"{warm}/part-00000.parquet") and _exists(f"{warm}/{MANIFEST}")
    # It stays failed (and reported) on every sweep until someone looks at it.
    assert [
        a.status for a in lifecycle.sweep(runtime, now=ended + timedelta(days=32)).actions if a.action == "move_to_cold"
    ] == ["failed"]


def test_storage_sweep_command_dry_run_then_sweep(tmp_path: Path, tiny_model: Path) -> None:
    env = {"SPOTLANE_STORAGE__COLD_AFTER_DAYS": "0.00001", "SPOTLANE_STORAGE__CHECKPOINT_GRACE_HOURS": "0"}
    prompts = write_prompts(tmp_path / "in.parquet", 8)
    done = spotlane("run", str(prompts), "--model", str(tiny_model), "--max-tokens", "2", env=env)
    assert done.returncode == 0, done.stderr
    runtime = Runtime.open()
    with session_scope(runtime.engine) as session:
        job_id = session.execute(select(Job.id)).scalar_one()

    dry = spotlane("storage", "sweep", "--dry-run", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    planned = {(a["action"], a["status"]) for a in json.loads(dry.stdout)["actions"]}
    assert planned == {("move_to_cold", "planned"), ("purge_checkpoints", "planned")}
    assert _job(runtime, job_id).result_tier == "warm"

    swept = spotlane("storage", "sweep", env=env)
    assert swept.returncode == 0, swept.stderr
    assert "move_to_cold" in swept.stdout and "purge_checkpoints" in swept.stdout
    shown = spotlane("results", job_id, env=env)
    assert shown.returncode == 0 and "(cold tier)" in shown.stdout
    assert spotlane("storage", "sweep", env=env).stdout.strip() == "nothing to do"


def test_one_sweep_at_a_time(store_url: str, tmp_path: Path, tiny_model: Path) -> None:
    from pipeline.store import leases

    runtime = _runtime(store_url, (tmp_path / "tiers").as_uri())
    job_id = _finished_job(runtime, tmp_path, tiny_model, rows=4)
    later = _job(runtime, job_id).finished_at + timedelta(days=31)  # type: ignore[operator]
    assert leases.take(runtime.engine, lifecycle.SWEEP_LEASE, "another-host:1", 60)
    held = lifecycle.sweep(runtime, now=later)
    assert held.locked and held.actions == []
    assert _job(runtime, job_id).result_tier == "warm"
    assert lifecycle.sweep(runtime, now=later, dry_run=True).actions  # a dry run reads, it needs no lease
    leases.release(runtime.engine, lifecycle.SWEEP_LEASE, "another-host:1")
    done = lifecycle.sweep(runtime, now=later)
    assert not done.locked and {(a.action, a.status) for a in done.actions} == {
        ("move_to_cold", "done"),
        ("purge_checkpoints", "done"),
    }
    # A holder that died: its lease runs out and the next sweep goes on.
    assert leases.take(runtime.engine, lifecycle.SWEEP_LEASE, "dead-host:1", -1)
    assert not lifecycle.sweep(runtime, now=later).locked


def test_results_with_the_old_manifest_name_are_still_read_and_moved(
    store_url: str, tmp_path: Path, tiny_model: Path
) -> None:
    runtime = _runtime(store_url, (tmp_path / "tiers").as_uri())
    job_id = _finished_job(runtime, tmp_path, tiny_model, rows=7)
    warm = Path(url_to_fs(_results(runtime, job_id))[1])
    (warm / MANIFEST).rename(warm / "manifest.json")  # as written before the rename
    assert api.results(runtime, job_id).manifest["rows"] == 7
    report = lifecycle.sweep(runtime, now=_job(runtime, job_id).finished_at + timedelta(days=31))  # type: ignore[operator]
    assert ("move_to_cold", "done") in {(a.action, a.status) for a in report.actions}
    info = api.results(runtime, job_id)
    assert info.tier == "cold" and info.manifest["rows"] == 7
    assert api.export_results(runtime, job_id, str(tmp_path / "old.parquet")).rows == 7


def test_a_result_version_written_during_a_move_is_not_deleted_with_the_copied_files(
    store_url: str, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = _runtime(store_url, (tmp_path / "tiers").as_uri())
    job_id = _finished_job(runtime, tmp_path, tiny_model, rows=5)
    warm_job = Path(url_to_fs(runtime.storage.job_url(job_id, "warm"))[1])
    moved = Path(url_to_fs(_results(runtime, job_id))[1])
    real = lifecycle.copy_verified

    def copy_then_a_retry_lands(*args: Any) -> tuple[int, int]:
        copied = real(*args)
        (warm_job / "results-v2").mkdir()
        (warm_job / "results-v2" / "part-00000.parquet").write_bytes(b"written after the copy listed the folder")
        return copied

    monkeypatch.setattr(lifecycle, "copy_verified", copy_then_a_retry_lands)
    lifecycle.sweep(runtime, now=_job(runtime, job_id).finished_at + timedelta(days=31))  # type: ignore[operator]
    assert _job(runtime, job_id).result_tier == "cold"
    assert moved.parent == warm_job and not moved.exists()
    assert (warm_job / "results-v2" / "part-00000.parquet").exists()


def test_a_failed_action_is_retried_a_few_times_then_left_for_a_person(
    store_url: str, tmp_path: Path, tiny_model: Path
) -> None:
    runtime = _runtime(store_url, (tmp_path / "tiers").as_uri())
    job_id = _finished_job(runtime, tmp_path, tiny_model, rows=5)
    part = Path(url_to_fs(f"{_results(runtime, job_id)}/part-00000.parquet")[1])
    part.write_bytes(part.read_bytes()[:-10])
    later = _job(runtime, job_id).finished_at + timedelta(days=31)  # type: ignore[operator]
    statuses = []
    for _ in range(lifecycle.MAX_ATTEMPTS + 1):
        report = lifecycle.sweep(runtime, now=later)
        statuses.append([a.status for a in report.actions if a.action == "move_to_cold"])
    assert statuses == [["failed"]] * lifecycle.MAX_ATTEMPTS + [[]]
    assert report.given_up == 1
    again = lifecycle.sweep(runtime, now=later, retry_failed=True)
    assert [a.status for a in again.actions if a.action == "move_to_cold"] == ["failed"]
    assert _job(runtime, job_id).result_tier == "warm"


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        ({"warm": "file:///data/r", "cold": "file:///data/r"}, "storage.warm .* and storage.cold .* must be separate"),
        ({"warm": "s3://b/r", "cold": "s3://b/r/cold"}, "must be separate places, neither inside the other"),
        ({"cold": "s3://key:secret@bucket/cold"}, "storage.cold carries a password"),
    ],
)
def test_tiers_that_would_lose_data_or_leak_a_secret_are_refused(tiers: dict[str, str], message: str) -> None:
    from schemas.errors import ConfigError
    from schemas.settings import load_settings

    with pytest.raises(ConfigError, match=message) as err:
        load_settings(storage=tiers)
    assert "secret" not in str(err.value).replace("carries a password", "")


def test_a_move_racing_a_resume_and_a_new_finalization_leaves_the_new_results_where_they_are(
    store_url: str, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review M7: the move's switch still matched (same URL string): the job pointed at the
    old, partial results in cold, and the sweep purged the resumed job's checkpoints."""
    from schemas.status import AttemptOutcome, ShardStatus
    from tests.support.jobs import model_folder, run_queued, shards, stub_runtime

    runtime, _ = stub_runtime(
        store_url,
        storage={t: (tmp_path / "tiers" / t).as_uri() for t in ("hot", "warm", "cold")},
        worker={"checkpoint_rows": 5},
    )
    job_id = submit(
        runtime, JobRequest(str(write_prompts(tmp_path / "in.parquet", 20)), model_folder(tmp_path), rows_per_shard=10)
    )
    route_job(runtime, job_id)
    first, second = shards(runtime, job_id)
    runner = ShardRunner(runtime)
    runner.run(RunShard(job_id=job_id, shard_id=first.id, backend="local", attempt=0))
    with session_scope(runtime.engine) as session:  # the second shard fails: the job finishes failed, 10 rows
        claim = claims.claim_shard(session, second.id, "w:1:t", 60, "local")
        assert claim is not None
        claims.end_shard(session, claim, ShardStatus.FAILED, outcome=AttemptOutcome.FAILED, error="boom")
    assert finalize_job(runtime, job_id) is JobStatus.FAILED
    failed_at = _job(runtime, job_id).finished_at
    assert failed_at is not None
    with session_scope(runtime.engine) as session:  # it failed 40 days ago: due to move and to purge
        session.execute(update(Job).where(Job.id == job_id).values(finished_at=failed_at - timedelta(days=40)))
    old = _job(runtime, job_id)
    real = lifecycle.copy_verified

    def copy_while_the_job_is_resumed(*args: Any) -> dict[str, int]:
        copied = real(*args)
        resume(runtime, job_id)
        assert run_queued(runtime, job_id) is JobStatus.SUCCEEDED  # finalized again, 20 rows
        return copied

    monkeypatch.setattr(lifecycle, "copy_verified", copy_while_the_job_is_resumed)
    report = lifecycle.sweep(runtime)
    monkeypatch.setattr(lifecycle, "copy_verified", real)

    moves = [a for a in report.actions if a.action == "move_to_cold"]
    assert [a.status for a in moves] == ["failed"] and "changed during the move" in (moves[0].error or "")
    job = _job(runtime, job_id)
    assert job.status is JobStatus.SUCCEEDED and job.result_tier == "warm" and job.result_url != old.result_url
    assert api.results(runtime, job_id).manifest["rows"] == 20
    assert job.checkpoints_purged_at is None  # it finished just now: its checkpoints are not due either
    assert ("purge_checkpoints", "done") not in [(a.action, a.status) for a in report.actions]

    # The next sweep retries the move, finds results that are not due yet, and leaves them.
    lifecycle.sweep(runtime)
    job = _job(runtime, job_id)
    assert job.result_tier == "warm" and api.export_results(runtime, job_id, str(tmp_path / "out.parquet")).rows == 20


def test_a_results_folder_still_being_written_is_neither_copied_nor_deleted(
    store_url: str, tmp_path: Path, tiny_model: Path
) -> None:
    """Review L11: a merge's finished part with no manifest yet was copied, 'verified'
    against itself and deleted from warm before the merge switched the job to it."""
    runtime = _runtime(store_url, (tmp_path / "tiers").as_uri())
    job_id = _finished_job(runtime, tmp_path, tiny_model, rows=5)
    warm_job = Path(url_to_fs(runtime.storage.job_url(job_id, "warm"))[1])
    writing = warm_job / "results-v2-0000abcd"
    writing.mkdir()
    (writing / "part-00000.parquet").write_bytes(b"a finished part of a merge whose manifest is not written yet")

    report = lifecycle.sweep(runtime, now=_job(runtime, job_id).finished_at + timedelta(days=31))  # type: ignore[operator]

    assert ("move_to_cold", "done") in {(a.action, a.status) for a in report.actions}
    assert (writing / "part-00000.parquet").exists()
    cold_job = Path(url_to_fs(runtime.storage.job_url(job_id, "cold"))[1])
    assert not (cold_job / "results-v2-0000abcd").exists()
    assert api.export_results(runtime, job_id, str(tmp_path / "out.parquet")).rows == 5
