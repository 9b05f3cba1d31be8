"""Attacks on the newest changes (issue 19 and the scale pieces of issue 20).

- the transformers engine's shared-prefix path (``_shared_prefix``/``_generate_batch``) must
  give the same greedy tokens as running every row whole, for any mix of rows; a model
  with noisy weights is used so that a wrong cache shows up as a different answer (the
  seeded tiny model answers ``::::`` to nearly everything);
- the server engine reorders a chunk by prefix group and must answer in input order;
- ``stream`` generates in a thread while the next chunk is read: a stop drops the chunk
  read ahead, a failed read still hands over the chunk generated;
- parts grow to about ``checkpoint_seconds`` of work: every row once whatever stops, the
  budget never passed, a kill (or a hung engine) costs about one part;
- the finalizer reads parts many at a time: order kept, every check still loud, a lost
  lease still stops it;
- the reaper resends only as many stale queued shards per queue as the broker misses.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select, update

from pipeline.jobs.control import set_budget
from pipeline.jobs.submit import JobRequest, submit
from pipeline.routing.router import route_job
from pipeline.runtime import Runtime
from pipeline.storage.objects import filesystem
from pipeline.store import leases, transitions
from pipeline.store.db import session_scope
from pipeline.tasks import finalize as finalizer
from pipeline.tasks.finalize import finalize_job, finalize_lease
from pipeline.tasks.reaper import reap
from schemas.backends import GpuPool
from schemas.base import utcnow
from schemas.inference import Completion, Request
from schemas.status import JobStatus, LedgerKind, ShardStatus
from schemas.tables import Checkpoint, Shard
from tests.support import write_prompts
from tests.support.jobs import (
    drive_to_the_end,
    job_row,
    ledger_sum,
    model_folder,
    provider_runtime,
    run_queued,
    shards,
    stub_runtime,
)
from tests.support.openai_server import FakeOpenAI
from workers.drain import StopFlag
from workers.engines.base import stream
from workers.engines.batching import BatchItem, grouped_order, plan_batches, prefix_groups
from workers.engines.hf import HFEngine
from workers.engines.server import ServerEngine
from workers.engines.stub import StubEngine
from workers.runner import ShardRunner


@pytest.fixture
def store_url(spotlane_home: Path) -> str:
    """The embedded store: these attacks must stay inside the suite's time."""
    return f"sqlite:///{spotlane_home / 'spotlane.db'}"


# -- the shared-prefix path of the transformers engine ------------------------------------

SYSTEM = "You are reviewer 0. Read the text and answer in one short sentence. " * 4
OTHER_SYSTEM = "You are reviewer 1. Read the text and answer in one short sentence. " * 4
BLOCK = "the quick brown fox jumps over the lazy dog while the data pipeline runs. " * 4  # > PREFIX_CHARS
SCHEMA = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})


def _chat(system: str | None, user: str | None, **extra: Any) -> Request:
    messages = ([{"role": "system", "content": system}] if system is not None else []) + (
        [{"role": "user", "content": user}] if user is not None else []
    )
    return Request(messages=messages, **extra)


@pytest.fixture(scope="module")
def noisy_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's architecture and tokenizer with weights of a larger spread and a
    1,024-token context: its greedy answers differ from prompt to prompt, so a KV cache
    that is copied wrong (a position off, a padding column seen) changes the text."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("noisy") / "model"
    shutil.copytree(tiny_model, out)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    model.config.max_position_embeddings = 1024
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def noisy_engines(noisy_model: Path) -> tuple[HFEngine, HFEngine]:
    engines = HFEngine(str(noisy_model), device="cpu", prefix_reuse=False), HFEngine(str(noisy_model), device="cpu")
    engines[0].generate([_chat(SYSTEM, "warm up", max_tokens=2, response_schema=SCHEMA)])  # torch, the grammar
    return engines


def _same(before: Sequence[Completion], after: Sequence[Completion], rows: Sequence[Request]) -> list[int]:
    """The greedy rows whose answer differs."""
    return [
        i
        for i, (a, b, r) in enumerate(zip(before, after, rows, strict=True))
        if r.temperature == 0
        and (a.output, a.finish_reason, a.input_tokens, a.output_tokens, a.error)
        != (b.output, b.finish_reason, b.input_tokens, b.output_tokens, b.error)
    ]


