"""Job, shard and attempt states, stored verbatim in SQL.

The allowed moves are listed here once; ``pipeline.transitions`` performs them
as guarded UPDATEs.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["ActionStatus", "AttemptOutcome", "JobStatus", "LedgerKind", "RunStatus", "ShardStatus", "StorageActionKind"]


class JobStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    FINALIZING = "finalizing"
    SUCCEEDED = "succeeded"
    SUCCEEDED_WITH_ERRORS = "succeeded_with_errors"
    FAILED = "failed"
    PAUSED = "paused"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in _FINAL_JOB


_FINAL_JOB = {
    JobStatus.SUCCEEDED,
    JobStatus.SUCCEEDED_WITH_ERRORS,
    JobStatus.FAILED,
    JobStatus.CANCELLED,
}


class ShardStatus(str, Enum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    PREEMPTED = "preempted"
    BLOCKED = "blocked"
    DONE = "done"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (ShardStatus.DONE, ShardStatus.FAILED)


class AttemptOutcome(str, Enum):
    RUNNING = "running"
    DONE = "done"
    PREEMPTED = "preempted"
    LOST = "lost"
    FAILED = "failed"


class LedgerKind(str, Enum):
    #: Estimated cost held against the budget when a shard is routed.
    RESERVE = "reserve"
    #: Actual cost of work done.
    CHARGE = "charge"
    #: A reservation given back (negative of what was reserved).
    RELEASE = "release"


class StorageActionKind(str, Enum):
    #: Results (every version) copied warm -> cold, verified, SQL switched, warm deleted.
    MOVE_TO_COLD = "move_to_cold"
    #: Checkpoint and orphan part files of a finished job deleted from the hot tier.
    PURGE_CHECKPOINTS = "purge_checkpoints"
    #: Everything of a job past retention deleted from every tier.
    DELETE_RESULTS = "delete_results"


class ActionStatus(str, Enum):
    #: Recorded before the first byte moves; a sweep finds and completes it after a crash.
    STARTED = "started"
    DONE = "done"
    #: Could not complete (a checksum mismatch, a tier unreachable); retried next sweep.
    FAILED = "failed"


class RunStatus(str, Enum):
    """A scheduled run: recorded first (the idempotency key), then submitted."""

    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    SKIPPED = "skipped"
    FAILED = "failed"
