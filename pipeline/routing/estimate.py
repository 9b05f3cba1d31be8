"""What a shard will cost to run: its rows' sizes, read from the input file.

A ``ShardProfile`` sums a shard's prompt characters, UTF-8 bytes and
``max_tokens`` and lists the models its rows ask for. Tokens come from the model's own tokenizer when it is
a local folder with ``tokenizer.json`` (the Rust ``tokenizers`` library, no
torch), else from characters divided by a calibrated characters-per-token ratio.
Output tokens are the rows' limits times the learnt fill ratio (how much of
``max_tokens`` rows really use), 1.0 until observed.

Those are estimates (what ``plan`` shows). ``input_bound`` and ``max_tokens`` are
bounds: what the budget reserves (``pipeline.routing.pricing.Quote.reserve_usd``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.storage.inputs import RowReader, iter_rows, open_parquet
from schemas.backends import PROMPT_ROLE, input_token_bound
from schemas.errors import InputError
from schemas.inference import Request
from schemas.structured import schema_text_of_response_format

__all__ = [
    "FOOTER_CHARS_PER_TOKEN",
    "ShardProfile",
    "Sharing",
    "count_tokens",
    "profile_columns",
    "profile_requests",
    "profile_rows",
]


#: Characters per token between the input's footer (column bytes) and ``Job.est_prompt_tokens``:
#: fixed, so a stored estimate turns back into characters exactly. Routing's own rate is
#: ``routing.chars_per_token``, replaced by a tokenizer or by what was observed.
FOOTER_CHARS_PER_TOKEN = 4.0


@dataclass
class ShardProfile:
    rows: int = 0
    prompt_chars: int = 0
    max_tokens: int = 0
    #: Rows that name their own model, by model.
    row_models: dict[str, int] = field(default_factory=dict)
    #: Exact prompt tokens when a local tokenizer was used, else None.
    prompt_tokens: int | None = None
    longest_prompt_chars: int = 0
    #: UTF-8 bytes of the rows' prompts (messages: roles and contents).
    prompt_bytes: int = 0
    #: Chat messages over all rows (one per row for plain prompts).
    messages: int = 0
    #: The largest single row: its bytes, messages and max_tokens (each the largest of
    #: any row, so together they bound every row).
    largest_row_bytes: int = 0
    largest_row_messages: int = 0
    largest_max_tokens: int = 0
    #: Rows whose answer follows a JSON Schema (the job's, or the row's own
    #: ``response_format``): an API lane may ask them again.
    structured_rows: int = 0
    #: Each row's request (None: it cannot run), when the job shares answers: the router
    #: fingerprints them per lane (``schemas.fingerprint``).
    asked: list[Asked | None] = field(default_factory=list)
    #: Rows that will not be sent: repeats of an earlier row of the shard, and rows the
    #: answer cache holds (the router counts them). The estimate leaves them out.
    answered_rows: int = 0

    @property
    def sent_share(self) -> float:
        """The share of the rows that will be sent (what the estimate counts)."""
        return 1.0 - self.answered_rows / self.rows if self.rows else 1.0

    def worst_row(self) -> ShardProfile:
        """A one-row profile no row of these exceeds (what starting one row needs)."""
        return ShardProfile(
            rows=1,
            prompt_bytes=self.largest_row_bytes,
            messages=max(1, self.largest_row_messages),
            max_tokens=self.largest_max_tokens,
            longest_prompt_chars=self.longest_prompt_chars,
            structured_rows=min(1, self.structured_rows),
        )

    def input_tokens(self, chars_per_token: float) -> int:
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        return int(self.prompt_chars / chars_per_token) + self.rows  # + BOS/role tokens

    def output_tokens(self, fill: float) -> int:
        return int(self.max_tokens * fill)

    def input_bound(self, exact_tokenizer: bool) -> int:
        """The most prompt tokens the rows can be billed: exact counts when the model's
        own tokenizer was used (``exact_tokenizer``), else their UTF-8 bytes; plus the
        chat template's tokens."""
        counted = self.prompt_tokens if exact_tokenizer and self.prompt_tokens is not None else self.prompt_bytes
        return input_token_bound(counted, self.messages, self.rows)