def _odd_mix() -> list[Request]:
    return [
        _chat(SYSTEM, "q1", max_tokens=5),
        _chat(SYSTEM, None, max_tokens=7),  # a system prompt and no user message
        _chat(SYSTEM, "a longer second question about the ticket", max_tokens=2),
        _chat(SYSTEM, "", max_tokens=4),  # an empty user message
        _chat(SYSTEM, "y" * 6000, max_tokens=4),  # too long for the context, in the group
        _chat(SYSTEM, "q3", max_tokens=6, temperature=0.7),  # sampled, same opening
        _chat(SYSTEM, "q4", max_tokens=12, response_schema=SCHEMA),  # schema-bound, same opening
        _chat(SYSTEM, "q1", max_tokens=5),  # a duplicate row
        _chat(SYSTEM, "q1", max_tokens=1),  # the same prompt, a different limit
        Request(prompt=BLOCK, max_tokens=5),  # the shared opening is this whole prompt
        Request(prompt=BLOCK + "and one more clause", max_tokens=6),
        Request(prompt=BLOCK + "x" * 6000, max_tokens=3),  # the group's prompt, too long
        Request(prompt="", max_tokens=5),  # empty
        _chat(OTHER_SYSTEM, "the only row of its group", max_tokens=5),
        _chat(None, "no system message at all", max_tokens=4),
        _chat(SYSTEM, "q5 " * 40, max_tokens=9),
    ]


def test_the_shared_prefix_gives_the_same_tokens_on_an_odd_mix_of_rows(
    noisy_engines: tuple[HFEngine, HFEngine],
) -> None:
    whole, shared = noisy_engines
    rows = _odd_mix()
    reused = shared.prefill_reused
    before, after = whole.generate(rows), shared.generate(rows)
    assert _same(before, after, rows) == []
    assert shared.prefill_reused > reused  # the prefix path ran
    assert len({c.output for c in before if c.error is None}) >= 6  # the model tells prompts apart
    assert after[4].error and "prompt too long" in after[4].error
    assert after[11].error and "prompt too long" in after[11].error
    assert after[12].error == "prompt is empty"
    assert after[5].error is None and after[5].output_tokens > 0  # sampled: only that it ran
    assert [c.output_tokens <= r.max_tokens for c, r in zip(after, rows, strict=True)] == [True] * len(rows)


def test_the_shared_prefix_survives_micro_batches_split_by_a_small_token_budget(noisy_model: Path) -> None:
    """Groups cut into many micro-batches (and batches of one) by the token budget."""
    whole = HFEngine(str(noisy_model), device="cpu", prefix_reuse=False, token_budget=400, max_batch_rows=3)
    shared = HFEngine(str(noisy_model), device="cpu", token_budget=400, max_batch_rows=3)
    rng = random.Random(5)
    rows = [
        _chat(rng.choice([SYSTEM, OTHER_SYSTEM]), f"item {i} " * rng.randrange(0, 4), max_tokens=rng.choice([1, 4, 8]))
        for i in range(14)
    ]
    before, after = whole.generate(rows), shared.generate(rows)
    assert _same(before, after, rows) == []
    assert shared.prefill_reused > 0


def test_prefix_groups_and_plans_keep_every_row_exactly_once_for_any_mix() -> None:
    rng = random.Random(11)
    openings = [SYSTEM, OTHER_SYSTEM, None]
    for _ in range(30):
        rows: list[Request] = []
        for i in range(rng.randrange(0, 40)):
            kind = rng.randrange(5)
            if kind == 0:
                rows.append(_chat(rng.choice(openings), f"q{i}"))
            elif kind == 1:
                rows.append(Request(prompt=BLOCK + str(i)))
            elif kind == 2:
                rows.append(Request(prompt=""))
            elif kind == 3:
                rows.append(Request(messages=[]))
            else:
                rows.append(_chat(SYSTEM, None))
        order = grouped_order(rows)
        assert sorted(order) == list(range(len(rows)))
        keys = prefix_groups(rows)
        seen: list[str | None] = []
        for i in order:  # each group's rows back to back
            if keys[i] is not None and seen and seen[-1] != keys[i]:
                assert keys[i] not in seen
            seen.append(keys[i])
        items = [
            BatchItem(i, rng.randint(1, 60), rng.choice([1, 8]), rng.choice([0.0, 0.5]), None, keys[i])
            for i in range(len(rows))
        ]
        batches = plan_batches(items, token_budget=300, max_rows=4)
        assert sorted(it.index for b in batches for it in b) == list(range(len(rows)))
        assert all(len({(it.prefix, it.temperature) for it in b}) == 1 for b in batches)


