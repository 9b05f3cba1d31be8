"""Reading jobs: resolve a reference, status, the job list, results, history, waiting."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, TypedDict

from sqlalchemy import func, select, text

from pipeline.jobs.progress import Live, live
from pipeline.runtime import Runtime
from pipeline.storage.objects import read_manifest
from pipeline.store.db import db_now, session_scope
from schemas.errors import NotFound, StoreError
from schemas.status import JobStatus
from schemas.tables import JOB_PROGRESS_VIEW, Job, Shard, ShardAttempt

__all__ = [
    "JobEvent",
    "JobReport",
    "JobSummary",
    "ResultsInfo",
    "job_events",
    "job_status",
    "list_jobs",
    "resolve_job",
    "results",
    "wait",
]


class JobSummary(TypedDict):
    """One line of ``list_jobs`` (times are ISO 8601, UTC)."""

    job_id: str
    status: str
    model: str
    rows: int
    rows_failed: int
    created_at: str | None
    finished_at: str | None
    result_url: str | None


class JobEvent(TypedDict):
    """One line of a job's history (``job_events``)."""

    at: str
    what: str


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
        matches = (
            session.execute(select(Job.id).where(Job.id.startswith(ref, autoescape=True)).order_by(Job.id).limit(6))
            .scalars()
            .all()
            if ref
            else []
        )
    if len(matches) == 1:
        return str(matches[0])
    if not matches:
        raise NotFound(f"no job {ref!r} in {runtime.store_name} (see `spotlane jobs`)")
    shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
    raise NotFound(
        f"{ref!r} names {'more than 5' if len(matches) > 5 else len(matches)} jobs ({shown}); give more of the id"
    )


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
    #: Rows answered without being sent (the answer cache, or a repeat of an earlier row)
    #: and what sending them would have cost.
    rows_cached: int = 0
    saved_usd: float = 0.0
    #: Rate, ETA, cost so far and projected, and whether it is stalled (``pipeline.jobs.progress``).
    live: Live | None = None

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
        progress = (
            session.execute(text(f"SELECT * FROM {JOB_PROGRESS_VIEW} WHERE job_id = :id"), {"id": job_id})
            .mappings()
            .one()
        )
        rows_cached, saved = session.execute(
            select(func.coalesce(func.sum(Shard.rows_cached), 0), func.coalesce(func.sum(Shard.saved_usd), 0.0)).where(
                Shard.job_id == job_id
            )
        ).one()
        shards: list[dict[str, Any]] = []
        if with_shards:
            for shard in session.execute(
                select(Shard).where(Shard.job_id == job_id).order_by(Shard.row_start)
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
            rows_cached=int(rows_cached),
            saved_usd=float(saved),
            live=live(session, runtime.settings, job, int(progress["rows_done"]), db_now(session)),
        )


def list_jobs(
    runtime: Runtime, limit: int = 20, status: str | None = None, api_key_id: str | None = None
) -> list[JobSummary]:
    """The newest jobs first (``api_key_id``: only that serve key's)."""
    with session_scope(runtime.engine) as session:
        query = select(Job).order_by(Job.created_at.desc()).limit(limit)
        if status:
            query = query.where(Job.status == JobStatus(status))
        if api_key_id is not None:
            query = query.where(Job.api_key_id == api_key_id)
        jobs = session.execute(query).scalars().all()
        return [
            JobSummary(
                job_id=job.id,
                status=job.status.value,
                model=job.model,
                rows=job.rows_total,
                rows_failed=job.rows_failed,
                created_at=_iso(job.created_at),
                finished_at=_iso(job.finished_at),
                result_url=job.result_url,
            )
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
def job_events(runtime: Runtime, job_id: str) -> list[JobEvent]:
    """The job's history, oldest first: submitted, each attempt's start and end, finished."""
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (see `spotlane jobs`)")
        events: list[tuple[datetime, str]] = [
            (
                job.created_at,
                (
                    f"submitted: {job.rows_total:,} rows of {job.source_url or job.input_url} in {job.shard_count} shard(s), "
                    f"model {job.model}" + (f", budget ${job.budget_usd:.4f}" if job.budget_usd is not None else "")
                ),
            )
        ]
        attempts = session.execute(
            select(ShardAttempt, Shard.shard_index)
            .join(Shard, Shard.id == ShardAttempt.shard_id)
            .where(Shard.job_id == job_id)
            .order_by(ShardAttempt.started_at)
        ).all()
        for attempt, index in attempts:
            events.append(
                (
                    attempt.started_at,
                    f"shard {index} attempt {attempt.attempt} started on {attempt.backend} "
                    f"by {attempt.worker_id}, from row {attempt.resumed_from}",
                )
            )
            if attempt.ended_at is not None:
                events.append(
                    (
                        attempt.ended_at,
                        f"shard {index} attempt {attempt.attempt} {attempt.outcome.value}: "
                        f"{attempt.rows_processed:,} rows" + (f"; {attempt.error}" if attempt.error else ""),
                    )
                )
        if job.finished_at is not None:
            events.append(
                (
                    job.finished_at,
                    f"{job.status.value}: {job.rows_ok:,} rows ok, {job.rows_failed:,} failed"
                    + (f"; {job.error}" if job.error else ""),
                )
            )
        elif job.error:
            events.append((job.updated_at, f"{job.status.value}: {job.error}"))
    return [JobEvent(at=at.isoformat(), what=what) for at, what in sorted(events, key=lambda e: e[0])]
