"""A provider's batch API as a lane: submit a shard's rows as one provider batch; collect it.

Submitting (a ``run_shard`` on the control queue, claimed like any shard):

    adopt what the shard already has at the provider (a submitter that died, a poller
        that was away): a batch recorded but not yet named is looked up by its marker
        in the provider's batch list, never created again
    else: read the unfinished rows (at most the lane's ``max_requests`` and ``max_bytes``),
        answer what the cache knows, reserve every sent row's worst case at the
        discounted price (the rows the budget covers; the rest, and rows past the
        limits, become a shard of their own for the router), and record the provider
        batch with its marker, all in one transaction, before anything is uploaded
    upload the JSONL file (named by the marker) -> record its id -> create the batch
        (the marker in its metadata) -> record its id -> the shard's lease passes to
        the provider (``pipeline.store.batches.BATCH_OWNER``) and the worker is free

Collecting (``poll``, a periodic control task, one poller per provider batch by lease):
an open batch is read every ``poll_seconds``; one whose job was cancelled, or that is
still open at its give-up time (its window, or ``fallback_minutes`` before the job's
deadline), is cancelled at the provider. Once the provider ends it (completed,
expired, cancelled, failed) its output and error files are read, every row gets its
answer, an error (a request the provider refused: another lane would too) or none
(expired, cancelled, an answer that fails its schema), parts are written for the
answered runs, and ``pipeline.store.batches.settle`` commits them, charges what the
provider billed (its ``usage``, clamped to each request's bounds, at the discount)
and sends the unanswered rows back to the router with the lane excluded.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from pipeline.routing import observations as learning
from pipeline.runtime import Runtime
from pipeline.storage.inputs import iter_rows
from pipeline.storage.objects import write_parquet
from pipeline.store import batches, claims, leases, transitions
from pipeline.store.db import db_now, session_scope
from pipeline.store.guards import matched
from pipeline.store.identity import owner_id
from pipeline.store.ledger import Charge
from schemas.backends import ProviderBatchLane
from schemas.errors import ConfigError, ProviderError, TransientError
from schemas.status import AttemptOutcome, JobStatus, ProviderBatchStatus, ShardStatus
from schemas.tables import Job, ProviderBatch
from workers import checkpoint
from workers.engines.base import Completion, Request
from workers.engines.chunks import Chunk, build_output, check_answer, merge
from workers.engines.openai_http import chat_body, request_messages, usage_bound
from workers.engines.provider_batch import BATCH_ENDPOINT, MARKER_KEY, BatchClient, ResultLine, parse_results
from workers.feed import answer_known, input_columns, prepare_rows, row_worst, rows_within
from workers.heartbeat import Heartbeat

__all__ = ["custom_id", "poll", "submit"]

log = logging.getLogger(__name__)

#: How long one poller holds a provider batch while it reads or collects it.
POLL_LEASE_SECONDS = 300.0
#: Provider statuses after which nothing more will be answered.
ENDED = ("completed", "expired", "cancelled", "failed")


def custom_id(row: int) -> str:
    """A request's ``custom_id``: its input row."""
    return f"row-{row}"


def _marker(claim: claims.Claim, first_row: int) -> str:
    return f"sl-{claim.job_id[:24]}-{claim.shard_id}-{first_row}-a{claim.attempt}"


def _read(job: Job, start: int, end: int) -> pa.Table:
    return pa.Table.from_batches(list(iter_rows(job.input_url, start, end, input_columns(job))))


def _line(lane: ProviderBatchLane, model: str, row: int, request: Request) -> bytes:
    body = chat_body(lane.provider, request.model or model, request, request_messages(request))
    line = {"custom_id": custom_id(row), "method": "POST", "url": BATCH_ENDPOINT, "body": body}
    return json.dumps(line, ensure_ascii=False).encode() + b"\n"


# -- submitting ------------------------------------------------------------------------


