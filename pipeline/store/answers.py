"""The answer cache in SQL: a request asked before is answered again for free.

Keyed by the request's fingerprint (``schemas.fingerprint``). A worker looks its
chunk's fingerprints up before sending anything (``lookup``: answers younger than
``cache.ttl_days``), and after its checkpoint committed, records the answers it
generated (``remember``): errors and answers cut by ``max_tokens`` are never kept.
Two jobs that ask the same new question at the same time both pay, and the first
answer recorded stays (an insert that finds the key taken changes nothing); a
``--refresh`` job replaces what it asks again. The storage sweep drops entries past
their time (``purge``).

The answers are a copy of result rows (text and token counts), not pointers into
result files: results move between tiers and are deleted by the lifecycle, and a
row served must not depend on a file that may be gone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from schemas.tables import CachedAnswer

__all__ = ["Answer", "lookup", "purge", "remember", "usable_since"]

#: Fingerprints per lookup query.
_BATCH = 500


@dataclass(frozen=True)
class Answer:
    fingerprint: str
    output: str | None
    finish_reason: str | None
    input_tokens: int
    output_tokens: int
    cost_usd: float
    model: str
    job_id: str
    embedding: list[float] | None = None


def usable_since(now: datetime, ttl_days: float, job_created: datetime | None, refresh: bool) -> datetime:
    """The oldest answer a job may be served: ``ttl_days`` back; for a ``--refresh`` job,
    only answers recorded since it began (its own, for its repeats)."""
    since = now - timedelta(days=ttl_days)
    return max(since, job_created) if refresh and job_created is not None else since


def lookup(session: Session, fingerprints: Iterable[str], since: datetime) -> dict[str, Answer]:
    """The cached answers among ``fingerprints``, recorded at ``since`` or later.

    Asked by key alone, their age checked here: with ``created_at`` in the query,
    PostgreSQL may walk the age index (every answer is recent) instead of the key."""
    wanted = sorted(set(fingerprints))
    found: dict[str, Answer] = {}
    for start in range(0, len(wanted), _BATCH):
        rows = session.scalars(select(CachedAnswer).where(CachedAnswer.fingerprint.in_(wanted[start : start + _BATCH])))
        for row in rows:
            if row.created_at < since:
                continue
            found[row.fingerprint] = Answer(
                row.fingerprint,
                row.output,
                row.finish_reason,
                row.input_tokens,
                row.output_tokens,
                row.cost_usd,
                row.model,
                row.job_id,
                row.embedding,
            )
    return found


def remember(session: Session, answers: Sequence[Answer], now: datetime, *, replace: bool = False) -> None:
    """Record ``answers``; a fingerprint already recorded keeps its answer unless ``replace``.

    Written in batches (a statement's parameters are bounded) in fingerprint order (two
    writers of overlapping answers lock rows in one order: no deadlock)."""
    if not answers:
        return
    ordered = sorted({a.fingerprint: a for a in answers}.values(), key=lambda a: a.fingerprint)
    for start in range(0, len(ordered), _BATCH):
        _insert(session, ordered[start : start + _BATCH], now, replace)


def _insert(session: Session, answers: Sequence[Answer], now: datetime, replace: bool) -> None:
    values = [
        {
            "fingerprint": a.fingerprint,
            "output": a.output,
            "finish_reason": a.finish_reason,
            "input_tokens": a.input_tokens,
            "output_tokens": a.output_tokens,
            "cost_usd": a.cost_usd,
            "embedding": a.embedding,
            "model": a.model,
            "job_id": a.job_id,
            "created_at": now,
        }
        for a in answers
    ]
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(CachedAnswer).values(values)
    if replace:
        changing = {k: statement.excluded[k] for k in values[0] if k != "fingerprint"}
        session.execute(statement.on_conflict_do_update(index_elements=["fingerprint"], set_=changing))
    else:
        session.execute(statement.on_conflict_do_nothing(index_elements=["fingerprint"]))


def purge(session: Session, before: datetime) -> int:
    """Drop the answers recorded before ``before``; how many."""
    result = session.execute(delete(CachedAnswer).where(CachedAnswer.created_at < before))
    return int(getattr(result, "rowcount", 0) or 0)
