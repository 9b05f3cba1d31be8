"""Turning input rows into requests, and completions into output rows.

Pure data plumbing between the Parquet file and an engine; no I/O and no state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

from schemas.arrow import EMBEDDING_TYPE, OUTPUT_FIELDS, output_schema
from schemas.structured import schema_text_of_response_format, validate_answer
from workers.engines.base import Completion, Request

__all__ = ["Chunk", "build_output", "check_answer", "merge", "prepare", "rechunk"]


def rechunk(batches: Iterator[pa.RecordBatch], size: int | Callable[[], int]) -> Iterator[pa.Table]:
    """Tables of exactly ``size`` rows (the last may be shorter); a callable ``size`` is
    asked again for each table."""
    pending: list[pa.RecordBatch] = []
    count = 0
    wanted = size if callable(size) else lambda: size
    target = max(1, wanted())
    for batch in batches:
        while len(batch):
            take = min(target - count, len(batch))
            pending.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if count == target:
                yield pa.Table.from_batches(pending)
                pending, count = [], 0
                target = max(1, wanted())
    if pending:
        yield pa.Table.from_batches(pending)


@dataclass
class Chunk:
    """One checkpoint's rows, their requests, and why the others cannot run.

    Rows are sent to the engine unless they cannot run, or were answered already:
    ``served`` (from the answer cache) or ``same_as`` (they ask what an earlier row of
    the shard asks, by fingerprint, and get its answer at no cost).
    """

    first_row: int
    table: pa.Table
    requests: list[Request | None]
    problems: list[str | None]
    served: dict[int, Completion] = field(default_factory=dict)
    same_as: dict[int, str] = field(default_factory=dict)
    #: Each row's fingerprint (``schemas.fingerprint``), None where it has none.
    fingerprints: list[str | None] = field(default_factory=list)

    def sent(self, i: int) -> bool:
        return self.requests[i] is not None and i not in self.served and i not in self.same_as

    @property
    def runnable(self) -> list[Request]:
        return [r for i, r in enumerate(self.requests) if r is not None and self.sent(i)]

    @property
    def prompt_chars(self) -> int:
        return sum(r.prompt_chars for r in self.runnable)

    @property
    def max_tokens(self) -> int:
        return sum(r.max_tokens for r in self.runnable)


def prepare(
    table: pa.Table,
    first_row: int,
    *,
    kind: str,
    default_max_tokens: int,
    default_temperature: float,
    serves: Any,
    response_schema: str | None = None,
    schema_retries: int = 0,
) -> Chunk:
    """Requests for each row, or ``None`` with a reason for rows that cannot run.

    ``serves(model) -> bool`` says whether the backend can run a row's own model;
    ``response_schema`` (JSON text) is the schema every answer must follow, unless the
    row's own ``response_format`` (OpenAI's object) says otherwise.
    """
    absent = [None] * table.num_rows
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    requests: list[Request | None] = []
    problems: list[str | None] = []
    for i in range(table.num_rows):
        own = columns.get("response_format", absent)[i]
        schema = schema_text_of_response_format(own) if own is not None else response_schema
        max_tokens = columns.get("max_tokens", absent)[i]
        temperature = columns.get("temperature", absent)[i]
        model = columns.get("model", absent)[i]
        body = columns[kind][i]
        problem = None
        if body is None:
            problem = f"{kind} is null"
        elif (bad := _bad_request(kind, body)) is not None:
            problem = bad
        elif max_tokens is not None and max_tokens < 1:
            problem = f"max_tokens {max_tokens} is below 1"
        elif temperature is not None and not 0 <= temperature <= 5:
            problem = f"temperature {temperature} is outside [0, 5]"
        elif model is not None and not serves(model):
            problem = f"the backend running this shard does not serve model {model!r}"
        problems.append(problem)
        if problem:
            requests.append(None)
            continue
        requests.append(
            Request(
                prompt=body if kind == "prompt" else None,
                messages=body if kind == "messages" else None,
                max_tokens=int(max_tokens) if max_tokens is not None else default_max_tokens,
                temperature=float(temperature) if temperature is not None else default_temperature,
                model=model,
                response_schema=schema,
                schema_retries=schema_retries if schema is not None else 0,
            )
        )
    return Chunk(first_row, table, requests, problems)


#: Chat roles a request may carry (OpenAI's; templates refuse others, or worse, accept them).
ROLES = ("system", "developer", "user", "assistant", "tool")


def _bad_request(kind: str, body: Any) -> str | None:
    """Why a row's prompt or messages cannot be sent, or None."""
    if kind == "prompt":
        return "prompt is empty" if not str(body).strip() else None
    if not body:
        return "messages is empty"
    for n, message in enumerate(body):
        if message.get("content") is None:
            return f"message {n} has no content"
        if message.get("role") not in ROLES:
            return f"message {n} has role {message.get('role')!r} (use {', '.join(ROLES)})"
    if not any(str(m.get("content")).strip() for m in body):
        return "every message is empty"
    return None


