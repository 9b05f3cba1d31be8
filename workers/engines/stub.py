"""An engine without a model: one answer per row, at once (or after a set delay).

Selected with ``worker.engine = "stub"``. It exercises everything around
generation (claims, leases, checkpoints, budgets, finalizing) at the speed of the
control plane, for benchmarks and for tests of what happens when workers die.
Answers are deterministic (they echo the prompt), so a row answered twice is
answered the same way; tokens are counted as words. A row whose text holds
``FAIL_MARKER`` comes back as an error row of the kind a retry may cure (an
engine's fault, not the row's), so retries and merges can be exercised.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from schemas.inference import Completion, Request

__all__ = ["StubEngine"]

#: Width of the stub's embeddings.
EMBEDDING_SIZE = 8
#: A row whose prompt or messages hold this fails, every time, as if the engine had.
FAIL_MARKER = "[stub: fail]"


class StubEngine:
    """Answers ``stub: <the prompt's first words>``; ``seconds_per_row`` of "compute" per row."""

    def __init__(self, model: str, seconds_per_row: float = 0.0, *, embed: bool = False) -> None:
        self.model = model
        self.seconds_per_row = seconds_per_row
        self.embed = embed

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        if self.seconds_per_row:
            time.sleep(self.seconds_per_row * len(requests))
        return [self._answer(r) for r in requests]

    def _answer(self, request: Request) -> Completion:
        if request.messages is not None:
            if any(m.get("content") is None for m in request.messages):
                return Completion.failed("a message has no content")
            text = " ".join(str(m.get("content")) for m in request.messages)
        else:
            text = request.prompt or ""
        if FAIL_MARKER in text:
            return Completion.failed("stub engine: this row asked to fail")
        words = text.split()
        if self.embed:
            vector = [float(len(words) % 7), *[float(len(w)) for w in words[: EMBEDDING_SIZE - 1]]]
            vector += [0.0] * (EMBEDDING_SIZE - len(vector))
            return Completion(None, "stop", len(words) + 1, 0, 0.0, self.seconds_per_row, embedding=vector)
        out = min(request.max_tokens, 4)
        return Completion(
            output="stub: " + " ".join(words[:out]),
            finish_reason="stop" if len(words) <= out else "length",
            input_tokens=len(words) + 1,
            output_tokens=out,
            latency_ms=self.seconds_per_row * 1000.0,
            compute_seconds=self.seconds_per_row,
        )