def submit(
    runtime: Runtime, claim: claims.Claim, job: Job, lane: ProviderBatchLane, model: str, beat: Heartbeat
) -> ShardStatus | None:
    """Put the claimed shard's unfinished rows at the provider (see the module doc).

    Returns ``running`` once the provider has them, ``done`` when no row needed sending,
    ``pending`` when the budget covers none of them (parked), None if the claim was lost.
    """
    client = BatchClient(lane.provider)
    with session_scope(runtime.engine) as session:
        held = session.execute(
            select(ProviderBatch)
            .where(ProviderBatch.shard_id == claim.shard_id, ProviderBatch.status.in_(batches.OPEN))
            .order_by(ProviderBatch.id)
        ).scalar_one_or_none()
        if held is not None:
            session.expunge(held)
    if held is not None:
        with session_scope(runtime.engine) as session:
            if not batches.adopt(session, held.id, claim):
                return None
        if held.batch_id is not None or held.input_file_id is not None:
            log.info("shard %s: adopting provider batch %s", claim.shard_index, held.batch_id or held.marker)
            return _create(runtime, client, claim, job, lane, held, b"", beat)
        # Recorded, but its file was never recorded: nothing was created from it.
        _close(runtime, held.id, ProviderBatchStatus.ABANDONED, "its submitter stopped before uploading")
    return _submit_new(runtime, client, claim, job, lane, model, beat)


def _submit_new(
    runtime: Runtime,
    client: BatchClient,
    claim: claims.Claim,
    job: Job,
    lane: ProviderBatchLane,
    model: str,
    beat: Heartbeat,
) -> ShardStatus | None:
    limits = lane.lane
    first = claim.row_start + claim.rows_done
    if first >= claim.row_end:  # every row was committed before (a redelivered task)
        with session_scope(runtime.engine) as session:
            ended = claims.end_shard(session, claim, ShardStatus.DONE, outcome=AttemptOutcome.DONE)
        return ShardStatus.DONE if ended else None
    table = _read(job, first, min(claim.row_end, first + limits.max_requests))
    chunk = _known(runtime, job, table, first, lane, model)
    lines: list[bytes] = []
    size = 0
    count = table.num_rows
    for i, request in enumerate(chunk.requests):
        if request is None or not chunk.sent(i):
            continue
        line = _line(lane, model, first + i, request)
        if lines and size + len(line) > limits.max_bytes:
            count = i
            break
        lines.append(line)
        size += len(line)
    worst = [row_worst(lane, r) if r is not None and chunk.sent(i) else 0.0 for i, r in enumerate(chunk.requests)]
    split = False
    record = None
    with session_scope(runtime.engine) as session:
        verdict, room = claims.reserve_chunk(session, claim, sum(worst[:count]))
        if verdict is claims.ChunkVerdict.NO_BUDGET:
            count = rows_within(worst[:count], room)  # the rows the budget still covers
            if count:
                verdict, _ = claims.reserve_chunk(session, claim, sum(worst[:count]))
        if verdict is claims.ChunkVerdict.GO:
            split = first + count < claim.row_end and batches.split_shard(session, claim, first + count) is not None
            if count < table.num_rows:  # a prefix sends the same rows it did in the whole
                chunk = _slice(chunk, 0, count)
                lines = [_line(lane, model, first + i, r) for i, r in enumerate(chunk.requests) if r and chunk.sent(i)]
            if lines:
                record = _record(session, claim, job, lane, model, first, count, chunk, db_now(session))
    if verdict is not claims.ChunkVerdict.GO:
        return _stopped(runtime, claim, model, verdict)
    claim = replace(claim, row_end=first + count)
    if split:
        runtime.send_route(claim.job_id)  # the rows past the cut: a shard of their own
    if record is None:  # the cache and the shard's own repeats answer every row
        return _commit_unsent(runtime, claim, job, lane, model, chunk, beat)
    return _create(runtime, client, claim, job, lane, record, b"".join(lines), beat)


def _known(runtime: Runtime, job: Job, table: pa.Table, first: int, lane: ProviderBatchLane, model: str) -> Chunk:
    chunk = prepare_rows(job, table, first, lane)
    answer_known(runtime, job, chunk, lane, model, set())
    return chunk


