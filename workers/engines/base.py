"""The inference-engine seam: requests in, completions out, same order.

An engine never raises for one bad row: it returns a ``Completion`` with ``error``
set. It raises only when it cannot work at all (the model will not load), which
fails the shard rather than the row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from schemas.inference import Completion, Request

__all__ = ["Completion", "Engine", "Request", "stream"]


class Engine(Protocol):
    #: The model as written in output rows.
    model: str

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """One completion per request, in the same order."""
        ...


def stream(
    engine: Engine, chunks: Iterable[Sequence[Request]], stopped: Callable[[], bool] = lambda: False
) -> Iterator[list[Completion]]:
    """Completions chunk by chunk, in order.

    Engines may overlap chunks themselves (a ``stream`` method: the API engines keep the
    next chunk's requests in flight). Any other engine generates in a thread of its own:
    while it runs a chunk, the caller's next chunk is read (its rows fetched from storage,
    its budget reserved, the answer cache asked), and that chunk starts before the caller
    commits the one just done; the GPU waits neither for the input nor for the commit.
    Once ``stopped()``, a chunk read but not started is dropped (its rows stay for the
    shard's next attempt): only the chunk generating when the stop came finishes.
    """
    own = getattr(engine, "stream", None)
    if own is not None:
        yield from own(chunks)
        return
    source = iter(chunks)
    first = next(source, None)
    if first is None:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="spotlane-generate") as pool:
        running: Future[list[Completion]] | None = pool.submit(engine.generate, first)
        while running is not None:
            failed: Exception | None = None
            try:
                following = next(source, None)  # read while the engine works
            except Exception as exc:  # the chunk in hand is still the caller's to commit
                following, failed = None, exc
            done = running.result()
            running = pool.submit(engine.generate, following) if following is not None and not stopped() else None
            yield done
            if failed is not None:
                raise failed
