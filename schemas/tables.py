"""SQL models of the job store: jobs, shards, attempts, checkpoints, cost ledger.

The ``job_progress`` view is defined in the migrations (SQL, not a model) and read
through ``JOB_PROGRESS_VIEW``. Row ranges are absolute row numbers of the input
file, ``row_start`` inclusive and ``row_end`` exclusive.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy import Enum as SqlEnum
from sqlalchemy.orm import Mapped, mapped_column, relationship

from schemas.base import Base, UtcDateTime, utcnow
from schemas.status import (
    ActionStatus,
    AttemptOutcome,
    JobStatus,
    LedgerKind,
    ProviderBatchStatus,
    RunStatus,
    ShardStatus,
    StorageActionKind,
)

__all__ = [
    "JOB_PROGRESS_VIEW",
    "BackendStats",
    "Lease",
    "Checkpoint",
    "CostLedgerEntry",
    "Job",
    "Shard",
    "ScheduleRecord",
    "ScheduleRun",
    "ShardAttempt",
    "StorageAction",
    "WorkerPresence",
    "ApiKey",
    "StoredFile",
    "WebhookDelivery",
    "CachedAnswer",
    "ProviderBatch",
]

JOB_PROGRESS_VIEW = "job_progress"


def _state(enum: type[Enum]) -> SqlEnum:
    # Stored as the value itself ("running"), in a plain VARCHAR, so a data team's
    # `where status = 'running'` works and new states need no ALTER TYPE.
    return SqlEnum(
        enum,
        native_enum=False,
        length=32,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    status: Mapped[JobStatus] = mapped_column(_state(JobStatus), default=JobStatus.PENDING)
    task: Mapped[str] = mapped_column(String(16), default="generate")
    model: Mapped[str] = mapped_column(Text)
    #: Every model the submitter accepts, cheapest-first choice among them.
    models: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: The input the job reads: the submitter's object-store URL, or a copy spotlane
    #: made in the hot tier at submit (a local file, several files stitched).
    input_url: Mapped[str] = mapped_column(Text)
    #: The input as the submitter named it (a path, a glob, a folder, a URL).
    source_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: What the input was when it was validated (size, and mtime, ETag or
    #: generation); a worker that finds it changed fails the shard instead of
    #: answering other prompts.
    input_identity: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: "prompt" or "messages": which column holds the request.
    input_kind: Mapped[str] = mapped_column(String(16))
    #: Input columns copied to the output unchanged.
    carried_columns: Mapped[list[str]] = mapped_column(JSON, default=list)
    max_tokens: Mapped[int] = mapped_column(Integer)
    temperature: Mapped[float] = mapped_column(Float, default=0.0)
    rows_total: Mapped[int] = mapped_column(Integer)
    rows_per_shard: Mapped[int] = mapped_column(Integer)
    #: Prompt tokens per row estimated from the file's metadata (for routing).
    est_prompt_tokens: Mapped[float] = mapped_column(Float, default=0.0)
    shard_count: Mapped[int] = mapped_column(Integer)
    budget_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    deadline: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: The JSON Schema every answer must follow (``--schema``, ``--choices``); None: free text.
    response_schema: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: How often an API lane re-asks for an answer that failed the schema.
    schema_retries: Mapped[int] = mapped_column(Integer, default=2, server_default="2")
    #: Where the finished results are now: the folder holding ``_manifest.json``.
    result_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: ``warm`` or ``cold``; ``deleted`` once retention removed them.
    result_tier: Mapped[str | None] = mapped_column(String(8), nullable=True)
    #: When the lifecycle deleted the job's checkpoints (it can no longer be resumed).
    checkpoints_purged_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    #: When retention deleted the job's results.
    results_deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    #: A ``retry-errors`` job: the job whose error rows it re-runs.
    retry_of: Mapped[str | None] = mapped_column(String(40), nullable=True)
    #: When this retry job's rows were merged into its parent's next result version
    #: (NULL on a finished retry job: the merge is still to do, and the reaper sees to it).
    merged_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    #: The serve key that created the job (its tenant); NULL for jobs of the CLI and API.
    api_key_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    #: The OpenAI endpoint of a job read from a batch JSONL file (``/v1/chat/completions``...).
    openai_endpoint: Mapped[str | None] = mapped_column(String(40), nullable=True)
    #: A serve batch: its input file, completion window ("24h") and metadata as given.
    input_file_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    completion_window: Mapped[str | None] = mapped_column(String(16), nullable=True)
    batch_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: Rows may be answered from the answer cache, and this job's answers fill it.
    use_cache: Mapped[bool] = mapped_column(Boolean, default=True, server_default="1")
    #: Ask again even what the cache holds, and replace it (``--refresh``).
    refresh_cache: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    #: Set when the job's results are written: rows answered without being sent (the answer
    #: cache, repeats of an earlier row) and what sending them would have cost.
    rows_cached: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    saved_usd: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    #: Spent plus still reserved, in USD: ``sum(cost_ledger.amount_usd)`` of the job, kept
    #: by triggers on ``cost_ledger`` (migration 0012), so that the budget check under
    #: the job lock reads one row, not a ledger that grows with every checkpoint.
    committed_usd: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    rows_ok: Mapped[int] = mapped_column(Integer, default=0)
    rows_failed: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)

    shards: Mapped[list[Shard]] = relationship(back_populates="job", order_by="Shard.shard_index")

    __table_args__ = (
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_retry_of", "retry_of"),
        Index("ix_jobs_api_key", "api_key_id", "created_at"),
    )


class Shard(Base):
    __tablename__ = "shards"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    shard_index: Mapped[int] = mapped_column(Integer)
    row_start: Mapped[int] = mapped_column(Integer)
    row_end: Mapped[int] = mapped_column(Integer)
    status: Mapped[ShardStatus] = mapped_column(_state(ShardStatus), default=ShardStatus.PENDING)
    backend: Mapped[str | None] = mapped_column(String(64), nullable=True)
    queue: Mapped[str | None] = mapped_column(String(128), nullable=True)
    #: The model rows without their own ``model`` use, chosen with the backend.
    model: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: The router's estimate when it chose the backend.
    est_input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    est_output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    est_cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    est_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    #: Backends that failed this shard; the router does not pick them again.
    excluded_backends: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: Why the router chose as it did (deadline missed, fallback, ...).
    route_note: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: Rows of this shard covered by committed checkpoints (resume point).
    rows_done: Mapped[int] = mapped_column(Integer, default=0)
    rows_failed: Mapped[int] = mapped_column(Integer, default=0)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    #: Committed rows answered without being sent (the answer cache, or a repeat of an
    #: earlier row), and what sending them would have cost.
    rows_cached: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    saved_usd: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    queued_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)

    job: Mapped[Job] = relationship(back_populates="shards")

    __table_args__ = (
        UniqueConstraint("job_id", "shard_index"),
        Index("ix_shards_job_status", "job_id", "status"),
        Index("ix_shards_status_lease", "status", "lease_expires_at"),
        Index("ix_shards_status_queue", "status", "queue", "queued_at"),
    )

    @property
    def rows_total(self) -> int:
        return self.row_end - self.row_start


class ShardAttempt(Base):
    __tablename__ = "shard_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    shard_id: Mapped[int] = mapped_column(ForeignKey("shards.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str] = mapped_column(String(128))
    backend: Mapped[str | None] = mapped_column(String(64), nullable=True)
    outcome: Mapped[AttemptOutcome] = mapped_column(_state(AttemptOutcome), default=AttemptOutcome.RUNNING)
    #: Shard-relative row the attempt resumed from.
    resumed_from: Mapped[int] = mapped_column(Integer, default=0)
    rows_processed: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)

    __table_args__ = (UniqueConstraint("shard_id", "attempt"),)


class Checkpoint(Base):
    """A committed part file: only parts with a row here make the final result."""

    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    shard_id: Mapped[int] = mapped_column(ForeignKey("shards.id", ondelete="CASCADE"))
    #: Absolute input row of the part's first row; fixes the part's file name.
    first_row: Mapped[int] = mapped_column(Integer)
    row_count: Mapped[int] = mapped_column(Integer)
    rows_failed: Mapped[int] = mapped_column(Integer, default=0)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    url: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("shard_id", "first_row"),)


class ProviderBatch(Base):
    """One batch at a provider's batch API, for the rows ``[first_row, row_end)`` of a shard.

    Written with its ``marker`` before the provider is asked, so a submitter killed
    between creating the batch and recording its id is found out (the provider
    batch carries the marker in its metadata) and adopted, never created twice.
    """

    __tablename__ = "provider_batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    shard_id: Mapped[int] = mapped_column(ForeignKey("shards.id", ondelete="CASCADE"))
    #: The shard attempt that owns it (an adopting attempt takes it over).
    attempt: Mapped[int] = mapped_column(Integer)
    #: The lane, ``<provider>.batch``.
    backend: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(Text)
    #: Ours, unique: the provider batch's ``metadata.spotlane_marker`` and its file's name.
    marker: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[ProviderBatchStatus] = mapped_column(_state(ProviderBatchStatus))
    first_row: Mapped[int] = mapped_column(Integer)
    row_end: Mapped[int] = mapped_column(Integer)
    #: Requests sent (rows the cache answers, or repeats, are not).
    requests: Mapped[int] = mapped_column(Integer, default=0)
    #: The rows sent, as ``[start, end)`` ranges of input rows: only their answers are
    #: taken (and paid for); a line for any other row is ignored.
    sent_rows: Mapped[list[list[int]]] = mapped_column(JSON, default=list)
    #: Prompt tokens enqueued, bounded by bytes (what the lane's ``max_enqueued_tokens`` counts).
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    batch_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    input_file_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    #: What the provider last said (validating, in_progress, completed, expired, ...).
    provider_status: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    #: Past this, an open batch is cancelled: its window ends, or the job's deadline is at risk.
    give_up_at: Mapped[datetime] = mapped_column(UtcDateTime)
    next_poll_at: Mapped[datetime] = mapped_column(UtcDateTime)
    #: When the provider ended it (its turnaround, for the router, is this less ``submitted_at``).
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    collected_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    rows_answered: Mapped[int] = mapped_column(Integer, default=0)
    #: Rows sent back to the router (expired, cancelled, failed, or an answer that fails its schema).
    rows_returned: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    #: Looks at it that failed in a row (a provider that answers nonsense); past
    #: ``MAX_POLL_FAILURES`` its rows go elsewhere.
    poll_failures: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        Index("ix_provider_batches_status_poll", "status", "next_poll_at"),
        Index("ix_provider_batches_shard", "shard_id"),
        Index("ix_provider_batches_backend_ended", "backend", "ended_at"),
    )


class CostLedgerEntry(Base):
    """Money held or spent. A job's spend is ``sum(amount_usd) where kind='charge'``."""

    __tablename__ = "cost_ledger"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    shard_id: Mapped[int | None] = mapped_column(ForeignKey("shards.id", ondelete="CASCADE"), nullable=True)
    backend: Mapped[str] = mapped_column(String(64))
    kind: Mapped[LedgerKind] = mapped_column(_state(LedgerKind))
    amount_usd: Mapped[float] = mapped_column(Float)
    #: The shard attempt a reservation belongs to (NULL: the shard's pool, held by the
    #: router until a worker claims it), or that did the charged work.
    attempt: Mapped[int | None] = mapped_column(Integer, nullable=True)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    __table_args__ = (
        Index("ix_cost_ledger_job", "job_id", "kind"),
        Index("ix_cost_ledger_shard", "shard_id", "attempt"),
    )