def _record(
    session: Session,
    claim: claims.Claim,
    job: Job,
    lane: ProviderBatchLane,
    model: str,
    first: int,
    count: int,
    chunk: Chunk,
    now: datetime,
) -> ProviderBatch:
    limits = lane.lane
    give_up = now + timedelta(hours=limits.window_hours)
    if job.deadline is not None:
        give_up = min(give_up, job.deadline - timedelta(minutes=limits.fallback_minutes))
    offsets = [i for i, r in enumerate(chunk.requests) if r is not None and chunk.sent(i)]
    sent = [r for r in (chunk.requests[i] for i in offsets) if r is not None]
    record = ProviderBatch(
        job_id=claim.job_id,
        shard_id=claim.shard_id,
        attempt=claim.attempt,
        backend=lane.name,
        model=model,
        marker=_marker(claim, first),
        status=ProviderBatchStatus.CREATING,
        first_row=first,
        row_end=first + count,
        requests=len(offsets),
        sent_rows=batches.ranges_of([first + i for i in offsets]),
        input_tokens=sum(usage_bound(request_messages(r)) for r in sent),
        created_at=now,
        give_up_at=give_up,
        next_poll_at=now,
        rows_answered=0,
        rows_returned=0,
        cost_usd=0.0,
    )
    session.add(record)
    session.flush()
    session.expunge(record)
    return record


def _stopped(runtime: Runtime, claim: claims.Claim, model: str, verdict: claims.ChunkVerdict) -> ShardStatus | None:
    if verdict is claims.ChunkVerdict.LOST:
        return None
    note = "job cancelled" if verdict is claims.ChunkVerdict.CANCELLED else "parked: the budget cannot cover its rows"
    outcome = AttemptOutcome.PREEMPTED if verdict is claims.ChunkVerdict.CANCELLED else AttemptOutcome.PARKED
    with session_scope(runtime.engine) as session:
        if not claims.end_shard(session, claim, ShardStatus.PENDING, outcome=outcome, error=note):
            return None
    return ShardStatus.PENDING


def _create(
    runtime: Runtime,
    client: BatchClient,
    claim: claims.Claim,
    job: Job,
    lane: ProviderBatchLane,
    record: ProviderBatch,
    content: bytes,
    beat: Heartbeat,
) -> ShardStatus | None:
    """Upload (unless done), create (unless the provider has it, by marker), record, hand over."""
    fenced = (
        ProviderBatch.id == record.id,
        ProviderBatch.status == ProviderBatchStatus.CREATING,
        ProviderBatch.attempt == claim.attempt,
    )
    batch_id = record.batch_id
    if batch_id is None:
        file_id = record.input_file_id
        if file_id is None:
            file_id = client.upload(f"{record.marker}.jsonl", content)
            with session_scope(runtime.engine) as session:
                if not _updated(session, fenced, input_file_id=file_id):
                    return None
        else:
            found = client.find(record.marker, record.created_at.timestamp())
            batch_id = str(found["id"]) if found is not None else None
        if batch_id is None:
            try:
                created = client.create(
                    file_id, lane.lane.window_hours, {MARKER_KEY: record.marker, "spotlane_job": claim.job_id}
                )
            except ProviderError as exc:
                _close(runtime, record.id, ProviderBatchStatus.ABANDONED, str(exc))
                raise
            batch_id = str(created["id"])
            with session_scope(runtime.engine) as session:
                if not _updated(
                    session,
                    fenced,
                    batch_id=batch_id,
                    status=ProviderBatchStatus.SUBMITTED,
                    provider_status=str(created.get("status") or "validating"),
                    submitted_at=db_now(session),
                ):
                    _disown(runtime, client, record.id, batch_id)
                    return None
        else:
            with session_scope(runtime.engine) as session:
                _updated(
                    session,
                    fenced,
                    batch_id=batch_id,
                    status=ProviderBatchStatus.SUBMITTED,
                    submitted_at=db_now(session),
                )
    beat.stop()  # from here the shard's lease is the provider's, not this worker's
    with session_scope(runtime.engine) as session:
        give_up = session.execute(select(ProviderBatch.give_up_at).where(ProviderBatch.id == record.id)).scalar_one()
        until = max(give_up, db_now(session)) + batches.CANCEL_GRACE + timedelta(seconds=3 * lane.lane.poll_seconds)
        if not batches.hand_to_provider(session, claim, until):
            return None
    log.info(
        "shard %s of job %s: rows %d-%d at %s as provider batch %s",
        claim.shard_index,
        claim.job_id,
        record.first_row,
        record.row_end,
        lane.name,
        batch_id,
    )
    runtime.send_poll_batches()
    return ShardStatus.RUNNING


