from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.storage.openai_batch import (
    ENDPOINTS,
    BatchFile,
    convert_jsonl,
    endpoint_of,
    is_openai_jsonl,
    line_of_row,
    openai_lines,
)
from schemas.arrow import MESSAGE_TYPE, output_schema
from schemas.errors import InputError

CHAT, COMPLETIONS, EMBEDDINGS = ENDPOINTS
SCHEMA = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}


def chat(custom_id: str, content: Any = "hi", **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": {"model": "m", "messages": messages, **body}}


def completion(custom_id: str, prompt: Any = "once upon", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": COMPLETIONS,
        "body": {"model": "m", "prompt": prompt, **body},
    }


def embedding(custom_id: str, text: Any = "a sentence", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": EMBEDDINGS, "body": {"model": "e", "input": text, **body}}


def write_jsonl(path: Path, lines: list[dict[str, Any] | str]) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def convert(tmp_path: Path, lines: list[dict[str, Any] | str]) -> tuple[BatchFile, pa.Table]:
    target = tmp_path / "out" / "input.parquet"
    found = convert_jsonl(write_jsonl(tmp_path / "batch.jsonl", lines), str(target))
    return found, pq.read_table(target)


def test_a_chat_file_becomes_messages_and_the_limits_as_columns(tmp_path: Path) -> None:
    system = {"role": "system", "content": "Be brief."}
    first = chat("a", max_tokens=16, temperature=0.5, response_format=SCHEMA)
    first["body"]["messages"].insert(0, system)

    found, table = convert(tmp_path, [first, chat("b", model="other")])

    assert found == BatchFile(endpoint=CHAT, models=["m", "other"], rows=2, task="generate")
    assert table.column_names == [
        "id",
        "messages",
        "model",
        "max_tokens",
        "temperature",
        "response_format",
        "body_params",
    ]
    assert table.schema.field("messages").type == MESSAGE_TYPE
    assert table.schema.field("max_tokens").type == pa.int64()
    assert table.schema.field("temperature").type == pa.float64()
    rows = table.to_pylist()
    assert rows[0] == {
        "id": "a",
        "messages": [system, {"role": "user", "content": "hi"}],
        "model": "m",
        "max_tokens": 16,
        "temperature": 0.5,
        "response_format": json.dumps(SCHEMA, separators=(",", ":")),
        "body_params": None,
    }
    assert rows[1]["max_tokens"] is None and rows[1]["temperature"] is None and rows[1]["response_format"] is None


def test_a_completions_file_becomes_a_prompt_column(tmp_path: Path) -> None:
    found, table = convert(tmp_path, [completion("a", max_tokens=5), completion("b", prompt="twice")])

    assert (found.endpoint, found.task, found.rows) == (COMPLETIONS, "generate", 2)
    assert table.column_names == [
        "id",
        "prompt",
        "model",
        "max_tokens",
        "temperature",
        "response_format",
        "body_params",
    ]
    assert table.column("prompt").to_pylist() == ["once upon", "twice"]
    assert table.column("max_tokens").to_pylist() == [5, None]


def test_an_embeddings_file_becomes_an_embed_task_with_the_input_as_prompt(tmp_path: Path) -> None:
    found, table = convert(tmp_path, [embedding("a"), embedding("b", text="more", dimensions=256)])

    assert found == BatchFile(endpoint=EMBEDDINGS, models=["e"], rows=2, task="embed")
    assert table.column_names == ["id", "prompt", "model", "body_params"]
    assert table.column("prompt").to_pylist() == ["a sentence", "more"]
    assert table.column("body_params").to_pylist() == [None, '{"dimensions":256}']


def test_max_completion_tokens_fills_max_tokens(tmp_path: Path) -> None:
    _, table = convert(tmp_path, [chat("a", max_completion_tokens=7), chat("b", max_tokens=9, max_completion_tokens=9)])

    assert table.column("max_tokens").to_pylist() == [7, 9]


def test_text_parts_are_joined_into_one_content(tmp_path: Path) -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]

    _, table = convert(tmp_path, [chat("a", content=parts)])

    assert table.column("messages").to_pylist() == [[{"role": "user", "content": "first\nsecond"}]]


def test_other_body_keys_are_kept_as_json_but_not_applied(tmp_path: Path) -> None:
    request = chat("a", top_p=0.9, seed=3, stop=["\n"], user="u-1", n=1, stream=False, metadata={"k": "v"})

    _, table = convert(tmp_path, [request])

    kept = json.loads(table.column("body_params")[0].as_py())
    assert kept == {"top_p": 0.9, "seed": 3, "stop": ["\n"], "user": "u-1", "metadata": {"k": "v"}}


def test_the_endpoint_is_in_the_metadata_and_rows_map_to_their_own_lines(tmp_path: Path) -> None:
    target = tmp_path / "input.parquet"
    convert_jsonl(write_jsonl(tmp_path / "b.jsonl", [chat("a"), chat("b"), ""]), str(target))
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["x"]}), plain)

    assert endpoint_of(str(target)) == CHAT
    assert endpoint_of(str(plain)) is None
    assert [line_of_row(str(target), row) for row in (0, 1)] == [1, 2]
    assert b"spotlane.jsonl_lines" not in (pq.ParquetFile(target).metadata.metadata or {})


