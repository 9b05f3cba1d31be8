"""Chaos: every way a distributed job can be hit, at random, on real processes and services.

PostgreSQL, a private Redis, S3 (the moto server), several ``spotlane worker``
processes on the stub engine (their chunks take real time), and a seeded random
schedule of attacks:

- the job's routing message is lost (deleted from the broker before any worker runs);
- workers are killed (-9) and drained (SIGTERM), and restarted;
- Redis is killed and restarted;
- a worker is frozen (SIGSTOP) past its lease with a chunk in flight; another
  worker with a different checkpoint size takes its shard over; then it is woken;
- the process finalizing the job is killed mid-write.

Every run must end with every id exactly once, a manifest that agrees, nothing
spent past the budget at any moment, and the rows generated but never committed
within one checkpoint interval per interruption. ``SPOTLANE_TEST_LONG=1`` runs a
bigger job with more rounds of attacks.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import redis as redis_client
from sqlalchemy import create_engine, text

from tests.support import PrivateRedis, spotlane, stop_process, write_prompts
from tests.support.jobs import model_folder

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

LONG = os.environ.get("SPOTLANE_TEST_LONG", "") not in ("", "0")
ROWS, PER_SHARD, CHECKPOINT = (3000, 100, 10) if LONG else (600, 50, 10)
WORKERS = 3
#: A pool priced so that the stub engine's 0.05 s a row costs money: $36/h = $0.01/s.
POOL = '[{"name": "local", "price_per_hour": 36.0, "tokens_per_second": 200}]'
BUDGET = 10.0


def test_kills_drains_restarts_freezes_a_killed_finalizer_and_a_lost_message_lose_nothing(
    postgres_url: str, s3_bucket: str, tmp_path: Path
) -> None:
    rng = random.Random(20261126)
    broker = PrivateRedis(tmp_path)
    broker.start()
    env = {
        "SPOTLANE_DATABASE__URL": postgres_url,
        "SPOTLANE_BROKER__URL": broker.url,
        "SPOTLANE_STORAGE__HOT": f"{s3_bucket}/hot",
        "SPOTLANE_STORAGE__WARM": f"{s3_bucket}/warm",
        "SPOTLANE_STORAGE__COLD": f"{s3_bucket}/cold",
        "SPOTLANE_GPU_POOLS": POOL,
        "SPOTLANE_WORKER__ENGINE": "stub",
        "SPOTLANE_WORKER__STUB_SECONDS_PER_ROW": "0.05",
        "SPOTLANE_WORKER__CHECKPOINT_ROWS": str(CHECKPOINT),
        "SPOTLANE_WORKER__CHECKPOINT_MAX_ROWS": str(CHECKPOINT),  # the redone work is bounded by it
        "SPOTLANE_WORKER__REAP_INTERVAL_SECONDS": "1",
        "SPOTLANE_WORKER__LEASE_SECONDS": "4",
        "SPOTLANE_WORKER__HEARTBEAT_SECONDS": "1",
        "SPOTLANE_WORKER__REQUEUE_AFTER_SECONDS": "3",
        "SPOTLANE_WORKER__SHUTDOWN_GRACE_SECONDS": "10",
        "SPOTLANE_WORKER__FINALIZE_GRACE_SECONDS": "3",
    }
    assert spotlane("db", "upgrade", env=env).returncode == 0
    fs, bucket = fsspec.core.url_to_fs(s3_bucket)
    fs.put_file(str(write_prompts(tmp_path / "in.parquet", ROWS)), f"{bucket}/inputs/in.parquet")
    submitted = spotlane(
        "submit",
        f"{s3_bucket}/inputs/in.parquet",
        "--model",
        model_folder(tmp_path),
        "--rows-per-shard",
        str(PER_SHARD),
        "--max-tokens",
        "4",
        "--budget",
        str(BUDGET),
        env=env,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    hits: Counter[str] = Counter()
    hits["lost routing message"] += redis_client.Redis.from_url(broker.url).delete("control")  # before any worker
    store = create_engine(postgres_url)
    logs: list[Path] = []

    def start(**settings: str) -> subprocess.Popen[bytes]:
        log = tmp_path / f"worker{len(logs)}.log"
        logs.append(log)
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker"],
            env={**os.environ, **env, **settings},
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
        )  # noqa: SIM115

    def query(sql: str) -> list[tuple[object, ...]]:
        with store.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), {"j": job_id})]

    def status() -> str:
        return str(query("select status from jobs where id = :j")[0][0])

    highest = 0.0

    def watch_the_budget() -> None:
        nonlocal highest
        highest = max(
            highest, float(query("select coalesce(sum(amount_usd), 0) from cost_ledger where job_id = :j")[0][0])
        )

    def holder_of(lease: str) -> int | None:
        rows = query(f"select owner from leases where name = '{lease}'")
        return int(str(rows[0][0]).split(":")[1]) if rows else None

    workers = [start() for _ in range(WORKERS)]
    started = last_kill = time.monotonic()
    rounds = 3 if LONG else 1
    finished = threading.Event()

    def kill_the_finalizer() -> None:
        """kill -9 the process writing the results, the moment it holds the finalizer's lease.

        A thread of its own, polling all the time: the main loop sleeps through its other
        attacks (a freeze is seven seconds), and a job once finished inside one of them.
        """
        lease = f"finalize:{job_id}"
        while not finished.is_set():
            pid = holder_of(lease)
            victim = next((w for w in list(workers) if w.pid == pid), None)
            if victim is not None:
                victim.kill()  # the main loop starts another in its place
                hits["finalizer killed"] += 1
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_the_finalizer, daemon=True)
    watcher.start()
    try:
        time.sleep(4)
        while status() not in ("succeeded", "failed") and time.monotonic() - started < (600 if LONG else 150):
            watch_the_budget()
            for i, worker in enumerate(workers):
                if worker.poll() is not None:  # the finalizer, killed by the watcher
                    workers[i] = start()
            # Attacks are keyed to progress, not to the clock: the job must still be running when
            # each one comes (a faster run once finished before the freeze was due).
            done = int(str(query("select coalesce(sum(rows_done), 0) from shards where job_id = :j")[0][0]))
            (left,) = query("select count(*) from shards where job_id = :j and status not in ('done', 'failed')")[0]
            progress = done / ROWS
            if int(str(left)) <= 2:
                time.sleep(0.01)  # near the end: only watch for the finalizer
                continue
            if hits["redis restart"] < rounds and progress >= 0.15 + 0.25 * hits["redis restart"]:
                broker.kill()
                time.sleep(2)
                broker.start()
                hits["redis restart"] += 1
            elif hits["freeze past the lease"] < rounds and progress >= 0.3 + 0.25 * hits["freeze past the lease"]:
                owners = query("select lease_owner from shards where job_id = :j and status = 'running'")
                pids = {int(str(o[0]).split(":")[1]) for o in owners if o[0]}
                frozen = next((w for w in workers if w.pid in pids), None)
                if frozen is not None:
                    time.sleep(0.2)  # inside a chunk
                    os.kill(frozen.pid, signal.SIGSTOP)
                    taker = start(
                        SPOTLANE_WORKER__CHECKPOINT_ROWS="7", SPOTLANE_WORKER__CHECKPOINT_MAX_ROWS="7"
                    )  # another checkpoint size takes over
                    time.sleep(7)  # past the lease: the reaper re-queues, the taker claims
                    frozen.send_signal(signal.SIGCONT)
                    workers.append(taker)
                    hits["freeze past the lease"] += 1
            elif progress < 0.8 and time.monotonic() - last_kill > 2.0 and rng.random() < 0.4:
                last_kill = time.monotonic()
                victim = rng.randrange(len(workers))
                how = rng.choice(["kill -9", "SIGTERM"])
                workers[victim].send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGTERM)
                try:
                    workers[victim].wait(20)
                except subprocess.TimeoutExpired:
                    workers[victim].kill()
                    workers[victim].wait()
                    hits["killed after grace"] += 1
                hits[how] += 1
                workers[victim] = start()
            time.sleep(rng.uniform(0.5, 1.5))
        wall = time.monotonic() - started
        watch_the_budget()
    finally:
        finished.set()
        watcher.join()
        for worker in workers:
            stop_process(worker, grace=15)
        broker.kill()

    assert status() == "succeeded", logs[-1].read_text()[-3000:]
    out = tmp_path / "out.parquet"
    assert spotlane("results", job_id, "--to", str(out), env=env).returncode == 0
    ids = pq.read_table(out).column("id").to_pylist()
    assert ids == [f"row-{i:05d}" for i in range(ROWS)]  # every id once, in input order
    manifest_rows = query("select rows_ok + rows_failed from jobs where id = :j")[0][0]
    spent = float(
        query("select coalesce(sum(amount_usd), 0) from cost_ledger where job_id = :j and kind = 'charge'")[0][0]
    )
    generated = sum(
        int(b) - int(a) for log in logs for a, b in re.findall(r"generated rows (\d+)-(\d+) of shard", log.read_text())
    )
    outcomes = dict(
        query(
            "select outcome, count(*) from shard_attempts a join shards s on s.id = a.shard_id "
            "where s.job_id = :j group by outcome"
        )
    )
    store.dispose()
    recomputed = generated - ROWS
    hard = (
        hits["kill -9"]
        + hits["redis restart"]
        + hits["killed after grace"]
        + hits["freeze past the lease"]
        + hits["finalizer killed"]
    )
    print(
        f"\nchaos ({'long' if LONG else 'default'}): {ROWS} rows in {ROWS // PER_SHARD} shards; interruptions "
        f"{dict(hits)}; attempts {outcomes}; rows generated {generated}, recomputed {recomputed}; "
        f"spent ${spent:.4f}, highest reserved + spent ${highest:.4f} of ${BUDGET:.2f}; wall {wall:.1f} s"
    )
    assert manifest_rows == ROWS
    assert highest <= BUDGET + 1e-9 and spent <= BUDGET
    assert hits["lost routing message"] == 1 and hits["redis restart"] == rounds
    assert hits["freeze past the lease"] == rounds and hits["finalizer killed"] == 1
    assert 0 <= recomputed <= CHECKPOINT * max(hard, 1)