class BackendStats(Base):
    """What the router has learnt about a backend and model (EWMAs of observations)."""

    __tablename__ = "backend_stats"

    backend: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(Text, primary_key=True)
    #: Output tokens per second of one worker (GPU) or per request stream (API).
    tokens_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Seconds per request (API) or per micro-batch (GPU).
    latency_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Fraction of rows that came back with an error.
    error_rate: Mapped[float] = mapped_column(Float, default=0.0)
    #: Fraction of shard runs that ended preempted or lost.
    preemption_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Prompt characters per input token.
    chars_per_token: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Output tokens / max_tokens: how much of the limit rows really use.
    output_fill: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Re-asks per row with a schema (API lane: answers that failed it and were asked again).
    reask_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    samples: Mapped[int] = mapped_column(Integer, default=0)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    cooldown_until: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)


class StorageAction(Base):
    """One lifecycle step on one job's files, recorded before it starts.

    ``select * from storage_actions where status <> 'done'`` is what an interrupted
    sweep left; the next sweep completes it.
    """

    __tablename__ = "storage_actions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    action: Mapped[StorageActionKind] = mapped_column(_state(StorageActionKind))
    status: Mapped[ActionStatus] = mapped_column(_state(ActionStatus), default=ActionStatus.STARTED)
    source_url: Mapped[str] = mapped_column(Text)
    target_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    files: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    #: Sweeps that ran it; a failed action is retried up to a limit, then left for a person.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)

    __table_args__ = (Index("ix_storage_actions_status", "status"), Index("ix_storage_actions_job", "job_id"))


