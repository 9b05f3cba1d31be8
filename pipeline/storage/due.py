"""What a storage sweep is due to do, and what it reports.

``due_jobs`` lists, per action, the ended jobs whose time has come: deleted after
``storage.retention_days``, moved to cold after ``storage.cold_after_days``,
their parts purged after ``storage.checkpoint_grace_hours``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, select
from sqlalchemy.orm import Session

from pipeline.runtime import Runtime
from schemas.status import ActionStatus, JobStatus, StorageActionKind
from schemas.tables import Job, StorageAction

__all__ = ["FINAL", "ActionReport", "SweepReport", "action_urls", "cutoff_for", "due_jobs"]

#: The job states after which a job's storage ages.
FINAL = tuple(s for s in JobStatus if s.is_final)


@dataclass
class ActionReport:
    job_id: str
    action: str
    status: str
    source_url: str
    target_url: str | None = None
    files: int = 0
    bytes: int = 0
    error: str | None = None


@dataclass
class SweepReport:
    dry_run: bool
    now: str
    actions: list[ActionReport] = field(default_factory=list)
    #: Actions left for the next sweep (``storage.sweep_max_seconds`` ran out; a
    #: sweep always does at least one, so it always makes progress).
    deferred: int = 0
    #: Another sweep holds the lease; this one did nothing.
    locked: bool = False
    #: Answer-cache entries past ``cache.ttl_days`` dropped.
    cache_dropped: int = 0
    #: Failed actions past ``MAX_ATTEMPTS`` that sweeps no longer retry.
    given_up: int = 0

    @property
    def failed(self) -> list[ActionReport]:
        return [a for a in self.actions if a.status == ActionStatus.FAILED.value]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "now": self.now,
            "deferred": self.deferred,
            "locked": self.locked,
            "given_up": self.given_up,
            "cache_dropped": self.cache_dropped,
            "actions": [asdict(a) for a in self.actions],
        }


def _open_action(kind: StorageActionKind) -> Any:
    return exists().where(
        StorageAction.job_id == Job.id,
        StorageAction.action == kind,
        StorageAction.status != ActionStatus.DONE,
    )


def due_jobs(session: Session, now: datetime, runtime: Runtime) -> dict[StorageActionKind, list[str]]:
    storage = runtime.settings.storage
    ended = and_(Job.status.in_(FINAL), Job.finished_at.is_not(None), Job.results_deleted_at.is_(None))
    found: dict[StorageActionKind, list[str]] = {kind: [] for kind in StorageActionKind}
    if storage.retention_days:
        cutoff = cutoff_for(runtime, StorageActionKind.DELETE_RESULTS, now)
        found[StorageActionKind.DELETE_RESULTS] = list(
            session.execute(select(Job.id).where(ended, Job.finished_at < cutoff).order_by(Job.finished_at)).scalars()
        )
    gone = set(found[StorageActionKind.DELETE_RESULTS])
    if storage.cold_after_days:
        cutoff = cutoff_for(runtime, StorageActionKind.MOVE_TO_COLD, now)
        found[StorageActionKind.MOVE_TO_COLD] = [
            j
            for j in session.execute(
                select(Job.id)
                .where(
                    ended,
                    Job.finished_at < cutoff,
                    Job.result_tier == "warm",
                    ~_open_action(StorageActionKind.MOVE_TO_COLD),
                )
                .order_by(Job.finished_at)
            ).scalars()
            if j not in gone
        ]
    cutoff = cutoff_for(runtime, StorageActionKind.PURGE_CHECKPOINTS, now)
    found[StorageActionKind.PURGE_CHECKPOINTS] = [
        j
        for j in session.execute(
            select(Job.id)
            .where(ended, Job.finished_at < cutoff, Job.checkpoints_purged_at.is_(None))
            .order_by(Job.finished_at)
        ).scalars()
        if j not in gone
    ]
    return found


def action_urls(runtime: Runtime, kind: StorageActionKind, job_id: str) -> tuple[str, str | None]:
    storage = runtime.storage
    if kind is StorageActionKind.MOVE_TO_COLD:
        return storage.job_url(job_id, "warm"), storage.job_url(job_id, "cold")
    if kind is StorageActionKind.PURGE_CHECKPOINTS:
        return storage.checkpoints_url(job_id), None
    return storage.job_url(job_id, "warm"), None


def cutoff_for(runtime: Runtime, kind: StorageActionKind, now: datetime) -> datetime:
    storage = runtime.settings.storage
    if kind is StorageActionKind.DELETE_RESULTS:
        return now - timedelta(days=storage.retention_days)
    if kind is StorageActionKind.MOVE_TO_COLD:
        return now - timedelta(days=storage.cold_after_days)
    return now - timedelta(hours=storage.checkpoint_grace_hours)
