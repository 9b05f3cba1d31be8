"""The Python API: what the CLI wraps, for notebooks and orchestrators.

    from pipeline import Runtime, submit, job_status
    rt = Runtime.open()
    job_id = submit(rt, "prompts.parquet", model="./tiny-model")
    print(job_status(rt, job_id).status)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from sqlalchemy import select, text

from pipeline import producer
from pipeline.db import session_scope
from pipeline.runtime import Runtime
from pipeline.inputs import canonical_url
from pipeline.storage import filesystem, open_new, read_manifest
from schemas.errors import InputError, NotFound, StoreError
from schemas.status import JobStatus
from schemas.tables import JOB_PROGRESS_VIEW, Checkpoint, Job, Shard, ShardAttempt

__all__ = [
    "JobReport", "ResultsInfo", "check_export_target", "export_results", "job_events", "job_status", "list_jobs",
    "resolve_job", "results", "submit", "wait",
]


def resolve_job(runtime: Runtime, ref: str) -> str:
    """The job id ``ref`` names: a full id, a unique prefix of one, or ``latest``."""
    ref = ref.strip()
    with session_scope(runtime.engine) as session:
        if ref == "latest":
            found = session.execute(select(Job.id).order_by(Job.created_at.desc(), Job.id.desc()).limit(1)).scalar()
            if found is None:
                raise NotFound(f"no jobs yet in {runtime.store_name} (see `spotlane submit`)")
            return str(found)
        if session.get(Job, ref) is not None:
            return ref
        matches = session.execute(
            select(Job.id).where(Job.id.startswith(ref, autoescape=True)).order_by(Job.id).limit(6)
        ).scalars().all() if ref else []
    if len(matches) == 1:
        return str(matches[0])
    if not matches:
        raise NotFound(f"no job {ref!r} in {runtime.store_name} (see `spotlane jobs`)")
    shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
    raise NotFound(f"{ref!r} names {'more than 5' if len(matches) > 5 else len(matches)} jobs ({shown}); give more of the id")


def wait(runtime: Runtime, job_id: str, *, timeout: float | None = None, poll_seconds: float = 1.0) -> JobReport:
    """Block until the job is final (or paused: only a bigger budget moves it); return its report.

    ``TimeoutError`` after ``timeout`` seconds. Workers do the work: this only watches SQL.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        report = job_status(runtime, job_id, with_shards=False)
        if report.is_final or report.status == JobStatus.PAUSED.value:
            return report
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} is still {report.status} after {timeout:.0f} s")
        time.sleep(poll_seconds)


def submit(
    runtime: Runtime,
    input_url: str,
    model: str | list[str],
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    rows_per_shard: int | None = None,
    budget_usd: float | None = None,
    deadline: datetime | None = None,
    tags: dict[str, Any] | None = None,
    task: str = "generate",
) -> str:
    """Validate ``input_url``, create the job and enqueue it; return the job id."""
    return producer.submit(
        runtime,
        producer.JobRequest(
            input_url=input_url,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            rows_per_shard=rows_per_shard,
            budget_usd=budget_usd,
            deadline=deadline,
            tags=tags or {},
            task=task,
        ),
    )


@dataclass
class JobReport:
    """A job's row, its ``job_progress`` line and its shards."""

    job_id: str
    status: str
    model: str
    input_url: str
    rows_total: int
    rows_done: int
    rows_failed: int
    shards_total: int
    shards_done: int
    shards_running: int
    shards_waiting: int
    shards_failed: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    percent_done: float
    created_at: str
    started_at: str | None
    finished_at: str | None
    result_url: str | None
    error: str | None
    shards: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_final(self) -> bool:
        return JobStatus(self.status).is_final

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def job_status(runtime: Runtime, job_id: str, *, with_shards: bool = True) -> JobReport:
    """The job's current state, read from SQL (the ``job_progress`` view)."""
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (see `spotlane jobs`)")
        progress = session.execute(
            text(f"SELECT * FROM {JOB_PROGRESS_VIEW} WHERE job_id = :id"), {"id": job_id}
        ).mappings().one()
        shards: list[dict[str, Any]] = []
        if with_shards:
            for shard in session.execute(
                select(Shard).where(Shard.job_id == job_id).order_by(Shard.shard_index)
            ).scalars():
                shards.append(
                    {
                        "shard": shard.shard_index,
                        "status": shard.status.value,
                        "rows": shard.rows_total,
                        "rows_done": shard.rows_done,
                        "rows_failed": shard.rows_failed,
                        "backend": shard.backend,
                        "attempts": shard.attempts,
                        "error": shard.error,
                    }
                )
        return JobReport(
            job_id=job.id,
            status=job.status.value,
            model=job.model,
            input_url=job.source_url or job.input_url,
            rows_total=job.rows_total,
            rows_done=int(progress["rows_done"]),
            rows_failed=int(progress["rows_failed"]),
            shards_total=int(progress["shards_total"]),
            shards_done=int(progress["shards_done"]),
            shards_running=int(progress["shards_running"]),
            shards_waiting=int(progress["shards_waiting"]),
            shards_failed=int(progress["shards_failed"]),
            input_tokens=int(progress["input_tokens"]),
            output_tokens=int(progress["output_tokens"]),
            cost_usd=float(progress["cost_usd"]),
            percent_done=float(progress["percent_done"]),
            created_at=_iso(job.created_at) or "",
            started_at=_iso(job.started_at),
            finished_at=_iso(job.finished_at),
            result_url=job.result_url,
            error=job.error,
            shards=shards,
        )


