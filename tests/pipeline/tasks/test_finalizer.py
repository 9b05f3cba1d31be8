"""Finalizing: one finalizer at a time, results that appear whole, merges that complete.

Review findings H2 (a slow finalizer got a concurrent twin that truncated its
files in place), L8 (a row group per checkpoint), M10 and L11 (retry merges:
memory per row, never retried, written in place).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import api
from pipeline.jobs.retry import _replace_rows, merge_retry, retry_errors
from pipeline.jobs.submit import JobRequest, submit
from pipeline.storage.objects import filesystem, sha256_of
from pipeline.store import leases, transitions
from pipeline.store.db import session_scope
from pipeline.tasks import finalize as finalizer
from pipeline.tasks.finalize import finalize_job, finalize_lease
from pipeline.tasks.reaper import reap
from schemas.status import JobStatus
from tests.support import write_prompts
from tests.support.jobs import job_row, model_folder, run_queued, stub_runtime
from workers.engines.stub import FAIL_MARKER


def _read_all(runtime, job_id: str) -> pa.Table:  # type: ignore[no-untyped-def]
    info = api.results(runtime, job_id)
    for entry in info.manifest["files"]:
        assert sha256_of(f"{info.url}/{entry['name']}") == entry["sha256"]
    return pa.concat_tables([pq.read_table(filesystem(url)[1]) for url in info.files])


def test_a_slow_finalizer_keeps_its_lease_and_no_second_one_starts(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """H2: the grace ran from updated_at, which a working finalizer never renewed; the
    reaper started a second one that truncated the first one's file in place."""
    runtime, sent = stub_runtime(
        store_url,
        worker={"checkpoint_rows": 10, "finalize_grace_seconds": 1.0, "requeue_after_seconds": 0.1},
        storage={"read_concurrency": 1},  # one part at a time: the finalizer stays slow
    )
    job_id = submit(
        runtime,
        JobRequest(str(write_prompts(tmp_path / "in.parquet", 200)), model_folder(tmp_path), rows_per_shard=200),
    )
    run_queued(runtime, job_id, finalize=False)
    real_read = pq.read_table

    def slow_read(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.1)  # object-store latency: 20 parts take 2 s, twice the lease
        return real_read(*args, **kwargs)

    monkeypatch.setattr(finalizer.pq, "read_table", slow_read)
    first: list[JobStatus | None] = []
    thread = threading.Thread(target=lambda: first.append(finalize_job(runtime, job_id)))
    thread.start()
    while job_row(runtime, job_id).status is not JobStatus.FINALIZING:
        time.sleep(0.01)
    time.sleep(1.5)  # past the lease: only renewals keep it

    sent.clear()
    assert reap(runtime).finalized == 0 and sent.of("spotlane.finalize_job") == []
    assert finalize_job(runtime, job_id) is None  # a duplicate message: the job is taken
    with pytest.raises(Exception, match="no results yet"):
        api.results(runtime, job_id)  # nothing half-written is visible
    thread.join()

    assert first == [JobStatus.SUCCEEDED]
    assert _read_all(runtime, job_id).column("id").to_pylist() == [f"row-{i:05d}" for i in range(200)]


def test_a_dead_finalizer_is_replaced_once_its_lease_runs_out(store_url: str, tmp_path: Path) -> None:
    runtime, sent = stub_runtime(store_url, worker={"checkpoint_rows": 10, "requeue_after_seconds": 0.1})
    job_id = submit(runtime, JobRequest(str(write_prompts(tmp_path / "in.parquet", 30)), model_folder(tmp_path)))
    run_queued(runtime, job_id, finalize=False)
    # A finalizer took the job, then its process was killed mid-write.
    assert leases.take(runtime.engine, finalize_lease(job_id), "control-0:7:dead", 0.2)
    with session_scope(runtime.engine) as session:
        assert transitions.start_finalizing(session, job_id)

    sent.clear()
    assert reap(runtime).finalized == 0  # its lease still runs
    time.sleep(0.3)
    assert reap(runtime).finalized == 1 and [r.job_id for r in sent.of("spotlane.finalize_job")] == [job_id]  # type: ignore[attr-defined]
    assert finalize_job(runtime, job_id) is JobStatus.SUCCEEDED
    assert _read_all(runtime, job_id).num_rows == 30


