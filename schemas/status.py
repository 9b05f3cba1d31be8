"""Job, shard and attempt states, stored verbatim in SQL, and the moves allowed between them.

``JOB_MOVES`` and ``SHARD_MOVES`` are the one table of allowed moves;
``pipeline.store.transitions`` performs each move as a guarded UPDATE and refuses any
move this table does not list.

    job:   pending ─▶ running ─▶ finalizing ─▶ succeeded | succeeded_with_errors | failed
              │          │ ▲                        (a finalizer that died: another takes over)
              │          ▼ │
              └──────▶ paused (budget)      cancelled / failed ─▶ running (resume)

    shard: pending ─▶ queued ─▶ running ─▶ done | failed
              │  ▲       │         │ ├──▶ preempted ─▶ queued | pending
              ▼  │       ▼         │ ├──▶ queued (lease expired)
           blocked ◀── (cancel) ───┘ └──▶ pending (reroute, cancel, budget)
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "JOB_MOVES",
    "SHARD_MOVES",
    "ActionStatus",
    "AttemptOutcome",
    "JobStatus",
    "LedgerKind",
    "ProviderBatchStatus",
    "RunStatus",
    "ShardStatus",
    "StorageActionKind",
]


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


_J, _S = JobStatus, ShardStatus

#: Every allowed job move: ``JOB_MOVES[old]`` is the set of states ``old`` may become.
JOB_MOVES: dict[JobStatus, frozenset[JobStatus]] = {
    # running: a shard was claimed or routed; finalizing: every shard failed routing;
    # paused: the budget covers no shard.
    _J.PENDING: frozenset({_J.RUNNING, _J.FINALIZING, _J.PAUSED, _J.CANCELLED}),
    _J.RUNNING: frozenset({_J.FINALIZING, _J.PAUSED, _J.CANCELLED}),
    _J.PAUSED: frozenset({_J.RUNNING, _J.CANCELLED}),
    # Cancel is refused while results are written: nothing is spent any more.
    _J.FINALIZING: frozenset({_J.SUCCEEDED, _J.SUCCEEDED_WITH_ERRORS, _J.FAILED}),
    _J.FAILED: frozenset({_J.RUNNING}),
    _J.CANCELLED: frozenset({_J.RUNNING}),
    _J.SUCCEEDED: frozenset(),
    _J.SUCCEEDED_WITH_ERRORS: frozenset(),
}

#: Every allowed shard move.
SHARD_MOVES: dict[ShardStatus, frozenset[ShardStatus]] = {
    # queued: routed; blocked: the budget cannot cover it; failed: no backend can run it.
    _S.PENDING: frozenset({_S.QUEUED, _S.BLOCKED, _S.FAILED}),
    # running: claimed; pending: its job was cancelled before a worker claimed it.
    _S.QUEUED: frozenset({_S.RUNNING, _S.PENDING}),
    # queued: its lease expired; preempted: handed back (drain, spot notice, a
    # transient fault, a hung engine); pending: back to the router (the backend
    # failed it, the job was cancelled, the budget ran out mid-shard).
    _S.RUNNING: frozenset({_S.DONE, _S.FAILED, _S.PREEMPTED, _S.QUEUED, _S.PENDING}),
    _S.PREEMPTED: frozenset({_S.QUEUED, _S.PENDING}),
    # pending: the budget was raised, or the job resumed or cancelled.
    _S.BLOCKED: frozenset({_S.PENDING}),
    _S.DONE: frozenset(),
    # pending: the job resumed.
    _S.FAILED: frozenset({_S.PENDING}),
}


class AttemptOutcome(str, Enum):
    RUNNING = "running"
    DONE = "done"
    #: Handed back: a drain, a spot notice, a transient storage or database fault.
    PREEMPTED = "preempted"
    #: The lease ran out (the worker died, froze or hung).
    LOST = "lost"
    FAILED = "failed"
    #: Stopped because the job's budget could not cover its next chunk.
    PARKED = "parked"


class LedgerKind(str, Enum):
    #: Worst-case cost held against the budget when a shard is routed (or topped up).
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


class ProviderBatchStatus(str, Enum):
    """A provider batch as spotlane tracks it (the provider's own status is kept beside it).

    creating ─▶ submitted ─▶ (cancelling) ─▶ collected
       │ (recorded before the provider is asked: a submitter that died is found out
       ▼  by the batch's metadata and adopted, never created twice)    abandoned
    """

    #: Recorded, with its marker, before the file is uploaded and the batch created.
    CREATING = "creating"
    #: The provider has it; the poller looks at it every ``poll_seconds``.
    SUBMITTED = "submitted"
    #: Asked to stop (the job was cancelled, or its deadline is at risk); what finished is kept.
    CANCELLING = "cancelling"
    #: Its rows were committed, and the rest sent back to the router.
    COLLECTED = "collected"
    #: The provider never ended it after a cancel: its rows went elsewhere.
    ABANDONED = "abandoned"

    @property
    def is_open(self) -> bool:
        return self in (ProviderBatchStatus.CREATING, ProviderBatchStatus.SUBMITTED, ProviderBatchStatus.CANCELLING)
