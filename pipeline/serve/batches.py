"""OpenAI's file and batch objects over spotlane's files table and jobs.

A batch is a job (``batch_<job id>``) created from an uploaded batch JSONL file; its
status is the job's, mapped to OpenAI's names; its output and error files are
written from the job's rows the first time they are asked for once the job has
stopped (``ensure_output_files``), into the warm tier, under ids derived from the
job, so replicas that race write the same files and record them once.

Every custom_id of the input lands exactly once in the output file (answered) or
the error file (an error row, or, for a batch cancelled or expired before it got to
the row, ``batch_cancelled`` / ``batch_expired``, as OpenAI reports them).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pipeline.jobs.export import write_openai
from pipeline.jobs.progress import live
from pipeline.jobs.webhooks import EXPIRED
from pipeline.runtime import Runtime
from pipeline.storage.objects import filesystem, write_options
from pipeline.store.db import db_now, session_scope
from schemas.errors import InputError
from schemas.settings import Settings
from schemas.status import JobStatus, ShardStatus
from schemas.tables import Job, Shard, StoredFile

__all__ = [
    "batch_id",
    "batch_object",
    "ensure_output_files",
    "file_object",
    "job_id_of",
    "parse_window",
    "stopped",
]

_STATUS = {
    JobStatus.PENDING: "validating",
    JobStatus.RUNNING: "in_progress",
    JobStatus.PAUSED: "in_progress",
    JobStatus.FINALIZING: "finalizing",
    JobStatus.SUCCEEDED: "completed",
    JobStatus.SUCCEEDED_WITH_ERRORS: "completed",
    JobStatus.FAILED: "failed",
}


def batch_id(job_id: str) -> str:
    return f"batch_{job_id}"


def job_id_of(batch: str) -> str | None:
    return batch.removeprefix("batch_") if batch.startswith("batch_") else None


def parse_window(window: str) -> timedelta:
    """A completion window: ``24h``, any number of hours (OpenAI takes only 24h), or days (``2d``)."""
    found = re.fullmatch(r"\s*(\d+)\s*([hd])\s*", window or "")
    if not found or int(found.group(1)) < 1:
        raise InputError(f"completion_window {window!r}: give hours such as '24h' (or days, '2d')")
    amount = int(found.group(1))
    return timedelta(hours=amount) if found.group(2) == "h" else timedelta(days=amount)


def _ts(at: datetime | None) -> int | None:
    return int(at.timestamp()) if at is not None else None


def _expires_at(job: Job) -> int | None:
    """``created_at`` + the window, as OpenAI reports it (the deadline itself was taken an
    instant before the job row's creation: in whole seconds the two could differ by one)."""
    created = _ts(job.created_at)
    if job.completion_window and created is not None:
        try:
            return created + int(parse_window(job.completion_window).total_seconds())
        except InputError:
            pass
    return _ts(job.deadline)


def file_object(row: StoredFile) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": _ts(row.created_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def _running(session: Session, job_id: str) -> int:
    return int(
        session.execute(
            select(func.count()).select_from(Shard).where(Shard.job_id == job_id, Shard.status == ShardStatus.RUNNING)
        ).scalar_one()
    )


def stopped(session: Session, job: Job) -> bool:
    """The job will write no more rows: it ended, and no shard of a cancelled job still runs."""
    return job.status.is_final and (job.status is not JobStatus.CANCELLED or _running(session, job.id) == 0)


def _status(session: Session, job: Job) -> str:
    if job.status is JobStatus.CANCELLED:
        if (job.error or "").startswith(EXPIRED):
            return "expired"
        return "cancelled" if _running(session, job.id) == 0 else "cancelling"
    return _STATUS.get(job.status, "in_progress")


def batch_object(session: Session, job: Job, settings: Settings | None = None) -> dict[str, Any]:
    """OpenAI's batch object for ``job``. With ``settings``, a batch still running also
    carries its live numbers in ``metadata`` (strings, as OpenAI's metadata holds):
    ``spotlane_rows_per_second``, ``spotlane_eta``, ``spotlane_spent_usd``,
    ``spotlane_projected_usd`` and, when it has stalled, ``spotlane_stalled``."""
    status = _status(session, job)
    if job.status.is_final and job.status is not JobStatus.CANCELLED:  # what the results hold
        done, failed = job.rows_ok + job.rows_failed, job.rows_failed
    else:  # what the shards have committed so far
        done, failed = (
            int(v)
            for v in session.execute(
                select(
                    func.coalesce(func.sum(Shard.rows_done), 0), func.coalesce(func.sum(Shard.rows_failed), 0)
                ).where(Shard.job_id == job.id)
            ).one()
        )
    files = {
        f.id: f
        for f in session.scalars(
            select(StoredFile).where(StoredFile.job_id == job.id, StoredFile.deleted_at.is_(None))
        ).all()
    }
    ended = job.finished_at if job.status.is_final else None
    errors = None
    if job.status is JobStatus.FAILED:
        errors = {
            "object": "list",
            "data": [{"code": "batch_failed", "message": job.error or "the batch failed", "param": None, "line": None}],
        }
    return {
        "id": batch_id(job.id),
        "object": "batch",
        "endpoint": job.openai_endpoint,
        "model": job.model,
        "errors": errors,
        "input_file_id": job.input_file_id,
        "completion_window": job.completion_window,
        "status": status,
        "output_file_id": f"file-{job.id}-output" if f"file-{job.id}-output" in files else None,
        "error_file_id": f"file-{job.id}-errors" if f"file-{job.id}-errors" in files else None,
        "created_at": _ts(job.created_at),
        "in_progress_at": _ts(job.started_at),
        "expires_at": _expires_at(job),
        "finalizing_at": _ts(job.updated_at) if job.status is JobStatus.FINALIZING else None,
        "completed_at": _ts(ended) if status == "completed" else None,
        "failed_at": _ts(ended) if status == "failed" else None,
        "expired_at": _ts(ended) if status == "expired" else None,
        "cancelling_at": _ts(ended) if status in ("cancelling", "cancelled") else None,
        "cancelled_at": _ts(ended) if status == "cancelled" else None,
        "request_counts": {"total": job.rows_total, "completed": done - failed, "failed": failed},
        "metadata": _with_live(session, settings, job, done) if settings is not None else job.batch_metadata,
    }


def _with_live(session: Session, settings: Settings, job: Job, done: int) -> dict[str, Any] | None:
    if job.status.is_final:
        return job.batch_metadata
    now = live(session, settings, job, done, db_now(session))
    numbers = {
        "spotlane_rows_per_second": f"{now.rows_per_second:.3f}",
        "spotlane_eta": now.eta or "",
        "spotlane_spent_usd": f"{now.spent_usd:.6f}",
        "spotlane_projected_usd": f"{now.projected_usd:.6f}",
    }
    if now.stalled:
        numbers["spotlane_stalled"] = (now.stalled_reason or "no progress")[:500]
    return {**(job.batch_metadata or {}), **numbers}


def ensure_output_files(runtime: Runtime, job_id: str) -> None:
    """Write and record the output and error files of a stopped batch, once."""
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None or job.openai_endpoint is None or not stopped(session, job):
            return
        if session.get(StoredFile, f"file-{job_id}-output") is not None:
            return
        key = job.api_key_id or ""
    folder = f"{runtime.storage.job_url(job_id, 'warm')}/openai"
    fs, base = filesystem(folder)
    fs.makedirs(base, exist_ok=True)
    cls = runtime.storage.storage_class("warm")
    with (
        fs.open(f"{base}/output.jsonl", "wb", **write_options(cls)) as out,
        fs.open(f"{base}/errors.jsonl", "wb", **write_options(cls)) as err,
    ):
        _, errors = write_openai(runtime, job_id, out, err)
    with session_scope(runtime.engine) as session:
        for name in ("output", "errors") if errors else ("output",):
            try:
                with session.begin_nested():
                    session.add(
                        StoredFile(
                            id=f"file-{job_id}-{name}",
                            api_key_id=key,
                            filename=f"batch_{job_id}_{name}.jsonl",
                            purpose="batch_output",
                            bytes=fs.size(f"{base}/{name}.jsonl"),
                            url=f"{folder}/{name}.jsonl",
                            job_id=job_id,
                        )
                    )
            except IntegrityError:
                pass  # another replica recorded it first
