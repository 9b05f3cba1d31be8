"""The inference-engine seam: requests in, completions out, same order.

An engine never raises for one bad row: it returns a ``Completion`` with ``error``
set. It raises only when it cannot work at all (the model will not load), which
fails the shard rather than the row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Completion", "Engine", "Request", "stream"]


@dataclass(frozen=True)
class Request:
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    #: The row's own model, when it names one; else the engine's.
    model: str | None = None


@dataclass(frozen=True)
class Completion:
    output: str | None
    finish_reason: str | None
    input_tokens: int
    output_tokens: int
    latency_ms: float
    #: This row's share of the engine's busy time, for pricing GPU-hours.
    compute_seconds: float = 0.0
    error: str | None = None
    #: Exact cost when the backend reports it per request (API usage); else priced by time.
    cost_usd: float | None = None
    #: Attempts the request took (API retries); 1 for engines that do not retry.
    tries: int = 1
    #: The row's embedding (``embed`` task).
    embedding: list[float] | None = None

    @classmethod
    def failed(cls, error: str, input_tokens: int = 0, tries: int = 1) -> Completion:
        return cls(None, "error", input_tokens, 0, 0.0, 0.0, error, tries=tries)


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
