"""Inputs of several files: a glob or a folder expanded, and stitched into one file.

Errors found in a stitched file are traced back to the source file and its row
(``source_of_row``), so the user hears about the file they wrote.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage.inputs import _ID_BATCH, batch_rows, canonical_url, open_parquet
from pipeline.storage.objects import filesystem, write_options
from schemas.errors import InputError

__all__ = ["expand_input", "source_of_row", "stitch_inputs"]

_GLOB_CHARS = set("*?[")


def expand_input(url: str) -> list[str]:
    """The Parquet files ``url`` names: itself, every match of a glob, or every
    ``*.parquet`` in a folder (sorted by name). Raises ``InputError`` if none."""
    url = canonical_url(url)
    fs, path = filesystem(url)
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    prefix = "" if protocol in ("", "file://") else protocol
    if _GLOB_CHARS & set(path):
        fs.invalidate_cache()
        matches = sorted(p for p in fs.glob(path) if not fs.isdir(p))
        if not matches:
            raise InputError("no file matches this pattern", file=url, missing=True)
        return [f"{prefix}{m}" if prefix else m for m in matches]
    if fs.exists(path) and fs.isdir(path):
        matches = sorted(p for p in fs.glob(f"{path.rstrip('/')}/*.parquet"))
        if not matches:
            raise InputError("folder holds no *.parquet file", file=url, missing=True)
        return [f"{prefix}{m}" if prefix else m for m in matches]
    return [url]


def stitch_inputs(urls: list[str], target: str, storage_class: str = "") -> str:
    """Stream several input files into one Parquet file at ``target``; return ``target``.

    Every file must have the first file's columns and types (an error names the
    file and column otherwise). Memory: one record batch. The file's metadata
    lists the sources under ``spotlane.sources``.
    """
    first = open_parquet(urls[0])
    schema = first.schema_arrow
    for url in urls[1:]:
        other = open_parquet(url).schema_arrow
        for f in schema:
            if f.name not in other.names:
                raise InputError(f"column missing here but present in {urls[0]}", file=url, column=f.name)
            if not other.field(f.name).type.equals(f.type):
                raise InputError(
                    f"is {other.field(f.name).type} here but {f.type} in {urls[0]}", file=url, column=f.name
                )
        extra = [n for n in other.names if n not in schema.names]
        if extra:
            raise InputError(f"column not in {urls[0]}", file=url, column=extra[0])
    schema = schema.with_metadata({**(schema.metadata or {}), b"spotlane.sources": json.dumps(urls).encode()})
    fs, path = filesystem(target)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with (
        fs.open(path, "wb", **write_options(storage_class)) as sink,
        pq.ParquetWriter(sink, schema, compression="zstd") as writer,
    ):
        for url in urls:
            source = open_parquet(url)
            for batch in source.iter_batches(batch_size=batch_rows(source, most=_ID_BATCH)):
                writer.write_batch(pa.RecordBatch.from_arrays(batch.select(schema.names).columns, schema=schema))
    return target


def source_of_row(url: str, row: int) -> tuple[str, int] | None:
    """For a stitched input: (source file, row within it) of ``row``; None otherwise."""
    meta = open_parquet(url).schema_arrow.metadata or {}
    if b"spotlane.sources" not in meta:
        return None
    for source in json.loads(meta[b"spotlane.sources"]):
        rows = open_parquet(source).metadata.num_rows
        if row < rows:
            return source, row
        row -= rows
    return None