# -- the server engine answers in input order ------------------------------------------------


def test_the_server_engine_answers_an_interleaved_chunk_in_input_order() -> None:
    rows = [
        _chat(SYSTEM, "alpha one"),
        _chat(None, "loner two"),
        _chat(OTHER_SYSTEM, "beta three"),
        _chat(SYSTEM, "alpha four", max_tokens=1),
        Request(prompt=BLOCK + "gamma five"),
        _chat(SYSTEM, None),  # system only: the last message is the system prompt
        Request(prompt=BLOCK + "gamma seven", max_tokens=2),
        _chat(OTHER_SYSTEM, "beta eight"),
        Request(prompt="short nine"),
    ]
    with FakeOpenAI(latency=0.0) as server:
        engine = ServerEngine(GpuPool(name="srv", engine="server", server_url=server.url), "m")
        try:
            done = engine.generate(rows)
            assert engine.generate([]) == []
        finally:
            engine.close()
    expected = []
    for r in rows:
        last = r.messages[-1]["content"] if r.messages else r.prompt
        expected.append("echo: " + " ".join(str(last).split()[: min(r.max_tokens, 5)]))
    assert [c.output for c in done] == expected


# -- stream: the next chunk read while one generates --------------------------------------


class _Recording(StubEngine):
    """The stub engine, recording the chunks it generated."""

    def __init__(self, seconds_per_row: float = 0.0) -> None:
        super().__init__("m", seconds_per_row)
        self.generated: list[str] = []

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        done = super().generate(requests)
        self.generated.append(requests[0].prompt if requests else "<empty>")  # type: ignore[arg-type]
        return done


def test_a_stop_while_the_second_chunk_generates_finishes_it_and_drops_the_third() -> None:
    stop = threading.Event()
    reads: list[int] = []

    class StopsOnSecond(_Recording):
        def generate(self, requests: Sequence[Request]) -> list[Completion]:
            if requests and requests[0].prompt == "c1":
                stop.set()
            return super().generate(requests)

    def chunks() -> Iterator[list[Request]]:
        for i in range(6):
            reads.append(i)
            yield [Request(prompt=f"c{i}")]

    engine = StopsOnSecond(0.01)
    out = [c[0].output for c in stream(engine, chunks(), stopped=stop.is_set)]
    assert out == ["stub: c0", "stub: c1"] and engine.generated == ["c0", "c1"]
    assert reads == [0, 1, 2]  # the third was read ahead, never started


def test_empty_chunks_and_a_failed_read_after_a_stop_still_hand_over_what_was_generated() -> None:
    stop = threading.Event()

    def chunks() -> Iterator[list[Request]]:
        yield []  # every row answered by the cache
        yield [Request(prompt="second")]
        stop.set()
        raise OSError("storage went away")

    got: list[list[str | None]] = []
    with pytest.raises(OSError, match="storage went away"):
        for completions in stream(_Recording(), chunks(), stopped=stop.is_set):
            got.append([c.output for c in completions])
    assert got == [[], ["stub: second"]]
    assert list(stream(_Recording(), iter([]))) == []


# -- parts that grow: every row once, the budget, what a kill costs --------------------------


def _parts(runtime: Runtime, job_id: str) -> list[tuple[int, int]]:
    with session_scope(runtime.engine) as session:
        return [
            (first, count)
            for first, count in session.execute(
                select(Checkpoint.first_row, Checkpoint.row_count)
                .join(Shard, Shard.id == Checkpoint.shard_id)
                .where(Shard.job_id == job_id)
                .order_by(Checkpoint.first_row)
            ).all()
        ]


def _ids(runtime: Runtime, job_id: str) -> list[str]:
    return pq.read_table(job_row(runtime, job_id).result_url, columns=["id"]).column("id").to_pylist()


