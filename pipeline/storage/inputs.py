"""Reading the input Parquet file: validation at submit time, row ranges at run time.

Both stream: validation reads the footer, then only the ``id`` column in batches
(8 bytes of hash per row to find duplicates); a worker reads just its shard's rows.
Memory is bounded by a batch or a shard, never by the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage.objects import filesystem
from schemas.arrow import (
    CARRIED_KNOWN,
    OPTIONAL_INPUT_TYPES,
    OUTPUT_NAMES,
    REQUEST_COLUMNS,
    is_string,
)
from schemas.errors import InputChanged, InputError
from schemas.structured import schema_of_response_format

__all__ = [
    "InputInfo",
    "RowReader",
    "canonical_url",
    "check_identity",
    "input_identity",
    "inspect_input",
    "batch_rows",
    "iter_rows",
    "open_parquet",
    "refuse_credentials",
]

_ID_BATCH = 1 << 16
#: Distinct per-row ``model`` names an input may use (each is loaded by workers).
MAX_ROW_MODELS = 32
#: Query parameters that make a URL a credential (presigned S3, GCS, Azure SAS, tokens).
_SECRET_PARAMS = {
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "sig",
    "signature",
    "token",
    "access_token",
    "password",
    "secret",
}


@dataclass(frozen=True)
class InputInfo:
    url: str
    rows: int
    #: "prompt" or "messages"
    kind: str
    carried_columns: tuple[str, ...]
    #: Request columns present in the file, beyond id and the prompt column.
    request_columns: tuple[str, ...]
    schema: pa.Schema
    #: Distinct models named in the ``model`` column (rows that override the job's).
    row_models: tuple[str, ...] = ()


def open_parquet(url: str) -> pq.ParquetFile:
    fs, path = filesystem(url)
    try:
        if not fs.exists(path):
            raise InputError("file does not exist", file=url, missing=True)
        if fs.isdir(path):
            raise InputError("is a folder; give one Parquet file", file=url)
        handle = fs.open(path, "rb")
        return pq.ParquetFile(handle, buffer_size=1 << 20)
    except InputError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"not a readable Parquet file ({exc})", file=url) from exc


def _check_messages_type(t: pa.DataType) -> bool:
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return False
    item = t.value_type
    if not pa.types.is_struct(item):
        return False
    names = {item.field(i).name: item.field(i).type for i in range(item.num_fields)}
    return {"role", "content"} <= names.keys() and all(is_string(names[k]) for k in ("role", "content"))


def _check_schema(url: str, schema: pa.Schema) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    names = schema.names
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise InputError("column appears more than once", file=url, column=duplicated[0])
    if "id" not in names:
        raise InputError("required column is missing", file=url, column="id")
    if not is_string(schema.field("id").type):
        raise InputError(
            f"must be a string, not {schema.field('id').type} (cast it, e.g. df['id'] = df['id'].astype(str))",
            file=url,
            column="id",
        )
    has_prompt, has_messages = "prompt" in names, "messages" in names
    if has_prompt and has_messages:
        raise InputError("give either a 'prompt' or a 'messages' column, not both", file=url)
    if not (has_prompt or has_messages):
        raise InputError("required column is missing (or give 'messages')", file=url, column="prompt")
    kind = "prompt" if has_prompt else "messages"
    field_type = schema.field(kind).type
    if kind == "prompt" and not is_string(field_type):
        raise InputError(f"must be a string, not {field_type}", file=url, column="prompt")
    if kind == "messages" and not _check_messages_type(field_type):
        raise InputError(
            f"must be a list of {{role: string, content: string}}, not {field_type}",
            file=url,
            column="messages",
        )
    for column, (check, what) in OPTIONAL_INPUT_TYPES.items():
        if column in names and not check(schema.field(column).type):
            raise InputError(f"must be {what}, not {schema.field(column).type}", file=url, column=column)
    carried = tuple(n for n in names if n not in REQUEST_COLUMNS or n in CARRIED_KNOWN)
    clash = [n for n in carried if n in OUTPUT_NAMES]
    if clash:
        raise InputError(
            f"is also the name of an output column ({', '.join(sorted(OUTPUT_NAMES))}); rename it",
            file=url,
            column=clash[0],
        )
    requests = tuple(n for n in names if n in REQUEST_COLUMNS and n not in ("id", kind))
    return kind, carried, requests


def _first(mask: pa.Array) -> int:
    return int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])


def _check_values(url: str, pf: pq.ParquetFile, requests: tuple[str, ...]) -> tuple[str, ...]:
    """Refuse per-row limits a request cannot have, naming the row; return the row models."""
    columns = [c for c in ("max_tokens", "temperature", "model", "response_format") if c in requests]
    if not columns:
        return ()
    import pyarrow.compute as pc

    models: dict[str, int] = {}
    offset = 0
    for batch in pf.iter_batches(columns=columns, batch_size=_ID_BATCH):
        if "max_tokens" in columns:
            bad = pc.fill_null(pc.less(batch.column("max_tokens"), 1), False)
            if pc.any(bad).as_py():
                row = _first(bad)
                raise InputError(
                    f"max_tokens {batch.column('max_tokens')[row].as_py()} is below 1",
                    file=url,
                    column="max_tokens",
                    row=offset + row,
                )
        if "temperature" in columns:
            values = batch.column("temperature").cast(pa.float64())
            bad = pc.fill_null(pc.invert(pc.and_(pc.greater_equal(values, 0.0), pc.less_equal(values, 5.0))), False)
            if pc.any(bad).as_py():
                row = _first(bad)
                raise InputError(
                    f"temperature {values[row].as_py()} is not a number in [0, 5]",
                    file=url,
                    column="temperature",
                    row=offset + row,
                )
        if "model" in columns:
            for i, name in enumerate(batch.column("model").to_pylist()):
                if name is not None and name not in models:
                    if len(models) >= MAX_ROW_MODELS:
                        raise InputError(
                            f"more than {MAX_ROW_MODELS} distinct models", file=url, column="model", row=offset + i
                        )
                    models[name] = offset + i
        if "response_format" in columns:
            seen: set[str] = set()
            for i, text in enumerate(batch.column("response_format").to_pylist()):
                if text is not None and text not in seen:
                    try:
                        schema_of_response_format(text)
                    except InputError as exc:
                        raise InputError(
                            str(exc).removeprefix("response_format: "),
                            file=url,
                            column="response_format",
                            row=offset + i,
                        ) from None
                    seen.add(text)
        offset += batch.num_rows
    return tuple(models)


def refuse_credentials(url: str) -> None:
    """Credentials in an input URL would be stored in SQL, the manifest and ``status``."""
    if "://" not in url:
        return
    parts = urlsplit(url)
    try:
        password = parts.password
    except ValueError:
        password = None
    if password is not None or (parts.username and parts.scheme in ("http", "https")):
        raise InputError(
            "the URL carries credentials; give them through the environment "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for S3), never in the URL",
            file=_redact(url),
        )
    secret = sorted(k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if k.lower() in _SECRET_PARAMS)
    if secret:
        raise InputError(
            f"the URL carries a signature or token ({secret[0]}=...); presigned URLs expire and would be "
            "stored with the job: give the object's own URL and credentials through the environment",
            file=_redact(url),
        )


def _redact(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else ""), query=""))


def input_identity(url: str) -> dict[str, Any]:
    """What pins the input: its size, and its ETag, generation or mtime where the store has one."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    info = fs.info(path)
    found: dict[str, Any] = {"size": int(info.get("size") or 0)}
    for key in ("ETag", "etag", "generation", "version_id", "VersionId"):
        if info.get(key):
            found[key.lower()] = str(info[key])
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if mtime is not None and not any(k in found for k in ("etag", "generation")):
        found["mtime"] = mtime.isoformat() if hasattr(mtime, "isoformat") else float(mtime)
    return found


