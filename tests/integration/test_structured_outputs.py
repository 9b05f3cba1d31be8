"""Structured outputs end to end: --schema and --choices through `spotlane run` on the
local model, every row valid or quarantined, a typed `parsed` column duckdb can group by."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.structured import validate_answer
from tests.support import spotlane, write_prompts

pytestmark = pytest.mark.slow

TICKET = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["billing", "shipping", "other"]},
        "urgency": {"type": "integer", "minimum": 1, "maximum": 5},
        "note": {"type": "string", "maxLength": 10},
    },
    "required": ["category", "urgency", "note"],
    "additionalProperties": False,
}


def test_a_schema_job_answers_valid_json_or_quarantines_the_row_and_types_the_results(
    tmp_path: Path, tiny_model: Path
) -> None:
    schema = tmp_path / "ticket.json"
    schema.write_text(json.dumps(TICKET))
    out = tmp_path / "answers.parquet"
    ran = spotlane(
        "run",
        str(write_prompts(tmp_path / "in.parquet", 12)),
        "--model",
        str(tiny_model),
        "--schema",
        str(schema),
        "--max-tokens",
        "80",
        "--output",
        str(out),
    )
    assert ran.returncode in (0, 1), ran.stderr  # 1: some rows quarantined (succeeded_with_errors is not a failure)

    table = pq.read_table(out)
    assert table.schema.field("parsed").type == pa.struct(
        [
            pa.field("category", pa.string(), nullable=False),
            pa.field("urgency", pa.int64(), nullable=False),
            pa.field("note", pa.string(), nullable=False),
        ]
    )
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [f"row-{i:05d}" for i in range(12)]
    for row in rows:
        if row["error"] is None:
            assert validate_answer(TICKET, row["output"]) == (row["parsed"], None)
        else:  # quarantined: the raw text is kept, the reason is the first validation error
            assert row["finish_reason"] == "error" and row["error"].startswith("schema: ") and row["parsed"] is None
    valid = sum(r["error"] is None for r in rows)
    assert valid >= 10, [r["error"] for r in rows]  # only rows cut by max_tokens may fail
    grouped = duckdb.sql(
        f"select parsed.category, count(*) from '{out}' where parsed is not null group by 1"
    ).fetchall()
    assert sum(n for _, n in grouped) == valid


def test_choices_label_every_row_with_one_of_them(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "labels.parquet"
    ran = spotlane(
        "run",
        str(write_prompts(tmp_path / "in.parquet", 6)),
        "--model",
        str(tiny_model),
        "--choices",
        "spam,ham",
        "--output",
        str(out),
    )
    assert ran.returncode == 0, ran.stderr
    table = pq.read_table(out)
    assert table.schema.field("parsed").type == pa.string()
    assert set(table.column("parsed").to_pylist()) <= {"spam", "ham"} and table.column("error").null_count == 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--schema", "{bad}"], "keyword 'type' at type"),
        (["--schema", "{bad}", "--task", "embed"], "an embedding job takes no schema"),
        (["--schema", "{bad}", "--choices", "a,b"], "give --schema or --choices, not both"),
        (["--schema", "missing.json"], "--schema missing.json"),
        (["--choices", "a,a"], "--choices repeats a label"),
    ],
)
def test_a_schema_the_job_cannot_use_is_refused_at_submit_naming_why(
    tmp_path: Path, tiny_model: Path, args: list[str], message: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "objekt"}' if "embed" not in args else json.dumps(TICKET))
    args = [str(bad) if a == "{bad}" else (str(tmp_path / a) if a == "missing.json" else a) for a in args]
    message = message.replace("missing.json", str(tmp_path / "missing.json"))
    result = spotlane("submit", str(write_prompts(tmp_path / "in.parquet", 3)), "--model", str(tiny_model), *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_a_rows_own_response_format_overrides_the_jobs_and_a_bad_one_is_refused_naming_the_row(
    tmp_path: Path, tiny_model: Path
) -> None:
    labels = json.dumps({"type": "json_schema", "json_schema": {"name": "l", "schema": {"enum": ["spam", "ham"]}}})
    formats = [labels, json.dumps({"type": "text"}), None, labels]
    path = write_prompts(tmp_path / "in.parquet", 4, response_format=formats)
    out = tmp_path / "answers.parquet"
    ran = spotlane(
        "run", str(path), "--model", str(tiny_model), "--choices", "yes,no", "--max-tokens", "12", "--output", str(out)
    )
    assert ran.returncode in (0, 1), ran.stderr

    rows = pq.read_table(out).to_pylist()
    assert rows[0]["error"] is None and rows[0]["parsed"] in ('"spam"', '"ham"')  # its own schema
    assert rows[3]["error"] is None and rows[3]["parsed"] in ('"spam"', '"ham"')
    assert rows[2]["error"] is None and rows[2]["parsed"] in ('"yes"', '"no"')  # the job's
    assert rows[1]["error"] is None  # free text, not validated
    assert pq.read_table(out).schema.field("parsed").type == pa.string()  # rows differ: JSON text

    bad = write_prompts(tmp_path / "bad.parquet", 3, response_format=[None, json.dumps({"type": "xml"}), None])
    refused = spotlane("submit", str(bad), "--model", str(tiny_model))
    assert refused.returncode == 2
    assert "column 'response_format', row 1: type must be text, json_object or json_schema" in refused.stderr
