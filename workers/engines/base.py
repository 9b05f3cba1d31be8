"""The inference-engine seam: requests in, completions out, same order.

An engine never raises for one bad row: it returns a ``Completion`` with ``error``
set. It raises only when it cannot work at all (the model will not load), which
fails the shard rather than the row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from schemas.inference import Completion, Request

__all__ = ["Completion", "Engine", "Request", "stream"]


class Engine(Protocol):
    #: The model as written in output rows.
    model: str

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """One completion per request, in the same order."""
        ...


def stream(engine: Engine, chunks: Iterable[Sequence[Request]]) -> Iterator[list[Completion]]:
    """Completions chunk by chunk, in order; engines may overlap chunks (``stream`` method)."""
    own = getattr(engine, "stream", None)
    if own is not None:
        yield from own(chunks)
        return
    for chunk in chunks:
        yield engine.generate(chunk)
