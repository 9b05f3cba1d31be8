"""The finalizer's data path on a local S3 server: before issue 20 and now, side by side.

The finalizer reads every committed part of a job, in order, and writes the rows into
the results (large row groups, ``ResultWriter``). This measures that path alone (no
SQL) on moto's S3 server for a job of ``--rows`` rows, five ways in one run:

- **before**: parts of 256 rows (the fixed checkpoint size before parts grew to
  ``worker.checkpoint_seconds`` of work), each opened with ``fs.open`` and read one
  at a time (a HEAD for the size, then a GET for the footer and one for the columns);
- **now, 500-row shards**: one part per shard (a 10M-row job in 20,000 shards: a part
  holds at least ten seconds of a lane's work, so a 500-row shard on a fast lane is
  one part), read by the finalizer's ``_read_parts``: one GET a part,
  ``storage.read_concurrency`` (16) at a time;
- **now, the defaults**: shards of ``jobs.rows_per_shard`` (1,000) rows, one part each
  (a worker keeps the part size it learnt for the lane from shard to shard, so a fast
  lane's shard is one part after its first); and the shards a 10M-row job gets by
  default (at most ``jobs.max_shards``, 2,000: 5,000 rows a shard);
- **now, large shards**: parts of ``worker.checkpoint_max_rows`` (8,192) rows, as a
  fast lane writes them in shards of that size or more.

and, to tell the two changes apart, the 256-row parts read the new way; last, the store's
own floor (every 500-row part fetched and dropped, all at once). Prints the
time, rows/s, MB/s and the ratio to *before* of each, and the 10M-row time each
extrapolates to (every part costs the same, so the time grows with the parts).

    python benchmarks/finalize_reads.py [--rows 1000000] [--answer-chars 200]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from lifecycle import _start_s3  # noqa: E402  (moto's server mode, with a bucket "bench")

BEFORE_PART_ROWS = 256


def _part(first: int, rows: int, answer_chars: int) -> pa.Table:
    """A part as a worker writes it: the output columns, short ids, answers of ``answer_chars``."""
    from schemas.arrow import output_schema

    schema = output_schema()
    ids = [f"req-{i:09d}" for i in range(first, first + rows)]
    columns: dict[str, Any] = {f.name: pa.nulls(rows, f.type) for f in schema}
    columns["id"] = pa.array(ids)
    columns["output"] = pa.array([f"answer {i} " + "x" * max(answer_chars - 16, 0) for i in range(first, first + rows)])
    columns["finish_reason"] = pa.array(["stop"] * rows)
    columns["input_tokens"] = pa.array([12] * rows, pa.int32())
    columns["output_tokens"] = pa.array([answer_chars // 4] * rows, pa.int32())
    columns["backend"] = pa.array(["gpu"] * rows)
    columns["model"] = pa.array(["bench-model"] * rows)
    columns["cost_usd"] = pa.array([0.0001] * rows)
    columns["latency_ms"] = pa.array([12.5] * rows)
    columns["attempt"] = pa.array([1] * rows, pa.int32())
    return pa.table([columns[f.name] for f in schema], schema=schema)


def write_parts(folder: str, rows: int, part_rows: int, answer_chars: int) -> tuple[list[str], int]:
    """The parts of a ``rows``-row job, ``part_rows`` each, uploaded in batches; (urls, bytes)."""
    import fsspec

    fs = fsspec.filesystem("s3")
    urls: list[str] = []
    size = 0
    batch: dict[str, bytes] = {}
    for first in range(0, rows, part_rows):
        sink = io.BytesIO()
        pq.write_table(_part(first, min(part_rows, rows - first), answer_chars), sink)
        path = f"{folder}/part-{first:010d}.parquet"
        batch[path] = sink.getvalue()
        size += len(batch[path])
        urls.append(f"s3://{path}")
        if len(batch) >= 256:
            fs.pipe(batch)
            batch = {}
    if batch:
        fs.pipe(batch)
    return urls, size


def _read_before(parts: Sequence[Any], _: int) -> Iterator[tuple[Any, pa.Table]]:
    """The finalizer's reading before: each part opened and read, one at a time."""
    from pipeline.storage.objects import filesystem

    for part in parts:
        fs, path = filesystem(part.url)
        with fs.open(path, "rb") as fh:
            yield part, pq.read_table(fh)


