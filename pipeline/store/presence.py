"""Which processes consume which queues now (the ``workers`` table).

A ``spotlane worker`` announces itself with its queues when it starts, renews its
row every ``worker.reap_interval_seconds`` and removes it when it stops; a row not
renewed for three intervals belongs to a worker that is gone. Commands that only
enqueue work (``resume``, ``budget``, ``retry-errors``) use it to say when nothing
will pick that work up.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pipeline.store.db import db_now, session_scope
from schemas.tables import WorkerPresence

__all__ = ["announce", "consumers", "consumers_in", "leave", "renew"]

#: Missed renewals after which a worker counts as gone.
MISSED = 3


def announce(engine: Engine, owner: str, queues: list[str]) -> None:
    with session_scope(engine) as session:
        now = db_now(session)
        try:
            with session.begin_nested():
                session.add(
                    WorkerPresence(
                        owner=owner,
                        hostname=socket.gethostname()[:128],
                        pid=os.getpid(),
                        queues=list(queues),
                        started_at=now,
                        seen_at=now,
                    )
                )
        except IntegrityError:
            session.execute(
                update(WorkerPresence).where(WorkerPresence.owner == owner).values(queues=list(queues), seen_at=now)
            )


def renew(engine: Engine, owner: str) -> None:
    with session_scope(engine) as session:
        session.execute(update(WorkerPresence).where(WorkerPresence.owner == owner).values(seen_at=db_now(session)))


def leave(engine: Engine, owner: str) -> None:
    with session_scope(engine) as session:
        session.execute(delete(WorkerPresence).where(WorkerPresence.owner == owner))


def consumers(engine: Engine, queue: str, interval_seconds: float) -> int:
    """How many live workers consume ``queue``."""
    with session_scope(engine) as session:
        return consumers_in(session, queue, interval_seconds)


def consumers_in(session: Session, queue: str, interval_seconds: float) -> int:
    """``consumers`` inside the caller's transaction."""
    since = db_now(session) - timedelta(seconds=interval_seconds * MISSED)
    rows = session.execute(select(WorkerPresence.queues).where(WorkerPresence.seen_at >= since)).scalars().all()
    return sum(1 for queues in rows if queue in (queues or []))
