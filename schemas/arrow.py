"""Arrow schemas of the input and output Parquet files.

Input: ``id`` (string, unique, required), ``prompt`` (string) or ``messages``
(list of {role, content}), optional per-row ``max_tokens``, ``temperature``,
``model`` and ``metadata``. Any other column is carried to the output untouched,
and so is ``metadata``.

Output: one row per input row, same ``id``, the ``OUTPUT_FIELDS`` below, then the
carried columns in input order.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.types as pat

__all__ = [
    "CARRIED_KNOWN",
    "EMBEDDING_TYPE",
    "MESSAGE_TYPE",
    "OPTIONAL_INPUT_TYPES",
    "OUTPUT_FIELDS",
    "OUTPUT_NAMES",
    "REQUEST_COLUMNS",
    "is_integer",
    "is_number",
    "is_string",
    "output_schema",
]

MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))

#: Columns the engine reads; they are not copied to the output (prompts are large).
REQUEST_COLUMNS = ("id", "prompt", "messages", "max_tokens", "temperature", "model", "response_format", "body_params")
#: Known columns that are nevertheless carried through to the output.
CARRIED_KNOWN = ("metadata",)

OUTPUT_FIELDS: tuple[pa.Field, ...] = (
    pa.field("id", pa.string(), nullable=False),
    pa.field("output", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("input_tokens", pa.int32()),
    pa.field("output_tokens", pa.int32()),
    pa.field("backend", pa.string()),
    pa.field("model", pa.string()),
    pa.field("cost_usd", pa.float64()),
    pa.field("latency_ms", pa.float64()),
    pa.field("attempt", pa.int32()),
    pa.field("error", pa.string()),
    #: A row answered from the answer cache (``backend`` = "cache"): the job that paid for it.
    pa.field("cached_from", pa.string()),
)


#: Names the output gives its own columns: an input column carried to the output
#: may not use one (the results would hold two columns of that name).
OUTPUT_NAMES = frozenset(f.name for f in OUTPUT_FIELDS) | {"embedding", "parsed"}


def is_string(t: pa.DataType) -> bool:
    """Text, however it is stored: plain, large, view, or dictionary-encoded (pandas
    ``category``, polars ``Categorical``)."""
    if pat.is_dictionary(t):
        return is_string(t.value_type)
    return bool(pat.is_string(t) or pat.is_large_string(t) or pat.is_string_view(t))


def is_integer(t: pa.DataType) -> bool:
    return bool(pat.is_integer(t))


def is_number(t: pa.DataType) -> bool:
    return bool(pat.is_integer(t) or pat.is_floating(t))


#: Optional per-row request columns and the check their type must pass.
OPTIONAL_INPUT_TYPES = {
    "max_tokens": (is_integer, "an integer"),
    "temperature": (is_number, "a number"),
    "model": (is_string, "a string"),
    "metadata": (is_string, "a string (JSON text is fine)"),
    "response_format": (is_string, "a string: OpenAI's response_format object as JSON"),
    # An OpenAI batch line's other body parameters (top_p, stop, seed...), kept as JSON; not applied.
    "body_params": (is_string, "a string: JSON of request parameters"),
}


EMBEDDING_TYPE = pa.list_(pa.float32())


def output_schema(carried: pa.Schema | None = None, *, embed: bool = False) -> pa.Schema:
    """The output schema: ``OUTPUT_FIELDS`` (+ ``embedding`` for embed jobs), then the carried columns."""
    fields = list(OUTPUT_FIELDS)
    if embed:
        fields.append(pa.field("embedding", EMBEDDING_TYPE))
    if carried is not None:
        fields.extend(carried)
    return pa.schema(fields)
