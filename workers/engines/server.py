"""A GPU pool's rows on a local inference server: vLLM, SGLang or TGI beside the worker.

``engine = "server"`` on a pool: the worker sends each row as a chat completion to the
OpenAI-compatible server at ``server_url`` (a sidecar on the same node, sharing its
localhost) and keeps enough requests in flight to fill the server's continuous
batching. How many is learnt, as TCP learns a window (AIMD): every answered
request grows the window by one request per window's worth of answers, while the
latency stays under twice the best seen (the server still has room); a latency past
that holds it, and an overload (429, 503, a time-out, a dropped connection) halves it.
The window never passes ``server_max_concurrency``.

It is the API engine underneath (``workers.engines.openai_http``: retries, re-asks
for schemas, the usage clamp, chunks overlapped) with three differences: the window
above instead of a fixed concurrency; the rows are priced by the GPU's time, not by
tokens (each chunk's rows share the wall time since the previous chunk came back);
and no key: the server is the worker's own. A chunk's rows go out grouped by their
opening (``workers.engines.batching.prefix_groups``), so that the rows sharing a system
prompt reach the server together and its prefix cache serves the prompt once.

``wait_healthy`` polls ``<server root>/health`` (vLLM's, SGLang's and TGI's) until it
answers 200: the shard runner calls it before it claims a shard, so a worker whose
sidecar is still loading its model takes nothing.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from types import TracebackType

from schemas.backends import ApiProvider, GpuPool
from schemas.errors import ProviderError
from workers.engines.base import Completion, Request
from workers.engines.batching import grouped_order
from workers.engines.openai_http import APIEngine

__all__ = ["AdaptiveWindow", "ServerEngine", "health_url", "wait_healthy"]

#: The window a server engine starts with.
START_WINDOW = 8
#: Latency past this many times the best seen means the server's batch is full.
LATENCY_ROOM = 2.0
OVERLOAD = {429, 503, 529}


def health_url(server_url: str) -> str:
    """``http://host:port/v1`` -> ``http://host:port/health``."""
    root = server_url.rstrip("/")
    return (root[: -len("/v1")] if root.endswith("/v1") else root) + "/health"


def wait_healthy(server_url: str, seconds: float, every: float = 0.5) -> bool:
    """Whether the server answered its health check within ``seconds``."""
    deadline = time.monotonic() + seconds
    url = health_url(server_url)
    while True:
        try:
            with urllib.request.urlopen(url, timeout=min(5.0, max(seconds, 0.1))) as answer:
                if answer.status == 200:
                    return True
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() + every > deadline:
            return False
        time.sleep(every)


class AdaptiveWindow:
    """An asyncio limiter whose size is learnt (see the module doc)."""

    def __init__(self, start: int, most: int) -> None:
        self.most = max(1, most)
        self.size = float(min(max(1, start), self.most))
        self.in_flight = 0
        self.best_latency: float | None = None
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> AdaptiveWindow:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < int(self.size))
            self.in_flight += 1
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        async with self._changed:
            self.in_flight -= 1
            self._changed.notify_all()

    def answered(self, status: int | None, seconds: float) -> None:
        """Grow on a good answer with room left, halve on an overload."""
        if status is None or status in OVERLOAD:
            self.size = max(1.0, self.size / 2)
            return
        if status != 200:
            return
        self.best_latency = seconds if self.best_latency is None else min(self.best_latency, seconds)
        if seconds <= LATENCY_ROOM * self.best_latency:
            self.size = min(float(self.most), self.size + 1.0 / self.size)


class ServerEngine(APIEngine):
    """Chat completions on the pool's own inference server, priced by GPU time."""

    #: Send a chunk's rows grouped by their opening (off: in input order, for comparison).
    group_prefixes = True

    def __init__(self, pool: GpuPool, model: str, served_model: str | None = None) -> None:
        self.pool = pool
        server = ApiProvider(
            name=pool.name,
            base_url=pool.server_url,
            models={model: served_model or model},
            max_concurrency=pool.server_max_concurrency,
            timeout_seconds=600.0,
            max_retries=3,
        )
        super().__init__(server, model)
        self._last = time.perf_counter()

    async def _setup(self) -> None:
        await super()._setup()
        self._slots = AdaptiveWindow(START_WINDOW, self.provider.max_concurrency)  # type: ignore[assignment]

    @property
    def window(self) -> float:
        return float(self._slots.size)  # type: ignore[attr-defined]

    def _answered(self, status: int | None, seconds: float) -> None:
        self._slots.answered(status, seconds)  # type: ignore[attr-defined]

    async def _chunk(self, requests: list[Request]) -> list[Completion]:
        """A chunk in which the server failed any row beyond retries is not committed: the
        server is the worker's own, and one that stops answering is going away (out of
        memory, killed); the shard moves on from its last checkpoint."""
        order = (
            grouped_order(requests) if self.group_prefixes else list(range(len(requests)))
        )  # a prefix group's rows back to back: the server's prefix cache hits
        answered = await super()._chunk([requests[i] for i in order])
        where = {i: position for position, i in enumerate(order)}
        results = [answered[where[i]] for i in range(len(requests))]
        gone = [c for c in results if c.error and c.error.startswith("provider unavailable")]
        if gone:
            raise ProviderError(f"the inference server of pool {self.pool.name!r} stopped answering: {gone[0].error}")
        return results

    def _priced(self, completions: list[Completion]) -> list[Completion]:
        """The GPU's time since the previous chunk came back, shared by this chunk's rows."""
        now = time.perf_counter()
        share = (now - self._last) / max(len(completions), 1)
        self._last = now
        return [replace(c, cost_usd=None, compute_seconds=share) for c in completions]

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        self._last = time.perf_counter()
        return self._priced(super().generate(requests))

    def stream(self, chunks: Iterable[Sequence[Request]], lookahead: int = 1) -> Iterator[list[Completion]]:
        self._last = time.perf_counter()
        for done in super().stream(chunks, lookahead):
            yield self._priced(done)