def _updated(session: Session, fenced: tuple[Any, ...], **values: Any) -> bool:
    return matched(session.execute(update(ProviderBatch).where(*fenced).values(**values))) == 1


def _disown(runtime: Runtime, client: BatchClient, record_id: int, batch_id: str) -> None:
    """This submitter lost its claim between creating ``batch_id`` and recording it (it froze
    past its lease): unless the attempt that took over adopted this very batch, it is a
    second one, and is cancelled before it runs up a bill."""
    with session_scope(runtime.engine) as session:
        adopted = session.execute(select(ProviderBatch.batch_id).where(ProviderBatch.id == record_id)).scalar_one()
    if adopted != batch_id:
        log.warning("provider batch %s was created by a submitter that lost its claim: cancelling it", batch_id)
        client.cancel(batch_id)


def _close(runtime: Runtime, record_id: int, status: ProviderBatchStatus, error: str) -> None:
    with session_scope(runtime.engine) as session:
        session.execute(
            update(ProviderBatch)
            .where(ProviderBatch.id == record_id, ProviderBatch.status.in_(batches.OPEN))
            .values(status=status, error=error[:500], collected_at=db_now(session))
        )


def _commit_unsent(
    runtime: Runtime,
    claim: claims.Claim,
    job: Job,
    lane: ProviderBatchLane,
    model: str,
    chunk: Chunk,
    beat: Heartbeat,
) -> ShardStatus | None:
    """Every row is answered by the cache or by an earlier row (or cannot run): commit them."""
    completions = merge(chunk, [], {})
    table, cost = build_output(
        chunk,
        completions,
        backend=lane.name,
        model=model,
        attempt=claim.attempt,
        usd_per_second=0.0,
        carried=job.carried_columns,
    )
    stats = checkpoint.stats_of(runtime, claim, chunk, completions, table, cost)
    checkpoint.persist(runtime, claim, table, stats, beat)
    with session_scope(runtime.engine) as session:
        if not claims.end_shard(session, claim, ShardStatus.DONE, outcome=AttemptOutcome.DONE):
            return None
    return ShardStatus.DONE


# -- collecting ------------------------------------------------------------------------


def poll(runtime: Runtime, job_id: str | None = None) -> int:
    """Look at every provider batch that is due (of ``job_id`` only, if given); how many."""
    with session_scope(runtime.engine) as session:
        now = db_now(session)
        query = (
            select(ProviderBatch.id)
            .join(Job, Job.id == ProviderBatch.job_id)
            .where(
                ProviderBatch.status.in_((ProviderBatchStatus.SUBMITTED, ProviderBatchStatus.CANCELLING)),
                or_(
                    ProviderBatch.next_poll_at <= now,
                    (ProviderBatch.status == ProviderBatchStatus.SUBMITTED) & (Job.status == JobStatus.CANCELLED),
                ),
            )
            .order_by(ProviderBatch.next_poll_at)
        )
        if job_id is not None:
            query = query.where(ProviderBatch.job_id == job_id)
        due = list(session.execute(query).scalars())
    owner = owner_id()
    looked = 0
    for record_id in due:
        lease = f"provider-batch:{record_id}"
        if not leases.take(runtime.engine, lease, owner, POLL_LEASE_SECONDS):
            continue
        try:
            _poll_one(runtime, record_id)
            looked += 1
        except (TransientError, ProviderError, ConfigError) as exc:
            log.warning("provider batch %s: %s; looked at again later", record_id, exc)
            _later(runtime, record_id)
        except Exception:  # one batch the provider answers nonsense for never stops the others
            log.exception("provider batch %s could not be read; looked at again later", record_id)
            _failed(runtime, record_id)
        finally:
            leases.release(runtime.engine, lease, owner)
    return looked


