"""Scale benchmark: memory bounded by the shard, not the file; rows/s end to end.

Three measurements, each against a baseline run in the same invocation:

1. ``submit`` on a large input (10 million rows by default): peak RSS and time of
   ``spotlane submit`` (footer + streamed ids) vs a script that loads the file with
   ``pq.read_table`` and checks ``id`` uniqueness with a set.
2. A worker across many shards of that job: RSS after each finished shard, so a
   leak or a file-sized buffer shows as growth.
3. Rows/s through the whole pipeline (``spotlane run``: submit, broker, worker
   process, checkpoints, finalize) vs the engine alone in one process on the same
   rows with the same tiny model.

    python benchmarks/scale.py [--rows 10000000] [--watch-shards 30] [--pipeline-rows 2000]

Everything happens in a temporary folder (``--workdir`` to keep it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_input(path: Path, rows: int, row_group: int = 100_000) -> None:
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("team", pa.string())])
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, rows, 1_000_000):
            n = min(1_000_000, rows - start)
            ids = [f"req-{i:09d}" for i in range(start, start + n)]
            prompts = [
                f"Summarize support ticket {i}: the customer reports a billing error on invoice {i % 9973}."
                for i in range(start, start + n)
            ]
            teams = ["finance", "support", "growth", "infra"] * (n // 4) + ["finance"] * (n % 4)
            writer.write_table(
                pa.table({"id": ids, "prompt": prompts, "team": teams}, schema=schema), row_group_size=row_group
            )


_HWM_WRAPPER = """
import atexit, runpy, sys
out = sys.argv.pop(1)
def _peak():
    with open("/proc/self/status") as fh, open(out, "w") as dst:
        dst.write(next(l for l in fh if l.startswith("VmHWM:")).split()[1])
