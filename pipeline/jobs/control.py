"""Stopping and continuing jobs by hand: cancel, resume, and changing the budget.

``cancel`` stops routing at once; shards not started go back to ``pending`` and a
running shard stops at its next checkpoint (the worker sees the job cancelled),
so every committed checkpoint is kept. A job writing its results (``finalizing``)
spends nothing more and is not cancelled. ``resume`` continues a cancelled, failed or
paused job: unfinished shards are routed again and resume after their last
committed checkpoint; finished shards are not touched. ``set_budget`` raises (or
lowers) a job's budget and, if the job was paused for money, routes it again.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from pipeline.runtime import Runtime
from pipeline.store import transitions
from pipeline.store.db import session_scope
from schemas.errors import InputError, NotFound, StoreError
from schemas.status import JobStatus
from schemas.tables import Job, Shard

__all__ = ["Stopped", "cancel", "resume", "set_budget"]


@dataclass(frozen=True)
class Stopped:
    job_id: str
    status: str
    rows_kept: int
    rows_total: int


def _rows_done(session: object, job_id: str) -> int:
    return int(
        session.execute(  # type: ignore[attr-defined]
            select(func.coalesce(func.sum(Shard.rows_done), 0)).where(Shard.job_id == job_id)
        ).scalar_one()
    )


def cancel(runtime: Runtime, job_id: str, *, reason: str = "cancelled by hand") -> Stopped:
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (see `spotlane jobs`)")
        if job.status.is_final:
            raise StoreError(f"job {job_id} already ended ({job.status.value}); nothing to cancel")
        if job.status is JobStatus.FINALIZING:
            raise StoreError(f"job {job_id} is writing its results (every shard has ended); nothing to cancel")
        if not transitions.cancel_job(session, job_id, reason):
            raise StoreError(f"job {job_id} changed state while cancelling; try again")
        stopped = Stopped(job_id, JobStatus.CANCELLED.value, _rows_done(session, job_id), job.rows_total)
    runtime.send_webhooks()
    return stopped


def resume(runtime: Runtime, job_id: str) -> Stopped:
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (see `spotlane jobs`)")
        if job.status not in (JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.PAUSED):
            raise StoreError(f"job {job_id} is {job.status.value}; only cancelled, failed or paused jobs resume")
        # Guarded on the checkpoints being there: the lifecycle sweep deletes them only
        # of jobs still final and not yet purged (both are guarded UPDATEs).
        if not transitions.resume_job(session, job_id, job.status):
            session.refresh(job)
            if job.checkpoints_purged_at is None:
                raise StoreError(f"job {job_id} changed state while resuming (now {job.status.value}); try again")
            raise StoreError(
                f"job {job_id}'s checkpoints were deleted by the storage lifecycle "
                f"(storage.checkpoint_grace_hours); it cannot resume: submit its input again"
            )
        kept = _rows_done(session, job_id)
        total = job.rows_total
    runtime.send_route(job_id)
    return Stopped(job_id, JobStatus.RUNNING.value, kept, total)


def set_budget(runtime: Runtime, job_id: str, budget_usd: float) -> str:
    """Set a job's budget; a job paused for money resumes. Returns its status."""
    if budget_usd < 0 or budget_usd != budget_usd:
        raise InputError("the budget must be a number of USD, not negative")
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (see `spotlane jobs`)")
        resumed = transitions.change_budget(session, job_id, budget_usd)
        status = JobStatus.RUNNING.value if resumed else job.status.value
    runtime.send_route(job_id)
    return status
