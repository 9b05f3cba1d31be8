"""Named leases in SQL: one holder at a time, lost by a holder that stops renewing.

Used where two processes must not do the same long job at once: two storage
sweeps, two finalizers of one job, two routers of one job, two merges into one
job. Taking, renewing and giving back are guarded UPDATEs measured by the
database's clock, so they hold on SQLite and PostgreSQL alike and across machines
whose clocks disagree.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import ColumnElement, Engine, delete, exists, or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pipeline.store.db import db_now, session_scope
from pipeline.store.guards import matched
from schemas.tables import Lease

__all__ = ["held", "held_by", "release", "renew", "take"]


def take(engine: Engine, name: str, owner: str, seconds: float) -> bool:
    """Hold ``name`` for ``seconds`` if nobody else does; True if ``owner`` holds it now."""
    with session_scope(engine) as session:
        now = db_now(session)
        taken = matched(
            session.execute(
                update(Lease)
                .where(Lease.name == name, or_(Lease.expires_at < now, Lease.owner == owner))
                .values(owner=owner, expires_at=now + timedelta(seconds=seconds))
            )
        )
        if taken:
            return True
        if session.get(Lease, name) is not None:
            return False
    try:
        with session_scope(engine) as session:
            session.add(Lease(name=name, owner=owner, expires_at=db_now(session) + timedelta(seconds=seconds)))
    except IntegrityError:
        return False  # another process created it first
    return True


def renew(engine: Engine, name: str, owner: str, seconds: float) -> bool:
    """Extend ``owner``'s hold; False if it was lost (expired and taken by another)."""
    with session_scope(engine) as session:
        return bool(
            matched(
                session.execute(
                    update(Lease)
                    .where(Lease.name == name, Lease.owner == owner)
                    .values(expires_at=db_now(session) + timedelta(seconds=seconds))
                )
            )
        )


def release(engine: Engine, name: str, owner: str) -> None:
    """Give ``name`` back (nothing if ``owner`` no longer holds it)."""
    with session_scope(engine) as session:
        session.execute(delete(Lease).where(Lease.name == name, Lease.owner == owner))


def held_by(session: Session, name: str, owner: str) -> ColumnElement[bool]:
    """A condition, for a guarded UPDATE: ``owner`` still holds ``name`` now."""
    return exists().where(Lease.name == name, Lease.owner == owner, Lease.expires_at >= db_now(session))


def held(session: Session, name: str) -> bool:
    """Whether anyone holds ``name`` now."""
    return bool(
        session.execute(exists().where(Lease.name == name, Lease.expires_at >= db_now(session)).select()).scalar()
    )
