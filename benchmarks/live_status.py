"""What the live numbers cost a status read, on a big job.

A job of 10M rows in 20,000 shards, half done: 100,000 committed parts (SQLite, the
embedded default; rows written straight into the store). Timed, side by side:

- baseline: ``job_status`` as it was before live numbers (the ``job_progress`` view
  and the job row; ``--json`` without ``live``), measured as the view query alone;
- ours: ``job_status(with_shards=False)`` with ``live`` (rate, ETA, projection,
  stall check), what ``status`` and ``run``'s bar read;
- the view's own live columns (``rows_per_second``, ``seconds_left``, ``spent_usd``).

Target: the live read stays under 0.5 s on this job, so ``status --watch`` and the
jobs page (one read per job) stay usable.

    python benchmarks/live_status.py [--shards 20000] [--parts 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.jobs.queries import job_status  # noqa: E402
from pipeline.runtime import Runtime  # noqa: E402
from schemas.base import utcnow  # noqa: E402
from schemas.status import JobStatus, LedgerKind, ShardStatus  # noqa: E402
from schemas.tables import Checkpoint, CostLedgerEntry, Job, Shard  # noqa: E402


def _build(runtime: Runtime, shards: int, parts: int, rows_per_part: int) -> str:
    now = utcnow()
    job_id = "bench-live"
    rows = shards * parts * rows_per_part
    with runtime.engine.begin() as conn:
        conn.execute(
            insert(Job).values(
                id=job_id,
                status=JobStatus.RUNNING,
                model="m",
                input_url="file:///dev/null",
                input_kind="prompt",
                rows_total=rows,
                rows_per_shard=parts * rows_per_part,
                shard_count=shards,
                max_tokens=64,
                temperature=0.0,
                budget_usd=1000.0,
                created_at=now - timedelta(hours=2),
                started_at=now - timedelta(hours=2),
                updated_at=now,
            )
        )
        done = shards // 2
        conn.execute(
            insert(Shard),
            [
                {
                    "job_id": job_id,
                    "shard_index": i,
                    "row_start": i * parts * rows_per_part,
                    "row_end": (i + 1) * parts * rows_per_part,
                    "status": ShardStatus.DONE if i < done else ShardStatus.QUEUED,
                    "backend": "local",
                    "queue": "gpu.local",
                    "rows_done": parts * rows_per_part if i < done else 0,
                    "est_seconds": 60.0,
                    "est_cost_usd": 0.01,
                    "excluded_backends": [],
                    "updated_at": now,
                }
                for i in range(shards)
            ],
        )
        ids = [r[0] for r in conn.execute(text("select id from shards order by shard_index limit :n"), {"n": done})]
        conn.execute(
            insert(Checkpoint),
            [
                {
                    "shard_id": sid,
                    "first_row": k * parts * rows_per_part + p * rows_per_part,
                    "row_count": rows_per_part,
                    "cost_usd": 0.001 * (1 + (p % 3)),
                    "url": f"file:///x/{sid}-{p}",
                    "attempt": 1,
                    "created_at": now - timedelta(seconds=(done - k) * 0.2),
                }
                for k, sid in enumerate(ids)
                for p in range(parts)
            ],
        )
        conn.execute(
            insert(CostLedgerEntry),
            [
                {
                    "job_id": job_id,
                    "shard_id": sid,
                    "backend": "local",
                    "kind": LedgerKind.CHARGE,
                    "amount_usd": sum(0.001 * (1 + (p % 3)) for p in range(parts)),
                    "created_at": now,
                }
                for sid in ids
            ],
        )
    return job_id


def _time(label: str, fn, repeat: int = 5) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    seconds = (time.perf_counter() - started) / repeat
    print(f"  {label:<48} {seconds * 1000:8.1f} ms")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=20_000)
    parser.add_argument("--parts", type=int, default=10)
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="spotlane-bench-live-")
    os.environ["SPOTLANE_HOME"] = home
    runtime = Runtime.open()
    rows_per_part = 50
    job_id = _build(runtime, args.shards, args.parts, rows_per_part)
    print(
        f"job: {args.shards * args.parts * rows_per_part:,} rows, {args.shards:,} shards, "
        f"{args.shards // 2 * args.parts:,} committed parts (SQLite)"
    )

    def view() -> None:
        with runtime.engine.connect() as conn:
            conn.execute(
                text("select rows_done, percent_done from job_progress where job_id = :id"), {"id": job_id}
            ).one()

    def view_live() -> None:
        with runtime.engine.connect() as conn:
            conn.execute(
                text("select rows_per_second, seconds_left, spent_usd from job_progress where job_id = :id"),
                {"id": job_id},
            ).one()

    base = _time("baseline: the job_progress view's counts", view)
    ours = _time(
        "ours: job_status(with_shards=False) with live", lambda: job_status(runtime, job_id, with_shards=False)
    )
    _time("the view's live columns", view_live)
    report = job_status(runtime, job_id, with_shards=False)
    assert report.live is not None
    print(
        f"\nlive: {report.live.rows_per_second:.1f} rows/s, ETA {report.live.eta}, spent ${report.live.spent_usd:.2f}, "
        f"projected ${report.live.projected_usd:.2f} (${report.live.projected_low_usd:.2f}-"
        f"${report.live.projected_high_usd:.2f}), stalled={report.live.stalled}"
    )
    print(f"ours / baseline: {ours / base:.2f}x; ours: {ours * 1000:.0f} ms (target < 500 ms)")


if __name__ == "__main__":
    main()
