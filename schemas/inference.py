"""What an inference engine is asked and what it answers: one request per row, one completion back.

The records both planes share: the worker builds ``Request``s from input rows and
engines return ``Completion``s; the control plane prices requests (a chunk's
worst case) without importing any engine.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PERMANENT_ROW_ERRORS", "Completion", "Request", "is_permanent"]

#: How error rows that no retry can change begin: the row itself is at fault (its
#: prompt, its limits, its model), not the engine or the provider of the day.
PERMANENT_ROW_ERRORS = (
    "prompt is null",
    "messages is null",
    "prompt is empty",
    "messages is empty",
    "every message is empty",
    "message ",
    "max_tokens ",
    "temperature ",
    "prompt too long",
    "the backend running this shard does not serve",
)


def is_permanent(error: str | None) -> bool:
    """Whether an error row failed for a reason a retry cannot change."""
    return bool(error) and str(error).startswith(PERMANENT_ROW_ERRORS)


@dataclass(frozen=True)
class Request:
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    #: The row's own model, when it names one; else the engine's.
    model: str | None = None
    #: A JSON Schema (as JSON text) the answer must follow; None: free text.
    response_schema: str | None = None
    #: API lanes: how often an answer that fails the schema is asked again.
    schema_retries: int = 0

    @property
    def prompt_chars(self) -> int:
        """Characters of the prompt, or of the messages' contents."""
        return len(self.prompt or "") + sum(len(m.get("content") or "") for m in (self.messages or []))


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
    #: Times the row was asked again because its answer failed its schema (API lane;
    #: every one was billed and is in the tokens and cost above).
    reasks: int = 0
    #: The row's embedding (``embed`` task).
    embedding: list[float] | None = None
    #: What answered the row when it was not this backend: ``cache`` (the answer cache).
    source: str | None = None
    #: For a cached answer: the job that paid for it.
    cached_from: str | None = None
    #: What this row would have cost had it been sent (a cached answer: what it cost then).
    saved_usd: float = 0.0

    @classmethod
    def failed(cls, error: str, input_tokens: int = 0, tries: int = 1) -> Completion:
        return cls(None, "error", input_tokens, 0, 0.0, 0.0, error, tries=tries)
