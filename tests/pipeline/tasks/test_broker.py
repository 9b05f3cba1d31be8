"""Broker contract tests: the no-server filesystem transport and Redis."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection
from kombu.simple import SimpleQueue

from pipeline.runtime import Runtime
from schemas.records import RouteJob, RunShard


@pytest.fixture(params=["filesystem", "redis"])
def broker_runtime(request: pytest.FixtureRequest) -> Runtime:
    if request.param == "redis":
        return Runtime.open(broker={"url": request.getfixturevalue("redis_url")})
    return Runtime.open()


@pytest.fixture
def connection(broker_runtime: Runtime) -> Iterator[Connection]:
    with broker_runtime.celery.connection_for_read() as conn:
        yield conn


def _get(conn: Connection, queue: str, timeout: float = 5) -> Any:
    simple = conn.SimpleQueue(queue)
    try:
        return simple.get(timeout=timeout)
    finally:
        simple.close()


def test_a_task_reaches_its_queue_with_only_ids_in_the_payload(broker_runtime: Runtime, connection: Connection) -> None:
    record = RunShard(job_id="j1", shard_id=7, backend="local")

    broker_runtime.send("spotlane.run_shard", record, "gpu.local")
    message = _get(connection, "gpu.local")

    args, kwargs, _ = message.decode()
    assert message.headers["task"] == "spotlane.run_shard"
    assert RunShard.decode(args[0]) == record
    assert kwargs == {}
    message.ack()


def test_queues_are_separate(broker_runtime: Runtime, connection: Connection) -> None:
    broker_runtime.send("spotlane.route_job", RouteJob(job_id="j2"), "control")

    with pytest.raises(SimpleQueue.Empty):
        _get(connection, "gpu.other", timeout=0.5)
    assert RouteJob.decode(_get(connection, "control").decode()[0][0]).job_id == "j2"


def test_a_rejected_message_is_delivered_again_not_lost(broker_runtime: Runtime, connection: Connection) -> None:
    broker_runtime.send("spotlane.route_job", RouteJob(job_id="j3"), "control")

    _get(connection, "control").reject(requeue=True)
    again = _get(connection, "control")

    assert RouteJob.decode(again.decode()[0][0]).job_id == "j3"
    again.ack()
