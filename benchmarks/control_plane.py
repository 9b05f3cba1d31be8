"""What spotlane's control plane costs as a job grows: PostgreSQL + Redis + S3, no model.

The model is taken out: the GPU pool's workers run the stub engine
(``worker.engine = "stub"``), which answers every row at once, so what is left is
the control plane and the bookkeeping around each row. For each size in
``--rows`` (500 rows a shard by default: 10M rows are 20,000 shards) it sets up a
fresh PostgreSQL database, a Redis (a private ``redis-server`` without persistence,
or ``--redis URL``, flushed before and after) and a bucket on a local S3 server
(moto), uploads a generated input (streamed with pyarrow, row groups of 100k rows,
short prompts) and then:

- this process is the control plane: it calls ``submit`` (no routing message),
  ``route_job`` (on a thread of its own), ``reap`` (every ``--reap-every``
  seconds while the job runs, and once after) and ``finalize_job`` (once every
  shard is done) in-process, and times each;
- ``--workers`` worker processes are the data plane: ``spotlane worker -Q
  gpu.bench --no-reaper``, started through this script's ``_worker`` mode, which
  counts their SQL statements (a ``before_cursor_execute`` listener on every
  engine), times every checkpoint commit (``claims.commit_checkpoint`` to the
  transaction's commit), every part write + commit (``checkpoint.persist``) and
  every shard (``ShardRunner.run``), and writes them to a JSON file every 2 s and
  at exit, with the process's peak RSS (VmHWM).

Reported per size, and as growth across sizes (1M/100k, 10M/1M):

1. submit's own time, and from submit to the first ``run_shard`` sent;
2. routing the whole job (``route_job`` until no shard is pending);
3. checkpoint commits per second over the job, their p50/p99 latency, and the same
   for a part's write + commit and a whole shard in the worker;
4. the reaper's sweep while the job runs (median, max) and once after;
5. the finalizer's time and MB/s (bytes of the committed parts it reads);
6. peak RSS of this process (reset per size) and of the largest worker;
7. SQL statements per row: this process by phase, the workers by phase (checkpoint
   commits, the shard loop, heartbeat and presence threads).

This process's own polling (progress, the parts' URLs, and an ``ANALYZE`` every
``--analyze-every`` seconds, standing in for autovacuum, which some servers run
with off: without statistics the answer cache lookup scans every cached answer)
goes through an engine of its own that is not counted. Everything is removed at the end, Ctrl-C included
(``--keep``: keep the databases and the work folder, logs and stats included).

    python benchmarks/control_plane.py [--rows 100000 1000000 10000000] [--rows-per-shard 500] [--workers 4]
    python benchmarks/control_plane.py --quick        # 20k rows: a smoke run
    python benchmarks/control_plane.py --rows 10000000 --first-shards 200   # the first shards of 10M rows

Needs PostgreSQL at ``--postgres`` (trust auth; a database is created per size) and
``redis-server`` on the PATH (or ``--redis``). 10M rows take hours on a small machine.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKER_MODE = "_worker"
POOL = "bench"
QUEUE = f"gpu.{POOL}"
ROW_GROUP = 100_000


# -- counting, in this process and in each worker ------------------------------------------


class Probe:
    """Counts SQL statements by phase and records latencies; one per process.

    A statement's phase is its thread's current phase (``with probe.phase(...)``),
    else its thread's name. Statements on ``excluded`` engines are not counted.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.local = threading.local()
        self.statements: Counter[str] = Counter()
        self.timings: dict[str, list[list[float]]] = {}
        self.excluded: set[int] = set()

    def install(self) -> None:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        event.listen(Engine, "before_cursor_execute", self._on_statement)

    def _on_statement(self, conn: Any, *_: Any) -> None:
        if id(conn.engine) in self.excluded:
            return
        name = getattr(self.local, "phase", None) or threading.current_thread().name
        with self.lock:
            self.statements[name] += 1

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        before = getattr(self.local, "phase", None)
        self.local.phase = name
        try:
            yield
        finally:
            self.local.phase = before

    def record(self, name: str, seconds: float) -> None:
        with self.lock:
            self.timings.setdefault(name, []).append([time.time(), seconds])

    def timed(self, owner: Any, name: str, label: str) -> None:
        """Replace ``owner.name`` (a module's function, a class's method) by itself, timed as ``label``."""
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.record(label, time.perf_counter() - started)

        setattr(owner, name, wrapper)

    def reset(self) -> None:
        with self.lock:
            self.statements.clear()
            self.timings.clear()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            statements: Counter[str] = Counter()
            for name, n in self.statements.items():  # heartbeat-123 -> heartbeat
                statements[re.sub(r"[-_]\d+$", "", name)] += n
            return {
                "statements": dict(statements),
                "timings": {k: list(v) for k, v in self.timings.items()},
                "vmhwm_kib": _proc_status("VmHWM"),
            }


