"""The batch lane on real processes: a worker killed (-9) after the provider created its
batch, before it learnt the batch's id, must not make anyone pay for a second one.

PostgreSQL, Redis, two ``spotlane worker`` processes one after the other, and the
test suite's Files + Batches server holding its answer to the create for a few
seconds after the batch exists: the first worker is killed inside that window. The
second worker's reaper takes the dead worker's shard back, its claim finds the
provider batch recorded as ``creating``, looks it up by its marker in the
provider's batch list and adopts it. The provider is asked for exactly one batch,
every row is answered once, and the key appears in no log and no SQL row.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import create_engine, text

from tests.support import spotlane, stop_process, write_prompts
from tests.support.openai_server import FakeOpenAI

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SECRET = "sk-batch-NEVER-IN-LOGS-0123456789"


@pytest.fixture
def provider() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(required_key=SECRET, create_delay=4.0, batch_delay=0.5) as server:
        yield server


def _worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "worker", "--loglevel", "INFO"],
        env={**os.environ, **env},
        stdout=open(log, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )


def _wait_ready(log: Path) -> None:
    deadline = time.monotonic() + 60
    while " ready." not in log.read_text():
        assert time.monotonic() < deadline, f"worker did not start: {log.read_text()[-2000:]}"
        time.sleep(0.2)


def test_a_worker_killed_between_creating_a_provider_batch_and_recording_it_never_pays_twice(
    postgres_url: str, redis_url: str, tmp_path: Path, provider: FakeOpenAI
) -> None:
    storage = {tier: (tmp_path / tier).as_uri() for tier in ("hot", "warm", "cold")}
    api = {
        "name": "prov",
        "base_url": provider.url,
        "api_key_env": "TEST_BATCH_KEY",
        "models": {"m": "remote-m"},
        "input_usd_per_1m": 10.0,
        "output_usd_per_1m": 10.0,
        "max_retries": 1,
        "batch": {"poll_seconds": 0.3},
    }
    env = {
        "SPOTLANE_DATABASE__URL": postgres_url,
        "SPOTLANE_BROKER__URL": redis_url,
        "SPOTLANE_STORAGE__HOT": storage["hot"],
        "SPOTLANE_STORAGE__WARM": storage["warm"],
        "SPOTLANE_STORAGE__COLD": storage["cold"],
        "SPOTLANE_GPU_POOLS": "[]",
        "SPOTLANE_API_PROVIDERS": json.dumps([api]),
        "SPOTLANE_WORKER__REAP_INTERVAL_SECONDS": "1",
        "SPOTLANE_WORKER__REQUEUE_AFTER_SECONDS": "2",
        "TEST_BATCH_KEY": SECRET,
    }
    assert spotlane("db", "upgrade", env=env).returncode == 0
    first = _worker(env, tmp_path / "first.log")
    second: subprocess.Popen[bytes] | None = None
    store = create_engine(postgres_url)
    try:
        _wait_ready(tmp_path / "first.log")
        path = write_prompts(tmp_path / "in.parquet", 30)
        submitted = spotlane("submit", str(path), "--model", "m", "--max-tokens", "8", env=env)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()

        deadline = time.monotonic() + 60
        while not provider.batches:  # the create reached the provider; its answer is held
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        with store.connect() as conn:
            recorded = conn.execute(text("select status, batch_id from provider_batches")).all()
        assert [tuple(r) for r in recorded] == [("creating", None)]  # created, never recorded

        second = _worker(env, tmp_path / "second.log")
        deadline = time.monotonic() + 120
        status = "pending"
        while time.monotonic() < deadline:
            with store.connect() as conn:
                status = conn.execute(text("select status from jobs where id = :id"), {"id": job_id}).scalar_one()
            if status in ("succeeded", "failed"):
                break
            time.sleep(0.3)
        log = (tmp_path / "second.log").read_text()
        assert status == "succeeded", log[-4000:]
    finally:
        for worker in (first, second):
            if worker is not None:
                stop_process(worker)

    assert len(provider.batches) == 1, "a second provider batch was created"
    with store.connect() as conn:
        recorded = conn.execute(text("select status, batch_id, attempt from provider_batches")).all()
        attempts = conn.execute(text("select attempt, outcome from shard_attempts order by attempt")).all()
        result_url = conn.execute(text("select result_url from jobs where id = :id"), {"id": job_id}).scalar_one()
        dump = "\n".join(
            str(row)
            for table in ("jobs", "shards", "shard_attempts", "provider_batches", "cost_ledger", "checkpoints")
            for row in conn.execute(text(f"select * from {table}"))
        )
    store.dispose()
    assert [tuple(r) for r in recorded] == [("collected", "batch_1", 2)]  # adopted by the second attempt
    assert [(a, o) for a, o in attempts] == [(1, "lost"), (2, "done")]
    table = pq.read_table(result_url.removeprefix("file://"))
    assert table.column("id").to_pylist() == [f"row-{i:05d}" for i in range(30)]
    assert set(table.column("backend").to_pylist()) == {"prov.batch"}
    assert SECRET not in dump
    for name in ("first.log", "second.log"):
        assert SECRET not in (tmp_path / name).read_text()
