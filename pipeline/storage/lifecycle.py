"""The storage lifecycle: warm -> cold moves, checkpoint cleanup, retention.

One sweep (the scheduler sends one every ``storage.sweep_interval_seconds``;
``spotlane storage sweep`` runs one by hand) does, in this order:

1. completes every action an earlier sweep recorded but did not finish;
2. deletes everything of jobs that ended more than ``storage.retention_days`` ago;
3. moves results of jobs that ended more than ``storage.cold_after_days`` ago from
   warm to cold;
4. deletes the hot-tier part files (checkpoints and orphans) of jobs that ended
   more than ``storage.checkpoint_grace_hours`` ago.

One sweep runs at a time (a lease in SQL, renewed after every file). Every step
is recorded in ``storage_actions`` before a byte moves, and every step can be
run again (a failed one by the next ``MAX_ATTEMPTS`` sweeps, then by hand). A
move copies each file (by the filesystem itself where it can: the kernel, S3
server-side), checks the copy against the manifest's SHA-256 and size (a
streamed copy checks the source too, so a damaged warm file is reported, not
archived), switches ``jobs.result_url`` with a guarded UPDATE, and only then
deletes the warm files it copied (a result version written meanwhile stays). A
crash anywhere leaves either the warm copy that SQL points at, or both copies;
the next sweep finishes the move.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update

from pipeline import metrics
from pipeline.runtime import Runtime
from pipeline.storage.due import FINAL, ActionReport, SweepReport, action_urls, cutoff_for, due_jobs
from pipeline.storage.moving import copy_verified, delete_copied
from pipeline.storage.objects import (
    list_files,
    remove_tree,
)
from pipeline.store import answers, leases
from pipeline.store.db import session_scope
from pipeline.store.guards import matched
from pipeline.store.identity import owner_id
from schemas.base import utcnow
from schemas.errors import StoreError
from schemas.status import ActionStatus, StorageActionKind
from schemas.tables import Job, StorageAction

__all__ = ["SweepReport", "sweep"]

log = logging.getLogger(__name__)


# -- the three actions -----------------------------------------------------------------


def _do_move(runtime: Runtime, action: StorageAction, heartbeat: Callable[[], None]) -> tuple[int, int]:
    source, target = action.source_url, action.target_url or ""
    with session_scope(runtime.engine) as session:
        job = session.get(Job, action.job_id)
        if job is None or job.results_deleted_at is not None:
            return 0, 0  # deleted meanwhile: nothing to move
        result_url, finished_at = job.result_url or "", job.finished_at
        recent = finished_at is None or finished_at >= cutoff_for(
            runtime, StorageActionKind.MOVE_TO_COLD, action.started_at
        )
        if not job.status.is_final or (recent and result_url.startswith(source + "/")):
            # Resumed (and perhaps finished again) since the action started: its new
            # results are not due yet; a later sweep moves them when they are.
            return 0, 0
    if result_url.startswith(source + "/"):
        copied = copy_verified(source, target, runtime.storage.storage_class("cold"), heartbeat)
        moved_url = target + result_url[len(source) :]
        with session_scope(runtime.engine) as session:
            # Guarded on the very results copied: a resume and a new finalization (a
            # new folder, a new finish time) or a retry's merge meanwhile switch nothing.
            switched = matched(
                session.execute(
                    update(Job)
                    .where(
                        Job.id == action.job_id,
                        Job.result_url == result_url,
                        Job.status.in_(FINAL),
                        Job.finished_at == finished_at,
                    )
                    .values(result_url=moved_url, result_tier="cold", updated_at=utcnow())
                )
            )
        if switched != 1:
            raise StoreError(f"job {action.job_id}'s results changed during the move; the next sweep tries again")
        log.info("job %s: results moved to %s (%d files)", action.job_id, moved_url, len(copied))
    elif result_url.startswith(target + "/"):
        copied = dict(list_files(target))  # switched by an earlier, interrupted sweep
    else:
        return 0, 0  # results are elsewhere (re-finalized after a resume): leave them
    delete_copied(source, copied)  # SQL points at the cold copy now
    return len(copied), sum(copied.values())


def _do_purge(runtime: Runtime, action: StorageAction, heartbeat: Callable[[], None]) -> tuple[int, int]:
    listing = list(list_files(action.source_url))
    remove_tree(action.source_url)
    return len(listing), sum(size for _, size in listing)


def _job_folders(runtime: Runtime, job_id: str) -> list[str]:
    """Everything of a job, in every tier (what retention deletes)."""
    return [runtime.storage.job_url(job_id, tier) for tier in ("warm", "cold", "hot")]


def _do_delete(runtime: Runtime, action: StorageAction, heartbeat: Callable[[], None]) -> tuple[int, int]:
    files = size = 0
    for url in _job_folders(runtime, action.job_id):
        heartbeat()
        listing = list(list_files(url))
        files, size = files + len(listing), size + sum(s for _, s in listing)
        remove_tree(url)
    return files, size


_HANDLERS = {
    StorageActionKind.MOVE_TO_COLD: _do_move,
    StorageActionKind.PURGE_CHECKPOINTS: _do_purge,
    StorageActionKind.DELETE_RESULTS: _do_delete,
}


def _execute(runtime: Runtime, action_id: int, heartbeat: Callable[[], None]) -> ActionReport:
    with session_scope(runtime.engine) as session:
        action = session.get(StorageAction, action_id)
        assert action is not None
        session.expunge(action)
    report = ActionReport(
        action.job_id, action.action.value, ActionStatus.DONE.value, action.source_url, action.target_url
    )
    try:
        report.files, report.bytes = _HANDLERS[action.action](runtime, action, heartbeat)
    except Exception as exc:  # recorded; the next sweep tries again
        log.warning("storage action %s (%s of job %s) failed: %s", action_id, action.action.value, action.job_id, exc)
        report.status, report.error = ActionStatus.FAILED.value, f"{exc.__class__.__name__}: {exc}"
    metrics.STORAGE_ACTIONS.labels(report.action, report.status).inc()
    metrics.STORAGE_BYTES.labels(report.action).inc(report.bytes)
    with session_scope(runtime.engine) as session:
        session.execute(
            update(StorageAction)
            .where(StorageAction.id == action_id)
            .values(
                status=ActionStatus(report.status),
                files=report.files,
                bytes=report.bytes,
                error=report.error,
                attempts=StorageAction.attempts + 1,
                finished_at=utcnow() if report.status == ActionStatus.DONE.value else None,
            )
        )
    return report


# -- planning ----------------------------------------------------------------------


def _start(runtime: Runtime, kind: StorageActionKind, job_id: str, now: datetime) -> int | None:
    """Mark the job (guarded) and record the action in one transaction; None if lost the race.

    The guard checks again that the job is final and ended before the cutoff: a job
    resumed (and perhaps finished again) since the sweep listed it is left alone.
    """
    source, target = action_urls(runtime, kind, job_id)
    with session_scope(runtime.engine) as session:
        guard = [
            Job.id == job_id,
            Job.status.in_(FINAL),
            Job.results_deleted_at.is_(None),
            Job.finished_at < cutoff_for(runtime, kind, now),
        ]
        marks: dict[str, Any] = {"updated_at": utcnow()}
        if kind is StorageActionKind.DELETE_RESULTS:
            marks |= {
                "results_deleted_at": now,
                "result_url": None,
                "result_tier": "deleted",
                "checkpoints_purged_at": func.coalesce(Job.checkpoints_purged_at, now),
            }
        elif kind is StorageActionKind.PURGE_CHECKPOINTS:
            guard.append(Job.checkpoints_purged_at.is_(None))
            marks["checkpoints_purged_at"] = now
        else:
            guard.append(Job.result_tier == "warm")
        if matched(session.execute(update(Job).where(*guard).values(**marks))) != 1:
            return None
        action = StorageAction(
            job_id=job_id,
            action=kind,
            status=ActionStatus.STARTED,
            source_url=source,
            target_url=target,
            files=0,
            bytes=0,
            started_at=now,
        )
        session.add(action)
        session.flush()
        return action.id


def _planned(runtime: Runtime, kind: StorageActionKind, job_id: str) -> ActionReport:
    source, target = action_urls(runtime, kind, job_id)
    urls = _job_folders(runtime, job_id) if kind is StorageActionKind.DELETE_RESULTS else [source]
    listing = [item for url in urls for item in list_files(url)]
    return ActionReport(job_id, kind.value, "planned", source, target, len(listing), sum(s for _, s in listing))


#: The lease one sweep holds (renewed after every file it copies).
SWEEP_LEASE = "storage_sweep"
LEASE_SECONDS = 300.0
#: A failed action is retried by this many sweeps, then left for a person
#: (``spotlane storage sweep --retry-failed``).
MAX_ATTEMPTS = 3


def sweep(
    runtime: Runtime, *, now: datetime | None = None, dry_run: bool = False, retry_failed: bool = False
) -> SweepReport:
    """Run one lifecycle sweep (see the module docstring); ``now`` is injectable for tests.

    One sweep runs at a time (a lease in SQL): a second one, from a duplicated
    beat or by hand, returns at once with ``locked`` set.
    """
    now = now or utcnow()
    report = SweepReport(dry_run=dry_run, now=now.isoformat())
    owner = owner_id()
    if not dry_run and not leases.take(runtime.engine, SWEEP_LEASE, owner, LEASE_SECONDS):
        report.locked = True
        return report

    def heartbeat() -> None:
        if not leases.renew(runtime.engine, SWEEP_LEASE, owner, LEASE_SECONDS):
            raise StoreError("this sweep lost its lease (it stalled past the lease); the next sweep goes on")

    try:
        _sweep(runtime, report, now, dry_run, retry_failed, heartbeat)
        if not dry_run:  # answers past cache.ttl_days are asked again anyway: drop them
            with session_scope(runtime.engine) as session:
                report.cache_dropped = answers.purge(session, now - timedelta(days=runtime.settings.cache.ttl_days))
    finally:
        if not dry_run:
            leases.release(runtime.engine, SWEEP_LEASE, owner)
    if report.deferred:
        log.info("storage sweep: %d actions left for the next sweep (storage.sweep_max_seconds)", report.deferred)
    return report


def _sweep(
    runtime: Runtime,
    report: SweepReport,
    now: datetime,
    dry_run: bool,
    retry_failed: bool,
    heartbeat: Callable[[], None],
) -> None:
    retryable = StorageAction.status == ActionStatus.STARTED
    if retry_failed:
        retryable = StorageAction.status != ActionStatus.DONE
    else:
        retryable = or_(
            retryable, and_(StorageAction.status == ActionStatus.FAILED, StorageAction.attempts < MAX_ATTEMPTS)
        )
    with session_scope(runtime.engine) as session:
        unfinished = list(
            session.execute(
                select(
                    StorageAction.id,
                    StorageAction.job_id,
                    StorageAction.action,
                    StorageAction.source_url,
                    StorageAction.target_url,
                )
                .where(retryable)
                .order_by(StorageAction.id)
            ).all()
        )
        report.given_up = (
            int(
                session.execute(
                    select(func.count())
                    .select_from(StorageAction)
                    .where(StorageAction.status == ActionStatus.FAILED, StorageAction.attempts >= MAX_ATTEMPTS)
                ).scalar_one()
            )
            if not retry_failed
            else 0
        )
        candidates = due_jobs(session, now, runtime)
    stop_at = time.monotonic() + runtime.settings.storage.sweep_max_seconds
    for row in unfinished:
        if dry_run:
            report.actions.append(
                ActionReport(row.job_id, row.action.value, "unfinished", row.source_url, row.target_url)
            )
        elif report.actions and time.monotonic() > stop_at:
            report.deferred += 1
        else:
            heartbeat()
            report.actions.append(_execute(runtime, row.id, heartbeat))
    for kind in (StorageActionKind.DELETE_RESULTS, StorageActionKind.MOVE_TO_COLD, StorageActionKind.PURGE_CHECKPOINTS):
        for job_id in candidates[kind]:
            if dry_run:
                report.actions.append(_planned(runtime, kind, job_id))
                continue
            if report.actions and time.monotonic() > stop_at:
                report.deferred += 1
                continue
            heartbeat()
            action_id = _start(runtime, kind, job_id, now)
            if action_id is not None:
                report.actions.append(_execute(runtime, action_id, heartbeat))