def check_identity(url: str, recorded: dict[str, Any] | None) -> None:
    """Raise ``InputChanged`` if ``url`` is not the file recorded at submit."""
    if not recorded:
        return
    try:
        now = input_identity(url)
    except FileNotFoundError:
        raise InputChanged(f"the input {url} is gone since the job was submitted; submit it again") from None
    changed = sorted(k for k, v in recorded.items() if now.get(k) != v)
    if changed:
        raise InputChanged(
            f"the input {url} changed since the job was submitted ({', '.join(f'{k}: {recorded[k]} -> {now.get(k)}' for k in changed)}); "
            "its rows are no longer the ones validated: submit it again"
        )


#: A random odd weight for each 8-byte word of an id (words past the 128th take them
#: again from the first), and what that makes of each byte (a byte is worth its
#: word's weight shifted to its place in the little-endian word). Fixed, so that both
#: passes of ``_check_ids`` agree.
_WORD_WEIGHTS = np.random.default_rng(0x5107).integers(1, 2**63, size=128, dtype=np.uint64) | np.uint64(1)
_BYTE_WEIGHTS = np.repeat(_WORD_WEIGHTS, 8) << np.tile(np.arange(0, 64, 8, dtype=np.uint64), len(_WORD_WEIGHTS))
_LENGTH_MIX = np.uint64(0x9E3779B97F4A7C15)


