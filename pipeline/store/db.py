"""Connections to the job store, and its migrations.

One engine per database URL per process. SQLite (the embedded default) is put in
WAL mode with a busy timeout, so a CLI reading status and a worker committing
checkpoints from another process do not trip over each other.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import BindParameter, Engine, Table, bindparam, create_engine, event, func, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

import migrations
from schemas.base import utcnow
from schemas.errors import ConfigError, StoreError, TransientError
from schemas.secrets import mask_url

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "bound",
    "current_revision",
    "db_now",
    "engine_for",
    "head_revision",
    "is_transient",
    "session_scope",
    "upgrade",
]

MIGRATIONS_DIR = Path(migrations.__file__).parent


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


@lru_cache(maxsize=16)
def _engine(url: str, pid: int, pool_size: int) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"database.url {mask_url(url)!r} is not a database URL", setting="database.url") from exc
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        # psycopg 3 is what we install; the bare scheme would ask for psycopg2.
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return create_engine(url, pool_size=pool_size, pool_pre_ping=True)


def engine_for(url: str, pool_size: int = 5) -> Engine:
    """The process's engine for ``url`` (a new one after a fork)."""
    return _engine(url, os.getpid(), pool_size)


@lru_cache(maxsize=16)
def _sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = _sessions(engine)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def bound(table: Table, name: str, column: str | None = None) -> BindParameter[Any]:
    """A bound parameter of a statement built once, typed as ``table``'s ``column``
    (``name`` by default) and named ``p_<name>``: SQLAlchemy takes an execution
    parameter named as a column of a table the statement updates for a SET of it."""
    return bindparam(f"p_{name}", type_=table.c[column or name].type)


def db_now(session: Session) -> datetime:
    """The database's clock: what leases, heartbeats and the reaper all measure by.

    Workers and reapers on different machines would otherwise compare each
    other's clocks. PostgreSQL answers ``clock_timestamp()``; SQLite lives on
    this machine's disk, so every process using it shares this machine's clock.
    """
    if session.get_bind().dialect.name == "postgresql":
        value: datetime = session.execute(select(func.clock_timestamp())).scalar_one()
        return value
    return utcnow()


def _alembic_config(engine: Engine) -> Config:
    from alembic.config import Config  # Alembic only to migrate: it takes a tenth of a second to import

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def head_revision() -> str | None:
    return migrations.HEAD


def current_revision(engine: Engine) -> str | None:
    """The store's revision, as Alembic records it (None: an empty store)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        value: str | None = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        return value


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the Alembic migrations up to ``revision`` (idempotent)."""
    from alembic import command

    cfg = _alembic_config(engine)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except SQLAlchemyError as exc:
        raise StoreError(
            f"could not migrate the job store at {mask_url(str(engine.url))}: {exc.__class__.__name__}: {exc.orig if hasattr(exc, 'orig') else exc}"
        ) from exc


def is_transient(exc: BaseException) -> bool:
    """A fault that may pass: storage I/O, a dropped or locked database connection."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)
