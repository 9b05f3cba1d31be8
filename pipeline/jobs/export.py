"""Exporting a job's rows: Parquet, CSV, JSON Lines or OpenAI's batch output format.

``to`` gets the rows, ``errors_to`` the rows that came back with an error (only
those, if ``to`` is not given). In OpenAI's format (``fmt="openai"``) the two are
its output and error files: every custom_id in exactly one of them, the answered
ones in ``to`` shaped like the endpoint's response, the others in ``errors_to``
(error rows, and the rows a cancelled or expired job never reached).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from sqlalchemy import select

from pipeline.jobs.queries import results
from pipeline.runtime import Runtime
from pipeline.storage.inputs import canonical_url, iter_rows, open_parquet
from pipeline.storage.objects import filesystem, open_new
from pipeline.storage.openai_batch import error_line, openai_lines
from pipeline.storage.results import with_parsed
from pipeline.store.db import session_scope
from schemas.arrow import output_schema
from schemas.errors import InputError, NotFound, StoreError
from schemas.status import JobStatus
from schemas.structured import arrow_type
from schemas.tables import Checkpoint, Job, Shard

__all__ = [
    "EXPORT_FORMATS",
    "Exported",
    "check_export_target",
    "error_rows",
    "export_results",
    "export_sources",
    "write_openai",
]


EXPORT_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def check_export_target(to: str, fmt: str | None = None) -> str:
    """The format of an export to ``to`` (``fmt``, or by its extension); ``InputError``
    naming the problem if it cannot be written there. Checked before any work is done."""
    target = canonical_url(to)
    if "://" not in target and Path(target).is_dir():
        raise InputError(f"{to} is a folder; give a file name")
    suffix = PurePosixPath(to.split("?", 1)[0]).suffix.lower()
    if fmt is not None and fmt not in (*EXPORT_FORMATS.values(), "openai"):
        raise InputError(f"--format {fmt}: use parquet, csv, jsonl or openai")
    fmt = fmt or EXPORT_FORMATS.get(suffix)
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


def export_sources(runtime: Runtime, job_id: str, *, partial: bool = False) -> list[str]:
    """The files holding the job's rows in input order: its results, or, for a job
    stopped before it had any (cancelled, failed, paused), or any job not finished yet
    when ``partial``, its committed parts."""
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (see `spotlane jobs`)")
        stopped = job.result_url is None and job.status in (JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.PAUSED)
        if (stopped or (partial and job.result_url is None)) and job.checkpoints_purged_at is None:
            return list(
                session.execute(
                    select(Checkpoint.url)
                    .join(Shard, Shard.id == Checkpoint.shard_id)
                    .where(Shard.job_id == job_id)
                    .order_by(Shard.row_start, Checkpoint.first_row)
                ).scalars()
            )
    return results(runtime, job_id).files


def missing_rows(runtime: Runtime, job_id: str) -> list[tuple[int, int]]:
    """The input rows ``[start, end)`` no committed part holds yet, in order."""
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (see `spotlane jobs`)")
        if job.result_url is not None:
            return []
        spans = session.execute(
            select(Shard.row_start + Shard.rows_done, Shard.row_end)
            .where(Shard.job_id == job_id, Shard.row_start + Shard.rows_done < Shard.row_end)
            .order_by(Shard.row_start)
        ).all()
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((int(start), int(end)))
    return merged


class Exported(NamedTuple):
    #: Rows written to ``to``, and to ``errors_to``.
    rows: int
    errors: int
    #: A partial export: the input rows ``[start, end)`` not committed yet.
    missing: list[tuple[int, int]] = []


def export_results(
    runtime: Runtime,
    job_id: str,
    to: str | None,
    *,
    errors_to: str | None = None,
    fmt: str | None = None,
    partial: bool = False,
) -> Exported:
    """Write a job's rows to ``to`` and its error rows to ``errors_to`` (see the module
    docstring); return how many rows went to each.

    A finished job's results, or a stopped job's finished rows; ``partial``: a running
    job's rows committed so far, in input order (``Exported.missing`` says which are not). Neither file may lie
    inside spotlane's own storage tiers (it could replace a part or a result file),
    and each appears whole or not at all.
    """
    targets = [t for t in (to, errors_to) if t]
    if not targets:
        raise InputError("give --to FILE, --errors FILE, or both")
    formats = {t: check_export_target(t, fmt) for t in targets}
    for target in targets:
        for tier in ("hot", "warm", "cold"):
            root = canonical_url(runtime.storage.tier(tier))
            if _within(canonical_url(target), root):
                raise StoreError(f"{target} is inside spotlane's storage ({tier} tier): export somewhere else")
    with contextlib.ExitStack() as stack:
        sinks = {t: stack.enter_context(open_new(canonical_url(t))) for t in targets}
        missing = missing_rows(runtime, job_id) if partial else []
        if fmt == "openai":
            if partial:
                raise InputError("--partial exports Parquet, CSV or JSON Lines; OpenAI's format is for finished jobs")
            return Exported(*write_openai(runtime, job_id, sinks.get(to or ""), sinks.get(errors_to or "")))
        empty = _results_schema(runtime, job_id)  # what a file of no rows holds
        writers = {t: stack.enter_context(_RowWriter(sinks[t], formats[t], empty)) for t in targets}
        counts = {t: 0 for t in targets}
        for batch in _batches(runtime, job_id, partial=partial):
            if to:
                writers[to].write(batch)
                counts[to] += len(batch)
            if errors_to:
                failed = batch.filter(pc.is_valid(batch.column("error")))
                if len(failed):
                    writers[errors_to].write(failed)
                    counts[errors_to] += len(failed)
        return Exported(counts.get(to or "", 0), counts.get(errors_to or "", 0), missing)


def _results_schema(runtime: Runtime, job_id: str) -> pa.Schema | None:
    """The columns of the job's results, as the finalizer writes them (None if unknown)."""
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        carried, task, schema, input_url = list(job.carried_columns), job.task, job.response_schema, job.input_url
    try:
        names = open_parquet(input_url).schema_arrow
    except (OSError, InputError, StoreError):
        return output_schema(None, embed=task == "embed")
    kept = pa.schema([names.field(c) for c in carried if c in names.names]) if carried else None
    fields = output_schema(kept, embed=task == "embed")
    per_row = "response_format" in names.names
    if schema is not None or per_row:
        kind = pa.string() if per_row or schema is None else arrow_type(schema)
        fields = fields.append(pa.field("parsed", kind))
    return fields