atexit.register(_peak)
if sys.argv[1] == "-m":
    sys.argv = [sys.argv[2], *sys.argv[3:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    code = sys.argv[2]
    sys.argv = ["-c", *sys.argv[3:]]
    exec(compile(code, "<baseline>", "exec"), {"__name__": "__main__"})
"""


def peak_rss_of(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run ``python <args>``; return (wall seconds, peak RSS MiB of that process, output).

    The peak is the child's own VmHWM read at exit (``ru_maxrss`` would include the
    parent's size at fork time).
    """
    with tempfile.NamedTemporaryFile("r", suffix=".hwm") as hwm:
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", _HWM_WRAPPER, hwm.name, *args], env=env, capture_output=True, text=True
        )
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        peak_kib = int(open(hwm.name).read() or 0)
    return wall, peak_kib / 1024.0, proc.stdout


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


BASELINE_LOAD = """
import sys, pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
ids = t.column("id").to_pylist()
assert len(set(ids)) == len(ids), "duplicate ids"
print(t.num_rows)
"""

BASELINE_ENGINE = """
import sys, time, pyarrow.parquet as pq
from workers.engines.hf import load_engine
from workers.engines.base import Request
path, model, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
engine = load_engine(model, device="auto", dtype="auto", token_budget=32768, max_batch_rows=64)
prompts = pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist()
t0 = time.perf_counter()
for i in range(0, len(prompts), 256):
    engine.generate([Request(prompt=p, max_tokens=max_tokens) for p in prompts[i:i + 256]])
print(time.perf_counter() - t0)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows in the large input")
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--watch-shards", type=int, default=30, help="shards to watch the worker's memory over")
    parser.add_argument("--pipeline-rows", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="spotlane-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SPOTLANE_HOME": str(work / "home"), "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "pipeline.cli"]
    cli_args = ["-m", "pipeline.cli"]
    from workers.demo_model import build_tiny_model

    model = build_tiny_model(work / "tiny-model")
    big = work / "big.parquet"
    if not big.exists():
        t0 = time.perf_counter()
        make_input(big, args.rows)
        print(
            f"generated {args.rows:,} rows ({big.stat().st_size / 2**20:.0f} MiB on disk) in {time.perf_counter() - t0:.1f}s"
        )

    # 1. submit vs load-it-all
    base_wall, base_rss, _ = peak_rss_of(["-c", BASELINE_LOAD, str(big)], env)
    ours_wall, ours_rss, out = peak_rss_of(
        [
            *cli_args,
            "submit",
            str(big),
            "--model",
            str(model),
            "--max-tokens",
            "1",
            "--rows-per-shard",
            str(args.rows_per_shard),
        ],
        env,
    )
    job_id = out.strip().splitlines()[-1]
    print("\n== submit: validate + plan + record", f"{args.rows:,} rows ==")
    print(f"baseline (pq.read_table + set of ids): peak RSS {base_rss:8.0f} MiB, {base_wall:6.1f} s")
    print(f"spotlane submit                      : peak RSS {ours_rss:8.0f} MiB, {ours_wall:6.1f} s")
    print(f"ratio baseline/spotlane peak RSS     : {base_rss / ours_rss:.1f}x")

    # 2. worker memory over shards
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{work / 'home' / 'spotlane.db'}")
    worker = subprocess.Popen(
        [*cli, "worker", "--loglevel", "WARNING"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    samples: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    last = 0
    while last < args.watch_shards and worker.poll() is None:
        with engine.connect() as conn:
            done = conn.execute(
                sa.text("select count(*) from shards where job_id = :j and status = 'done'"), {"j": job_id}
            ).scalar_one()
        if done > last:
            samples.append((done, rss_mib(worker.pid)))
            last = done
        time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    worker.terminate()
    worker.wait(60)
    print(f"\n== worker RSS across shards ({args.rows_per_shard} rows each, max_tokens 1) ==")
    for done, rss in samples[:: max(1, len(samples) // 10)]:
        print(f"after shard {done:4d}: {rss:7.0f} MiB")
    first = next(r for d, r in samples if d >= min(3, samples[-1][0]))
    print(
        f"growth from shard 3 to shard {samples[-1][0]}: {samples[-1][1] - first:+.0f} MiB "
        f"({samples[-1][0] * args.rows_per_shard / elapsed:,.0f} rows/s incl. model load)"
    )

    # 3. pipeline vs engine alone
    small = work / "small.parquet"
    make_input(small, args.pipeline_rows, row_group=10_000)
    base = subprocess.run(
        [sys.executable, "-c", BASELINE_ENGINE, str(small), str(model), str(args.max_tokens)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    engine_s = float(base.stdout.strip().splitlines()[-1])
    # A home of its own: the big job's remaining shards must not queue ahead of this one.
    env_run = {**env, "SPOTLANE_HOME": str(work / "home-run")}
    started_run = time.perf_counter()
    subprocess.run(
        [*cli, "run", str(small), "--model", str(model), "--max-tokens", str(args.max_tokens)],
        env=env_run,
        check=True,
        capture_output=True,
    )
    run_wall = time.perf_counter() - started_run
    engine = sa.create_engine(f"sqlite:///{work / 'home-run' / 'spotlane.db'}")
    with engine.connect() as conn:
        parts = conn.execute(sa.text("select created_at, row_count from checkpoints order by created_at")).all()
    from datetime import datetime

    stamps = [datetime.fromisoformat(str(p[0])) for p in parts]
    steady_rows = sum(p[1] for p in parts[1:])
    steady = (stamps[-1] - stamps[0]).total_seconds()
    n = args.pipeline_rows
    print(f"\n== rows/s, {n} rows, max_tokens {args.max_tokens}, tiny model ==")
    print(f"engine alone (in process, no I/O)              : {n / engine_s:8.1f} rows/s ({engine_s:.2f} s)")
    print(
        f"spotlane run, steady state (checkpoint 1..last): {steady_rows / steady:8.1f} rows/s ({steady_rows} rows in {steady:.2f} s)"
    )
    print(f"spotlane run, wall incl. start-up and finalize : {n / run_wall:8.1f} rows/s ({run_wall:.1f} s)")
    print(f"ratio pipeline steady state / engine alone     : {(steady_rows / steady) / (n / engine_s):.2f}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
