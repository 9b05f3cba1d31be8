"""The embedded broker never hands a consumer half a message (kombu's own filesystem
transport did: a worker died with ``Unrecoverable error: JSONDecodeError`` in CI)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from kombu import Connection
from kombu.transport import filesystem

from pipeline.tasks import fs_transport

PAYLOAD = {"body": "x" * 200_000}  # big enough that writing it takes a while


def _race(transport: type[filesystem.Transport], folder: Path, messages: int = 300) -> tuple[int, list[str]]:
    """Two producers put, one consumer gets as fast as it can: (messages read, errors)."""
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder), "store_processed": False}
    got, errors = 0, []
    done = threading.Event()

    def produce() -> None:
        with Connection(transport=transport, transport_options=options) as conn:
            channel = conn.default_channel
            for _ in range(messages // 2):
                channel._put("q", PAYLOAD)

    def consume() -> None:
        nonlocal got
        with Connection(transport=transport, transport_options=options) as conn:
            channel = conn.default_channel
            while got < messages and not done.is_set():
                try:
                    message = channel._get("q")
                except filesystem.Empty:
                    continue
                except ValueError as exc:  # JSONDecodeError: a message read before it was written
                    errors.append(exc.__class__.__name__)
                    got += 1
                    continue
                assert message == PAYLOAD
                got += 1

    consumer = threading.Thread(target=consume)
    consumer.start()
    producers = [threading.Thread(target=produce) for _ in range(2)]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    consumer.join(30)
    done.set()
    return got, errors


@pytest.fixture
def slow_writers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A producer that takes its time between creating a message's file and writing it
    (a loaded machine, a slow disk): kombu takes a lock there."""
    lock = filesystem.lock

    def slow(fh: object, flags: int) -> None:
        time.sleep(0.005)
        lock(fh, flags)

    monkeypatch.setattr(filesystem, "lock", slow)


def test_a_consumer_racing_slow_producers_reads_every_message_whole(tmp_path: Path, slow_writers: None) -> None:
    got, errors = _race(fs_transport.Transport, tmp_path, messages=100)
    assert errors == [] and got == 100
    assert not list(tmp_path.iterdir())  # no half-written leftovers either


def test_kombus_own_filesystem_transport_hands_half_written_messages_to_a_racing_consumer(
    tmp_path: Path, slow_writers: None
) -> None:
    """Why ``fs_transport`` exists."""
    got, errors = _race(filesystem.Transport, tmp_path, messages=100)
    assert errors, "kombu's transport no longer hands out half-written messages: fs_transport may be dropped"
