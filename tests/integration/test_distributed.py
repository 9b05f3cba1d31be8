"""Distributed mode: Redis broker, PostgreSQL job store, S3 storage, several workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from sqlalchemy import create_engine, text

from pipeline.jobs.submit import JobRequest, submit
from pipeline.routing.router import route_job
from pipeline.runtime import Runtime
from pipeline.store.db import session_scope
from schemas.records import RunShard
from schemas.tables import Shard
from tests.support import PrivateRedis, race, spotlane, stop_process, write_prompts
from workers.runner import ShardRunner

pytestmark = [pytest.mark.postgres]


@pytest.fixture
def distributed_env(postgres_url: str, redis_url: str, s3_bucket: str) -> dict[str, str]:
    """Settings of a distributed deployment, as environment variables (what compose sets)."""
    return {
        "SPOTLANE_DATABASE__URL": postgres_url,
        "SPOTLANE_BROKER__URL": redis_url,
        "SPOTLANE_STORAGE__HOT": f"{s3_bucket}/hot",
        "SPOTLANE_STORAGE__WARM": f"{s3_bucket}/warm",
        "SPOTLANE_STORAGE__COLD": f"{s3_bucket}/cold",
    }


def _upload(local: Path, url: str) -> str:
    fs, path = fsspec.core.url_to_fs(url)
    fs.put_file(str(local), path)
    return url


def test_the_same_task_delivered_twice_at_once_runs_once(
    distributed_env: dict[str, str], tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in distributed_env.items():
        monkeypatch.setenv(key, value)
    assert subprocess.run([sys.executable, "-m", "pipeline.cli", "db", "upgrade"], capture_output=True).returncode == 0
    runtime = Runtime.open()
    bucket = distributed_env["SPOTLANE_STORAGE__HOT"].rsplit("/", 1)[0]
    input_url = _upload(write_prompts(tmp_path / "in.parquet", 12), f"{bucket}/inputs/in.parquet")
    job_id = submit(runtime, JobRequest(input_url, str(tiny_model), rows_per_shard=12, max_tokens=4))
    route_job(runtime, job_id)
    with session_scope(runtime.engine) as session:
        shard = session.query(Shard).filter_by(job_id=job_id).one()
    task = RunShard(job_id=job_id, shard_id=shard.id, backend="local")
    runners = [ShardRunner(runtime, wid=f"worker-{n}") for n in range(2)]
    outcomes: list[object] = race(*(partial(r.run, task) for r in runners))

    assert sorted(str(o) for o in outcomes) == sorted(["None", "ShardStatus.DONE"])
    with runtime.engine.connect() as conn:
        attempts = conn.execute(text("select count(*) from shard_attempts")).scalar_one()
        parts = conn.execute(text("select count(*), sum(row_count) from checkpoints")).one()
    assert attempts == 1
    assert tuple(parts) == (1, 12)


def test_two_worker_processes_finish_a_multi_shard_job_over_redis_postgres_and_s3(
    distributed_env: dict[str, str], tmp_path: Path, tiny_model: Path
) -> None:
    env = {**distributed_env, "SPOTLANE_WORKER__CHECKPOINT_ROWS": "10", "SPOTLANE_WORKER__CHECKPOINT_MAX_ROWS": "10"}
    assert spotlane("db", "upgrade", env=env).returncode == 0
    bucket = distributed_env["SPOTLANE_STORAGE__HOT"].rsplit("/", 1)[0]
    input_url = _upload(
        write_prompts(tmp_path / "in.parquet", 120, team=["a", "b", "c"] * 40), f"{bucket}/inputs/in.parquet"
    )
    env["SPOTLANE_WORKER__MAX_BATCH_ROWS"] = "4"
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker", "--loglevel", "INFO"],
            env={**os.environ, **env},
            stdout=open(tmp_path / f"worker{n}.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        for n in range(2)
    ]
    deadline = time.monotonic() + 60
    while not all(" ready." in (tmp_path / f"worker{n}.log").read_text() for n in range(2)):
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.2)
    submitted = spotlane(
        "submit", input_url, "--model", str(tiny_model), "--rows-per-shard", "20", "--max-tokens", "6", env=env
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    store = create_engine(distributed_env["SPOTLANE_DATABASE__URL"])
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with store.connect() as conn:
                status = conn.execute(text("select status from jobs where id = :id"), {"id": job_id}).scalar_one()
            if status in ("succeeded", "failed"):
                break
            time.sleep(0.5)
    finally:
        for worker in workers:
            stop_process(worker)
        store.dispose()

    assert status == "succeeded", (tmp_path / "worker0.log").read_text()[-3000:]
    with create_engine(distributed_env["SPOTLANE_DATABASE__URL"]).connect() as conn:
        owners = conn.execute(text("select count(distinct worker_id) from shard_attempts")).scalar_one()
        attempts = conn.execute(text("select count(*) from shard_attempts")).scalar_one()
    assert attempts == 6 and owners == 2, "both workers took shards, each shard ran once"
    manifest = json.loads(spotlane("results", job_id, "--json", env=env).stdout)
    assert manifest["rows"] == 120
    with create_engine(distributed_env["SPOTLANE_DATABASE__URL"]).connect() as conn:
        result_dir = conn.execute(text("select result_url from jobs where id = :id"), {"id": job_id}).scalar_one()
    assert result_dir.startswith(f"{distributed_env['SPOTLANE_STORAGE__WARM']}/jobs/{job_id}/results-")
    fs, path = fsspec.core.url_to_fs(result_dir)
    with fs.open(f"{path}/{manifest['files'][0]['name']}", "rb") as fh:
        table = pq.read_table(fh)
    assert table.column("id").to_pylist() == [f"row-{i:05d}" for i in range(120)]
    assert table.column("team").to_pylist() == ["a", "b", "c"] * 40


@pytest.mark.slow
def test_a_worker_rides_out_a_redis_restart_and_the_job_completes(
    postgres_url: str, tmp_path: Path, tiny_model: Path
) -> None:
    server = PrivateRedis(tmp_path)
    server.start()
    env = {
        "SPOTLANE_DATABASE__URL": postgres_url,
        "SPOTLANE_BROKER__URL": server.url,
        "SPOTLANE_WORKER__CHECKPOINT_ROWS": "5",
        "SPOTLANE_WORKER__CHECKPOINT_MAX_ROWS": "5",
        "SPOTLANE_WORKER__MAX_BATCH_ROWS": "2",
        "SPOTLANE_WORKER__REAP_INTERVAL_SECONDS": "2",
    }
    assert spotlane("db", "upgrade", env=env).returncode == 0
    job_id = spotlane(
        "submit",
        str(write_prompts(tmp_path / "in.parquet", 60)),
        "--model",
        str(tiny_model),
        "--rows-per-shard",
        "15",
        "--max-tokens",
        "16",
        env=env,
    ).stdout.strip()
    store = create_engine(postgres_url)

    def scalar(sql: str) -> object:
        with store.connect() as conn:
            return conn.execute(text(sql), {"id": job_id}).scalar_one()

    worker = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "worker"],
        env={**os.environ, **env},
        stdout=open(tmp_path / "worker.log", "wb"),
        stderr=subprocess.STDOUT,  # noqa: SIM115
    )
    try:
        deadline = time.monotonic() + 120
        while int(scalar("select count(*) from checkpoints")) < 2:  # type: ignore[call-overload]
            assert time.monotonic() < deadline, "no progress before the restart"
            time.sleep(0.2)
        server.kill()
        time.sleep(3)
        server.start()
        deadline = time.monotonic() + 180
        while scalar("select status from jobs where id = :id") not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        stop_process(worker)
        server.kill()
        store.dispose()

    assert scalar("select status from jobs where id = :id") == "succeeded"
    assert scalar("select sum(row_count) from checkpoints") == 60
    assert scalar("select count(*) from (select shard_id, first_row from checkpoints group by 1, 2) parts") == 12