class ScheduleRecord(Base):
    """A configured schedule as the scheduler last saw it (config is the source)."""

    __tablename__ = "schedules"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    cron: Mapped[str] = mapped_column(String(128))
    timezone: Mapped[str] = mapped_column(String(64))
    input_template: Mapped[str] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    #: Fire times before this are never caught up: the schedule was added, or
    #: re-enabled, then (a disabled schedule's runs are not "missed").
    active_since: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    next_fire_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)


class ScheduleRun(Base):
    """One run of a schedule; (schedule, fire_at) is its idempotency key."""

    __tablename__ = "schedule_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    schedule: Mapped[str] = mapped_column(String(128))
    #: The cron fire time this run is for (UTC); ``run_date`` is its local date.
    fire_at: Mapped[datetime] = mapped_column(UtcDateTime)
    run_date: Mapped[str] = mapped_column(String(10))
    #: ``beat`` (on time), ``catch_up`` (late, after the scheduler was down), ``manual``.
    trigger: Mapped[str] = mapped_column(String(16))
    status: Mapped[RunStatus] = mapped_column(_state(RunStatus), default=RunStatus.SUBMITTING)
    #: Chosen when the run is recorded, so a retried submit cannot create a second job.
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    input_url: Mapped[str] = mapped_column(Text)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)

    __table_args__ = (UniqueConstraint("schedule", "fire_at"), Index("ix_schedule_runs_status", "status"))