def test_a_stop_mid_shard_with_grown_parts_then_a_resume_answers_every_row_once(tmp_path: Path, store_url: str) -> None:
    runtime, _ = stub_runtime(
        store_url,
        worker={
            "checkpoint_rows": 5,
            "checkpoint_max_rows": 500,
            "checkpoint_seconds": 0.2,
            "stub_seconds_per_row": 0.0005,
        },
        jobs={"rows_per_shard": 3000},
    )
    job_id = submit(runtime, JobRequest(str(write_prompts(tmp_path / "in.parquet", 3000)), model_folder(tmp_path)))
    route_job(runtime, job_id)
    (shard,) = shards(runtime, job_id)
    stop = StopFlag()

    def stop_once_grown() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            (now,) = shards(runtime, job_id)
            if now.rows_done >= 300:
                stop.set()  # a spot notice while a grown part generates and the next is read
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=stop_once_grown)
    watcher.start()
    with session_scope(runtime.engine) as session:
        record = transitions.run_record(session, shard.id)
    status = ShardRunner(runtime, stop=stop).run(record)
    watcher.join()
    (after,) = shards(runtime, job_id)
    assert status is ShardStatus.QUEUED and 300 <= after.rows_done < 3000
    assert max(count for _, count in _parts(runtime, job_id)) > 5  # parts had grown
    # Another worker, with parts of its own size, takes over from the last commit.
    other, _ = stub_runtime(store_url, worker={"checkpoint_rows": 7}, jobs={"rows_per_shard": 3000})
    assert run_queued(other, job_id) is JobStatus.SUCCEEDED
    parts = _parts(other, job_id)
    assert [first for first, _ in parts] == [0, *itertools.accumulate(count for _, count in parts[:-1])]
    assert _ids(other, job_id) == [f"row-{i:05d}" for i in range(3000)]


def _cached_then_new(tmp_path: Path, fast: Runtime, cached: int, new: int) -> str:
    """An input whose first ``cached`` rows a finished job already answered (the answer
    cache serves them), followed by ``new`` rows nobody asked."""

    def write(name: str, n: int) -> str:
        path = tmp_path / name
        pq.write_table(
            pa.table({"id": [f"r{i}" for i in range(n)], "prompt": [f"question number {i} please" for i in range(n)]}),
            path,
        )
        return str(path)

    first = submit(fast, JobRequest(write("seen.parquet", cached), model_folder(tmp_path)))
    assert run_queued(fast, first) is JobStatus.SUCCEEDED
    return write("more.parquet", cached + new)


_GROWING = {"checkpoint_rows": 5, "checkpoint_max_rows": 2000, "checkpoint_seconds": 0.1}


def test_a_part_after_cached_rows_holds_about_checkpoint_seconds_of_work(tmp_path: Path, store_url: str) -> None:
    """README: a kill costs at most one part, "about checkpoint_seconds" of work on a lane
    fast enough to grow its parts. Rows answered by the cache cost nothing, yet they are
    counted as work done by ``Feed.learn``: a resubmitted file with new rows appended grows
    its parts on the cached rows and then sends hundreds of rows in one part."""
    fast, _ = stub_runtime(store_url, worker=_GROWING, jobs={"rows_per_shard": 5000})
    slow, _ = stub_runtime(
        store_url,
        worker={**_GROWING, "checkpoint_seconds": 0.05, "stub_seconds_per_row": 0.0005},
        jobs={"rows_per_shard": 5000},
    )
    cached, new = 1000, 1000
    path = _cached_then_new(tmp_path, fast, cached, new)
    job_id = submit(slow, JobRequest(path, model_folder(tmp_path)))
    assert run_queued(slow, job_id) is JobStatus.SUCCEEDED
    assert _ids(slow, job_id) == [f"r{i}" for i in range(cached + new)]
    # 0.05 s of this lane's work is 100 new rows; allow four times that in one part.
    worst = max(max(0, first + count - max(first, cached)) for first, count in _parts(slow, job_id))
    assert worst <= 400, f"one part held {worst} rows the engine had to generate ({worst * 0.0005:.2f} s of work)"


