"""What the router learns from what happens: per backend and model moving averages.

Workers report each committed checkpoint (throughput, latency, errors, tokens per
character, how much of ``max_tokens`` rows use, how often a row with a schema was
asked again) and each shard's end (done,
preempted, lost, failed). Each figure is an exponentially weighted moving average
computed inside one UPDATE, so concurrent reports never lose each other. A backend
that fails ``cooldown_failures`` shards in a row is cooled down for
``cooldown_seconds``: the router skips it while another backend can do the work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schemas.backends import RoutingSettings
from schemas.base import utcnow
from schemas.tables import BackendStats, ProviderBatch

__all__ = ["MIN_TURNAROUNDS", "Observed", "observed", "record_checkpoint", "record_shard_end", "turnaround"]

#: Provider batches a batch lane must have seen end before its observed turnaround
#: replaces the window; and the most recent ones read.
MIN_TURNAROUNDS = 5
TURNAROUNDS_READ = 50


@dataclass(frozen=True)
class Observed:
    tokens_per_second: float | None
    latency_seconds: float | None
    error_rate: float
    preemption_rate: float | None
    chars_per_token: float | None
    output_fill: float | None
    cooldown_until: datetime | None
    samples: int
    #: Re-asks per row with a schema (API lane); None until a checkpoint with one.
    reask_rate: float | None = None

    def cooling(self, now: datetime) -> bool:
        return self.cooldown_until is not None and self.cooldown_until > now


def observed(session: Session, backend: str, model: str) -> Observed | None:
    row = session.get(BackendStats, (backend, model))
    if row is None:
        return None
    return Observed(
        row.tokens_per_second,
        row.latency_seconds,
        row.error_rate,
        row.preemption_rate,
        row.chars_per_token,
        row.output_fill,
        row.cooldown_until,
        row.samples,
        row.reask_rate,
    )


def turnaround(session: Session, lane: str, percentile: float) -> float | None:
    """The ``percentile`` (nearest rank) of the lane's recent turnarounds, seconds, from
    submitting a provider batch to the provider ending it (completed, expired, or
    cancelled by us at the deadline's risk: a lower bound, counted all the same);
    None until ``MIN_TURNAROUNDS`` are known."""
    rows = session.execute(
        select(ProviderBatch.submitted_at, ProviderBatch.ended_at)
        .where(
            ProviderBatch.backend == lane,
            ProviderBatch.ended_at.is_not(None),
            ProviderBatch.submitted_at.is_not(None),
            ProviderBatch.provider_status.in_(("completed", "expired", "cancelled")),
        )
        .order_by(ProviderBatch.ended_at.desc())
        .limit(TURNAROUNDS_READ)
    ).all()
    if len(rows) < MIN_TURNAROUNDS:
        return None
    seconds = sorted(max(0.0, (ended - sent).total_seconds()) for sent, ended in rows if sent and ended)
    return seconds[max(0, math.ceil(percentile / 100.0 * len(seconds)) - 1)]


def _ensure(session: Session, backend: str, model: str) -> None:
    if session.get(BackendStats, (backend, model)) is not None:
        return
    try:
        with session.begin_nested():
            session.execute(
                insert(BackendStats).values(
                    backend=backend,
                    model=model,
                    error_rate=0.0,
                    samples=0,
                    consecutive_failures=0,
                    updated_at=utcnow(),
                )
            )
    except IntegrityError:
        pass  # another worker inserted it first


def _ewma(column: Any, value: float | None, alpha: float) -> Any:
    if value is None:
        return column
    return case((column.is_(None), value), else_=column * (1 - alpha) + value * alpha)


def record_checkpoint(
    session: Session,
    backend: str,
    model: str,
    routing: RoutingSettings,
    *,
    rows: int,
    rows_failed: int,
    prompt_chars: int,
    input_tokens: int,
    output_tokens: int,
    max_tokens: int,
    seconds: float,
    requests_latency: float | None = None,
    structured_rows: int = 0,
    reasks: int = 0,
) -> None:
    """Fold one committed checkpoint into the backend's averages.

    ``prompt_chars``, ``input_tokens``, ``output_tokens`` and ``max_tokens`` are of the
    rows answered at the first ask (a re-ask's prompt holds the answer before it and a
    note, so it would skew characters per token and the fill); ``reasks`` over
    ``structured_rows`` (rows with a schema) is the re-ask rate.
    """
    if rows <= 0:
        return
    _ensure(session, backend, model)
    a = routing.ewma_alpha
    ok = rows - rows_failed
    values: dict[str, Any] = {
        "error_rate": BackendStats.error_rate * (1 - a) + (rows_failed / rows) * a,
        "samples": BackendStats.samples + 1,
        "updated_at": utcnow(),
    }
    if seconds > 0 and output_tokens > 0:
        values["tokens_per_second"] = _ewma(BackendStats.tokens_per_second, output_tokens / seconds, a)
    if requests_latency is not None:
        values["latency_seconds"] = _ewma(BackendStats.latency_seconds, requests_latency, a)
    if input_tokens > 0 and prompt_chars > 0 and ok > 0:
        values["chars_per_token"] = _ewma(BackendStats.chars_per_token, prompt_chars / input_tokens, a)
    if max_tokens > 0 and ok > 0:
        values["output_fill"] = _ewma(BackendStats.output_fill, min(1.0, output_tokens / max_tokens), a)
    if structured_rows > 0:
        values["reask_rate"] = _ewma(BackendStats.reask_rate, reasks / structured_rows, a)
    session.execute(
        update(BackendStats).where(BackendStats.backend == backend, BackendStats.model == model).values(**values)
    )


def record_shard_end(session: Session, backend: str, model: str, outcome: str, routing: RoutingSettings) -> None:
    """Fold a shard run's outcome in: preemption rate, failures in a row, cooldown."""
    _ensure(session, backend, model)
    a = routing.ewma_alpha
    interrupted = 1.0 if outcome in ("preempted", "lost") else 0.0
    where = (BackendStats.backend == backend, BackendStats.model == model)
    values: dict[str, Any] = {
        "preemption_rate": _ewma(BackendStats.preemption_rate, interrupted, a),
        "updated_at": utcnow(),
    }
    if outcome == "failed":
        values["consecutive_failures"] = BackendStats.consecutive_failures + 1
    elif outcome == "done":
        values["consecutive_failures"] = 0
        values["cooldown_until"] = None
    session.execute(update(BackendStats).where(*where).values(**values))
    if outcome == "failed":
        failures = session.execute(select(BackendStats.consecutive_failures).where(*where)).scalar_one()
        if failures >= routing.cooldown_failures:
            session.execute(
                update(BackendStats)
                .where(*where)
                .values(cooldown_until=utcnow() + timedelta(seconds=routing.cooldown_seconds))
            )
