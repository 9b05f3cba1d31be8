"""Exporting a job's rows to one file: Parquet, CSV or JSON Lines, all rows or only the errors."""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from sqlalchemy import select

from pipeline.jobs.queries import results
from pipeline.runtime import Runtime
from pipeline.storage.inputs import canonical_url
from pipeline.storage.objects import filesystem, open_new
from pipeline.store.db import session_scope
from schemas.errors import InputError, NotFound, StoreError
from schemas.status import JobStatus
from schemas.tables import Checkpoint, Job, Shard

__all__ = ["EXPORT_FORMATS", "check_export_target", "export_results"]


EXPORT_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def check_export_target(to: str) -> str:
    """The format of an export to ``to`` (by its extension); ``InputError`` naming the
    problem if it cannot be written there. Checked before any work is done."""
    target = canonical_url(to)
    if "://" not in target and Path(target).is_dir():
        raise InputError(f"{to} is a folder; give a file name")
    suffix = PurePosixPath(to.split("?", 1)[0]).suffix.lower()
    fmt = EXPORT_FORMATS.get(suffix)
    if fmt is None:
        raise InputError(f"{to}: export to .parquet, .csv or .jsonl (not {suffix or 'a name without an extension'})")
    if "://" not in target:
        parent = Path(target).parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        try:  # a real write: permissions alone say nothing to root, or on /proc
            probe = parent / f".spotlane-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise InputError(f"{to}: cannot write in {parent} ({exc.strerror})") from None
    return fmt


def _export_sources(runtime: Runtime, job_id: str) -> list[str]:
    """The files holding the job's rows in input order: its results, or, for a job
    stopped before it had any (cancelled, failed, paused), its committed parts."""
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (see `spotlane jobs`)")
        stopped = job.result_url is None and job.status in (JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.PAUSED)
        if stopped and job.checkpoints_purged_at is None:
            return list(
                session.execute(
                    select(Checkpoint.url)
                    .join(Shard, Shard.id == Checkpoint.shard_id)
                    .where(Shard.job_id == job_id)
                    .order_by(Shard.shard_index, Checkpoint.first_row)
                ).scalars()
            )
    return results(runtime, job_id).files


def export_results(runtime: Runtime, job_id: str, to: str, *, errors_only: bool = False) -> int:
    """Write a job's rows to one file at ``to`` (.parquet, .csv or .jsonl); return the row count.

    A finished job's results, or a stopped job's finished rows; ``errors_only``: only
    the rows that came back with an error. ``to`` may not lie inside spotlane's own
    storage tiers (it could replace a part or a result file), and it appears whole
    or not at all.
    """
    fmt = check_export_target(to)
    target = canonical_url(to)
    for tier in ("hot", "warm", "cold"):
        root = canonical_url(runtime.storage.tier(tier))
        if _within(target, root):
            raise StoreError(f"--to {to} is inside spotlane's storage ({tier} tier): export somewhere else")
    sources = _export_sources(runtime, job_id)
    rows = 0
    with open_new(target) as sink, _RowWriter(sink, fmt) as writer:
        for url in sources:
            fs, path = filesystem(url)
            with fs.open(path, "rb") as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=65536):
                    if errors_only:
                        batch = batch.filter(pc.is_valid(batch.column("error")))
                    writer.write(batch)
                    rows += len(batch)
    return rows


class _RowWriter:
    """Record batches to Parquet, CSV (nested values as JSON text) or JSON Lines."""

    def __init__(self, sink: Any, fmt: str) -> None:
        self.sink, self.fmt = sink, fmt
        self._writer: Any = None

    def __enter__(self) -> _RowWriter:
        return self

    def write(self, batch: pa.RecordBatch) -> None:
        if self.fmt == "parquet":
            if self._writer is None:
                self._writer = pq.ParquetWriter(self.sink, batch.schema, compression="zstd")
            self._writer.write_batch(batch)
        elif self.fmt == "csv":
            flat = pa.RecordBatch.from_arrays([_as_text(column) for column in batch.columns], names=batch.schema.names)
            if self._writer is None:
                self._writer = pacsv.CSVWriter(self.sink, flat.schema)
            self._writer.write_batch(flat)
        else:
            for row in batch.to_pylist():
                self.sink.write((json.dumps(row, ensure_ascii=False, default=str) + "\n").encode())

    def __exit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()


def _as_text(column: pa.Array) -> pa.Array:
    """A column CSV can hold: nested values (an embedding, a struct) become JSON text."""
    if pa.types.is_nested(column.type):
        return pa.array([None if v is None else json.dumps(v) for v in column.to_pylist()], pa.string())
    return column


def _within(target: str, root: str) -> bool:
    def plain(url: str) -> str:
        return url.removeprefix("file://").rstrip("/")

    target, root = plain(target), plain(root)
    return target == root or target.startswith(root + "/")
