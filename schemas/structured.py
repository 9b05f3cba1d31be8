"""Structured outputs: a job's JSON Schema, checked once, and every answer checked against it.

``load_schema`` takes what a user gives (a file's text, a dict, a Pydantic model
class, or ``choices`` for one enum label) and returns the schema as a dict, refusing
one that is not valid JSON Schema, or that constrained decoding cannot follow (an
unimplemented keyword such as ``not``, a ``$ref`` to nowhere), with an ``InputError``
naming the keyword at fault. ``validate_answer`` parses an answer and returns the first validation error
(None if valid), with the place in the document it concerns. ``arrow_type`` maps a
schema to the Arrow type of the typed ``parsed`` column (objects -> struct, arrays ->
list, strings and enums -> string, integers -> int64, numbers -> float64,
booleans -> bool); a schema that does not map (``oneOf``, ``patternProperties``,
mixed types) maps to the JSON text, and ``parsed_column`` builds the column either way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from schemas.errors import InputError

if TYPE_CHECKING:
    import jsonschema

__all__ = [
    "arrow_type",
    "choices_schema",
    "load_schema",
    "parsed_column",
    "schema_of_response_format",
    "schema_text_of_response_format",
    "validate_answer",
]

#: Keywords whose shapes have no one Arrow type: ``parsed`` holds the JSON text there.
_UNMAPPED = ("oneOf", "anyOf", "allOf", "not", "patternProperties", "if", "$ref", "additionalItems")


def choices_schema(choices: Sequence[str]) -> dict[str, Any]:
    """``--choices a,b,c``: one JSON string, one of the labels."""
    labels = [c.strip() for c in choices if c.strip()]
    if not labels:
        raise InputError("--choices names no label")
    if len(set(labels)) != len(labels):
        raise InputError(f"--choices repeats a label: {', '.join(labels)}")
    return {"type": "string", "enum": labels}


def load_schema(schema: str | dict[str, Any] | type, *, option: str = "--schema") -> dict[str, Any]:
    """The JSON Schema ``schema`` stands for: JSON text, a dict, or a Pydantic model class.

    ``InputError`` (exit 2) if it is not JSON, not an object, or not valid JSON Schema
    (the message names the keyword and where it is).
    """
    if isinstance(schema, type):
        dump = getattr(schema, "model_json_schema", None)
        if dump is None:
            raise InputError(f"{option}: {schema.__name__} is not a Pydantic model class")
        schema = dump()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InputError(f"{option}: not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(schema, dict):
        raise InputError(f"{option}: a JSON Schema is an object, not {type(schema).__name__}")
    import jsonschema  # on use: a command that reads no schema does not pay its import

    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "the top level"
        keyword = exc.path[-1] if exc.path else exc.validator
        raise InputError(f"{option}: keyword {keyword!r} at {where}: {exc.message}") from None
    problem = _unconstrainable(schema)
    if problem:
        raise InputError(f"{option}: constrained decoding cannot follow this schema: {problem}")
    return schema


def _unconstrainable(schema: dict[str, Any]) -> str:
    """Why the grammar engine (llguidance, as the GPU lane uses it) cannot follow ``schema``; "" if it can."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
    except Exception as exc:  # llguidance reports unsupported schemas in its own exception types
        return str(exc)
    return str(llguidance.LLMatcher.validate_grammar(grammar) or "")


@lru_cache(maxsize=256)
def schema_text_of_response_format(text: str) -> str | None:
    """``schema_of_response_format`` as the JSON text requests carry; parsed once per
    process (rows repeat a handful of formats), not once per row."""
    found = schema_of_response_format(text)
    return json.dumps(found) if found is not None else None


def schema_of_response_format(text: str) -> dict[str, Any] | None:
    """The schema a row's ``response_format`` (OpenAI's object, as JSON text) asks for:
    ``json_schema`` -> its schema, ``json_object`` -> any object, ``text`` -> None (free text).
    ``InputError`` if it is none of these, or its schema is not valid JSON Schema."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"response_format: not JSON ({exc.msg})") from None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict) or "schema" not in inner:
            raise InputError("response_format: a json_schema response_format needs json_schema.schema")
        return load_schema(inner["schema"], option="response_format")
    raise InputError("response_format: type must be text, json_object or json_schema")


@lru_cache(maxsize=64)
def _validator(schema_text: str) -> jsonschema.protocols.Validator:
    import jsonschema

    schema = json.loads(schema_text)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def validate_answer(schema: dict[str, Any] | str, text: str | None) -> tuple[Any, str | None]:
    """(the parsed answer, None) if ``text`` is JSON valid against ``schema`` (a dict, or its
    JSON text as requests carry it: validators are cached by that text, so the hot path
    parses no schema); (None or the parsed value, the first error) otherwise."""
    if text is None:
        return None, "no answer"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not JSON: {exc.msg} (character {exc.pos})"
    key = schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True)
    errors = sorted(_validator(key).iter_errors(value), key=lambda e: (list(e.path), e.message))
    if not errors:
        return value, None
    first = errors[0]
    where = "/".join(str(p) for p in first.absolute_path)
    return value, f"{'at ' + where + ': ' if where else ''}{first.message}"


def _type_of(schema: dict[str, Any], *, required: bool) -> pa.DataType | None:
    """The Arrow type of ``schema``'s values; None if it has no single one."""
    if any(k in schema for k in _UNMAPPED):
        return None
    kind = schema.get("type")
    if kind is None and "enum" in schema:
        kind = "string" if {type(v) for v in schema["enum"]} == {str} else None
    if kind is None and "const" in schema:
        kind = {str: "string", bool: "boolean", int: "integer", float: "number"}.get(type(schema["const"]))
    if isinstance(kind, list):
        named = [k for k in kind if k != "null"]
        kind = named[0] if len(named) == 1 else None
    if kind == "object":
        properties = schema.get("properties") or {}
        if not properties or schema.get("additionalProperties") not in (None, False):
            return None
        needed = set(schema.get("required") or [])
        fields = []
        for name, sub in properties.items():
            child = _type_of(sub, required=name in needed) if isinstance(sub, dict) else None
            if child is None:
                return None
            fields.append(pa.field(name, child, nullable=name not in needed))
        return pa.struct(fields)
    if kind == "array":
        items = schema.get("items")
        child = _type_of(items, required=True) if isinstance(items, dict) else None
        return pa.list_(child) if child is not None else None
    return {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}.get(str(kind))


def arrow_type(schema: dict[str, Any]) -> pa.DataType:
    """The Arrow type of the ``parsed`` column: derived from the schema, or the JSON text."""
    derived = _type_of(schema, required=True)
    return derived if derived is not None else pa.string()


def parsed_column(schema: dict[str, Any], answers: Sequence[Any]) -> pa.Array:
    """The ``parsed`` column of valid answers (None for rows without one), typed by ``arrow_type``.

    A valid answer Arrow cannot hold (an integer past 64 bits) is left null there; its
    text stays in ``output``.
    """
    kind = arrow_type(schema)
    if pa.types.is_string(kind) and _type_of(schema, required=True) is None:
        return pa.array([None if a is None else json.dumps(a) for a in answers], pa.string())
    try:
        return pa.array(list(answers), kind)
    except (OverflowError, pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([_fits(a, kind) for a in answers], kind)


def _fits(answer: Any, kind: pa.DataType) -> Any:
    try:
        pa.array([answer], kind)
    except (OverflowError, pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    return answer
