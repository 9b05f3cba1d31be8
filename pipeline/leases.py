"""Named leases in SQL: one holder at a time, lost by a holder that stops renewing.

Used where two processes must not do the same long job at once (two storage
sweeps: a duplicated beat, a sweep by hand). Taking, renewing and giving back are
guarded UPDATEs, so they hold on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, or_, update
from sqlalchemy.exc import IntegrityError

from pipeline.db import session_scope
from schemas.base import utcnow
from schemas.tables import Lease

__all__ = ["release", "renew", "take"]

_PAST = datetime(1970, 1, 1, tzinfo=UTC)


def take(engine: Engine, name: str, owner: str, seconds: float) -> bool:
    """Hold ``name`` for ``seconds`` if nobody else does; True if ``owner`` holds it now."""
    now = utcnow()
    with session_scope(engine) as session:
        taken = session.execute(
            update(Lease).where(Lease.name == name, or_(Lease.expires_at < now, Lease.owner == owner))
            .values(owner=owner, expires_at=now + timedelta(seconds=seconds))
        ).rowcount  # type: ignore[attr-defined]
        if taken:
            return True
        if session.get(Lease, name) is not None:
            return False
    try:
        with session_scope(engine) as session:
            session.add(Lease(name=name, owner=owner, expires_at=now + timedelta(seconds=seconds)))
    except IntegrityError:
        return False  # another process created it first
    return True


def renew(engine: Engine, name: str, owner: str, seconds: float) -> bool:
    """Extend ``owner``'s hold; False if it was lost (expired and taken by another)."""
    with session_scope(engine) as session:
        return bool(session.execute(
            update(Lease).where(Lease.name == name, Lease.owner == owner)
            .values(expires_at=utcnow() + timedelta(seconds=seconds))
        ).rowcount)  # type: ignore[attr-defined]


def release(engine: Engine, name: str, owner: str) -> None:
    with session_scope(engine) as session:
        session.execute(update(Lease).where(Lease.name == name, Lease.owner == owner).values(expires_at=_PAST))
