"""Results files: written whole and checksummed, and the parts they are made of checked.

``ResultWriter`` streams tables into files of at most ``RESULT_FILE_ROWS`` rows in
row groups of ``ROW_GROUP_ROWS`` (memory: one row group), each file appearing
whole or not at all, with its SHA-256 taken on the way (the manifest lists them).
``check_part`` and ``check_coverage`` verify committed parts against their
checkpoints, the input's ids and their shards before any is copied (the
finalizer's fencing check).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage.inputs import iter_rows
from pipeline.storage.objects import open_new
from schemas.errors import StoreError
from schemas.status import ShardStatus
from schemas.structured import parsed_column

__all__ = [
    "RESULT_FILE_ROWS",
    "ROW_GROUP_ROWS",
    "InputIds",
    "ResultWriter",
    "check_coverage",
    "check_part",
    "with_parsed",
]


#: Rows per result file: large enough for fast scans, small enough to split work.
RESULT_FILE_ROWS = 1_000_000
#: Rows per row group in a result file (parts are buffered up to this).
ROW_GROUP_ROWS = 128 * 1024


class ResultWriter:
    """Streams tables into new ``part-<n>.parquet`` files of bounded rows, in large row groups.

    Each file appears whole (``storage.open_new``) and is checksummed as it is
    written. ``close`` returns the manifest's ``files`` entries.
    """

    def __init__(self, folder: str, schema: pa.Schema, storage_class: str = "") -> None:
        self.folder = folder.rstrip("/")
        self.storage_class = storage_class
        self.schema = schema
        self.files: list[dict[str, Any]] = []
        self._file: Any = None
        self._sink: Any = None
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0
        self._buffer: list[pa.Table] = []
        self._buffered = 0

    def _open(self) -> None:
        name = f"part-{len(self.files):05d}.parquet"
        self._file = open_new(f"{self.folder}/{name}", self.storage_class)
        self._sink = self._file.__enter__()
        self._writer = pq.ParquetWriter(self._sink, self.schema, compression="zstd")
        self.files.append({"name": name, "rows": 0})
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None or self._rows + self._buffered >= RESULT_FILE_ROWS:
                self._close_current()
                self._open()
            take = min(table.num_rows, RESULT_FILE_ROWS - self._rows - self._buffered)
            self._buffer.append(table.slice(0, take))
            self._buffered += take
            table = table.slice(take)
            if self._buffered >= ROW_GROUP_ROWS:
                self._flush()

    def _flush(self) -> None:
        if not self._buffered:
            return
        assert self._writer is not None
        self._writer.write_table(pa.concat_tables(self._buffer), row_group_size=ROW_GROUP_ROWS)
        self._rows += self._buffered
        self.files[-1]["rows"] += self._buffered
        self._buffer, self._buffered = [], 0

    def _close_current(self) -> None:
        if self._writer is None:
            return
        self._flush()
        self._writer.close()
        self._file.__exit__(None, None, None)
        self.files[-1]["bytes"] = self._sink.size
        self.files[-1]["sha256"] = self._sink.digest.hexdigest()
        self._writer = self._file = self._sink = None

    def close(self) -> list[dict[str, Any]]:
        if self._writer is None and not self.files:
            self._open()  # an empty job still gets one (empty) file with the schema
        self._close_current()
        return self.files

    def abort(self) -> None:
        """Drop the file being written (it never appears)."""
        if self._file is not None:
            self._file.__exit__(StoreError, StoreError("aborted"), None)
            self._writer = self._file = self._sink = None


class InputIds:
    """The input's ids, read forward once (the id column only), to check each part against."""

    def __init__(self, url: str, rows: int) -> None:
        self._batches: Iterator[pa.RecordBatch] = iter_rows(url, 0, rows, ["id"], batch_size=65536)
        #: Ids of input rows [_start, _start + len(_held)).
        self._held: pa.Array = pa.array([], pa.string())
        self._start = 0

    def take(self, first: int, count: int) -> pa.Array:
        """Ids of input rows ``[first, first + count)`` (fewer at the input's end);
        ``first`` never goes backwards."""
        if first < self._start:
            raise StoreError(f"checkpoints are out of order at input row {first}")
        drop = min(first - self._start, len(self._held))
        self._held, self._start = self._held.slice(drop), self._start + drop
        while self._start + len(self._held) < first + count:
            batch = next(self._batches, None)
            if batch is None:
                break
            ids = batch.column(0).cast(pa.string())
            skip = min(first - self._start, len(ids))  # rows of failed shards no part covers
            self._held, self._start = pa.concat_arrays([self._held, ids.slice(skip)]), self._start + skip
        return self._held.slice(0, count)