def test_every_finalization_writes_a_new_folder_and_results_have_large_row_groups(
    store_url: str, tmp_path: Path
) -> None:
    """L8: each 10-row checkpoint had become a row group of its own."""
    runtime, _ = stub_runtime(store_url, worker={"checkpoint_rows": 10})
    job_id = submit(
        runtime,
        JobRequest(str(write_prompts(tmp_path / "in.parquet", 300)), model_folder(tmp_path), rows_per_shard=100),
    )
    assert run_queued(runtime, job_id) is JobStatus.SUCCEEDED

    info = api.results(runtime, job_id)
    assert info.url.rsplit("/", 1)[1].startswith("results-")
    (only,) = info.files
    assert pq.ParquetFile(filesystem(only)[1]).metadata.num_row_groups == 1
    assert info.manifest["rows"] == 300 and info.manifest["input_identity"]["size"] > 0


def _parent_with_errors(runtime, tmp_path: Path) -> str:  # type: ignore[no-untyped-def]
    """A finished job whose rows 3 and 7 came back with an error a retry may cure (the engine failed them)."""
    messages = [[{"role": "user", "content": f"ticket {i}"}] for i in range(10)]
    for bad in (3, 7):
        messages[bad] = [{"role": "user", "content": f"ticket {bad} {FAIL_MARKER}"}]
    path = tmp_path / "chat.parquet"
    pq.write_table(
        pa.table({"id": [f"t{i}" for i in range(10)], "messages": messages, "team": list("abcdeabcde")}), path
    )
    job_id = submit(runtime, JobRequest(str(path), model_folder(tmp_path), rows_per_shard=5))
    assert run_queued(runtime, job_id) is JobStatus.SUCCEEDED_WITH_ERRORS
    return job_id


def test_a_merge_that_fails_is_completed_later_and_only_switches_what_it_merged_from(
    store_url: str, tmp_path: Path
) -> None:
    """M10: a merge that raised after the child was final was never tried again."""
    runtime, sent = stub_runtime(store_url, worker={"checkpoint_rows": 5, "requeue_after_seconds": 0.1})
    parent = _parent_with_errors(runtime, tmp_path)
    before = job_row(runtime, parent).result_url
    child, rows = retry_errors(runtime, parent)
    assert rows == 2
    part = filesystem(api.results(runtime, parent).files[0])
    moved_away = part[1] + ".away"
    part[0].mv(part[1], moved_away)  # the parent's results unreadable for a moment

    # The child's own results switch (its two rows fail again: nothing changed them); the merge fails.
    assert run_queued(runtime, child) is JobStatus.SUCCEEDED_WITH_ERRORS
    assert job_row(runtime, child).merged_at is None and job_row(runtime, parent).result_url == before
    part[0].mv(moved_away, part[1])
    time.sleep(0.2)
    sent.clear()
    assert reap(runtime).merges == 1 and [r.job_id for r in sent.of("spotlane.finalize_job")] == [child]  # type: ignore[attr-defined]
    assert finalize_job(runtime, child) is None  # the job is final: it completes the merge

    merged = job_row(runtime, parent)
    assert merged.result_url != before and "/results-v2-" in (merged.result_url or "")
    assert job_row(runtime, child).merged_at is not None
    info = api.results(runtime, parent)
    assert info.manifest["retry_job_id"] == child and info.manifest["previous_version_url"] == before
    table = _read_all(runtime, parent)
    assert table.column("id").to_pylist() == [f"t{i}" for i in range(10)]
    assert table.column("error").null_count == 8 and table.column("team").to_pylist() == list("abcdeabcde")
    assert merge_retry(runtime, child) is None  # done once: nothing more


def test_rows_are_replaced_by_id_in_one_vectorised_pass() -> None:
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(100_000)],
            "output": ["old"] * 100_000,
            "n": pa.array(range(100_000), pa.int64()),
        }
    )
    redone = pa.table(
        {"n": pa.array([7, 99_999], pa.int64()), "id": ["r99999", "r7"], "output": ["new-99999", "new-7"]}
    )

    merged = _replace_rows(table, redone)

    assert merged.schema == table.schema and merged.num_rows == 100_000
    assert merged.column("id").to_pylist() == table.column("id").to_pylist()
    assert merged.column("output")[7].as_py() == "new-7" and merged.column("output")[99_999].as_py() == "new-99999"
    assert merged.column("output").to_pylist().count("old") == 99_998
    assert _replace_rows(table, redone.slice(0, 0)) is table
