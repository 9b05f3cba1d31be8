"""What the answer cache saves: repeated prompts, and a nightly table that grows.

Against a local OpenAI-compatible server (every request counted and billed by the
tokens its usage reports), spotlane's API lane, jobs worked in this process
(``workers.run``), the embedded default (SQLite, local folders):

1. Repeats: a file where 40% of the rows repeat another row's prompt, run with the
   cache off (``use_cache=False``, the baseline: every row asked) and on (a fresh
   store: nothing cached before). Target: requests = unique prompts, cost <= 0.62x.
2. Nightly: five daily runs of a table that grows by 5% new rows a day, with 2% of
   the old rows' prompts changed each day; day 1 is a full run. Each later day is run
   ``incremental=True`` and compared with a full run of the same day's file with the
   cache off. Target: days 2-5 cost <= 0.08x of a full run each; every day's results
   hold every row.

    python benchmarks/cache.py [--rows 2000]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import api  # noqa: E402
from pipeline.runtime import Runtime  # noqa: E402
from tests.support.openai_server import FakeOpenAI  # noqa: E402
from workers import run  # noqa: E402

PRICE = {"input_usd_per_1m": 1.0, "output_usd_per_1m": 2.0}


def runtime(home: Path, url: str) -> Runtime:
    os.environ["BENCH_CACHE_KEY"] = "sk-bench"
    provider = {"name": "prov", "base_url": url, "api_key_env": "BENCH_CACHE_KEY", "models": {"m": "m"}, **PRICE}
    return Runtime.open(
        home=str(home),
        gpu_pools=[],
        api_providers=[provider],
        worker={"checkpoint_rows": 100},
        jobs={"rows_per_shard": 500},
    )


def write(path: Path, ids: list[str], prompts: list[str]) -> str:
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), path)
    return str(path)


def job(rt: Runtime, server: FakeOpenAI, path: str, **options: Any) -> tuple[int, float, int, Any]:
    """(requests the provider saw, cost charged, rows in the results, the job's report)."""
    before = server.ok
    report = run(rt, path, "m", max_tokens=16, **options)
    assert report.status == "succeeded", report.error
    files = api.results(rt, report.job_id).files if report.result_url else []
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    return server.ok - before, report.cost_usd, rows, report


def repeats(rows: int) -> None:
    rng = random.Random(7)
    unique = int(rows * 0.6)
    prompts = [f"Summarise ticket {i}: the parcel is late, the customer asks for a refund." for i in range(unique)]
    asked = prompts + [rng.choice(prompts) for _ in range(rows - unique)]
    rng.shuffle(asked)
    with FakeOpenAI() as server, tempfile.TemporaryDirectory() as work:
        path = write(Path(work) / "in.parquet", [f"r{i}" for i in range(rows)], asked)
        base = job(runtime(Path(work) / "off", server.url), server, path, use_cache=False)
        ours = job(runtime(Path(work) / "on", server.url), server, path)
    print(f"1. repeats: {rows} rows, {unique} unique prompts ({100 * (rows - unique) / rows:.0f}% repeats)")
    print(f"   cache off: {base[0]:6d} requests  ${base[1]:.6f}  {base[2]} rows")
    print(f"   cache on:  {ours[0]:6d} requests  ${ours[1]:.6f}  {ours[2]} rows  (saved ${ours[3].saved_usd:.6f})")
    print(
        f"   ratio requests {ours[0] / base[0]:.3f}, cost {ours[1] / base[1]:.3f}x (target: requests = unique, <= 0.62x)"
    )


def nightly(rows: int) -> None:
    rng = random.Random(11)
    ids = [f"t{i}" for i in range(rows)]
    prompts = [f"Classify ticket {i}: order {i * 7} arrived damaged." for i in range(rows)]
    with FakeOpenAI() as server, tempfile.TemporaryDirectory() as work:
        ours = runtime(Path(work) / "nightly", server.url)
        print(f"2. nightly: day 1 {rows} rows; each day +5% new rows, 2% of the old prompts changed")
        print("   day   rows   full run (cache off)         incremental              ratio   results")
        for day in range(1, 6):
            if day > 1:
                for i in rng.sample(range(len(ids)), int(len(ids) * 0.02)):
                    prompts[i] = f"{prompts[i]} (edited on day {day})"
                start = len(ids)
                ids += [f"t{i}" for i in range(start, start + int(rows * 0.05))]
                prompts += [f"Classify ticket {i}: order {i * 7} arrived damaged." for i in range(start, len(ids))]
            path = write(Path(work) / f"day{day}.parquet", ids, prompts)
            full = job(runtime(Path(work) / f"full{day}", server.url), server, path, use_cache=False)
            inc = job(ours, server, path, incremental=True)
            print(
                f"   {day}   {len(ids):6d}   {full[0]:6d} req  ${full[1]:.6f}   {inc[0]:6d} req  ${inc[1]:.6f}"
                f"   {inc[1] / full[1]:.3f}x   {inc[2]} of {len(ids)} rows"
            )
        print("   target: days 2-5 <= 0.08x of a full run each, every row in the results every day")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    repeats(args.rows)
    nightly(args.rows)


if __name__ == "__main__":
    main()