def check_part(part: Any, table: pa.Table, ids: InputIds) -> None:
    """The part holds exactly the checkpoint's rows of the input, with its error count."""
    where = f"shard {part.shard_index}, checkpoint at input row {part.first_row} (attempt {part.attempt}, {part.url})"
    if table.num_rows != part.row_count:
        raise StoreError(f"{where}: the part has {table.num_rows} rows, its checkpoint says {part.row_count}")
    expected = ids.take(part.first_row, part.row_count)
    got = table.column("id").combine_chunks()
    if got.type != pa.string():  # a compute call costs more than a small part's whole check
        got = got.cast(pa.string())
    if len(expected) != part.row_count or not got.equals(expected):
        first_bad = next((i for i in range(min(len(got), len(expected))) if got[i] != expected[i]), len(expected))
        raise StoreError(
            f"{where}: ids do not match the input at row {part.first_row + first_bad} "
            f"(part: {got[first_bad] if first_bad < len(got) else 'none'}, "
            f"input: {expected[first_bad] if first_bad < len(expected) else 'none'})"
        )
    failed = table.num_rows - table.column("error").null_count
    if failed != part.rows_failed:
        raise StoreError(f"{where}: the part has {failed} error rows, its checkpoint says {part.rows_failed}")


def check_coverage(parts: Sequence[Any], shards: dict[int, Any]) -> None:
    """Each shard's parts run contiguously from its first row; a done shard's cover it all."""
    reached: dict[int, int] = {}
    for part in parts:
        shard = shards[part.shard_id]
        at = reached.get(part.shard_id, shard.row_start)
        if part.first_row != at:
            raise StoreError(
                f"shard {shard.shard_index}: a checkpoint starts at input row {part.first_row}, "
                f"the one before it ends at {at}"
            )
        reached[part.shard_id] = at + part.row_count
    for shard in shards.values():
        end = reached.get(shard.id, shard.row_start)
        if shard.status is ShardStatus.DONE and end != shard.row_end:
            raise StoreError(
                f"shard {shard.shard_index} is done but its checkpoints cover input rows "
                f"{shard.row_start}-{end}, not {shard.row_start}-{shard.row_end}"
            )


def with_parsed(table: pa.Table, response_schema: dict[str, Any] | None, *, as_text: bool = False) -> pa.Table:
    """``table`` with the ``parsed`` column: each valid answer's value (null for error rows),
    typed by ``response_schema``, or as JSON text (``as_text``: rows carry schemas of their own)."""
    outputs, errors = table.column("output").to_pylist(), table.column("error").to_pylist()
    values = [_json_or_none(o) if e is None and o is not None else None for o, e in zip(outputs, errors, strict=True)]
    if as_text or response_schema is None:
        column = pa.array([None if v is _NOT_JSON or v is None else json.dumps(v) for v in values], pa.string())
    else:
        column = parsed_column(response_schema, [None if v is _NOT_JSON else v for v in values])
    return table.append_column(pa.field("parsed", column.type), column)


_NOT_JSON = object()


def _json_or_none(text: str) -> Any:
    """The value of a JSON text; a free-text answer (a row without a schema) is not parsed."""
    try:
        return json.loads(text)
    except ValueError:
        return _NOT_JSON
