"""A part holds about ``checkpoint_seconds`` of work: a fast lane's parts grow (fewer
commits, fewer files for the finalizer), a slow lane's stay at ``checkpoint_rows``, and
either way every row is answered once; the finalizer reads parts many at a time and
writes them in input order."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from sqlalchemy import select

from pipeline.jobs.submit import JobRequest, submit
from pipeline.runtime import Runtime
from pipeline.store.db import session_scope
from schemas.settings import WorkerSettings
from schemas.status import JobStatus
from schemas.tables import Checkpoint, Shard
from tests.support import write_prompts
from tests.support.jobs import job_row, model_folder, run_queued, stub_runtime
from workers.feed import Feed


def _part_sizes(runtime: Runtime, job_id: str) -> list[list[int]]:
    """Each shard's committed parts' row counts, in input order."""
    with session_scope(runtime.engine) as session:
        rows = session.execute(
            select(Shard.shard_index, Checkpoint.row_count)
            .join(Shard, Shard.id == Checkpoint.shard_id)
            .where(Shard.job_id == job_id)
            .order_by(Shard.row_start, Checkpoint.first_row)
        ).all()
    sizes: dict[int, list[int]] = {}
    for index, count in rows:
        sizes.setdefault(index, []).append(count)
    return [sizes[i] for i in sorted(sizes)]


def test_the_next_chunk_is_sized_to_the_seconds_a_part_should_hold() -> None:
    settings = WorkerSettings(checkpoint_rows=100, checkpoint_seconds=10.0, checkpoint_max_rows=5000)
    feed = Feed(chunk_rows=100)
    feed.learn(100, 0.05, settings)  # 2,000 rows/s: 20,000 rows would be 10 s, but growth is 4x at most
    assert feed.chunk_rows == 400
    feed.learn(400, 0.2, settings)
    assert feed.chunk_rows == 1600
    feed.learn(1600, 0.8, settings)
    assert feed.chunk_rows == 5000  # the cap
    feed.learn(5000, 100.0, settings)  # the lane slowed down: 500 rows are 10 s now
    assert feed.chunk_rows == 500
    feed.learn(500, 1000.0, settings)  # never under checkpoint_rows
    assert feed.chunk_rows == 100
    feed.learn(0, 0.0, settings)  # nothing was committed: nothing learnt
    assert feed.chunk_rows == 100


def test_a_fast_lane_writes_few_large_parts_and_every_row_once(store_url: str, tmp_path: Path) -> None:
    runtime, _ = stub_runtime(
        store_url,
        worker={"checkpoint_rows": 10, "checkpoint_max_rows": 2000, "checkpoint_seconds": 10.0},
        jobs={"rows_per_shard": 1000},
    )
    job_id = submit(runtime, JobRequest(str(write_prompts(tmp_path / "in.parquet", 3000)), model_folder(tmp_path)))
    assert run_queued(runtime, job_id) is JobStatus.SUCCEEDED
    sizes = _part_sizes(runtime, job_id)
    # Grown 4x a part while the lane kept up (the second was read while the first ran).
    assert sizes[0][:5] == [10, 10, 40, 160, 640]
    assert all(len(s) <= 2 for s in sizes[1:])  # later shards start from what was learnt
    assert sum(map(len, sizes)) < 3000 / 10 / 20  # not a part every 10 rows
    out = pq.read_table(job_row(runtime, job_id).result_url).column("id").to_pylist()
    assert out == [f"row-{i:05d}" for i in range(3000)]  # each row once, in input order


def test_a_slow_lane_keeps_small_parts(store_url: str, tmp_path: Path) -> None:
    runtime, _ = stub_runtime(
        store_url,
        worker={
            "checkpoint_rows": 10,
            "checkpoint_max_rows": 2000,
            "checkpoint_seconds": 0.05,  # ten rows of this lane are already that much work
            "stub_seconds_per_row": 0.005,
        },
        jobs={"rows_per_shard": 60},
    )
    job_id = submit(runtime, JobRequest(str(write_prompts(tmp_path / "in.parquet", 60)), model_folder(tmp_path)))
    assert run_queued(runtime, job_id) is JobStatus.SUCCEEDED
    assert max(_part_sizes(runtime, job_id)[0]) <= 20


def test_parts_read_many_at_a_time_come_out_in_input_order(store_url: str, tmp_path: Path) -> None:
    results = {}
    for at_once in (1, 16):
        runtime, _ = stub_runtime(
            store_url,
            worker={"checkpoint_rows": 7},
            jobs={"rows_per_shard": 50},
            storage={
                "read_concurrency": at_once,
                **{t: (tmp_path / f"{at_once}" / t).as_uri() for t in ("hot", "warm", "cold")},
            },
        )
        data = write_prompts(tmp_path / "in.parquet", 400)
        job_id = submit(runtime, JobRequest(str(data), model_folder(tmp_path), use_cache=False))
        assert run_queued(runtime, job_id) is JobStatus.SUCCEEDED
        table = pq.read_table(job_row(runtime, job_id).result_url, columns=["id", "output", "finish_reason"])
        results[at_once] = table.to_pylist()
    assert [r["id"] for r in results[16]] == [f"row-{i:05d}" for i in range(400)]
    assert results[16] == results[1]


def test_a_worker_reads_on_from_shard_to_shard_and_shards_in_any_order_get_their_own_rows(
    store_url: str, tmp_path: Path
) -> None:
    """One runner keeps its reader of the input between shards: in order it reads on, out of
    order (or another job's input) it reopens; every shard gets exactly its own rows."""
    from pipeline.routing.router import route_job
    from pipeline.store.transitions import run_record
    from tests.support.jobs import shards
    from workers.runner import ShardRunner

    runtime, _ = stub_runtime(store_url, worker={"checkpoint_rows": 7}, jobs={"rows_per_shard": 40})
    data = write_prompts(tmp_path / "in.parquet", 400, row_group_size=150)
    job_id = submit(runtime, JobRequest(str(data), model_folder(tmp_path), use_cache=False))
    other = submit(runtime, JobRequest(str(write_prompts(tmp_path / "b.parquet", 40)), model_folder(tmp_path)))
    route_job(runtime, job_id)
    route_job(runtime, other)
    runner = ShardRunner(runtime)
    mine = {s.shard_index: s.id for s in shards(runtime, job_id)}
    theirs = [s.id for s in shards(runtime, other)]
    readers = set()
    for shard_id in [
        mine[0],
        mine[1],
        mine[5],
        mine[2],
        theirs[0],
        mine[3],
        mine[9],
        mine[4],
        mine[6],
        mine[7],
        mine[8],
    ]:
        with session_scope(runtime.engine) as session:
            record = run_record(session, shard_id)
        runner.run(record)
        readers.add(id(runner._reader))
    assert len(readers) == 3  # one per input, and one again after the other job's shard
    assert run_queued(runtime, job_id) is JobStatus.SUCCEEDED
    out = pq.read_table(job_row(runtime, job_id).result_url, columns=["id", "output"]).to_pylist()
    prompts = pq.read_table(data).to_pylist()
    assert [r["id"] for r in out] == [p["id"] for p in prompts]
    assert all(r["output"] == "stub: " + " ".join(p["prompt"].split()[:4]) for r, p in zip(out, prompts, strict=True))
