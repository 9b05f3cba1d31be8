"""Shared fixtures: a spotlane home per test, a tiny real model, real job stores.

Service fixtures skip when the service is missing, except under ``CI=true``
where a missing service is a failure.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from pipeline.runtime import Runtime
from tests.support import free_port
from workers.demo_model import build_tiny_model

POSTGRES_ADMIN_URL = os.environ.get(
    "SPOTLANE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
#: The pytest-xdist worker running this process (0 without xdist).
XDIST_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
#: A Redis database number of its own (one per xdist worker: 13, 12, ...), flushed
#: around each test that uses it.
REDIS_URL = os.environ.get("SPOTLANE_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{13 - XDIST_WORKER}")


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
        from pipeline.store import db

        db._engine.cache_clear()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The test Redis database, empty before and after the test."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError as exc:
        service_missing("Redis", exc)
    try:
        yield REDIS_URL
    finally:
        client.flushdb()
        client.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API on loopback (moto's server mode), for the whole session.

    Credentials and the endpoint reach s3fs the standard AWS way, through the
    environment, which child processes inherit.
    """
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("moto's S3 server did not start")
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing-secret",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.terminate()
        server.wait(10)


_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A new, empty bucket: ``s3://<name>``."""
    import fsspec

    name = f"spotlane-{secrets.token_hex(4)}"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(params=["file", "s3"])
def tier_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A storage root: a local folder URL, or a bucket on the S3 server."""
    if request.param == "file":
        return (tmp_path / "objects").as_uri()
    return str(request.getfixturevalue("s3_bucket")) + "/spotlane"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, spotlane_home: Path) -> str:
    """The job store under test: the embedded SQLite file, or a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{spotlane_home / 'spotlane.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def runtime(store_url: str) -> Runtime:
    """A migrated runtime on ``store_url`` (Alembic migrations, not create_all)."""
    from pipeline.store import db

    if not store_url.startswith("sqlite"):
        db.upgrade(db.engine_for(store_url))  # the embedded store migrates itself
    return Runtime.open(database={"url": store_url})