def profile_requests(requests: Sequence[Request]) -> ShardProfile:
    """The profile of requests a worker is about to send (for the chunk's worst case)."""
    profile = ShardProfile()
    for r in requests:
        text = r.prompt if r.messages is None else _render(r.messages)
        # A message's role counts in its bound; rendered messages hold theirs.
        size = len((text or "").encode("utf-8", "surrogatepass")) + (len(PROMPT_ROLE) if r.messages is None else 0)
        messages = len(r.messages) if r.messages is not None else 1
        profile.rows += 1
        profile.prompt_chars += len(text or "")
        profile.prompt_bytes += size
        profile.messages += messages
        profile.max_tokens += max(0, r.max_tokens)
        profile.longest_prompt_chars = max(profile.longest_prompt_chars, len(text or ""))
        profile.largest_row_bytes = max(profile.largest_row_bytes, size)
        profile.largest_row_messages = max(profile.largest_row_messages, messages)
        profile.largest_max_tokens = max(profile.largest_max_tokens, max(0, r.max_tokens))
        profile.structured_rows += r.response_schema is not None
    return profile


@lru_cache(maxsize=8)
def context_length(model: str) -> int | None:
    """The model's context in tokens, from a local folder's ``config.json`` (None if unknown)."""
    path = Path(model) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return int(config[key])
    return None


@lru_cache(maxsize=8)
def _tokenizer(model: str) -> Any:
    path = Path(model) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def count_tokens(model: str, texts: list[str]) -> int | None:
    """Exact token count with the model's local tokenizer, or None if it has none."""
    tokenizer = _tokenizer(model)
    if tokenizer is None:
        return None
    return sum(len(e.ids) for e in tokenizer.encode_batch(texts))


def _render(messages: Sequence[Mapping[str, Any]]) -> str:
    return "\n".join(f"{m.get('role') or ''}: {m.get('content') or ''}" for m in messages)


def _texts(column: pa.ChunkedArray | pa.Array, kind: str) -> tuple[list[str], list[int]]:
    """The rows' texts, and how many chat messages each holds."""
    values = column.to_pylist()
    if kind == "prompt":
        return [v or "" for v in values], [1] * len(values)
    return [_render(v or []) for v in values], [max(1, len(v or [])) for v in values]


@dataclass(frozen=True)
class Sharing:
    """What a row's fingerprint needs besides the row and the lane: the job's defaults."""

    model: str
    task: str
    temperature: float
    #: The job's schema as JSON text, and its re-asks.
    schema: str | None
    retries: int


@dataclass(frozen=True)
class Asked:
    """A row as the router sees it for fingerprints: its request and the model it names."""

    request: Request
    #: The row's own model; None: the shard's.
    model: str | None


def _asked(batch: pa.RecordBatch, kind: str, default_max_tokens: int, sharing: Sharing) -> list[Asked | None]:
    columns = {name: batch.column(name).to_pylist() for name in batch.schema.names}
    absent = [None] * batch.num_rows
    found: list[Asked | None] = []
    for i, body in enumerate(columns[kind]):
        own = columns.get("response_format", absent)[i]
        schema = sharing.schema
        if own is not None:
            try:
                schema = schema_text_of_response_format(own)
            except InputError:  # checked at submit; a row refused there never runs
                schema = None
        model = columns.get("model", absent)[i]
        temperature = columns.get("temperature", absent)[i]
        request = Request(
            prompt=body if kind == "prompt" else None,
            messages=(body or []) if kind == "messages" else None,
            max_tokens=columns.get("max_tokens", absent)[i] or default_max_tokens,
            temperature=sharing.temperature if temperature is None else float(temperature),
            response_schema=schema,
            schema_retries=sharing.retries if schema is not None else 0,
        )
        found.append(Asked(request, model) if body is not None else None)
    return found