def _failed(runtime: Runtime, record_id: int) -> None:
    """Count a look that failed; past ``MAX_POLL_FAILURES`` in a row the batch is given up
    on (its rows go elsewhere; its reservation stays held: the provider may bill it)."""
    with session_scope(runtime.engine) as session:
        record = session.get(ProviderBatch, record_id)
        if record is None:
            return
        record.poll_failures += 1
        failures = record.poll_failures
        claim = batches.batch_claim(session, record)
        job = session.get(Job, record.job_id)
        session.expunge(record)
    _later(runtime, record_id)
    lane = runtime.settings.backend(record.backend)
    if failures >= batches.MAX_POLL_FAILURES and claim is not None and job is not None:
        if isinstance(lane, ProviderBatchLane):
            with contextlib.suppress(Exception):  # tried again at the next look
                _abandon(runtime, claim, lane, record, f"could not be read {failures} times in a row")


def _later(runtime: Runtime, record_id: int, seconds: float | None = None) -> None:
    with session_scope(runtime.engine) as session:
        record = session.get(ProviderBatch, record_id)
        if record is None:
            return
        try:
            wait = seconds or runtime.settings.backend(record.backend).lane.poll_seconds  # type: ignore[union-attr]
        except (ConfigError, AttributeError):
            wait = 300.0
        record.next_poll_at = db_now(session) + timedelta(seconds=wait)


def _poll_one(runtime: Runtime, record_id: int) -> None:
    with session_scope(runtime.engine) as session:
        record = session.get(ProviderBatch, record_id)
        job = session.get(Job, record.job_id) if record is not None else None
        if record is None or job is None or not record.status.is_open or record.batch_id is None:
            return
        claim = batches.batch_claim(session, record)
        now = db_now(session)
        session.expunge(record)
        session.expunge(job)
    lane = runtime.settings.backend(record.backend)
    if not isinstance(lane, ProviderBatchLane):
        raise ConfigError(f"{record.backend} is no longer a provider batch lane", setting="api_providers")
    client = BatchClient(lane.provider)
    found = client.get(record.batch_id)
    status = str(found.get("status") or "")
    if claim is None:  # the shard was taken back (its lease ran out): its next attempt adopts this batch
        _later(runtime, record_id)
        return
    if status in ENDED:
        _collect(runtime, client, claim, job, lane, record, found)
        return
    values: dict[str, Any] = {"provider_status": status[:32] or None, "poll_failures": 0}
    if status == "cancelling" or record.status is ProviderBatchStatus.CANCELLING:
        if now > record.give_up_at + batches.CANCEL_GRACE:
            _abandon(runtime, claim, lane, record, "did not end after it was cancelled")
            return
    elif job.status is JobStatus.CANCELLED or now >= record.give_up_at:
        why = "its job was cancelled" if job.status is JobStatus.CANCELLED else "it would end too late"
        log.info("cancelling provider batch %s: %s", record.batch_id, why)
        client.cancel(record.batch_id)
        values["status"] = ProviderBatchStatus.CANCELLING
    values["next_poll_at"] = now + timedelta(seconds=lane.lane.poll_seconds)
    with session_scope(runtime.engine) as session:
        session.execute(
            update(ProviderBatch)
            .where(ProviderBatch.id == record_id, ProviderBatch.status.in_(batches.OPEN))
            .values(**values)
        )


def _ended_at(found: dict[str, Any], status: str) -> datetime | None:
    stamp = found.get({"completed": "completed_at", "failed": "failed_at"}.get(status, f"{status}_at"))
    return datetime.fromtimestamp(stamp, UTC) if isinstance(stamp, int | float) else None


@dataclass
class _Answers:
    completions: list[Completion | None]
    billed: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0


