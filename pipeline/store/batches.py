"""A shard at a provider's batch API: its provider batches, and the moves on the shard.

A shard routed to a batch lane is claimed like any other, by a worker on the
control queue, which records a ``provider_batches`` row (with a marker that will
name the provider batch) and commits *before* it uploads and creates anything,
then hands the shard to the provider: the shard stays ``running``, its lease held
by ``BATCH_OWNER`` until the batch's give-up time, and no worker waits for it.
The poller (a control task) collects the batch under that same claim, fenced by
the attempt like any commit.

Collecting settles the shard in one transaction (``settle``): the batch's rows are
cut into runs, answered and not; the first run stays with the shard, every later
run becomes a shard of its own (done, with its committed part; or pending, for
the router, the lane excluded). The runs partition the rows the batch held, so
each row lands in exactly one shard and one committed part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from pipeline.store import ledger, transitions
from pipeline.store.claims import CheckpointStats, Claim, owned
from pipeline.store.db import db_now
from pipeline.store.guards import check_shard_move, matched
from schemas.status import AttemptOutcome, ProviderBatchStatus, ShardStatus
from schemas.tables import Checkpoint, Job, ProviderBatch, Shard, ShardAttempt

__all__ = [
    "BATCH_OWNER",
    "CANCEL_GRACE",
    "MAX_POLL_FAILURES",
    "MAX_RUNS",
    "OPEN",
    "Run",
    "adopt",
    "batch_claim",
    "hand_to_provider",
    "ranges_of",
    "rows_in",
    "runs_of",
    "settle",
    "split_shard",
]

#: The lease owner of a shard whose rows are at a provider: no process, so no reaper
#: calls it dead; its lease runs to the batch's give-up time (and the grace after it).
BATCH_OWNER = "provider-batch"
#: How long a cancelled provider batch may take to end before it is abandoned.
CANCEL_GRACE = timedelta(hours=1)
#: The most shards one collected batch is cut into (short answered runs between
#: unanswered ones are asked again rather than cut out).
MAX_RUNS = 16

#: Looks at a provider batch that may fail in a row (its provider answers what cannot be
#: read) before its rows go elsewhere.
MAX_POLL_FAILURES = 10

OPEN = tuple(s for s in ProviderBatchStatus if s.is_open)


def ranges_of(rows: Sequence[int]) -> list[list[int]]:
    """Sorted row numbers as ``[start, end)`` ranges."""
    ranges: list[list[int]] = []
    for row in sorted(rows):
        if ranges and ranges[-1][1] == row:
            ranges[-1][1] = row + 1
        else:
            ranges.append([row, row + 1])
    return ranges


def rows_in(ranges: Sequence[Sequence[int]]) -> set[int]:
    return {row for start, end in ranges for row in range(start, end)}


@dataclass(frozen=True)
class Run:
    """Rows ``[start, end)`` of a collected batch: answered (``part`` committed) or not."""

    start: int
    end: int
    part: CheckpointStats | None = None

    @property
    def answered(self) -> bool:
        return self.part is not None


def runs_of(answered: Sequence[bool], first_row: int, most: int = MAX_RUNS) -> list[tuple[int, int, bool]]:
    """Contiguous runs ``(start, end, answered)`` of rows from ``first_row``, at most ``most``:
    while there are more, the shortest answered run is counted unanswered (it merges
    with its neighbours, so each step removes at least one run)."""
    runs: list[list[int | bool]] = []
    for i, ok in enumerate(answered):
        if runs and runs[-1][2] == ok:
            runs[-1][1] = first_row + i + 1
        else:
            runs.append([first_row + i, first_row + i + 1, ok])
    while len(runs) > max(1, most):
        k = min((k for k, r in enumerate(runs) if r[2]), key=lambda k: int(runs[k][1]) - int(runs[k][0]))
        runs[k][2] = False
        merged: list[list[int | bool]] = []
        for run in runs:
            if merged and merged[-1][2] == run[2]:
                merged[-1][1] = run[1]
            else:
                merged.append(run)
        runs = merged
    return [(int(s), int(e), bool(ok)) for s, e, ok in runs]


def split_shard(session: Session, claim: Claim, at: int) -> int | None:
    """Cut the claimed shard at input row ``at``: it keeps ``[row_start, at)``, and a new
    pending shard takes ``[at, row_end)`` for the router. The new shard's id, or None if
    the claim no longer holds or ``at`` is not inside the shard's unfinished rows."""
    transitions.lock_job(session, claim.job_id)
    shard = session.execute(
        select(Shard).where(*owned(claim), Shard.row_end > at, Shard.row_start + Shard.rows_done < at)
    ).scalar_one_or_none()
    if shard is None:
        return None
    now = db_now(session)
    end = shard.row_end
    session.execute(update(Shard).where(Shard.id == shard.id).values(row_end=at, updated_at=now))
    new = _new_shard(session, shard, at, end, now, status=ShardStatus.PENDING)
    session.execute(update(Job).where(Job.id == claim.job_id).values(shard_count=Job.shard_count + 1))
    return new.id


