"""Structured outputs' contract: schemas refused by keyword, answers validated, typed columns."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel

from schemas.errors import InputError
from schemas.structured import arrow_type, choices_schema, load_schema, parsed_column, validate_answer

TICKET = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["billing", "shipping", "other"]},
        "urgency": {"type": "integer", "minimum": 1, "maximum": 5},
        "refund_amount": {"type": ["number", "null"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["category", "urgency"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ('{"type": "objekt"}', "keyword 'type'"),
        ('{"type": "object", "properties": {"a": {"minimum": "five"}}}', "keyword 'minimum' at properties/a/minimum"),
        ('{"type": "object", "required": "a"}', "keyword 'required'"),
        ('{"type": "object",', "--schema: not JSON"),
        ("[1, 2]", "a JSON Schema is an object, not list"),
        ('{"not": {"type": "string"}}', 'constrained decoding cannot follow this schema: Unimplemented keys: ["not"]'),
        ('{"properties": {"a": {"$ref": "#/nowhere"}}}', "Pointer '/nowhere' does not exist"),
    ],
)
def test_a_schema_that_is_not_json_schema_is_refused_naming_the_keyword(schema: str, message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)) as refused:
        load_schema(schema)
    assert refused.value.exit_code == 2


def test_a_pydantic_model_and_choices_become_schemas() -> None:
    class Ticket(BaseModel):
        category: str
        urgency: int

    schema = load_schema(Ticket)
    assert schema["required"] == ["category", "urgency"]
    assert validate_answer(schema, '{"category": "billing", "urgency": 2}') == (
        {"category": "billing", "urgency": 2},
        None,
    )
    assert choices_schema(["spam", " ham "]) == {"type": "string", "enum": ["spam", "ham"]}
    with pytest.raises(InputError, match="repeats a label"):
        choices_schema(["a", "a"])
    with pytest.raises(InputError, match="names no label"):
        choices_schema([" "])
    with pytest.raises(InputError, match="not a Pydantic model class"):
        load_schema(dict)


def test_every_answer_is_validated_and_the_first_error_says_where() -> None:
    assert validate_answer(TICKET, '{"category": "billing", "urgency": 3}')[1] is None
    assert validate_answer(TICKET, '{"category": "refunds", "urgency": 3}')[1] == (
        "at category: 'refunds' is not one of ['billing', 'shipping', 'other']"
    )
    assert validate_answer(TICKET, '{"category": "other"}')[1] == "'urgency' is a required property"
    assert (
        validate_answer(TICKET, '{"category": "other", "urgency": 9}')[1]
        == "at urgency: 9 is greater than the maximum of 5"
    )
    assert validate_answer(TICKET, '{"category": "oth')[1] == "not JSON: Unterminated string starting at (character 13)"
    assert validate_answer(TICKET, None) == (None, "no answer")


def test_the_parsed_column_is_typed_by_the_schema_and_queryable(tmp_path: Path) -> None:
    kind = arrow_type(TICKET)
    assert kind == pa.struct(
        [
            pa.field("category", pa.string(), nullable=False),
            pa.field("urgency", pa.int64(), nullable=False),
            pa.field("refund_amount", pa.float64()),
            pa.field("tags", pa.list_(pa.string())),
        ]
    )
    answers = [
        {"category": "billing", "urgency": 2, "refund_amount": 10.5, "tags": ["late"]},
        {"category": "billing", "urgency": 4},
        None,  # an error row
        {"category": "shipping", "urgency": 1, "refund_amount": None, "tags": []},
    ]
    path = tmp_path / "results.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "parsed": parsed_column(TICKET, answers)}), path)

    counts = duckdb.sql(
        f"select parsed.category, count(*) from '{path}' where parsed is not null group by 1 order by 1"
    ).fetchall()
    assert counts == [("billing", 2), ("shipping", 1)]


@pytest.mark.parametrize(
    ("schema", "kind"),
    [
        ({"type": "string", "enum": ["a", "b"]}, pa.string()),
        ({"enum": ["a", "b"]}, pa.string()),
        ({"type": "array", "items": {"type": "integer"}}, pa.list_(pa.int64())),
        ({"type": "boolean"}, pa.bool_()),
        ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, pa.string()),
        ({"type": "object", "patternProperties": {"^x": {"type": "string"}}}, pa.string()),
        ({"type": "object", "properties": {"a": {"type": ["string", "integer"]}}}, pa.string()),
    ],
)
def test_shapes_without_one_arrow_type_keep_the_json_text(schema: dict[str, object], kind: pa.DataType) -> None:
    assert arrow_type(schema) == kind
    if "oneOf" in schema:
        assert parsed_column(schema, ["x", 3, None]).to_pylist() == ['"x"', "3", None]