def _answers(chunk: Chunk, lines: dict[str, ResultLine], lane: ProviderBatchLane, sent: set[int]) -> _Answers:
    """Each row's answer, error row, or None (not answered: back to the router). Only the
    rows ``sent`` (chunk-relative) take a line, and only theirs are paid for."""
    for i in sent:  # asked at the provider, whatever the cache holds now
        chunk.served.pop(i, None)
        chunk.same_as.pop(i, None)
    found = _Answers([])
    first_answer: dict[str, Completion] = {}
    for i, request in enumerate(chunk.requests):
        line = lines.get(custom_id(chunk.first_row + i)) if i in sent else None
        done: Completion | None = None
        fingerprint = chunk.fingerprints[i] if chunk.fingerprints else None
        if request is None:
            done = Completion.failed(chunk.problems[i] or "invalid row")
        elif line is not None and line.answered:
            answer = _completion(lane, request, line)
            if answer is not None:
                found.billed += answer.cost_usd or 0.0
                found.input_tokens += answer.input_tokens
                found.output_tokens += answer.output_tokens
                checked = check_answer(request, answer)
                # An answer that fails its schema is asked again elsewhere (re-asked there).
                done = None if checked.error is not None and checked.error.startswith("schema:") else checked
        elif i in chunk.served:
            done = chunk.served[i]
        elif i in chunk.same_as:
            first = first_answer.get(chunk.same_as[i])
            if first is not None:
                saved = first.cost_usd or 0.0
                done = replace(first, cost_usd=0.0, compute_seconds=0.0, latency_ms=0.0, saved_usd=saved)
        elif line is not None and line.final:
            done = Completion.failed(f"provider refused the request: {line.error or f'HTTP {line.status_code}'}")
        if done is not None and fingerprint is not None and i not in chunk.same_as:
            first_answer.setdefault(fingerprint, done)
        found.completions.append(done)
    return found


def _completion(lane: ProviderBatchLane, request: Request, line: ResultLine) -> Completion | None:
    """A chat completion from a result line, its usage clamped to the request's bounds and
    priced at the lane's discount; None for a body that is not one."""
    try:
        body = line.body or {}
        choice = body["choices"][0]
        text = choice["message"]["content"]
        usage = body["usage"]
        tokens_in, tokens_out = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        finish = choice.get("finish_reason") or "stop"
        if not isinstance(text, str) or not isinstance(finish, str):
            return None
    except (KeyError, IndexError, TypeError, ValueError, OverflowError, AttributeError):
        return None  # not a chat completion (infinite usage, a list for a message): asked elsewhere
    most_in = usage_bound(request_messages(request))
    clamped = min(max(0, tokens_in), most_in), min(max(0, tokens_out), request.max_tokens)
    if clamped != (tokens_in, tokens_out):
        log.warning(
            "%s reported usage %d in / %d out for a request bounded by %d / %d tokens; charged %d / %d",
            lane.name,
            tokens_in,
            tokens_out,
            most_in,
            request.max_tokens,
            *clamped,
        )
    p = lane.provider
    cost = (clamped[0] * p.input_usd_per_1m + clamped[1] * p.output_usd_per_1m) / 1e6 * lane.lane.discount
    return Completion(
        output=text,
        finish_reason=finish[:32],
        input_tokens=clamped[0],
        output_tokens=clamped[1],
        latency_ms=0.0,
        cost_usd=cost,
    )


def _slice(chunk: Chunk, start: int, end: int) -> Chunk:
    """Rows ``[start, end)`` (chunk-relative) of ``chunk`` as a chunk of their own."""
    return Chunk(
        chunk.first_row + start,
        chunk.table.slice(start, end - start),
        chunk.requests[start:end],
        chunk.problems[start:end],
        served={i - start: c for i, c in chunk.served.items() if start <= i < end},
        same_as={i - start: f for i, f in chunk.same_as.items() if start <= i < end},
        fingerprints=chunk.fingerprints[start:end],
    )