def hand_to_provider(session: Session, claim: Claim, until: datetime) -> bool:
    """The claimed shard's rows are at the provider: its lease passes to ``BATCH_OWNER``
    until ``until``. The attempt goes on; the poller collects under it."""
    result = session.execute(
        update(Shard)
        .where(*owned(claim))
        .values(lease_owner=BATCH_OWNER, lease_expires_at=until, updated_at=db_now(session))
    )
    return matched(result) == 1


def batch_claim(session: Session, batch: ProviderBatch) -> Claim | None:
    """The claim ``batch``'s shard is held under while at the provider (None: it is not)."""
    shard = session.execute(
        select(Shard).where(
            Shard.id == batch.shard_id,
            Shard.status == ShardStatus.RUNNING,
            Shard.lease_owner == BATCH_OWNER,
            Shard.attempts == batch.attempt,
        )
    ).scalar_one_or_none()
    if shard is None:
        return None
    return Claim.of(shard, BATCH_OWNER, shard.backend or batch.backend)


def adopt(session: Session, batch_id: int, claim: Claim) -> bool:
    """A new attempt of the shard takes over its open provider batch (its submitter died,
    or its poller was away past the lease) and the reservation that pays for it."""
    transitions.lock_job(session, claim.job_id)
    old = session.execute(
        select(ProviderBatch.attempt).where(ProviderBatch.id == batch_id, ProviderBatch.status.in_(OPEN))
    ).scalar_one_or_none()
    if old is None:
        return False
    session.execute(update(ProviderBatch).where(ProviderBatch.id == batch_id).values(attempt=claim.attempt))
    if old != claim.attempt:
        now = db_now(session)
        ledger.transfer(session, claim.job_id, claim.shard_id, claim.backend, now, old, claim.attempt)
    return True


def _new_shard(session: Session, like: Shard, start: int, end: int, now: datetime, **values: object) -> Shard:
    index = session.execute(select(func.max(Shard.shard_index)).where(Shard.job_id == like.job_id)).scalar_one()
    shard = Shard(
        job_id=like.job_id,
        shard_index=int(index) + 1,
        row_start=start,
        row_end=end,
        excluded_backends=list(like.excluded_backends or []),
        updated_at=now,
        **values,
    )
    session.add(shard)
    session.flush()
    return shard


def _checkpoint(session: Session, shard_id: int, attempt: int, part: CheckpointStats, now: datetime) -> None:
    session.add(
        Checkpoint(
            shard_id=shard_id,
            first_row=part.first_row,
            row_count=part.row_count,
            rows_failed=part.rows_failed,
            input_tokens=part.input_tokens,
            output_tokens=part.output_tokens,
            cost_usd=part.cost_usd,
            url=part.url,
            attempt=attempt,
            created_at=now,
        )
    )