def test_rows_after_blank_lines_map_back_to_their_lines_across_batches(tmp_path: Path) -> None:
    lines: list[dict[str, Any] | str] = ["", *(completion(f"r{i}") for i in range(10_000)), "   ", completion("last")]
    target = tmp_path / "input.parquet"

    found = convert_jsonl(write_jsonl(tmp_path / "b.jsonl", lines), str(target))

    assert found.rows == 10_001
    assert pq.read_table(target, columns=["id"]).column("id").to_pylist()[-2:] == ["r9999", "last"]
    assert [line_of_row(str(target), row) for row in (0, 9_999, 10_000)] == [2, 10_001, 10_003]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([chat("a"), "{not json"], "line 2: invalid JSON"),
        ([{k: v for k, v in chat("a").items() if k != "custom_id"}], "line 1: custom_id is missing"),
        ([chat("a"), chat("b"), chat("a")], "line 3: custom_id 'a' was already used on line 1"),
        (
            [chat("a"), completion("b")],
            f"line 2: the url must be the same on every line: {COMPLETIONS} here, {CHAT} on line 1",
        ),
        (
            [chat("a", content=[{"type": "image_url", "image_url": {"url": "x"}}])],
            r'line 1: messages\[0\].content\[0\] is a "image_url" part',
        ),
        ([chat("a", n=2)], "line 1: parameter 'n' = 2 is not supported"),
        ([chat("a", tools=[{"type": "function"}])], "line 1: parameter 'tools' is not supported"),
        ([chat("a", logprobs=True)], "line 1: parameter 'logprobs' = true is not supported"),
        ([chat("a", response_format={"type": "xml"})], "line 1: response_format: type must be"),
        ([chat("a", max_tokens=5, max_completion_tokens=6)], "line 1: max_tokens and max_completion_tokens differ"),
        ([chat("a", temperature=3)], "line 1: temperature must be a number from 0 to 2"),
        ([{**chat("a"), "method": "GET"}], 'line 1: method must be POST, not "GET"'),
        ([{**chat("a"), "url": "/v1/responses"}], 'line 1: url "/v1/responses" is not supported'),
        ([{**chat("a"), "body": {"messages": [{"role": "user", "content": "x"}]}}], "line 1: body.model is missing"),
        ([completion("a", prompt=["x", "y"])], "line 1: body.prompt must be one string per line"),
        ([embedding("a", text=["x", "y"])], "line 1: body.input must be one string per line"),
        (["", chat("a"), "  ", "[1]"], "line 4: a request is a JSON object"),
        (["", "\t"], "the file holds no request"),
    ],
)
def test_a_bad_line_is_refused_naming_it_and_leaves_no_file(
    tmp_path: Path, lines: list[dict[str, Any] | str], message: str
) -> None:
    target = tmp_path / "out" / "input.parquet"

    with pytest.raises(InputError, match=message) as caught:
        convert_jsonl(write_jsonl(tmp_path / "batch.jsonl", lines), str(target))

    assert caught.value.file == str(tmp_path / "batch.jsonl")
    assert not target.exists()


def test_a_missing_file_is_refused_as_missing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist") as caught:
        convert_jsonl(str(tmp_path / "nope.jsonl"), str(tmp_path / "out.parquet"))

    assert caught.value.missing


def test_jsonl_is_told_from_parquet_by_content_not_by_name(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "requests.parquet", ["", chat("a")])
    parquet = tmp_path / "input.jsonl"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["x"]}), parquet)

    assert is_openai_jsonl(jsonl)
    assert not is_openai_jsonl(str(parquet))
    assert not is_openai_jsonl(str(tmp_path / "missing.jsonl"))
    assert not is_openai_jsonl(str(tmp_path))