class WorkerPresence(Base):
    """A process consuming queues now: ``spotlane worker`` (and ``spotlane run``'s own loop).

    Written when it starts and renewed every ``worker.reap_interval_seconds``; a row
    not renewed for three intervals is a worker that is gone. Lets ``resume``,
    ``budget`` and ``retry-errors`` say when nothing will pick their work up.
    """

    __tablename__ = "workers"

    owner: Mapped[str] = mapped_column(String(160), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[list[str]] = mapped_column(JSON, default=list)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Lease(Base):
    """A named lease: at most one holder at a time (one storage sweep, say).

    Taken and renewed with guarded UPDATEs; a holder that dies loses it when
    ``expires_at`` passes.
    """

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ApiKey(Base):
    """A tenant of ``spotlane serve``: only the SHA-256 of its secret is kept."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    #: Hex SHA-256 of the key (keys are 256 random bits: a plain hash is enough).
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    #: The first characters of the key, to tell keys apart in lists.
    prefix: Mapped[str] = mapped_column(String(16))
    #: The most all of the key's jobs together may spend (reserved + spent), or NULL.
    budget_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Added to every job the key creates (``costs --by tag``).
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: An admin key sees every tenant's files and batches.
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class StoredFile(Base):
    """A file of the OpenAI Files API: uploaded input, or a batch's output or error file."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    api_key_id: Mapped[str] = mapped_column(String(40))
    filename: Mapped[str] = mapped_column(Text)
    #: ``batch`` (uploaded input), ``batch_output`` (results and errors).
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    url: Mapped[str] = mapped_column(Text)
    #: The job whose output (or errors) this file holds.
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)

    __table_args__ = (Index("ix_files_key", "api_key_id", "created_at"),)


class WebhookDelivery(Base):
    """One attempt to deliver one event to one webhook (delivered at least once)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: The event's id (``webhook-id``): the same on every attempt, so receivers dedupe.
    event_id: Mapped[str] = mapped_column(String(64))
    webhook: Mapped[str] = mapped_column(String(128))
    event: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str] = mapped_column(String(40))
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    delivered: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    __table_args__ = (
        UniqueConstraint("event_id", "webhook", "attempt"),
        Index("ix_webhook_deliveries_job", "job_id"),
    )


class CachedAnswer(Base):
    """An answer any later row with the same fingerprint gets for free (``pipeline.store.answers``)."""

    __tablename__ = "answer_cache"

    #: ``schemas.fingerprint.fingerprint`` of the request.
    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    output: Mapped[str | None] = mapped_column(Text, nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    #: What the answer cost when it was generated: what a row served from here saves.
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    #: The embedding of an ``embed`` row, as JSON.
    embedding: Mapped[list[float] | None] = mapped_column(JSON, nullable=True)
    model: Mapped[str] = mapped_column(Text)
    #: The job that paid for it.
    job_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    __table_args__ = (Index("ix_answer_cache_created", "created_at"),)
