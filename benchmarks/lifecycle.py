"""What the lifecycle's safety costs: a verified warm -> cold move vs a plain move.

The baseline is what a data team scripts today (``aws s3 mv --recursive`` or
``mv``): copy every object, delete the source, check nothing. spotlane's sweep
copies (server-side within one S3 endpoint, streamed otherwise), reads every
copy back to check its SHA-256 against the manifest, switches the job's SQL row
with a guarded UPDATE, then deletes the source. Both move identical result
folders (same files, same bytes), one after the other, in one run; the script
prints seconds, MB/s and the ratio.

    python benchmarks/lifecycle.py [--files 8] [--rows-per-file 200000] [--s3]

``--s3`` runs both on a local S3 server (moto's server mode), warm and cold in
one bucket, as a production deployment would have them.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.runtime import Runtime  # noqa: E402
from pipeline.storage.lifecycle import sweep  # noqa: E402
from pipeline.storage.objects import MANIFEST, filesystem, write_json  # noqa: E402
from pipeline.storage.results import ResultWriter  # noqa: E402
from pipeline.store.db import session_scope  # noqa: E402
from schemas.arrow import output_schema  # noqa: E402
from schemas.base import utcnow  # noqa: E402
from schemas.status import JobStatus  # noqa: E402
from schemas.tables import Job  # noqa: E402


def _results_table(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    words = np.array("the customer reports a delay in shipping and asks for a refund of the order".split())
    outputs = [" ".join(rng.choice(words, 24)) for _ in range(rows)]
    schema = output_schema()
    columns = {f.name: pa.nulls(rows, f.type) for f in schema}
    columns["id"] = pa.array([f"row-{seed}-{i}" for i in range(rows)])
    columns["output"] = pa.array(outputs)
    columns["input_tokens"] = pa.array(rng.integers(20, 200, rows), pa.int64()).cast(schema.field("input_tokens").type)
    return pa.table(columns, schema=schema)


def _write_results(folder: str, files: int, rows_per_file: int) -> int:
    """A results folder as the finalizer writes it; returns its size in bytes."""
    writer = ResultWriter(folder, output_schema())
    import pipeline.storage.results as finalizer

    saved, finalizer.RESULT_FILE_ROWS = finalizer.RESULT_FILE_ROWS, rows_per_file
    try:
        table = _results_table(rows_per_file, 0)
        for _ in range(files):
            writer.write(table)
        entries = writer.close()
    finally:
        finalizer.RESULT_FILE_ROWS = saved
    write_json({"rows": files * rows_per_file, "files": entries}, f"{folder}/{MANIFEST}")
    return sum(int(e["bytes"]) for e in entries)


def _plain_move(source: str, target: str) -> None:
    fs, src = filesystem(source)
    _, dst = filesystem(target)
    fs.copy(src, dst, recursive=True)
    fs.rm(src, recursive=True)


def _start_s3() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )
    import fsspec

    fsspec.filesystem("s3").mkdir("bench")
    return server, "s3://bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--rows-per-file", type=int, default=200_000)
    parser.add_argument("--s3", action="store_true", help="warm and cold on a local S3 server")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        server = None
        root = Path(tmp).as_uri()
        if args.s3:
            server, root = _start_s3()
        try:
            tiers = {t: f"{root}/{t}" for t in ("hot", "warm", "cold")}
            runtime = Runtime.open(home=Path(tmp) / "home", storage=tiers)
            storage = runtime.storage

            baseline_src, baseline_dst = f"{root}/plain/warm/results", f"{root}/plain/cold/results"
            size = _write_results(baseline_src, args.files, args.rows_per_file)
            started = time.perf_counter()
            _plain_move(baseline_src, baseline_dst)
            plain = time.perf_counter() - started

            job_id = "bench-job"
            folder = storage.new_results_url(job_id)
            assert _write_results(folder, args.files, args.rows_per_file) == size
            ended = utcnow() - timedelta(days=365)
            with session_scope(runtime.engine) as session:
                session.add(
                    Job(
                        id=job_id,
                        status=JobStatus.SUCCEEDED,
                        model="m",
                        input_url="x",
                        input_kind="prompt",
                        max_tokens=1,
                        rows_total=args.files * args.rows_per_file,
                        rows_per_shard=1,
                        shard_count=0,
                        result_url=folder,
                        result_tier="warm",
                        finished_at=ended,
                        checkpoints_purged_at=ended,
                    )
                )
            started = time.perf_counter()
            report = sweep(runtime)
            ours = time.perf_counter() - started
            assert [(a.action, a.status) for a in report.actions] == [("move_to_cold", "done")], report
        finally:
            if server is not None:
                server.terminate()

    mb = size / 1e6
    where = "S3 (moto server, same bucket)" if args.s3 else "local disk"
    print(f"{where}: {args.files} result files x {args.rows_per_file:,} rows = {mb:,.1f} MB")
    print(f"  plain move (copy + delete, unchecked): {plain:7.2f} s  {mb / plain:8.1f} MB/s")
    print(f"  spotlane sweep (copy, verify every file, SQL switch, delete): {ours:7.2f} s  {mb / ours:8.1f} MB/s")
    print(f"  ratio spotlane / plain: {ours / plain:.2f}x the time")


if __name__ == "__main__":
    main()