def profile_columns(names: Sequence[str], kind: str, sharing: Sharing | None = None) -> list[str]:
    """The input columns ``profile_rows`` reads, of a file with columns ``names``."""
    wanted = ("max_tokens", "model", "response_format") + (("temperature",) if sharing else ())
    return [kind] + [c for c in wanted if c in names]


def profile_rows(
    url: str,
    start: int,
    end: int,
    kind: str,
    default_max_tokens: int,
    model: str,
    job_schema: bool = False,
    sharing: Sharing | None = None,
    reader: RowReader | None = None,
) -> ShardProfile:
    """Profile rows ``[start, end)`` of ``url``; memory bounded by a read batch.

    ``reader``: a ``RowReader`` of ``url`` with ``profile_columns``, for profiling many
    ranges in order off one pass over the file (the router).

    ``job_schema``: the job has a schema, so every row follows one (a row's own
    ``response_format`` of type ``text`` frees it, which the profile leaves counted).
    ``sharing``: the job shares answers; each row's fingerprint is kept.
    """
    if reader is None:
        columns = profile_columns(open_parquet(url).schema_arrow.names, kind, sharing)
        batches = iter_rows(url, start, end, columns)
    else:
        columns, batches = reader.columns, reader.take(start, end)
    profile = ShardProfile()
    context = context_length(model)
    exact: int | None = 0
    for batch in batches:
        texts, messages = _texts(batch.column(kind), kind)
        lengths = [len(t) for t in texts]
        role = len(PROMPT_ROLE) if kind == "prompt" else 0  # rendered messages hold their roles
        sizes = [len(t.encode("utf-8", "surrogatepass")) + role for t in texts]
        profile.rows += len(texts)
        profile.messages += sum(messages)
        profile.prompt_chars += sum(lengths)
        profile.prompt_bytes += sum(sizes)
        profile.largest_row_bytes = max([profile.largest_row_bytes, *sizes])
        profile.largest_row_messages = max([profile.largest_row_messages, *messages])
        profile.longest_prompt_chars = max([profile.longest_prompt_chars, *lengths])
        if "max_tokens" in columns:
            # Submit refuses limits below 1; a file written before that rule cannot
            # make an estimate (or a reservation) negative. No row generates past the
            # model's context, whatever its max_tokens says.
            limits = pc.max_element_wise(pc.fill_null(batch.column("max_tokens"), default_max_tokens), 0)
            if context is not None:
                limits = pc.min_element_wise(limits, context)
            profile.max_tokens += int(pc.sum(limits).as_py() or 0)
            profile.largest_max_tokens = max(profile.largest_max_tokens, int(pc.max(limits).as_py() or 0))
        else:
            limit = default_max_tokens if context is None else min(default_max_tokens, context)
            profile.max_tokens += limit * len(texts)
            profile.largest_max_tokens = max(profile.largest_max_tokens, limit)
        if job_schema:
            profile.structured_rows += len(texts)
        elif "response_format" in columns:  # checked at submit: json_object or json_schema asks for JSON
            asks_json = pc.match_substring(pc.fill_null(batch.column("response_format"), ""), '"json_')
            profile.structured_rows += int(pc.sum(asks_json).as_py() or 0)
        if "model" in columns:
            for name in batch.column("model").to_pylist():
                if name is not None:
                    profile.row_models[name] = profile.row_models.get(name, 0) + 1
        if exact is not None:
            counted = count_tokens(model, texts)
            exact = None if counted is None else exact + counted
        if sharing is not None:
            profile.asked.extend(_asked(batch, kind, default_max_tokens, sharing))
    profile.prompt_tokens = exact
    return profile