def _proc_status(key: str, pid: int | str = "self") -> int:
    """A ``/proc/<pid>/status`` figure in KiB (0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def worker_main(stats: Path, argv: list[str]) -> None:
    """``spotlane <argv>`` with a probe: SQL statements by phase, checkpoint commits, parts
    and shards timed; written to ``stats`` every 2 s and at exit."""
    from celery.signals import worker_ready
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    import workers.checkpoint
    import workers.runner
    from pipeline.cli import main
    from pipeline.store import claims, transitions

    probe = Probe()
    probe.install()
    ready = threading.Event()

    commit = claims.commit_checkpoint

    def timed_commit(session: Any, *args: Any, **kwargs: Any) -> None:
        # Timed from here to the transaction's commit (or rollback): lock, UPDATEs, INSERTs, COMMIT.
        probe.local.commit_started = time.perf_counter()
        probe.local.phase = "checkpoint commit"
        commit(session, *args, **kwargs)

    def committed(_session: Any) -> None:
        started = getattr(probe.local, "commit_started", None)
        if started is not None:
            probe.record("commit", time.perf_counter() - started)
            probe.local.commit_started = None
            probe.local.phase = None

    def rolled_back(_session: Any) -> None:
        if getattr(probe.local, "commit_started", None) is not None:
            probe.local.commit_started = None
            probe.local.phase = None

    claims.commit_checkpoint = timed_commit
    event.listen(Session, "after_commit", committed)
    event.listen(Session, "after_rollback", rolled_back)

    probe.timed(workers.checkpoint, "persist", "persist")
    probe.timed(workers.runner.ShardRunner, "run", "shard")
    probe.timed(transitions, "lock_job", "lock_job")

    def flush() -> None:
        _write_json(stats, {"pid": os.getpid(), "ready": ready.is_set(), **probe.snapshot()})

    def flusher() -> None:
        while True:
            time.sleep(2.0)
            flush()

    def on_ready(**_: Any) -> None:
        ready.set()
        flush()

    worker_ready.connect(on_ready, weak=False)
    atexit.register(flush)
    threading.Thread(target=flusher, daemon=True, name="bench-flusher").start()
    sys.argv = ["spotlane", *argv]
    main()


# -- services -------------------------------------------------------------------------------


def _wait_port(port: int, process: subprocess.Popen[bytes], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"{what} did not start") from None
            time.sleep(0.2)


@dataclass
class Services:
    """moto's S3 server, a Redis, and PostgreSQL databases: started, created, and all removed."""

    workdir: Path
    postgres: str
    redis_url: str | None
    keep: bool
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    databases: list[str] = field(default_factory=list)
    bucket: str = ""
    broker: str = ""
    aws: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        from tests.support import free_port

        port = free_port()
        moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.processes.append(moto)
        _wait_port(port, moto, "moto's S3 server")
        self.aws = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }
        os.environ.update(self.aws)
        import fsspec

        self.bucket = f"spotlane-bench-{secrets.token_hex(4)}"
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir(self.bucket)
        if self.redis_url:
            self.broker = self.redis_url
        else:
            binary = shutil.which("redis-server")
            if binary is None:
                raise SystemExit("redis-server is not on the PATH: install it or pass --redis URL")
            port = free_port()
            redis = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=self.workdir,
            )
            self.processes.append(redis)
            _wait_port(port, redis, "redis-server")
            self.broker = f"redis://127.0.0.1:{port}/0"
        self.flush_redis()

    def flush_redis(self) -> None:
        import redis

        client = redis.Redis.from_url(self.broker)
        client.flushdb()
        client.close()

    def queue_length(self, queue: str) -> int:
        import redis

        client = redis.Redis.from_url(self.broker)
        try:
            return int(client.llen(queue))
        finally:
            client.close()

    def setting(self, name: str) -> str:
        """A PostgreSQL server setting (``SHOW``)."""
        from sqlalchemy import text

        admin = self._admin()
        try:
            with admin.connect() as conn:
                return str(conn.execute(text(f"SHOW {name}")).scalar_one())
        finally:
            admin.dispose()

    def _admin(self) -> Any:
        from sqlalchemy import create_engine

        return create_engine(self.postgres, isolation_level="AUTOCOMMIT")

    def _as_admin(self, statement: str) -> None:
        from sqlalchemy import text

        admin = self._admin()
        try:
            with admin.connect() as conn:
                conn.execute(text(statement))
        finally:
            admin.dispose()

    def new_database(self) -> str:
        name = f"spotlane_bench_{secrets.token_hex(4)}"
        self._as_admin(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return self.postgres.rsplit("/", 1)[0] + f"/{name}"

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        if self.keep or name not in self.databases:
            return
        self._as_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.databases.remove(name)

    def stop(self) -> None:
        from tests.support import stop_process

        for url in list(self.databases):
            try:
                self.drop_database(self.postgres.rsplit("/", 1)[0] + f"/{url}")
            except Exception as exc:  # noqa: BLE001  (cleanup goes on)
                print(f"could not drop database {url}: {exc}", file=sys.stderr)
        if self.broker:
            try:
                self.flush_redis()
            except Exception:  # noqa: BLE001  (a private server is stopped anyway)
                pass
        for process in reversed(self.processes):
            stop_process(process, grace=10)
        self.processes.clear()
        for key in self.aws:
            os.environ.pop(key, None)


# -- one size ---------------------------------------------------------------------------------


def make_input(path: Path, rows: int) -> None:
    """``rows`` short prompts (4 words: the stub answers them with ``stop``), streamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("prompt", pa.string())])
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, rows, ROW_GROUP):
            n = min(ROW_GROUP, rows - start)
            table = pa.table(
                {
                    "id": [f"req-{i:09d}" for i in range(start, start + n)],
                    "prompt": [f"Summarize ticket {i} briefly." for i in range(start, start + n)],
                },
                schema=schema,
            )
            writer.write_table(table, row_group_size=ROW_GROUP)


def postgres_floor(engine: Any, job_id: str, threads: int = 1, n: int = 300) -> tuple[list[float], float]:
    """What PostgreSQL itself takes for the smallest commit a checkpoint could be: lock the
    job row, insert one row, commit (fsync); ``n`` of them over ``threads`` connections at
    once: (every commit's seconds, commits/s)."""
    from sqlalchemy import text

    def commits(_: int) -> list[float]:
        took = []
        with engine.connect() as conn:
            conn.execute(text("CREATE TEMP TABLE IF NOT EXISTS floor_rows (id serial PRIMARY KEY, n integer)"))
            conn.commit()
            for i in range(n // threads):
                t = time.perf_counter()
                conn.execute(text("UPDATE jobs SET updated_at = updated_at WHERE id = :j"), {"j": job_id})
                conn.execute(text("INSERT INTO floor_rows (n) VALUES (:n)"), {"n": i})
                conn.commit()
                took.append(time.perf_counter() - t)
        return took

    return _at_once(threads, commits)


def our_sql_floor(engine: Any, on: list[tuple[Any, int]], threads: int, n: int = 300) -> tuple[list[float], float]:
    """A checkpoint commit's own SQL on PostgreSQL with none of our Python around it: the
    job lock and the one-statement commit (``transitions._LOCK_CLOCK``, ``claims._COMMIT``),
    compiled once and sent through psycopg's cursor, then COMMIT; ``n`` of them over
    ``threads`` connections at once, each on a claimed shard of ``on`` (claim, first row)."""
    from pipeline.store import claims, transitions

    lock = transitions._LOCK_CLOCK.compile(dialect=engine.dialect)
    commit = claims._COMMIT.compile(dialect=engine.dialect)

    def commits(i: int) -> list[float]:
        claim, start = on[i]
        took = []
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            for k in range(n // threads):
                t = time.perf_counter()
                cursor.execute(lock.string, lock.construct_params({"p_job_id": claim.job_id}))
                now = cursor.fetchone()[0]
                stats = claims.CheckpointStats(start + k, 1, 0, 10, 10, 0.0, f"s3://raw/{k}")
                sent = commit._process_parameters_for_postcompile(  # the IN (...) expanded, as SQLAlchemy does
                    commit.construct_params(claims._commit_parameters(claim, stats, now, 600.0))
                )
                cursor.execute(sent.statement, sent.parameters)
                advanced = cursor.fetchone()[0]
                raw.commit()
                took.append(time.perf_counter() - t)
                assert advanced == 1, "the one-statement commit did not advance its shard"
        finally:
            raw.close()
        return took

    return _at_once(threads, commits)


def _at_once(threads: int, work: Any) -> tuple[list[float], float]:
    """``work(i)`` (a list of latencies) on ``threads`` threads at once: (all latencies, how many a second)."""
    results: list[list[float]] = [[] for _ in range(threads)]

    def run(i: int) -> None:
        results[i] = work(i)

    running = [threading.Thread(target=run, args=(i,), name=f"bench-commits-{i}") for i in range(threads)]
    started = time.perf_counter()
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    took = [x for r in results for x in r]
    return took, len(took) / (time.perf_counter() - started)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    stats: Path
    log: Path

    def read(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.stats.read_text())
            return data
        except (OSError, ValueError):
            return {}


def start_workers(n: int, folder: Path, env: dict[str, str]) -> list[Worker]:
    started = []
    for i in range(n):
        stats, log = folder / f"worker{i}.json", folder / f"worker{i}.log"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            WORKER_MODE,
            str(stats),
            "worker",
            "-Q",
            QUEUE,
            "--no-reaper",
            "--loglevel",
            "WARNING",
        ]
        with open(log, "wb") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        started.append(Worker(process, stats, log))
    deadline = time.monotonic() + 120
    while not all(w.read().get("ready") for w in started):
        for w in started:
            if w.process.poll() is not None:
                raise SystemExit(f"a worker exited ({w.process.returncode}):\n{w.log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise SystemExit("workers did not start in 120 s")
        time.sleep(0.2)
    return started


def stop_workers(started: list[Worker]) -> None:
    from tests.support import stop_process

    for w in started:
        if w.process.poll() is None:
            w.process.terminate()
    for w in started:
        stop_process(w.process, grace=60)


def run_size(rows: int, args: argparse.Namespace, services: Services, probe: Probe) -> dict[str, float]:
    import fsspec
    from sqlalchemy import create_engine, func, select, text

    from pipeline.jobs.submit import JobRequest, submit
    from pipeline.routing.router import route_job
    from pipeline.runtime import Runtime
    from pipeline.store import db
    from pipeline.tasks.finalize import _read_parts, finalize_job
    from pipeline.tasks.reaper import reap
    from schemas.records import RUN_SHARD
    from schemas.status import ShardStatus
    from schemas.tables import Checkpoint, Shard

    folder = args.workdir / f"rows-{rows}"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    local_input = folder / "input.parquet"
    make_input(local_input, rows)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    prefix = f"{services.bucket}/rows-{rows}"
    input_url = f"s3://{prefix}/input/prompts.parquet"
    fs.put_file(str(local_input), input_url.removeprefix("s3://"))
    input_mb = local_input.stat().st_size / 1e6
    local_input.unlink()
    print(f"\n{rows:,} rows: input {input_mb:.1f} MB made and uploaded in {time.perf_counter() - started:.1f} s")

    model = folder / "stub-model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"model_type": "stub"}))
    config = folder / "spotlane.toml"
    config.write_text(
        f'[worker]\nengine = "stub"\n\n[cache]\nenabled = {str(not args.no_cache).lower()}\n\n'
        f'[[gpu_pools]]\nname = "{POOL}"\nmodels = ["*"]\nprice_per_hour = 0.0\n'
        f"tokens_per_second = 1000.0\nmax_workers = {args.workers}\n"
    )
    database = services.new_database()
    env = {
        "SPOTLANE_CONFIG": str(config),
        "SPOTLANE_HOME": str(folder / "home"),
        "SPOTLANE_DATABASE__URL": database,
        "SPOTLANE_BROKER__URL": services.broker,
        "SPOTLANE_STORAGE__HOT": f"s3://{prefix}/hot",
        "SPOTLANE_STORAGE__WARM": f"s3://{prefix}/warm",
        "SPOTLANE_STORAGE__COLD": f"s3://{prefix}/cold",
        "HF_HUB_OFFLINE": "1",
    }
    os.environ.update(env)
    child_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    upgraded = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "db", "upgrade"], env=child_env, capture_output=True, text=True
    )
    if upgraded.returncode != 0:
        raise SystemExit(f"spotlane db upgrade failed:\n{upgraded.stderr[-2000:]}")
    monitor = create_engine(database)
    probe.excluded.add(id(monitor))
    runtime = Runtime.open()
    workers: list[Worker] = []
    try:
        services.flush_redis()
        if not args.first_shards:
            workers = start_workers(args.workers, folder, child_env)
        sends: Counter[str] = Counter()
        first_run = [0.0]
        broker_send = runtime.send

        def send(name: str, record: Any, queue: str) -> None:
            if name == RUN_SHARD and not first_run[0]:
                first_run[0] = time.perf_counter()
            sends[name] += 1
            broker_send(name, record, queue)

        runtime.send = send  # type: ignore[method-assign]
        probe.reset()
        rss_reset = _reset_peak_rss()

        t0 = time.perf_counter()
        with probe.phase("submit"):
            job_id = submit(
                runtime,
                JobRequest(input_url, str(model), rows_per_shard=args.rows_per_shard, max_tokens=16),
                announce=False,
            )
        submit_s = time.perf_counter() - t0

        def pending() -> int:
            with monitor.connect() as conn:
                return int(
                    conn.execute(
                        select(func.count())
                        .select_from(Shard)
                        .where(Shard.job_id == job_id, Shard.status == ShardStatus.PENDING)
                    ).scalar_one()
                )

        route_times: dict[str, float] = {}
        route_error: list[BaseException] = []

        def route_all() -> None:
            route_times["start"] = time.perf_counter()
            try:
                with probe.phase("route"):
                    for _ in range(5):
                        route_job(runtime, job_id)
                        if not pending():
                            break
            except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
                route_error.append(exc)
            route_times["end"] = time.perf_counter()

        routing = threading.Thread(target=route_all, daemon=True, name="bench-router")
        routing.start()
        if args.first_shards:
            return _first_shards(runtime, job_id, args.first_shards, t0, submit_s, first_run, sends, routing, rss_reset)
        reaps: list[float] = []
        last_reap = last_analyze = time.perf_counter()
        last_print = last_progress_at = time.perf_counter()
        last_done = -1
        while True:
            time.sleep(0.25)
            with monitor.connect() as conn:
                counts = dict(
                    conn.execute(
                        select(Shard.status, func.count()).where(Shard.job_id == job_id).group_by(Shard.status)
                    ).all()
                )
            total = sum(counts.values())
            done = counts.get(ShardStatus.DONE, 0)
            failed = counts.get(ShardStatus.FAILED, 0)
            now = time.perf_counter()
            if done + failed == total and not routing.is_alive():
                break
            if route_error:
                raise route_error[0]
            if args.analyze_every and now - last_analyze >= args.analyze_every:
                with monitor.begin() as conn:  # what autovacuum would do (off on some servers)
                    conn.execute(text("ANALYZE"))
                last_analyze = time.perf_counter()
            if now - last_reap >= args.reap_every:
                with probe.phase("reap"):
                    t = time.perf_counter()
                    reap(runtime)
                    reaps.append(time.perf_counter() - t)
                last_reap = time.perf_counter()
            if done != last_done:
                last_done, last_progress_at = done, now
            elif now - last_progress_at > args.stall_seconds:
                tail = workers[0].log.read_text()[-3000:]
                raise SystemExit(f"no shard finished for {args.stall_seconds:.0f} s ({counts}); worker 0:\n{tail}")
            if now - last_print >= 10:
                routed = total - counts.get(ShardStatus.PENDING, 0)
                print(f"  {now - t0:7.1f} s: {routed:,}/{total:,} shards routed, {done:,} done")
                last_print = now
        job_done = time.perf_counter()
        if route_error:
            raise route_error[0]

        with probe.phase("finalize"):
            t = time.perf_counter()
            status = finalize_job(runtime, job_id)
            finalize_s = time.perf_counter() - t
        with probe.phase("reap"):
            t = time.perf_counter()
            reap(runtime)
            reap_after = time.perf_counter() - t
        bench_rss = _proc_status("VmHWM") / 1024.0 if rss_reset else float("nan")
        stop_workers(workers)

        with monitor.connect() as conn:
            urls = [
                u.removeprefix("s3://")
                for u in conn.execute(
                    select(Checkpoint.url).join(Shard, Shard.id == Checkpoint.shard_id).where(Shard.job_id == job_id)
                ).scalars()
            ]
            shards = int(
                conn.execute(select(func.count()).select_from(Shard).where(Shard.job_id == job_id)).scalar_one()
            )
        sizes = {p: int(info["size"]) for p, info in fs.find(f"{prefix}/hot", detail=True).items()}
        part_bytes = sum(sizes.get(u, 0) for u in urls)
        floor, floor_rate = postgres_floor(monitor, job_id)
        # The finalizer's reading of the parts, before (one at a time) and now (read ahead).
        reads = {}
        for at_once in (1, runtime.settings.storage.read_concurrency):
            t = time.perf_counter()
            for _ in _read_parts([SimpleNamespace(url=f"s3://{u}") for u in urls], at_once):
                pass
            reads[at_once] = time.perf_counter() - t
        left_on_control = services.queue_length(runtime.settings.control_queue)

        stats = [w.read() for w in workers]
        commits = [s for st in stats for s in st.get("timings", {}).get("commit", [])]
        persists = [s for st in stats for s in st.get("timings", {}).get("persist", [])]
        shard_runs = [s for st in stats for s in st.get("timings", {}).get("shard", [])]
        worker_sql: Counter[str] = Counter()
        for st in stats:
            worker_sql.update(st.get("statements", {}))
        bench_sql = Counter(probe.snapshot()["statements"])
        job_s = job_done - t0
        route_s = route_times["end"] - route_times["start"]
        print(
            f"  job {job_id}: {status.value if status else status}, {shards:,} shards, {len(urls):,} parts, "
            f"{job_s:.1f} s to the last shard"
        )
        print(f"  bench SQL by phase: {dict(bench_sql.most_common())}")
        print(f"  workers' SQL by phase: {dict(worker_sql.most_common())}")
        print(f"  messages sent by this process: {dict(sends)}; left on the control queue: {left_on_control:,}")
        figures: dict[str, float] = {
            "shards": shards,
            "parts (checkpoints)": len(urls),
            "submit (s)": submit_s,
            "submit -> first shard queued (s)": first_run[0] - t0 if first_run[0] else float("nan"),
            "routing, whole job (s)": route_s,
            "routing per shard (ms)": route_s / max(shards, 1) * 1000,
            "submit -> last shard done (s)": job_s,
            "checkpoint commits/s (over the job)": len(commits) / job_s,
            "commit p50 (ms)": _pct([c[1] for c in commits], 0.5) * 1000,
            "PostgreSQL floor: lock+insert+commit p50 (ms)": _pct(floor, 0.5) * 1000,
            "PostgreSQL floor: commits/s, one connection": floor_rate,
            "commit p99 (ms)": _pct([c[1] for c in commits], 0.99) * 1000,
            "part write+commit p50 (ms)": _pct([c[1] for c in persists], 0.5) * 1000,
            "part write+commit p99 (ms)": _pct([c[1] for c in persists], 0.99) * 1000,
            "shards/s (workers)": len(shard_runs) / job_s,
            "shard in worker p50 (ms)": _pct([c[1] for c in shard_runs], 0.5) * 1000,
            "shard in worker p99 (ms)": _pct([c[1] for c in shard_runs], 0.99) * 1000,
            "reap sweeps while running": len(reaps),
            "reap while running, median (ms)": (statistics.median(reaps) if reaps else float("nan")) * 1000,
            "reap while running, max (ms)": (max(reaps) if reaps else float("nan")) * 1000,
            "reap after the job (ms)": reap_after * 1000,
            "finalize (s)": finalize_s,
            "finalize: parts read (MB)": part_bytes / 1e6,
            "finalize (MB/s)": part_bytes / 1e6 / finalize_s,
            "parts read one at a time (s)": reads[1],
            "parts read ahead (s)": reads[runtime.settings.storage.read_concurrency],
            "  read ahead: x faster": reads[1] / reads[runtime.settings.storage.read_concurrency],
            "peak RSS, this process (MiB)": bench_rss,
            "peak RSS, largest worker (MiB)": max((st.get("vmhwm_kib", 0) for st in stats), default=0) / 1024.0,
            "route/finalize msgs left on control": left_on_control,
            "SQL/row, this process": sum(bench_sql.values()) / rows,
            "SQL/row, workers": sum(worker_sql.values()) / rows,
            "SQL/row, total": (sum(bench_sql.values()) + sum(worker_sql.values())) / rows,
        }
        bench_times = probe.snapshot()["timings"]
        for label in (
            "route: profile rows",
            "route: quotes",
            "route: answer cache lookup",
            "route: fingerprints",
            "route: answer cache SQL",
            "route: committed_usd",
        ):
            figures[f"  {label} (ms/shard)"] = sum(t for _, t in bench_times.get(label, [])) / max(shards, 1) * 1000
        figures["  route: job lock, p99 (ms)"] = _pct([t for _, t in bench_times.get("lock_job", [])], 0.99) * 1000
        locks = [s for st in stats for s in st.get("timings", {}).get("lock_job", [])]
        figures["worker job lock p50 (ms)"] = _pct([t for _, t in locks], 0.5) * 1000
        figures["worker job lock p99 (ms)"] = _pct([t for _, t in locks], 0.99) * 1000
        for phase in ("submit", "route", "reap", "finalize"):
            figures[f"  SQL/row: {phase}"] = bench_sql.get(phase, 0) / rows
        figures["  SQL/row: worker checkpoint commits"] = worker_sql.get("checkpoint commit", 0) / rows
        figures["  SQL/row: worker shard loop (rest)"] = worker_sql.get("MainThread", 0) / rows
        figures["  SQL/row: worker other threads"] = (
            sum(worker_sql.values()) - worker_sql.get("checkpoint commit", 0) - worker_sql.get("MainThread", 0)
        ) / rows
        return figures
    finally:
        if workers:
            stop_workers(workers)
        runtime.engine.dispose()
        monitor.dispose()
        db._engine.cache_clear()
        for key in env:
            os.environ.pop(key, None)
        services.flush_redis()
        services.drop_database(database)
        if not args.keep:
            fs.rm(prefix, recursive=True)


def _first_shards(
    runtime: Any,
    job_id: str,
    n: int,
    t0: float,
    submit_s: float,
    first_run: list[float],
    sends: Counter[str],
    routing: threading.Thread,
    rss_reset: bool,
) -> dict[str, float]:
    """``--first-shards``: no workers; route until ``n`` shards are queued, then pause the
    job (the router stops at its next shard) and report how soon the first was queued.
    Then, with nothing else running, a checkpoint commit's own cost: one queued shard
    claimed and ``COMMITS`` one-row checkpoints committed on it in a row, then as many
    over ``THREADS`` shards at once, each next to PostgreSQL's smallest commit
    (``postgres_floor``) on the same job, alone and as many at once; then cancel."""
    from sqlalchemy import select

    from pipeline.jobs.control import cancel
    from pipeline.store import claims, transitions
    from pipeline.store.db import session_scope
    from schemas.records import RUN_SHARD
    from schemas.status import JobStatus, ShardStatus
    from schemas.tables import Shard

    while sends[RUN_SHARD] < n and routing.is_alive():
        time.sleep(0.05)
    queued, elapsed = sends[RUN_SHARD], time.perf_counter() - t0
    with session_scope(runtime.engine) as session:
        transitions.set_job_status(session, job_id, JobStatus.PAUSED, expected=(JobStatus.RUNNING,))
    routing.join(60)
    first = first_run[0] - t0 if first_run[0] else float("nan")
    rss = _proc_status("VmHWM") / 1024.0 if rss_reset else float("nan")

    with session_scope(runtime.engine) as session:
        queued_shards = session.execute(
            select(Shard.id, Shard.backend, Shard.row_start)
            .where(Shard.job_id == job_id, Shard.status == ShardStatus.QUEUED)
            .order_by(Shard.shard_index)
            .limit(2 * (1 + THREADS))
        ).all()
    held = []
    for shard_id, backend, start in queued_shards:
        with session_scope(runtime.engine) as session:
            claim = claims.claim_shard(session, shard_id, "bench-committer", 600.0, str(backend))
        assert claim is not None
        held.append((claim, start))

    def commits(on: list[tuple[Any, int]], threads: int) -> tuple[list[float], float]:
        def work(i: int) -> list[float]:
            claim, start = on[i]
            took = []
            for k in range(COMMITS // threads):
                stats = claims.CheckpointStats(
                    start + k, 1, 0, 10, 10, 0.0, f"s3://bench/{claim.shard_id}/part-{k}.parquet"
                )
                t = time.perf_counter()
                with session_scope(runtime.engine) as session:
                    claims.commit_checkpoint(session, claim, stats, 600.0)
                took.append(time.perf_counter() - t)
            return took

        return _at_once(threads, work)

    alone, alone_rate = commits(held[:1], 1)
    together, together_rate = commits(held[1 : 1 + THREADS], THREADS)
    raw_alone, raw_alone_rate = our_sql_floor(runtime.engine, held[1 + THREADS : 2 + THREADS], 1)
    raw_together, raw_together_rate = our_sql_floor(runtime.engine, held[2 + THREADS :], THREADS)
    floor_alone, floor_alone_rate = postgres_floor(runtime.engine, job_id)
    floor_together, floor_together_rate = postgres_floor(runtime.engine, job_id, THREADS)
    cancel(runtime, job_id, reason="benchmark: first shards only")
    return {
        "submit (s)": submit_s,
        "submit -> first shard queued (s)": first,
        f"shards queued (of the first {n})": queued,
        "routing per shard after the first (ms)": (elapsed - first) / max(queued - 1, 1) * 1000,
        "peak RSS, this process (MiB)": rss,
        "checkpoint commit alone, p50 (ms)": _pct(alone, 0.5) * 1000,
        "checkpoint commits/s, one connection": alone_rate,
        "its SQL alone (psycopg), p50 (ms)": _pct(raw_alone, 0.5) * 1000,
        "its SQL alone (psycopg), commits/s": raw_alone_rate,
        "PostgreSQL floor: lock+insert+commit p50 (ms)": _pct(floor_alone, 0.5) * 1000,
        "PostgreSQL floor: commits/s, one connection": floor_alone_rate,
        f"checkpoint commits/s, {THREADS} at once (one job)": together_rate,
        f"checkpoint commit p99, {THREADS} at once (ms)": _pct(together, 0.99) * 1000,
        f"its SQL alone (psycopg): commits/s, {THREADS} at once": raw_together_rate,
        f"its SQL alone (psycopg): p99, {THREADS} at once (ms)": _pct(raw_together, 0.99) * 1000,
        f"PostgreSQL floor: commits/s, {THREADS} at once": floor_together_rate,
        f"PostgreSQL floor: p99, {THREADS} at once (ms)": _pct(floor_together, 0.99) * 1000,
    }


#: One-row checkpoints committed in a row by ``--first-shards`` (a shard holds 500 rows),
#: on one connection, then over ``THREADS`` connections at once (threads of this process,
#: each committing into a shard of its own of the same job, as workers do).
COMMITS = 300
THREADS = 4


# -- report -----------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "-"
    if abs(value) >= 100 or value == int(value):
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:,.2f}"
    return f"{value:.4f}"


def report(results: dict[int, dict[str, float]], args: argparse.Namespace) -> None:
    sizes = sorted(results)
    metrics = list(results[sizes[0]])
    width = max(len(m) for m in metrics) + 2
    print(
        f"\nControl plane on PostgreSQL + Redis + S3 (moto), stub engine, {args.workers} workers, "
        f"{args.rows_per_shard} rows a shard, cache {'off' if args.no_cache else 'on'}, autovacuum {args.autovacuum}, "
        f"ANALYZE {f'every {args.analyze_every:g} s' if args.analyze_every else 'never'} while a job runs:"
    )
    print(f"{'':<{width}}" + "".join(f"{f'{n:,} rows':>16}" for n in sizes))
    for m in metrics:
        print(f"{m:<{width}}" + "".join(f"{_fmt(results[n].get(m, float('nan'))):>16}" for n in sizes))
    if len(sizes) < 2:
        return
    print(f"\nGrowth (ratio between consecutive sizes; the rows grow {' then '.join(_steps(sizes))}):")
    for m in metrics:
        ratios = []
        for a, b in zip(sizes, sizes[1:], strict=False):
            x, y = results[a].get(m, float("nan")), results[b].get(m, float("nan"))
            ratios.append(
                f"{_label(b)}/{_label(a)} {y / x:.2f}x" if x and x == x and y == y else f"{_label(b)}/{_label(a)} -"
            )
        print(f"  {m.strip():<{width}}" + ", ".join(ratios))


def _label(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _steps(sizes: list[int]) -> list[str]:
    return [f"{b / a:g}x" for a, b in zip(sizes, sizes[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--rows-per-shard", type=int, default=500, help="500: 10M rows are 20,000 shards")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (the data plane)")
    parser.add_argument("--reap-every", type=float, default=5.0, help="seconds between timed reaper sweeps")
    parser.add_argument(
        "--analyze-every",
        type=float,
        default=30.0,
        help="seconds between ANALYZEs of the job store while a job runs, standing in for autovacuum (0: never)",
    )
    parser.add_argument("--no-cache", action="store_true", help="turn the answer cache off (it is on by default)")
    parser.add_argument("--quick", action="store_true", help="one run of 20k rows: a smoke test")
    parser.add_argument(
        "--first-shards",
        type=int,
        metavar="N",
        help="no workers: route the first N shards of each size, then cancel (time to the first shard at 10M rows)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the databases and the work folder")
    parser.add_argument("--workdir", type=Path, help="where inputs, logs and stats go (default: a temporary folder)")
    parser.add_argument(
        "--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres", help="an admin URL"
    )
    parser.add_argument("--redis", help="a Redis database to use (flushed!) instead of a private redis-server")
    parser.add_argument("--stall-seconds", type=float, default=300.0, help="give up after this long without progress")
    args = parser.parse_args()
    if args.quick:
        args.rows = [20_000]
    temporary = args.workdir is None
    args.workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="spotlane-bench-cp-"))).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)

    def interrupted(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    for key in [k for k in os.environ if k.startswith("SPOTLANE_")]:
        os.environ.pop(key)
    probe = Probe()
    probe.install()
    import pipeline.routing.router as router
    import pipeline.routing.sharing as sharing
    from pipeline.store import answers, ledger, transitions

    probe.timed(router, "profile_rows", "route: profile rows")
    probe.timed(router, "answered_rows", "route: answer cache lookup")
    probe.timed(sharing, "fingerprint", "route: fingerprints")
    probe.timed(answers, "lookup", "route: answer cache SQL")
    probe.timed(router, "quotes_for", "route: quotes")
    probe.timed(ledger, "committed_usd", "route: committed_usd")
    probe.timed(transitions, "lock_job", "lock_job")
    services = Services(args.workdir, args.postgres, args.redis, args.keep)
    args.autovacuum = services.setting("autovacuum")
    results: dict[int, dict[str, float]] = {}
    try:
        services.start()
        for rows in args.rows:
            results[rows] = run_size(rows, args, services, probe)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
    finally:
        services.stop()
        if args.keep:
            print(f"kept: {args.workdir}, databases {', '.join(services.databases) or '-'}")
        elif temporary:
            shutil.rmtree(args.workdir, ignore_errors=True)
    if results:
        report(results, args)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == WORKER_MODE:
        worker_main(Path(sys.argv[2]), sys.argv[3:])
    else:
        main()
