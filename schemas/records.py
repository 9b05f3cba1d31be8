"""Task payloads: small, frozen, versioned records of ids, never data.

Each record encodes to a plain dict for Celery's JSON serializer and decodes back,
refusing a version it does not know (a newer producer talking to an older worker).
Prompts never travel through the broker; a shard is a row range of the input file
that the worker reads itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Self

from schemas.errors import WorkerError

__all__ = [
    "FINALIZE_JOB",
    "REAP",
    "ROUTE_JOB",
    "RUN_SHARD",
    "DELIVER_WEBHOOKS",
    "POLL_BATCHES",
    "SCHEDULES_TICK",
    "STORAGE_SWEEP",
    "DeliverWebhooks",
    "PollBatches",
    "FinalizeJob",
    "RouteJob",
    "RunShard",
    "TaskRecord",
]

#: Task names: what a record is sent as, and what a worker registers.
ROUTE_JOB = "spotlane.route_job"
RUN_SHARD = "spotlane.run_shard"
FINALIZE_JOB = "spotlane.finalize_job"
#: Periodic tasks (sent by the scheduler, Celery beat), without a payload.
REAP = "spotlane.reap"
SCHEDULES_TICK = "spotlane.schedules_tick"
STORAGE_SWEEP = "spotlane.storage_sweep"
#: Post the job events due to ``[[webhooks]]`` (``pipeline.jobs.webhooks``), without a payload.
DELIVER_WEBHOOKS = "spotlane.deliver_webhooks"
POLL_BATCHES = "spotlane.poll_batches"


@dataclass(frozen=True, slots=True)
class TaskRecord:
    VERSION: ClassVar[int] = 1

    def encode(self) -> dict[str, Any]:
        return {"v": self.VERSION, **asdict(self)}

    @classmethod
    def decode(cls, data: dict[str, Any]) -> Self:
        version = data.get("v")
        if version != cls.VERSION:
            raise WorkerError(f"{cls.__name__} payload version {version!r} is not {cls.VERSION}: upgrade this worker")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True, slots=True)
class RouteJob(TaskRecord):
    """Route every pending shard of a job to a backend queue."""

    job_id: str


@dataclass(frozen=True, slots=True)
class RunShard(TaskRecord):
    """Run one shard on the backend it was routed to.

    ``attempt`` is the shard's attempt count when the message was sent: the claim
    only succeeds while the shard is still queued on ``backend`` with that count,
    so a duplicate or stale message (sent before a reroute, a re-price or a later
    hand-back) claims nothing. ``None`` (a message from an older producer) is
    guarded on the backend alone.
    """

    job_id: str
    shard_id: int
    backend: str
    attempt: int | None = None


@dataclass(frozen=True, slots=True)
class FinalizeJob(TaskRecord):
    """Gather a finished job's committed parts into its results."""

    job_id: str


@dataclass(frozen=True, slots=True)
class DeliverWebhooks(TaskRecord):
    """Post the job events due to ``[[webhooks]]`` (they are read from the jobs themselves)."""


@dataclass(frozen=True, slots=True)
class PollBatches(TaskRecord):
    """Look at the provider batches that are due (read from ``provider_batches``), and
    collect those the provider has ended."""