def test_a_hung_hand_back_after_cached_rows_does_not_hang_the_next_attempt_too(tmp_path: Path, store_url: str) -> None:
    """The chunk size learnt on cached rows is carried to the next attempt (``_chunk_rows``
    per backend and model), and a chunk that hangs never commits, so nothing smaller is
    ever learnt: every attempt of the shard on this worker hangs at the same row."""
    fast, _ = stub_runtime(store_url, worker=_GROWING, jobs={"rows_per_shard": 5000})
    slow, _ = stub_runtime(
        store_url,
        worker={
            **_GROWING,
            "stub_seconds_per_row": 0.005,  # 0.1 s of work is 20 rows; a hang is 0.5 s without a commit
            "hang_min_seconds": 0.5,
            "hang_factor": 1.5,
            "heartbeat_seconds": 0.1,
            "lease_seconds": 5.0,
            "reap_interval_seconds": 1.0,
        },
        jobs={"rows_per_shard": 5000},
    )
    cached, new = 1000, 200
    path = _cached_then_new(tmp_path, fast, cached, new)
    job_id = submit(slow, JobRequest(path, model_folder(tmp_path)))
    route_job(slow, job_id)
    runner = ShardRunner(slow)
    outcomes = []
    for _ in range(3):
        (shard,) = shards(slow, job_id)
        if shard.status is not ShardStatus.QUEUED:
            break
        with session_scope(slow.engine) as session:
            record = transitions.run_record(session, shard.id)
        outcomes.append((runner.run(record), shard.rows_done))
    (shard,) = shards(slow, job_id)
    assert shard.status is ShardStatus.DONE, f"attempts (status, resumed at row): {outcomes}"


def test_a_budget_that_runs_out_while_parts_grow_is_never_passed(tmp_path: Path, store_url: str) -> None:
    with FakeOpenAI() as server:
        runtime = provider_runtime(
            store_url,
            server.url,
            usd_per_1m=1000.0,
            worker={"checkpoint_rows": 5, "checkpoint_max_rows": 400, "checkpoint_seconds": 10.0},
        )
        rows = 400
        path = write_prompts(tmp_path / "in.parquet", rows)
        budget = 4.0
        job_id = submit(
            runtime,
            JobRequest(str(path), "m", max_tokens=8, rows_per_shard=400, budget_usd=budget, use_cache=False),
        )
        highest = drive_to_the_end(runtime, job_id, budget)
        spent = ledger_sum(runtime, job_id, LedgerKind.CHARGE)
        assert highest <= budget + 1e-9 and spent <= budget + 1e-9
        parts = _parts(runtime, job_id)
        assert max(count for _, count in parts) > 5  # parts grew before the budget ran out
        done = sum(count for _, count in parts)
        assert 0 < done < rows
        assert server.ok == done  # nothing sent that was not committed
        job = job_row(runtime, job_id)
        assert job.status is JobStatus.PAUSED and "budget" in (job.error or "")
        (shard,) = shards(runtime, job_id)
        assert shard.status is ShardStatus.BLOCKED and shard.rows_done == done
        assert ledger_sum(runtime, job_id) == pytest.approx(spent)  # nothing left reserved

        assert set_budget(runtime, job_id, 50.0) == "running"
        assert drive_to_the_end(runtime, job_id, 50.0) <= 50.0 + 1e-9
        assert finalize_job(runtime, job_id) is JobStatus.SUCCEEDED
        assert server.ok == rows  # each row sent once
        assert _ids(runtime, job_id) == [f"row-{i:05d}" for i in range(rows)]


# -- the finalizer reading parts many at a time ----------------------------------------------


def _finished_parts(store_url: str, tmp_path: Path, at_once: int = 8) -> tuple[Runtime, str, list[Any]]:
    runtime, _ = stub_runtime(
        store_url,
        worker={"checkpoint_rows": 7},
        jobs={"rows_per_shard": 50},
        storage={"read_concurrency": at_once},
    )
    job_id = submit(runtime, JobRequest(str(write_prompts(tmp_path / "in.parquet", 200)), model_folder(tmp_path)))
    run_queued(runtime, job_id, finalize=False)
    with session_scope(runtime.engine) as session:
        parts = list(
            session.execute(
                select(Checkpoint.url, Checkpoint.first_row, Checkpoint.row_count)
                .join(Shard, Shard.id == Checkpoint.shard_id)
                .where(Shard.job_id == job_id)
                .order_by(Checkpoint.first_row)
            ).all()
        )
    assert len(parts) > 16
    return runtime, job_id, parts


def _no_results(runtime: Runtime, job_id: str) -> None:
    job = job_row(runtime, job_id)
    assert job.result_url is None


