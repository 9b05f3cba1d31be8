"""Replacing retried rows in a result file: the row-by-row rebuild vs one vectorised take.

``retry-errors`` merges a child job's rows into the parent's next result version.
The baseline rebuilt every parent file that had a replaced row from one-row
slices (what spotlane did before); spotlane now maps ids with ``pc.index_in`` and
builds the file with one ``take``. Each arm runs in a fresh process on the same
parent file (N rows, a few hundred retried) and reports wall time and the growth
of peak RSS.

    python benchmarks/merge_retry.py [--rows 300000] [--retried 300]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _baseline(table, redone):  # type: ignore[no-untyped-def]
    """The merge as it was: a one-row slice per parent row, then concat_tables."""
    import pyarrow as pa

    replacement = {row_id: i for i, row_id in enumerate(redone.column("id").to_pylist())}
    take = [replacement.get(i) for i in table.column("id").to_pylist()]
    swapped = redone.select(table.column_names).cast(table.schema)
    return pa.concat_tables([swapped.slice(t, 1) if t is not None else table.slice(k, 1) for k, t in enumerate(take)])


def _arm(arm: str, parent: str, child: str) -> None:
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT))
    from pipeline.jobs.retry import _replace_rows

    table, redone = pq.read_table(parent), pq.read_table(child)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    merged = _baseline(table, redone) if arm == "baseline" else _replace_rows(table, redone)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert merged.num_rows == table.num_rows
    print(json.dumps({"seconds": seconds, "rss_growth_mib": (peak - before) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--retried", type=int, default=300)
    parser.add_argument("--arm", choices=["baseline", "spotlane"])
    parser.add_argument("--parent")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.arm:
        _arm(args.arm, args.parent, args.child)
        return

    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        n = args.rows
        parent, child = f"{tmp}/parent.parquet", f"{tmp}/child.parquet"
        pq.write_table(
            pa.table(
                {
                    "id": [f"row-{i:08d}" for i in range(n)],
                    "output": [f"an answer of some length for row {i}" for i in range(n)],
                    "error": pa.array([None] * n, pa.string()),
                    "cost_usd": pa.array([0.001] * n),
                    "team": [["a", "b", "c"][i % 3] for i in range(n)],
                }
            ),
            parent,
        )
        step = max(1, n // args.retried)
        picked = list(range(0, n, step))[: args.retried]
        pq.write_table(
            pa.table(
                {
                    "id": [f"row-{i:08d}" for i in picked],
                    "output": ["retried"] * len(picked),
                    "error": pa.array([None] * len(picked), pa.string()),
                    "cost_usd": pa.array([0.002] * len(picked)),
                    "team": ["z"] * len(picked),
                }
            ),
            child,
        )
        figures = {}
        for arm in ("baseline", "spotlane"):
            out = subprocess.run(
                [sys.executable, __file__, "--arm", arm, "--parent", parent, "--child", child],
                capture_output=True,
                text=True,
                check=True,
            )
            figures[arm] = json.loads(out.stdout.strip().splitlines()[-1])
    b, s = figures["baseline"], figures["spotlane"]
    print(f"merge {args.retried} retried rows into a {args.rows:,}-row result file")
    print(
        f"  baseline (one-row slices): {b['seconds']:7.2f} s, peak RSS +{b['rss_growth_mib']:8.1f} MiB "
        f"({b['rss_growth_mib'] * 1024 / args.rows:.1f} KiB per row)"
    )
    print(f"  spotlane (index_in + take): {s['seconds']:7.2f} s, peak RSS +{s['rss_growth_mib']:8.1f} MiB")
    print(
        f"  ratio: {b['seconds'] / max(s['seconds'], 1e-9):.0f}x faster, "
        f"{b['rss_growth_mib'] / max(s['rss_growth_mib'], 0.1):.0f}x less memory"
    )


if __name__ == "__main__":
    main()