def merge(
    chunk: Chunk,
    generated: Sequence[Completion],
    answered: dict[str, Completion] | None = None,
    usd_per_second: float = 0.0,
) -> list[Completion]:
    """Completions for every row of ``chunk``: generated ones (each answer checked against
    its schema), cached ones, a repeated row's copy of its first row's answer (at no cost:
    that row paid; ``saved_usd`` says what it would have cost), error rows for the rest.

    ``answered`` (fingerprint -> completion) holds the shard's rows answered so far, and
    gets this chunk's: a repeat finds its first row there, in this chunk or an earlier one.
    """
    answered = {} if answered is None else answered
    produced = iter(generated)
    done: list[Completion] = []
    for i, (request, problem) in enumerate(zip(chunk.requests, chunk.problems, strict=True)):
        if request is None:
            done.append(Completion.failed(problem or "invalid row"))
        elif i in chunk.served:
            done.append(chunk.served[i])
        elif i in chunk.same_as:
            first = answered[chunk.same_as[i]]
            cost = first.cost_usd if first.cost_usd is not None else first.compute_seconds * usd_per_second
            done.append(replace(first, cost_usd=0.0, compute_seconds=0.0, latency_ms=0.0, saved_usd=cost))
        else:
            done.append(check_answer(request, next(produced)))
            asked = chunk.fingerprints[i] if chunk.fingerprints else None
            if asked is not None:
                answered[asked] = done[-1]
    return done


def check_answer(request: Request, completion: Completion) -> Completion:
    """A structured answer that is cut short or fails its schema becomes an error row that
    keeps its text (and its tokens and cost: it was generated and paid for)."""
    if request.response_schema is None or completion.error is not None:
        return completion
    problem: str | None = None
    if completion.finish_reason == "length":
        problem = f"cut off by max_tokens ({request.max_tokens}) before the answer was complete"
    else:
        problem = validate_answer(request.response_schema, completion.output)[1]
    if problem is None:
        return completion
    return replace(completion, finish_reason="error", error=f"schema: {problem}")


def build_output(
    chunk: Chunk,
    completions: Sequence[Completion],
    *,
    backend: str,
    model: str,
    attempt: int,
    usd_per_second: float,
    carried: Sequence[str],
    embed: bool = False,
) -> tuple[pa.Table, float]:
    """The output table of a chunk, and its total cost."""
    n = chunk.table.num_rows
    row_models = chunk.table.column("model").to_pylist() if "model" in chunk.table.column_names else [None] * n
    costs = [c.cost_usd if c.cost_usd is not None else c.compute_seconds * usd_per_second for c in completions]
    rows: dict[str, list[Any]] = {
        "id": chunk.table.column("id").to_pylist(),
        "output": [c.output for c in completions],
        "finish_reason": [c.finish_reason for c in completions],
        "input_tokens": [c.input_tokens for c in completions],
        "output_tokens": [c.output_tokens for c in completions],
        "backend": [c.source or backend for c in completions],
        "model": [m or model for m in row_models],
        "cost_usd": costs,
        "latency_ms": [c.latency_ms for c in completions],
        "attempt": [attempt] * n,
        "error": [c.error for c in completions],
        "cached_from": [c.cached_from for c in completions],
    }
    kept = chunk.table.select(list(carried)) if carried else None
    schema = output_schema(kept.schema if kept is not None else None, embed=embed)
    arrays = [pa.array(rows[f.name], type=f.type) for f in OUTPUT_FIELDS]
    if embed:
        arrays.append(pa.array([c.embedding for c in completions], type=EMBEDDING_TYPE))
    if kept is not None:
        arrays.extend(c.combine_chunks() for c in kept.columns)
    return pa.Table.from_arrays(arrays, schema=schema), float(sum(costs))
