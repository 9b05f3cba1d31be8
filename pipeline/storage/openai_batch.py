"""OpenAI Batch API files: a JSONL input converted to an input Parquet file, results written back as JSONL.

Input: one request a line, ``{custom_id, method, url, body}``, every line to the same
endpoint (``ENDPOINTS``). ``convert_jsonl`` streams it line by line into the Parquet
input the rest of spotlane reads (``id``, ``messages`` or ``prompt``, ``model``, the
limits, ``response_format``), refusing a line it cannot honour with an ``InputError``
that names the line, the way OpenAI's own validation does. Body keys that do not
change what is asked (``top_p``, ``seed``, ``user``, ...) are kept as JSON text in
``body_params``; this module never applies them. Memory: one batch of rows, and a
hash and a line number per row to find a ``custom_id`` used twice.

Output: ``openai_lines`` turns result rows into the lines of OpenAI's output file
(``response.body`` shaped like the endpoint's own response) and error file.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage.inputs import open_parquet
from pipeline.storage.objects import filesystem, write_options
from schemas.arrow import MESSAGE_TYPE
from schemas.errors import InputError
from schemas.structured import schema_of_response_format

__all__ = [
    "ENDPOINTS",
    "BatchFile",
    "convert_jsonl",
    "endpoint_of",
    "error_line",
    "is_openai_jsonl",
    "line_of_row",
    "openai_lines",
]

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
_CHAT, _COMPLETIONS, _EMBEDDINGS = ENDPOINTS

#: Rows, and bytes of JSON, one written record batch holds at most.
_BATCH_ROWS = 8192
_BATCH_BYTES = 32 << 20
#: Bytes read to tell JSONL from Parquet.
_SNIFF = 64 << 10
_ENDPOINT_KEY = b"spotlane.openai_endpoint"
#: Present only when blank lines were skipped: row i came from line ``lines[i]``.
_LINES_KEY = b"spotlane.jsonl_lines"

_LIMIT_FIELDS = [("max_tokens", pa.int64()), ("temperature", pa.float64()), ("response_format", pa.string())]


def _schema(text: tuple[str, pa.DataType], limits: list[tuple[str, pa.DataType]]) -> pa.Schema:
    head = [pa.field("id", pa.string(), nullable=False), text, ("model", pa.string())]
    return pa.schema([*head, *limits, ("body_params", pa.string())])


_SCHEMAS = {
    _CHAT: _schema(("messages", MESSAGE_TYPE), _LIMIT_FIELDS),
    _COMPLETIONS: _schema(("prompt", pa.string()), _LIMIT_FIELDS),
    _EMBEDDINGS: _schema(("prompt", pa.string()), []),
}
_LIMITS = ("model", "max_tokens", "max_completion_tokens", "temperature", "response_format")
#: Body keys read into columns (the rest go to ``body_params``).
_CONSUMED = {_CHAT: {"messages", *_LIMITS}, _COMPLETIONS: {"prompt", *_LIMITS}, _EMBEDDINGS: {"input", "model"}}

_NO_TOOLS = "tool calls are not supported"
#: Parameters that change the answer, when they would, and why they cannot be honoured.
_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(("n", "best_of"), (lambda v: v not in (None, 1), "spotlane returns one answer per request")),
    "stream": (bool, "results are written to a file, not streamed"),
    **dict.fromkeys(("tools", "functions"), (bool, _NO_TOOLS)),
    **dict.fromkeys(("tool_choice", "function_call"), (lambda v: v not in (None, "none", "auto"), _NO_TOOLS)),
    **dict.fromkeys(("logprobs", "top_logprobs"), (bool, "log probabilities are not returned")),
    "audio": (lambda v: v is not None, "answers are text only"),
    "modalities": (lambda v: v not in (None, ["text"]), "answers are text only"),
    "prediction": (lambda v: v is not None, "predicted outputs are not supported"),
    "echo": (bool, "the prompt is not echoed"),
    "suffix": (bool, "insertion is not supported"),
}


@dataclass(frozen=True)
class BatchFile:
    endpoint: str
    #: Distinct ``body.model`` values, in order of first appearance.
    models: list[str]
    rows: int
    #: "generate" or "embed"
    task: str


class _Bad(Exception):
    """A line is not a request spotlane can run; the caller adds the line number and the file."""


def is_openai_jsonl(url: str) -> bool:
    """Whether ``url`` holds JSONL (its first non-blank byte is ``{``) rather than Parquet.
    Reads a small prefix only; False for a folder, a glob or a missing file."""
    fs, path = filesystem(url)
    try:
        if not fs.isfile(path):
            return False
        head = bytes(fs.cat_file(path, start=0, end=_SNIFF))
    except OSError:
        return False
    return not head.startswith(b"PAR1") and head.removeprefix(codecs.BOM_UTF8).lstrip()[:1] == b"{"


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _request(raw: bytes) -> tuple[str, str, dict[str, Any]]:
    """(custom_id, url, body) of one line, its envelope checked."""
    try:
        line = json.loads(raw)
    except ValueError as exc:
        raise _Bad(f"invalid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(line, dict):
        raise _Bad(f"a request is a JSON object, not {type(line).__name__}")
    custom_id, method, url, body = (line.get(k) for k in ("custom_id", "method", "url", "body"))
    if not isinstance(custom_id, str) or not custom_id:
        raise _Bad(
            "custom_id is missing"
            if custom_id is None
            else f"custom_id must be a non-empty string, not {_dumps(custom_id)}"
        )
    if method != "POST":
        raise _Bad("method is missing" if method is None else f"method must be POST, not {_dumps(method)}")
    if url not in ENDPOINTS:
        found = "is missing" if url is None else f"{_dumps(url)} is not supported"
        raise _Bad(f"url {found}; use one of {', '.join(ENDPOINTS)}")
    if not isinstance(body, dict):
        raise _Bad("body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _Bad("body.model is missing (every request names its model)")
    return custom_id, str(url), body


def _content(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _Bad(f"messages[{i}].content must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise _Bad(f"messages[{i}].content[{j}] is a {_dumps(kind)} part; only text parts are supported")
        texts.append(part["text"])
    return "\n".join(texts)


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _Bad("body.messages must be a non-empty list")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _Bad(f"messages[{i}] must be an object with a role")
        if message["role"] in ("tool", "function") or {"tool_calls", "function_call"} & message.keys():
            raise _Bad(f"messages[{i}]: {_NO_TOOLS}")
        messages.append({"role": message["role"], "content": _content(i, message.get("content"))})
    return messages


def _one_text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        many = " per line (a list is not supported: one request, one " + key + ")" if isinstance(value, list) else ""
        raise _Bad(f"body.{key} must be one string{many}")
    return value


def _limits(body: dict[str, Any]) -> tuple[int | None, float | None]:
    """(max_tokens, temperature); ``max_completion_tokens`` is the newer name of the first."""
    given = {k: body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None}
    for key, value in given.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _Bad(f"{key} must be an integer >= 1, not {_dumps(value)}")
    if len(set(given.values())) > 1:
        raise _Bad(
            f"max_tokens and max_completion_tokens differ ({given['max_tokens']} and {given['max_completion_tokens']})"
        )
    t = body.get("temperature")
    if t is not None and (not isinstance(t, int | float) or isinstance(t, bool) or not 0 <= t <= 2):
        raise _Bad(f"temperature must be a number from 0 to 2, not {_dumps(t)}")
    return next(iter(given.values()), None), None if t is None else float(t)


def _response_format(value: Any, checked: set[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _Bad("response_format must be a JSON object")
    text = _dumps(value)
    if text not in checked:
        try:
            schema_of_response_format(text)
        except InputError as exc:
            raise _Bad(str(exc)) from None
        if len(checked) > 1024:  # the cache is for files that repeat one format, not a record of all
            checked.clear()
        checked.add(text)
    return text


def _row(endpoint: str, body: dict[str, Any], formats: set[str]) -> dict[str, Any]:
    """The columns of one request (``id`` aside)."""
    if endpoint == _EMBEDDINGS:
        row: dict[str, Any] = {"prompt": _one_text(body, "input")}
    else:
        for key, (refused, why) in _UNSUPPORTED.items():
            value = body.get(key)
            if refused(value):
                shown = f" = {_dumps(value)}" if isinstance(value, bool | int | float | str) else ""
                raise _Bad(f"parameter {key!r}{shown} is not supported: {why}")
        row = {"messages": _messages(body.get("messages"))} if endpoint == _CHAT else {}
        if endpoint == _COMPLETIONS:
            row["prompt"] = _one_text(body, "prompt")
        row["max_tokens"], row["temperature"] = _limits(body)
        row["response_format"] = _response_format(body.get("response_format"), formats)
    row["model"] = body["model"]
    skipped = _CONSUMED[endpoint] | (set() if endpoint == _EMBEDDINGS else _UNSUPPORTED.keys())
    params = {k: v for k, v in body.items() if k not in skipped}
    row["body_params"] = _dumps(params) if params else None
    return row


class _Converter:
    """Requests in, record batches out; the Parquet writer opens with the first batch,
    once the first line has told the endpoint (and so the columns)."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.endpoint, self.first = "", 0
        self.pending: dict[str, list[Any]] = {}
        self.pending_bytes = 0
        self.rows = 0
        self.models: dict[str, None] = {}
        #: hash of each custom_id -> its line (a 64-bit hash: ids themselves could be large)
        self.ids: dict[int, int] = {}
        self.lines: array[int] | None = None
        self.formats: set[str] = set()
        self.writer: pq.ParquetWriter | None = None

    def add(self, n: int, raw: bytes) -> None:
        custom_id, endpoint, body = _request(raw)
        if not self.endpoint:
            self.endpoint, self.first = endpoint, n
            self.pending = {name: [] for name in _SCHEMAS[endpoint].names}
        elif endpoint != self.endpoint:
            raise _Bad(f"the url must be the same on every line: {endpoint} here, {self.endpoint} on line {self.first}")
        first = self.ids.setdefault(hash(custom_id), n)
        if first != n:
            raise _Bad(f"custom_id {custom_id!r} was already used on line {first}")
        row = _row(endpoint, body, self.formats)
        row["id"] = custom_id
        for name, values in self.pending.items():
            values.append(row[name])
        self.models.setdefault(row["model"], None)
        if self.lines is None and n != self.rows + 1:
            self.lines = array("q", range(1, self.rows + 1))
        if self.lines is not None:
            self.lines.append(n)
        self.rows += 1
        self.pending_bytes += len(raw)
        if len(self.pending["id"]) >= _BATCH_ROWS or self.pending_bytes >= _BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        schema = _SCHEMAS[self.endpoint]
        if self.writer is None:
            with_key = schema.with_metadata({_ENDPOINT_KEY: self.endpoint.encode()})
            self.writer = pq.ParquetWriter(self.sink, with_key, compression="zstd")
        self.writer.write_batch(pa.RecordBatch.from_pydict(self.pending, schema=schema))
        self.pending = {name: [] for name in schema.names}
        self.pending_bytes = 0

    def finish(self, url: str) -> None:
        if not self.rows:
            raise InputError("the file holds no request (it is empty)", file=url)
        if self.pending["id"]:
            self.flush()
        assert self.writer is not None
        if self.lines is not None:
            # The footer is written last, so the line map goes there rather than in the schema.
            self.writer.add_key_value_metadata({_LINES_KEY: _dumps(self.lines.tolist())})


def convert_jsonl(url: str, target: str, storage_class: str = "") -> BatchFile:
    """Stream the OpenAI batch input file ``url`` into a Parquet input file at ``target``.

    ``InputError`` names the first line at fault (1-based, blank lines counted though
    skipped); ``target`` is then removed. The file's metadata keeps the endpoint
    (``endpoint_of``) and, if blank lines were skipped, each row's line (``line_of_row``).
    """
    fs, path = filesystem(url)
    if not fs.isfile(path):
        raise InputError("file does not exist", file=url, missing=True)
    out_fs, out_path = filesystem(target)
    out_fs.makedirs(out_path.rsplit("/", 1)[0], exist_ok=True)
    try:
        with fs.open(path, "rb") as source, out_fs.open(out_path, "wb", **write_options(storage_class)) as sink:
            converter = _Converter(sink)
            try:
                for n, raw in enumerate(source, 1):
                    if raw.strip():
                        try:
                            converter.add(n, raw)
                        except _Bad as exc:
                            raise InputError(f"line {n}: {exc}", file=url) from None
                converter.finish(url)
            finally:
                if converter.writer is not None:
                    converter.writer.close()
    except BaseException:
        with contextlib.suppress(OSError):
            out_fs.rm(out_path)
        raise
    task = "embed" if converter.endpoint == _EMBEDDINGS else "generate"
    return BatchFile(converter.endpoint, list(converter.models), converter.rows, task)


def line_of_row(parquet_url: str, row: int) -> int:
    """The JSONL line (1-based) that row ``row`` (0-based) of a converted file came from."""
    lines = (open_parquet(parquet_url).metadata.metadata or {}).get(_LINES_KEY)
    return int(json.loads(lines)[row]) if lines else row + 1


def endpoint_of(parquet_url: str) -> str | None:
    """The endpoint of a file ``convert_jsonl`` wrote; None for a Parquet input of the user's own."""
    endpoint = (open_parquet(parquet_url).metadata.metadata or {}).get(_ENDPOINT_KEY)
    return endpoint.decode() if endpoint else None


def openai_lines(batch: pa.RecordBatch, endpoint: str, created: int) -> Iterator[tuple[bool, bytes]]:
    """(is an error, the JSONL line) for each result row of ``batch``, in order: an output-file
    line whose ``response.body`` has the shape of ``endpoint``'s response, or an error-file line.
    Ids are derived from ``custom_id``, so writing the same results again gives the same bytes."""
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, not {endpoint!r}")
    names = ("id", "output", "finish_reason", "input_tokens", "output_tokens", "model", "error")
    ids, outputs, finishes, prompt_tokens, completion_tokens, models, errors = (
        batch.column(name).to_pylist() for name in names
    )
    # Arrow writes a float32 in its shortest form ("0.1"), where Python's float would say 0.10000000149011612.
    vectors = batch.column("embedding").cast(pa.list_(pa.string())).to_pylist() if endpoint == _EMBEDDINGS else None
    for i, custom_id in enumerate(ids):
        digest = hashlib.sha256(custom_id.encode()).hexdigest()
        head = f'{{"id":{_dumps("batch_req_" + digest[:24])},"custom_id":{_dumps(custom_id)},'
        error, vector = errors[i], vectors[i] if vectors is not None else None
        if error is None and vectors is not None and (vector is None or not {"nan", "inf", "-inf"}.isdisjoint(vector)):
            error = "the embedding is missing or not finite"
        if error is not None:
            code = "schema_validation_failed" if error.startswith("schema:") else "request_failed"
            yield True, f'{head}"response":null,"error":{_dumps({"code": code, "message": error})}}}\n'.encode()
            continue
        used, made, model = prompt_tokens[i] or 0, completion_tokens[i] or 0, models[i] or ""
        if vector is not None:
            usage_text = _dumps({"prompt_tokens": used, "total_tokens": used})
            item = f'{{"object":"embedding","index":0,"embedding":[{",".join(vector)}]}}'
            body = f'{{"object":"list","data":[{item}],"model":{_dumps(model)},"usage":{usage_text}}}'
        else:
            chat = endpoint == _CHAT
            message = {"role": "assistant", "content": outputs[i], "refusal": None}
            choice: dict[str, Any] = {"index": 0, **({"message": message} if chat else {"text": outputs[i] or ""})}
            choice |= {"logprobs": None, "finish_reason": finishes[i] or "stop"}
            kind, prefix = ("chat.completion", "chatcmpl") if chat else ("text_completion", "cmpl")
            usage = {"prompt_tokens": used, "completion_tokens": made, "total_tokens": used + made}
            top = {"id": f"{prefix}-{digest[:24]}", "object": kind, "created": created, "model": model}
            body = _dumps({**top, "choices": [choice], "usage": usage})
        response = f'{{"status_code":200,"request_id":{_dumps(digest[24:56])},"body":{body}}}'
        yield False, f'{head}"response":{response},"error":null}}\n'.encode()


def error_line(custom_id: str, code: str, message: str) -> bytes:
    """An error-file line for a request that has no result row (a batch stopped before it)."""
    digest = hashlib.sha256(custom_id.encode()).hexdigest()
    error = _dumps({"code": code, "message": message})
    return f'{{"id":{_dumps("batch_req_" + digest[:24])},"custom_id":{_dumps(custom_id)},"response":null,"error":{error}}}\n'.encode()
