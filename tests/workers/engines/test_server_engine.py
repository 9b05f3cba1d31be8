"""A GPU pool on its own inference server (vLLM, SGLang, TGI as a sidecar), against a local
server with an inference server's manners: latency that grows with the requests in
flight, a health check that comes up late, a server that goes away mid-shard."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.jobs.submit import JobRequest, submit
from pipeline.routing.router import route_job
from pipeline.runtime import Runtime
from pipeline.store.db import session_scope
from pipeline.store.transitions import run_record
from schemas.backends import GpuPool
from schemas.errors import ProviderError
from schemas.status import JobStatus, LedgerKind, ShardStatus
from tests.support import write_prompts
from tests.support.jobs import job_row, ledger_sum, model_folder, run_queued, shards
from tests.support.openai_server import FakeOpenAI
from workers.engines.base import Request
from workers.engines.server import START_WINDOW, ServerEngine, health_url, wait_healthy
from workers.runner import ShardRunner


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    # 20 ms a request, and 1 ms more for every request in flight: a batch that fills up.
    with FakeOpenAI(latency=0.02, latency_per_in_flight=0.001) as fake:
        yield fake


def _pool(url: str, **extra: Any) -> GpuPool:
    return GpuPool(name="srv", engine="server", server_url=url, price_per_hour=36.0, **extra)


def test_the_window_grows_while_the_server_has_room_and_rows_are_priced_by_gpu_time(server: FakeOpenAI) -> None:
    engine = ServerEngine(_pool(server.url, server_max_concurrency=64), "m")
    try:
        done = engine.generate([Request(prompt=f"question {i}", max_tokens=8) for i in range(400)])
    finally:
        engine.close()
    assert all(c.error is None for c in done) and done[3].output == "echo: question 3"
    assert (
        engine.window > START_WINDOW * 1.5 and server.max_in_flight > START_WINDOW
    )  # it learnt to keep more in flight
    assert all(c.cost_usd is None and c.compute_seconds > 0 for c in done)  # the pool's hour, not tokens


def test_an_overloaded_server_halves_the_window(server: FakeOpenAI) -> None:
    engine = ServerEngine(_pool(server.url), "m")
    try:
        engine.generate([Request(prompt="warm up", max_tokens=4) for _ in range(100)])
        grown = engine.window
        server.script = [503] * (server.requests + 200)  # every next request refused: overloaded
        with pytest.raises(ProviderError, match="failed every request|stopped answering"):  # the shard moves on
            engine.generate([Request(prompt="again", max_tokens=4) for _ in range(20)])
    finally:
        engine.close()
    assert engine.window < grown / 2


def test_a_worker_takes_no_shard_until_its_server_is_healthy(server: FakeOpenAI, tmp_path: Path) -> None:
    assert health_url(server.url) == server.url.removesuffix("/v1") + "/health"
    server.healthy_at = time.monotonic() + 3600  # still loading its model
    assert not wait_healthy(server.url, 0.3, every=0.1)
    runtime = Runtime.open(gpu_pools=[_pool(server.url, server_start_seconds=0.3).model_dump()])
    job_id = submit(runtime, JobRequest(str(write_prompts(tmp_path / "in.parquet", 10)), model_folder(tmp_path)))
    route_job(runtime, job_id)
    (shard,) = shards(runtime, job_id)
    with session_scope(runtime.engine) as session:
        record = run_record(session, shard.id)
    assert ShardRunner(runtime).run(record) is None  # not claimed
    (shard,) = shards(runtime, job_id)
    assert shard.status is ShardStatus.QUEUED and shard.attempts == 0 and server.requests == 0

    server.healthy_at = time.monotonic()  # the model is loaded
    assert ShardRunner(runtime).run(record) is ShardStatus.DONE
    assert run_queued(runtime, job_id) is JobStatus.SUCCEEDED
    assert ledger_sum(runtime, job_id, LedgerKind.CHARGE) > 0  # GPU time at the pool's hourly price


def test_a_server_that_goes_away_mid_shard_keeps_what_it_committed_and_the_rest_moves_on(
    server: FakeOpenAI, tmp_path: Path
) -> None:
    server.down_after = 12  # the first chunk (10 rows) answered, then the server is gone
    runtime = Runtime.open(
        gpu_pools=[
            _pool(server.url, server_start_seconds=1.0).model_dump(),
            {"name": "local", "price_per_hour": 360.0},  # dearer: the router's second choice
        ],
        worker={"engine": "stub", "checkpoint_rows": 10},  # the in-process pool on the stub engine
    )
    path = write_prompts(tmp_path / "in.parquet", 30)
    job_id = submit(runtime, JobRequest(str(path), model_folder(tmp_path), rows_per_shard=30, max_tokens=4))

    assert run_queued(runtime, job_id) is JobStatus.SUCCEEDED
    job = job_row(runtime, job_id)
    assert job.result_url is not None
    backends = pq.read_table(job.result_url).column("backend").to_pylist()
    assert backends == ["srv"] * 10 + ["local"] * 20  # committed rows kept, the rest moved on
    (shard,) = shards(runtime, job_id)
    assert shard.excluded_backends == ["srv"]