def settle(
    session: Session,
    claim: Claim,
    batch_id: int,
    runs: Sequence[Run],
    billed: ledger.Charge,
    *,
    exclude: bool,
    note: str | None,
    ended_at: datetime | None,
    provider_status: str,
    release: bool = True,
) -> bool:
    """Commit a collected batch (see the module doc), fenced by ``claim``; False if the
    claim no longer holds (another poller settled it, or the shard was taken back).

    ``billed``: what the provider billed for the whole batch (answers that failed their
    schema included), charged against the attempt's reservation, the rest released.
    ``exclude``: the unanswered rows may not go back to this lane (it expired, failed,
    or ran into the deadline; not when the job was cancelled). ``release``: False keeps
    the attempt's reservation held until the job ends (a batch the provider may still bill).
    """
    check_shard_move((ShardStatus.RUNNING,), ShardStatus.DONE)
    check_shard_move((ShardStatus.RUNNING,), ShardStatus.PENDING)
    transitions.lock_job(session, claim.job_id)
    shard = session.execute(
        select(Shard).where(
            *owned(claim),
            Shard.row_start + Shard.rows_done == runs[0].start,
            Shard.row_end == runs[-1].end,
        )
    ).scalar_one_or_none()
    batch = session.execute(
        select(ProviderBatch).where(
            ProviderBatch.id == batch_id, ProviderBatch.status.in_(OPEN), ProviderBatch.attempt == claim.attempt
        )
    ).scalar_one_or_none()
    if shard is None or batch is None:
        return False
    now = db_now(session)
    excluded = sorted({*(shard.excluded_backends or []), claim.backend}) if exclude else shard.excluded_backends
    unattributed = max(0.0, billed.cost_usd - sum(r.part.cost_usd for r in runs if r.part is not None))
    first = runs[0]
    values: dict[str, object] = {
        "row_end": first.end,
        "lease_owner": None,
        "lease_expires_at": None,
        "updated_at": now,
        "cost_usd": Shard.cost_usd + unattributed,
    }
    if first.part is not None:
        part = first.part
        values |= {
            "status": ShardStatus.DONE,
            "finished_at": now,
            "error": None,
            "rows_done": Shard.rows_done + part.row_count,
            "rows_failed": Shard.rows_failed + part.rows_failed,
            "input_tokens": Shard.input_tokens + part.input_tokens,
            "output_tokens": Shard.output_tokens + part.output_tokens,
            "cost_usd": Shard.cost_usd + part.cost_usd + unattributed,
            "rows_cached": Shard.rows_cached + part.rows_cached,
            "saved_usd": Shard.saved_usd + part.saved_usd,
        }
    else:
        values |= {"status": ShardStatus.PENDING, "backend": None, "queue": None, "excluded_backends": excluded}
        values["error"] = note
    # The fence first: nothing is written unless the claim still holds (a reaper that
    # took the shard back between the read above and here leaves this a no-op).
    fenced = (*owned(claim), Shard.row_start + Shard.rows_done == first.start, Shard.row_end == runs[-1].end)
    if matched(session.execute(update(Shard).where(*fenced).values(**values))) != 1:
        return False
    if first.part is not None:
        _checkpoint(session, shard.id, claim.attempt, first.part, now)
        transitions.end_attempt(session, shard.id, claim.attempt, AttemptOutcome.DONE, None)
        session.execute(
            update(ShardAttempt)
            .where(ShardAttempt.shard_id == shard.id, ShardAttempt.attempt == claim.attempt)
            .values(rows_processed=ShardAttempt.rows_processed + first.part.row_count)
        )
    else:
        transitions.end_attempt(session, shard.id, claim.attempt, AttemptOutcome.FAILED, note)
    for run in runs[1:]:
        if run.part is None:
            new = _new_shard(session, shard, run.start, run.end, now, status=ShardStatus.PENDING, error=note)
            session.execute(update(Shard).where(Shard.id == new.id).values(excluded_backends=excluded))
            continue
        part = run.part
        new = _new_shard(
            session,
            shard,
            run.start,
            run.end,
            now,
            status=ShardStatus.DONE,
            backend=claim.backend,
            queue=shard.queue,
            model=shard.model,
            rows_done=part.row_count,
            rows_failed=part.rows_failed,
            input_tokens=part.input_tokens,
            output_tokens=part.output_tokens,
            cost_usd=part.cost_usd,
            rows_cached=part.rows_cached,
            saved_usd=part.saved_usd,
            attempts=1,
            started_at=now,
            finished_at=now,
        )
        session.add(
            ShardAttempt(
                shard_id=new.id,
                attempt=1,
                worker_id=BATCH_OWNER,
                backend=claim.backend,
                outcome=AttemptOutcome.DONE,
                resumed_from=0,
                rows_processed=part.row_count,
                started_at=now,
                ended_at=now,
            )
        )
        _checkpoint(session, new.id, 1, part, now)
    if len(runs) > 1:
        session.execute(update(Job).where(Job.id == claim.job_id).values(shard_count=Job.shard_count + len(runs) - 1))
    ledger.charge(session, billed, now)
    if release:
        ledger.release(session, claim.job_id, claim.shard_id, claim.backend, now, claim.attempt)
    session.execute(
        update(ProviderBatch)
        .where(ProviderBatch.id == batch_id)
        .values(
            status=ProviderBatchStatus.COLLECTED,
            provider_status=provider_status,
            ended_at=ended_at or now,
            collected_at=now,
            rows_answered=sum(r.end - r.start for r in runs if r.answered),
            rows_returned=sum(r.end - r.start for r in runs if not r.answered),
            cost_usd=billed.cost_usd,
            error=note,
        )
    )
    return True