def list_jobs(runtime: Runtime, limit: int = 20, status: str | None = None) -> list[dict[str, Any]]:
    """The newest jobs first, one dict per job."""
    with session_scope(runtime.engine) as session:
        query = select(Job).order_by(Job.created_at.desc()).limit(limit)
        if status:
            query = query.where(Job.status == JobStatus(status))
        jobs = session.execute(query).scalars().all()
        return [
            {
                "job_id": job.id,
                "status": job.status.value,
                "model": job.model,
                "rows": job.rows_total,
                "rows_failed": job.rows_failed,
                "created_at": _iso(job.created_at),
                "finished_at": _iso(job.finished_at),
                "result_url": job.result_url,
            }
            for job in jobs
        ]


@dataclass(frozen=True)
class ResultsInfo:
    job_id: str
    status: str
    url: str
    manifest: dict[str, Any]
    #: "warm" or "cold": the tier the results are in now.
    tier: str = "warm"

    @property
    def files(self) -> list[str]:
        return [f"{self.url}/{entry['name']}" for entry in self.manifest["files"]]


def results(runtime: Runtime, job_id: str) -> ResultsInfo:
    """Where a finished job's results are, with their manifest."""
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (see `spotlane jobs`)")
        if job.results_deleted_at is not None:
            raise StoreError(
                f"job {job_id}'s results were deleted on {job.results_deleted_at:%Y-%m-%d} "
                "(past storage.retention_days)"
            )
        if job.result_url is None:
            raise StoreError(f"job {job_id} has no results yet (status: {job.status.value})")
        url, status, tier = job.result_url, job.status.value, job.result_tier or "warm"
    return ResultsInfo(job_id, status, url, read_manifest(url), tier)


#: What an export can be, by the target's extension.
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
            return list(session.execute(
                select(Checkpoint.url).join(Shard, Shard.id == Checkpoint.shard_id)
                .where(Shard.job_id == job_id).order_by(Shard.shard_index, Checkpoint.first_row)
            ).scalars())
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
            flat = pa.RecordBatch.from_arrays(
                [_as_text(column) for column in batch.columns], names=batch.schema.names)
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


def job_events(runtime: Runtime, job_id: str) -> list[dict[str, Any]]:
    """The job's history, oldest first: submitted, each attempt's start and end, finished."""
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (see `spotlane jobs`)")
        events: list[tuple[datetime, str]] = [(job.created_at, (
            f"submitted: {job.rows_total:,} rows of {job.source_url or job.input_url} in {job.shard_count} shard(s), "
            f"model {job.model}" + (f", budget ${job.budget_usd:.4f}" if job.budget_usd is not None else "")))]
        attempts = session.execute(
            select(ShardAttempt, Shard.shard_index).join(Shard, Shard.id == ShardAttempt.shard_id)
            .where(Shard.job_id == job_id).order_by(ShardAttempt.started_at)
        ).all()
        for attempt, index in attempts:
            events.append((attempt.started_at, f"shard {index} attempt {attempt.attempt} started on {attempt.backend} "
                                               f"by {attempt.worker_id}, from row {attempt.resumed_from}"))
            if attempt.ended_at is not None:
                events.append((attempt.ended_at, f"shard {index} attempt {attempt.attempt} {attempt.outcome.value}: "
                                                 f"{attempt.rows_processed:,} rows"
                                                 + (f"; {attempt.error}" if attempt.error else "")))
        if job.finished_at is not None:
            events.append((job.finished_at, f"{job.status.value}: {job.rows_ok:,} rows ok, {job.rows_failed:,} failed"
                                             + (f"; {job.error}" if job.error else "")))
        elif job.error:
            events.append((job.updated_at, f"{job.status.value}: {job.error}"))
    return [{"at": at.isoformat(), "what": what} for at, what in sorted(events, key=lambda e: e[0])]