def error_rows(runtime: Runtime, job_id: str, most: int) -> list[dict[str, Any]]:
    """The job's first ``most`` rows with an error (``id``, ``error``, ``backend``), from its
    results or the parts committed so far; none before anything was committed."""
    found: list[dict[str, Any]] = []
    try:
        for batch in _batches(runtime, job_id, partial=True):
            failed = batch.filter(pc.is_valid(batch.column("error"))).select(["id", "error", "backend"])
            found.extend(failed.to_pylist()[: most - len(found)])
            if len(found) >= most:
                break
    except (StoreError, OSError):  # no results and no parts (deleted, purged, a part gone meanwhile)
        return found
    return found


def _batches(runtime: Runtime, job_id: str, *, partial: bool = False) -> Iterator[pa.RecordBatch]:
    """The rows of ``export_sources``; parts get the ``parsed`` column the results have."""
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        schema, input_url = (job.response_schema, job.input_url) if job is not None else (None, "")
    per_row: bool | None = None
    for url in export_sources(runtime, job_id, partial=partial):
        fs, path = filesystem(url)
        with fs.open(path, "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=65536):
                if "parsed" not in batch.schema.names:  # a part: parsed as the finalizer does
                    if per_row is None:
                        per_row = "response_format" in open_parquet(input_url).schema_arrow.names
                    if schema is not None or per_row:
                        table = with_parsed(pa.Table.from_batches([batch]), schema, as_text=per_row)
                        yield from table.to_batches()
                        continue
                yield batch


def write_openai(runtime: Runtime, job_id: str, out: Any | None, err: Any | None) -> tuple[int, int]:
    """A job's rows as OpenAI's batch output (``out``) and error (``err``) lines, in
    input order; rows a cancelled or expired job never reached are error lines too.
    Either sink may be None (those lines are skipped). Returns the two line counts."""
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (see `spotlane jobs`)")
        endpoint = job.openai_endpoint or ("/v1/embeddings" if job.task == "embed" else "/v1/chat/completions")
        stopped = job.status in (JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.PAUSED)
        expired = (job.error or "").startswith("expired")
        input_url = job.input_url
        ranges = [
            (s.row_start + s.rows_done, s.row_end)
            for s in session.scalars(select(Shard).where(Shard.job_id == job_id).order_by(Shard.row_start)).all()
        ]
    created = int(time.time())
    counts = [0, 0]
    for batch in _batches(runtime, job_id):
        for is_error, line in openai_lines(batch, endpoint, created):
            sink = err if is_error else out
            if sink is not None:
                sink.write(line)
                counts[is_error] += 1
    if stopped and err is not None:
        code = "batch_expired" if expired else "batch_cancelled"
        message = f"the batch {'expired' if expired else 'stopped'} before this request was run"
        for start, end in ranges:
            if start >= end:
                continue
            for batch in iter_rows(input_url, start, end, ["id"]):
                for custom_id in batch.column("id").to_pylist():
                    err.write(error_line(custom_id, code, message))
                    counts[1] += 1
    return counts[0], counts[1]


class _RowWriter:
    """Record batches to Parquet, CSV (nested values as JSON text) or JSON Lines."""

    def __init__(self, sink: Any, fmt: str, empty: pa.Schema | None = None) -> None:
        self.sink, self.fmt, self.empty = sink, fmt, empty
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
        if self._writer is None and self.fmt == "parquet" and self.empty is not None and exc[0] is None:
            self._writer = pq.ParquetWriter(self.sink, self.empty, compression="zstd")  # no rows: still Parquet
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
