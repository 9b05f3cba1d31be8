"""Object storage: three tiers of fsspec URLs and the layout inside them.

Layout (ARCHITECTURE "Storage tiers")::

    <hot>/jobs/<job_id>/shards/<shard_index>/part-<first_row>.parquet   checkpoints
    <warm>/jobs/<job_id>/results/part-<n>.parquet + manifest.json  results

Writes are whole-object: a file is written under a temporary name and moved into
place, so a reader never sees half a part (S3 PUTs are atomic already).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from schemas.errors import ConfigError, StoreError
from schemas.settings import StorageSettings

__all__ = ["Storage", "Tier", "filesystem", "read_json", "sha256_of", "write_json", "write_parquet"]

Tier = Literal["hot", "warm", "cold"]


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path of ``url``."""
    try:
        fs, path = url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"cannot open storage URL {url!r}: {exc}") from exc
    return fs, str(path)


def _join(base: str, *parts: str | int) -> str:
    return "/".join([base.rstrip("/"), *(str(p).strip("/") for p in parts)])


def _atomic_write(url: str, data: bytes) -> None:
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if fs.protocol in ("file", "local") or "file" in (fs.protocol or ()):
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as fh:
            fh.write(data)


def write_parquet(table: pa.Table, url: str) -> int:
    """Write ``table`` to ``url`` whole; return the number of bytes written."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    try:
        _atomic_write(url, data)
    except OSError as exc:
        raise StoreError(f"could not write {url}: {exc}") from exc
    return len(data)


def write_json(obj: Any, url: str) -> None:
    _atomic_write(url, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(url: str) -> Any:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as fh:
        return json.loads(fh.read())


def sha256_of(url: str, chunk: int = 1 << 22) -> str:
    fs, path = filesystem(url)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Storage:
    """Where each kind of object lives."""

    settings: StorageSettings

    def tier(self, tier: Tier) -> str:
        return str(getattr(self.settings, tier)).rstrip("/")

    def job_url(self, job_id: str, tier: Tier) -> str:
        return _join(self.tier(tier), "jobs", job_id)

    def part_url(self, job_id: str, shard_index: int, first_row: int) -> str:
        return _join(self.job_url(job_id, "hot"), "shards", shard_index, f"part-{first_row}.parquet")

    def results_url(self, job_id: str, tier: Tier = "warm") -> str:
        return _join(self.job_url(job_id, tier), "results")