@pytest.mark.parametrize("damage", ["deleted", "truncated", "swapped"])
def test_a_damaged_part_read_ahead_fails_the_finalizer_loudly(tmp_path: Path, store_url: str, damage: str) -> None:
    runtime, job_id, parts = _finished_parts(store_url, tmp_path)
    fs, victim = filesystem(parts[13].url)
    if damage == "deleted":
        fs.rm(victim)
    elif damage == "truncated":
        data = fs.cat_file(victim)
        with fs.open(victim, "wb") as fh:
            fh.write(data[: len(data) // 2])
    else:  # two parts of one size trade files: right row counts, wrong ids
        other = next(p for p in parts[14:] if p.row_count == parts[13].row_count)
        _, there = filesystem(other.url)
        a, b = fs.cat_file(victim), fs.cat_file(there)
        fs.pipe_file(victim, b)
        fs.pipe_file(there, a)
    assert finalize_job(runtime, job_id) is JobStatus.FAILED
    job = job_row(runtime, job_id)
    assert job.status is JobStatus.FAILED and "writing results failed" in (job.error or "")
    if damage == "swapped":
        assert "ids do not match" in (job.error or "")
    _no_results(runtime, job_id)


def test_a_finalizer_that_loses_its_lease_while_parts_are_read_ahead_stops(
    tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, job_id, parts = _finished_parts(store_url, tmp_path)
    runtime.settings.worker.finalize_grace_seconds = 0.4
    stalled, go = threading.Event(), threading.Event()
    real_read = pq.read_table
    reads: list[str] = []

    def read(source: Any, *args: Any, **kwargs: Any) -> pa.Table:  # object storage that stalls on one part
        name = getattr(source, "path", None) or getattr(source, "name", "")
        reads.append(str(name))
        if len(reads) == 3:
            stalled.set()
            go.wait(10)
        return real_read(source, *args, **kwargs)

    monkeypatch.setattr(finalizer.pq, "read_table", read)
    result: list[JobStatus | None] = []
    thread = threading.Thread(target=lambda: result.append(finalize_job(runtime, job_id)))
    thread.start()
    assert stalled.wait(10)
    time.sleep(0.6)  # past its lease
    assert leases.take(runtime.engine, finalize_lease(job_id), "control-1:1:other", 30)  # another finalizer
    go.set()
    thread.join(20)
    assert result == [None]
    job = job_row(runtime, job_id)
    assert job.status is JobStatus.FINALIZING and job.result_url is None
    assert not list(runtime.settings.home.rglob("results-*")), "the lost finalizer's folder was left behind"


def test_parts_read_far_ahead_still_come_out_in_input_order(tmp_path: Path, store_url: str) -> None:
    runtime, job_id, parts = _finished_parts(store_url, tmp_path, at_once=64)  # more than there are parts
    assert finalize_job(runtime, job_id) is JobStatus.SUCCEEDED
    assert _ids(runtime, job_id) == [f"row-{i:05d}" for i in range(200)]


# -- the reaper resends only what the broker misses -------------------------------------------


def _broker_messages(runtime: Runtime) -> list[Path]:
    return sorted((runtime.settings.broker_folder / "queue").glob("*gpu.local.msg"))


def test_the_reaper_resends_only_the_oldest_stale_shards_the_broker_misses(tmp_path: Path, store_url: str) -> None:
    runtime, sent = stub_runtime(store_url, deliver=True, worker={"requeue_after_seconds": 60})
    job_id = submit(
        runtime,
        JobRequest(str(write_prompts(tmp_path / "in.parquet", 60)), model_folder(tmp_path), rows_per_shard=10),
    )
    route_job(runtime, job_id)
    ids = [s.id for s in shards(runtime, job_id) if s.status is ShardStatus.QUEUED]
    assert len(ids) == 6  # no budget: the router queues every shard
    now = utcnow()
    with session_scope(runtime.engine) as session:  # all but the newest are stale, oldest first
        for age, shard_id in enumerate(reversed(ids[:-1]), start=1):
            session.execute(update(Shard).where(Shard.id == shard_id).values(queued_at=now - timedelta(hours=age)))
    before = _broker_messages(runtime)
    assert len(before) >= len(ids)
    assert reap(runtime).resent == 0  # every message is there: a long queue is not resent
    for lost in _broker_messages(runtime)[:2]:
        lost.unlink()  # the broker loses two messages
    sent.clear()
    first = reap(runtime)
    assert first.resent == 2
    resent = [r.shard_id for r in sent.of("spotlane.run_shard")]  # type: ignore[attr-defined]
    assert resent == ids[:2]  # the two oldest stale shards
    assert reap(runtime).resent == 0  # the broker has as many as SQL again
