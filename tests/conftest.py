"""Shared fixtures: a spotlane home per test, a tiny real model, real job stores.

Service fixtures skip when the service is missing, except under ``CI=true``
where a missing service is a failure.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from pipeline.runtime import Runtime
from workers.tiny import build_tiny_model

POSTGRES_ADMIN_URL = os.environ.get(
    "SPOTLANE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def service_missing(what: str, exc: BaseException) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is required under CI=true: {exc}")
    pytest.skip(f"{what} not available: {exc}")


@pytest.fixture(autouse=True)
def spotlane_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own embedded home; no SPOTLANE_* from the outside leaks in."""
    for key in list(os.environ):
        if key.startswith("SPOTLANE_") and not key.startswith("SPOTLANE_TEST_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    monkeypatch.setenv("SPOTLANE_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return home


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", max_positions=256)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    name = f"spotlane_test_{secrets.token_hex(4)}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        service_missing("PostgreSQL", exc)
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        from pipeline import db

        db._engine.cache_clear()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, spotlane_home: Path) -> str:
    """The job store under test: the embedded SQLite file, or a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{spotlane_home / 'spotlane.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def runtime(store_url: str) -> Runtime:
    """A migrated runtime on ``store_url`` (Alembic migrations, not create_all)."""
    from pipeline import db

    if not store_url.startswith("sqlite"):
        db.upgrade(db.engine_for(store_url))  # the embedded store migrates itself
    return Runtime.open(database={"url": store_url})


def write_prompts(path: Path, rows: int, *, row_group_size: int | None = None, **extra: Any) -> Path:
    """A valid input file of ``rows`` prompts, plus any extra columns given."""
    columns: dict[str, Any] = {
        "id": [f"row-{i:05d}" for i in range(rows)],
        "prompt": [f"Summarize the support ticket number {i} about a billing error." for i in range(rows)],
    }
    columns.update(extra)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def spotlane(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real ``spotlane`` CLI in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