def _collect(
    runtime: Runtime,
    client: BatchClient,
    claim: claims.Claim,
    job: Job,
    lane: ProviderBatchLane,
    record: ProviderBatch,
    found: dict[str, Any],
) -> None:
    status = str(found["status"])
    lines: dict[str, ResultLine] = {}
    for key in ("error_file_id", "output_file_id"):  # an answer wins over an error line
        if found.get(key):
            lines.update(parse_results(client.content(str(found[key]))))
    table = _read(job, record.first_row, record.row_end)
    chunk = _known(runtime, job, table, record.first_row, lane, record.model)
    sent = {row - record.first_row for row in batches.rows_in(record.sent_rows)}
    got = _answers(chunk, lines, lane, sent)
    spans = batches.runs_of([c is not None for c in got.completions], record.first_row)
    runs: list[batches.Run] = []
    written: list[tuple[Chunk, list[Completion]]] = []
    for k, (start, end, answered) in enumerate(spans):
        if not answered:
            runs.append(batches.Run(start, end))
            continue
        part = _slice(chunk, start - record.first_row, end - record.first_row)
        completions = [c for c in got.completions[start - record.first_row : end - record.first_row] if c is not None]
        attempt = claim.attempt if k == 0 else 1
        out, cost = build_output(
            part,
            completions,
            backend=lane.name,
            model=record.model,
            attempt=attempt,
            usd_per_second=0.0,
            carried=job.carried_columns,
        )
        stats = checkpoint.stats_of(runtime, claim, part, completions, out, cost, attempt)
        write_parquet(out, stats.url, runtime.storage.storage_class("hot"))
        runs.append(batches.Run(start, end, stats))
        written.append((part, completions))
    returned = sum(e - s for s, e, ok in spans if not ok)
    cancelled = job.status is JobStatus.CANCELLED
    note = None
    if returned:
        reason = "its job was cancelled" if cancelled else f"the provider batch ended {status}"
        note = f"{returned} row(s) not answered at {lane.name} ({reason}): back to the router"
    billed = Charge(
        claim.job_id, claim.shard_id, lane.name, got.billed, got.input_tokens, got.output_tokens, claim.attempt
    )
    with session_scope(runtime.engine) as session:
        settled = batches.settle(
            session,
            claim,
            record.id,
            runs,
            billed,
            exclude=not cancelled,
            note=note,
            ended_at=_ended_at(found, status),
            provider_status=status,
        )
        if settled:
            outcome = "done" if not returned else "failed"
            learning.record_shard_end(session, lane.name, record.model, outcome, runtime.settings.routing)
    if not settled:
        log.info("provider batch %s was settled by another poller", record.batch_id)
        return
    log.info(
        "provider batch %s (%s) collected: %d row(s) answered, %d back to the router, $%.6f",
        record.batch_id,
        status,
        record.row_end - record.first_row - returned,
        returned,
        got.billed,
    )
    for part, completions in written:
        checkpoint.remember(runtime, job, part, completions, record.model)
    _after(runtime, claim.job_id)


def _abandon(runtime: Runtime, claim: claims.Claim, lane: ProviderBatchLane, record: ProviderBatch, why: str) -> None:
    """A provider batch given up on (cancelled but never ended, or unreadable): its rows go
    elsewhere; its reservation stays held until the job ends (the provider may still bill it)."""
    note = f"provider batch {record.batch_id} {why}: its rows go back to the router"
    runs = [batches.Run(record.first_row, record.row_end)]
    billed = Charge(claim.job_id, claim.shard_id, lane.name, 0.0, attempt=claim.attempt)
    with session_scope(runtime.engine) as session:
        if not batches.settle(
            session,
            claim,
            record.id,
            runs,
            billed,
            exclude=True,
            note=note,
            ended_at=None,
            provider_status="cancelling",
            release=False,
        ):
            return
        session.execute(
            update(ProviderBatch).where(ProviderBatch.id == record.id).values(status=ProviderBatchStatus.ABANDONED)
        )
    log.warning("%s", note)
    _after(runtime, claim.job_id)


def _after(runtime: Runtime, job_id: str) -> None:
    with session_scope(runtime.engine) as session:
        done = transitions.job_shards_final(session, job_id)
        waiting = not done and transitions.shards_waiting_for_router(session, job_id)
    if done:
        runtime.send_finalize(job_id)
    elif waiting:
        runtime.send_route(job_id)
