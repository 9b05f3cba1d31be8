"""An in-process engine generates in a thread of its own while the shard's next chunk is
read, and a stop drops a chunk read ahead but not started."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import pytest

from schemas.inference import Completion, Request
from workers.engines.base import stream
from workers.engines.stub import StubEngine


class _Timed(StubEngine):
    """The stub engine, with what it generated and when."""

    def __init__(self, seconds_per_row: float) -> None:
        super().__init__("m", seconds_per_row)
        self.generated: list[str] = []
        self.spans: list[tuple[float, float]] = []

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        started = time.monotonic()
        done = super().generate(requests)
        self.generated.append(requests[0].prompt or "")
        self.spans.append((started, time.monotonic()))
        return done


def _chunks(n: int, read_seconds: float, reads: list[tuple[float, float]]) -> Iterator[list[Request]]:
    for i in range(n):
        started = time.monotonic()
        time.sleep(read_seconds)  # fetching the rows from storage
        reads.append((started, time.monotonic()))
        yield [Request(prompt=f"chunk {i} row {r}") for r in range(10)]


def test_the_next_chunk_is_read_while_the_engine_generates() -> None:
    engine, reads = _Timed(0.01), []  # 0.1 s a chunk
    done = [c[0].output for c in stream(engine, _chunks(5, 0.1, reads))]
    assert done == [f"stub: chunk {i} row 0" for i in range(5)]  # in order, each once
    # Reading chunk i+1 began before generating chunk i ended: the two overlap (by how
    # much is the machine's load; benchmarks/ measures it, not a test).
    assert all(reads[i + 1][0] < engine.spans[i][1] for i in range(4))


def test_a_stop_drops_the_chunk_read_ahead_and_starts_nothing_more() -> None:
    stop = threading.Event()

    class Noticed(_Timed):
        def generate(self, requests: Sequence[Request]) -> list[Completion]:
            stop.set()  # a spot notice while the first chunk generates
            return super().generate(requests)

    engine, reads = Noticed(0.02), []
    out = [c[0].output for c in stream(engine, _chunks(5, 0.0, reads), stopped=stop.is_set)]
    assert out == ["stub: chunk 0 row 0"] and engine.generated == ["chunk 0 row 0"]
    assert len(reads) == 2  # the second chunk was read, never generated


def test_a_failed_read_still_hands_over_the_chunk_generated_before_it() -> None:
    def chunks() -> Iterator[list[Request]]:
        yield [Request(prompt="first")]
        raise OSError("storage went away")

    got = []
    with pytest.raises(OSError, match="storage went away"):
        for completions in stream(StubEngine("m"), chunks()):
            got.append(completions[0].output)
    assert got == ["stub: first"]  # committed by the caller before the error reached it