def _hashes(ids: pa.Array) -> np.ndarray:
    """A 64-bit hash of each (non-null) id, from the Arrow buffers, with no Python object
    per row (``hash()`` of each id was most of a 10M-row submit): the id's 8-byte words
    times their weights, summed (mod 2**64), mixed with its length. A collision only
    sends the id to ``_check_ids``'s exact second pass."""
    text = ids.cast(pa.large_string())
    _, offsets_buffer, data_buffer = text.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[text.offset : text.offset + len(text) + 1]
    lengths = np.diff(offsets)
    sums = np.zeros(len(text), dtype=np.uint64)
    if data_buffer is not None and offsets[-1] > offsets[0]:
        data = np.frombuffer(data_buffer, dtype=np.uint8)[offsets[0] : offsets[-1]]
        if lengths.min() == lengths.max():  # ids of one length (the usual case): whole words at once
            width = int(lengths[0])
            words = -(-width // 8)
            padded = np.zeros((len(text), words * 8), dtype=np.uint8)
            padded[:, :width] = data.reshape(len(text), width)
            weights = _WORD_WEIGHTS[np.arange(words) % len(_WORD_WEIGHTS)]
            sums = (padded.view("<u8") * weights).sum(axis=1, dtype=np.uint64)
        else:  # byte by byte, each at its place: the same sums
            starts = offsets[:-1] - offsets[0]
            place = np.arange(len(data), dtype=np.int64) - np.repeat(starts, lengths)
            weighted = data.astype(np.uint64) * _BYTE_WEIGHTS[place % len(_BYTE_WEIGHTS)]
            filled = lengths > 0  # an empty id has no bytes: its sum stays 0
            sums[filled] = np.add.reduceat(weighted, starts[filled])
    return (sums ^ (lengths.astype(np.uint64) * _LENGTH_MIX)).view(np.int64)


def _check_ids(url: str, pf: pq.ParquetFile) -> None:
    """Refuse null or duplicate ids, naming the row; memory: 8 bytes per row."""
    chunks: list[np.ndarray] = []
    offset = 0
    for batch in pf.iter_batches(columns=["id"], batch_size=_ID_BATCH):
        ids = batch.column(0)
        if ids.null_count:
            first = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError("id is null", file=url, column="id", row=offset + first)
        chunks.append(_hashes(ids))
        offset += len(ids)
    if not chunks:
        return
    hashes = np.concatenate(chunks)
    del chunks
    hashes.sort()
    suspects = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    del hashes
    if not suspects:
        return
    # Second pass over the few ids whose hash collides: find a real duplicate.
    seen: dict[str, int] = {}
    offset = 0
    for batch in pf.iter_batches(columns=["id"], batch_size=_ID_BATCH):
        values = batch.column(0).to_pylist()
        for i, h in enumerate(_hashes(batch.column(0)).tolist()):
            if h in suspects:
                value = values[i]
                if value in seen:
                    raise InputError(
                        f"duplicate id {value!r} (first at row {seen[value]})",
                        file=url,
                        column="id",
                        row=offset + i,
                    )
                seen[value] = offset + i
        offset += len(values)


def canonical_url(url: str) -> str:
    """An absolute form of ``url`` that any process on any working folder can open."""
    if "://" in url:
        return url
    return str(Path(url).expanduser().resolve())


def inspect_input(url: str) -> InputInfo:
    """Validate the input file's schema and ids without loading it; raise ``InputError``."""
    url = canonical_url(url)
    pf = open_parquet(url)
    try:
        schema = pf.schema_arrow
    except pa.ArrowException as exc:
        raise InputError(f"unreadable schema ({exc})", file=url) from exc
    rows = pf.metadata.num_rows
    kind, carried, requests = _check_schema(url, schema)
    if rows == 0:
        raise InputError("file has no rows", file=url)
    try:
        _check_ids(url, pf)
        row_models = _check_values(url, pf, requests)
    except pa.ArrowException as exc:
        raise InputError(f"could not read the file's columns ({exc})", file=url) from exc
    return InputInfo(url, rows, kind, carried, requests, schema, row_models)


#: Bytes of (uncompressed) rows one read batch aims at: memory follows row size, not row count.
BATCH_BYTES = 32 << 20


def batch_rows(pf: pq.ParquetFile, columns: list[str] | None = None, most: int = 4096) -> int:
    """Rows per read batch so that a batch of ``columns`` holds about ``BATCH_BYTES``."""
    meta = pf.metadata
    if not meta.num_rows or not meta.num_row_groups:
        return most
    names = [meta.schema.column(i).path.split(".")[0] for i in range(meta.num_columns)]
    wanted = set(columns or names)
    size = sum(
        meta.row_group(rg).column(i).total_uncompressed_size
        for rg in range(meta.num_row_groups)
        for i, name in enumerate(names)
        if name in wanted
    )
    per_row = max(1.0, size / meta.num_rows)
    return int(max(1, min(most, BATCH_BYTES // per_row)))


def iter_rows(
    url: str, start: int, end: int, columns: list[str], batch_size: int | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream rows ``[start, end)`` of ``url`` as record batches of ``columns``
    (``batch_size`` rows at most; by default as many as fit ``BATCH_BYTES``)."""
    pf = open_parquet(url)
    batch_size = batch_rows(pf, columns, batch_size or 4096)
    meta = pf.metadata
    first = 0
    for rg in range(meta.num_row_groups):
        rg_rows = meta.row_group(rg).num_rows
        rg_start, rg_end = first, first + rg_rows
        first = rg_end
        if rg_end <= start or rg_start >= end:
            continue
        pos = rg_start
        for batch in pf.iter_batches(batch_size=batch_size, row_groups=[rg], columns=columns):
            b_start, b_end = pos, pos + len(batch)
            pos = b_end
            if b_end <= start:
                continue
            if b_start >= end:
                break
            lo, hi = max(start, b_start) - b_start, min(end, b_end) - b_start
            yield batch.slice(lo, hi - lo)


#: A forward jump in a ``RowReader`` longer than this reopens the file at the new row
#: (skipping whole row groups) instead of reading its way there.
REOPEN_GAP = 65536


class RowReader:
    """The rows of one input, read forward once for many ranges.

    ``take(start, end)`` streams rows ``[start, end)``; ascending ranges (a router
    profiling shard after shard) continue from one open reader, so each row group is
    fetched and decoded once for the whole job instead of once per range that touches
    it. A range that starts before the last one ended, or far after it, reopens the
    file. Memory: one read batch.
    """

    def __init__(self, url: str, columns: list[str]) -> None:
        self.url = url
        self.columns = columns
        self._rows: Iterator[pa.RecordBatch] | None = None
        self._pos = 0
        self._held: pa.RecordBatch | None = None

    def _open(self, start: int) -> None:
        total = open_parquet(self.url).metadata.num_rows
        self._rows, self._pos, self._held = iter_rows(self.url, start, total, self.columns), start, None

    def take(self, start: int, end: int) -> Iterator[pa.RecordBatch]:
        if self._rows is None or start < self._pos or start - self._pos > REOPEN_GAP:
            self._open(start)
        assert self._rows is not None
        while self._pos < end:
            batch = self._held if self._held is not None else next(self._rows, None)
            self._held = None
            if batch is None:
                return
            first, after = self._pos, self._pos + len(batch)
            if after <= start:
                self._pos = after
                continue
            lo, hi = max(start, first) - first, min(end, after) - first
            if hi < len(batch):
                self._held = batch.slice(hi)
            self._pos = first + hi
            yield batch.slice(lo, hi - lo)