def results(rows: list[dict[str, Any]], *, embed: bool = False) -> pa.RecordBatch:
    base = {
        "output": None,
        "finish_reason": None,
        "input_tokens": 11,
        "output_tokens": 4,
        "backend": "gpu",
        "model": "m-1",
        "cost_usd": 0.0,
        "latency_ms": 1.0,
        "attempt": 1,
        "error": None,
    }
    return pa.RecordBatch.from_pylist([{**base, **row} for row in rows], schema=output_schema(embed=embed))


def parsed(lines: list[tuple[bool, bytes]]) -> list[tuple[bool, dict[str, Any]]]:
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for _, line in lines)
    return [(is_error, json.loads(line)) for is_error, line in lines]


def test_a_chat_answer_becomes_an_output_line_shaped_like_a_chat_completion(tmp_path: Path) -> None:
    batch = results([{"id": "a", "output": "Paris é", "finish_reason": "stop"}])

    [(is_error, line)] = parsed(list(openai_lines(batch, CHAT, created=1700000000)))

    assert not is_error
    assert line["id"].startswith("batch_req_") and line["custom_id"] == "a" and line["error"] is None
    assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
    body = line["response"]["body"]
    assert body["id"].startswith("chatcmpl-")
    assert (body["object"], body["created"], body["model"]) == ("chat.completion", 1700000000, "m-1")
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Paris é", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}


def test_a_completion_answer_becomes_a_text_completion(tmp_path: Path) -> None:
    batch = results([{"id": "a", "output": "there was", "finish_reason": "length"}])

    [(is_error, line)] = parsed(list(openai_lines(batch, COMPLETIONS, created=5)))

    body = line["response"]["body"]
    assert not is_error
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": "there was", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"]["total_tokens"] == 15


def test_an_embedding_becomes_a_list_of_one_embedding(tmp_path: Path) -> None:
    batch = results([{"id": "a", "embedding": [0.1, -2.5, 3.0], "finish_reason": "embedding"}], embed=True)

    [(is_error, line)] = parsed(list(openai_lines(batch, EMBEDDINGS, created=5)))

    body = line["response"]["body"]
    assert not is_error
    assert body == {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -2.5, 3.0]}],
        "model": "m-1",
        "usage": {"prompt_tokens": 11, "total_tokens": 11},
    }


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_failed_row_becomes_an_error_line(endpoint: str) -> None:
    rows = [
        {"id": "bad", "error": "schema: at name: 3 is not of type 'string'", "finish_reason": "error"},
        {"id": "worse", "error": "the provider refused the request", "finish_reason": "error"},
    ]

    lines = parsed(list(openai_lines(results(rows, embed=endpoint == EMBEDDINGS), endpoint, created=5)))

    assert [is_error for is_error, _ in lines] == [True, True]
    first, second = (line for _, line in lines)
    assert first["custom_id"] == "bad" and first["response"] is None
    assert first["error"] == {"code": "schema_validation_failed", "message": rows[0]["error"]}
    assert second["error"] == {"code": "request_failed", "message": rows[1]["error"]}


def test_line_ids_depend_only_on_the_custom_id() -> None:
    batch = results([{"id": "a", "output": "x"}, {"id": "b", "output": "x"}])

    once, again = list(openai_lines(batch, CHAT, created=5)), list(openai_lines(batch, CHAT, created=5))

    assert once == again
    assert json.loads(once[0][1])["id"] != json.loads(once[1][1])["id"]


def test_output_bodies_parse_as_the_official_sdk_types() -> None:
    openai_types = pytest.importorskip("openai.types")
    chat_types = pytest.importorskip("openai.types.chat")
    answer = results([{"id": "a", "output": "hi", "finish_reason": "stop"}])
    vector = results([{"id": "a", "embedding": [0.5, 0.25], "finish_reason": "embedding"}], embed=True)

    def body(batch: pa.RecordBatch, endpoint: str) -> dict[str, Any]:
        [(_, line)] = list(openai_lines(batch, endpoint, created=5))
        return dict(json.loads(line)["response"]["body"])

    completion = chat_types.ChatCompletion.model_validate(body(answer, CHAT))
    assert completion.choices[0].message.content == "hi"
    assert openai_types.Completion.model_validate(body(answer, COMPLETIONS)).choices[0].text == "hi"
    assert openai_types.CreateEmbeddingResponse.model_validate(body(vector, EMBEDDINGS)).data[0].embedding == [
        0.5,
        0.25,
    ]