def finalize(urls: list[str], out: str, read: Callable[..., Iterator[tuple[Any, pa.Table]]], at_once: int) -> int:
    """Read every part in order and write the rows as the finalizer does; rows written."""
    from pipeline.storage.objects import remove_tree
    from pipeline.storage.results import ResultWriter

    writer: ResultWriter | None = None
    rows = 0
    for _, table in read([SimpleNamespace(url=u) for u in urls], at_once):
        if writer is None:
            writer = ResultWriter(out, table.schema)
        writer.write(table)
        rows += table.num_rows
    assert writer is not None
    files = writer.close()
    written = sum(int(f["rows"]) for f in files)
    remove_tree(out)
    if written != rows:
        raise SystemExit(f"wrote {written} rows of {rows}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--answer-chars", type=int, default=200, help="characters in each answer")
    args = parser.parse_args()

    import fsspec

    from pipeline.jobs.submit import shard_rows
    from pipeline.tasks.finalize import _read_parts
    from schemas.settings import Settings

    settings = Settings()
    at_once = settings.storage.read_concurrency
    big = settings.worker.checkpoint_max_rows
    default = shard_rows(args.rows, None, settings.jobs)
    default_10m = shard_rows(10_000_000, None, settings.jobs)
    server, _ = _start_s3()
    try:
        layouts = {
            "before": BEFORE_PART_ROWS,
            "shards": 500,
            "default": default,
            "default-10m": default_10m,
            "large": big,
        }
        parts: dict[str, tuple[list[str], int]] = {}
        for name, part_rows in layouts.items():
            t = time.perf_counter()
            parts[name] = write_parts(f"bench/{name}", args.rows, part_rows, args.answer_chars)
            print(f"{len(parts[name][0]):,} parts of {part_rows:,} rows uploaded in {time.perf_counter() - t:.1f} s")
        runs = [
            ("before: 256-row parts, fs.open, one at a time", "before", _read_before, 1),
            (f"256-row parts, one GET each, {at_once} at a time", "before", _read_parts, at_once),
            (f"now: 500-row shards (one part each), {at_once} at a time", "shards", _read_parts, at_once),
            (f"now: the default {default:,}-row shards, {at_once} at a time", "default", _read_parts, at_once),
            (f"now: 10M rows' {default_10m:,}-row shards, {at_once} at a time", "default-10m", _read_parts, at_once),
            (f"now: {big:,}-row parts, {at_once} at a time", "large", _read_parts, at_once),
        ]
        print(f"\nThe finalizer's data path for {args.rows:,} rows on moto's S3 server (read parts, write results):")
        print(f"{'':<56}{'parts':>8}{'seconds':>10}{'rows/s':>12}{'MB/s':>8}{'vs before':>11}{'10M rows':>10}")
        baseline = 0.0
        for label, layout, read, concurrency in runs:
            urls, size = parts[layout]
            t = time.perf_counter()
            rows = finalize(urls, f"s3://bench/out-{layout}-{concurrency}", read, concurrency)
            seconds = time.perf_counter() - t
            baseline = baseline or seconds
            at_10m = seconds * 10_000_000 / rows
            print(
                f"{label:<56}{len(urls):>8,}{seconds:>10.1f}{rows / seconds:>12,.0f}{size / 1e6 / seconds:>8.1f}"
                f"{baseline / seconds:>10.1f}x{at_10m / 60:>8.1f} min"
            )
        # The store's own floor: every part of the 500-row layout fetched and dropped, as
        # many at once as s3fs sends (nothing parsed, nothing written).
        urls, size = parts["shards"]
        fs = fsspec.filesystem("s3")
        t = time.perf_counter()
        fs.cat([u.removeprefix("s3://") for u in urls])
        seconds = time.perf_counter() - t
        print(
            f"{'the store alone: GET every 500-row part, nothing else':<56}{len(urls):>8,}{seconds:>10.1f}"
            f"{args.rows / seconds:>12,.0f}{size / 1e6 / seconds:>8.1f}{'':>11}{seconds * 10_000_000 / args.rows / 60:>6.1f} min"
        )
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
