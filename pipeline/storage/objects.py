"""Object storage: three tiers of fsspec URLs and the layout inside them.

Layout (the README's "Storage tiers and their lifecycle")::

    <hot>/jobs/<job_id>/shards/<shard_index>/part-<first_row>-a<attempt>-<token>.parquet   checkpoints
    <warm>/jobs/<job_id>/results-<token>/part-<n>.parquet + _manifest.json              results
    <warm>/jobs/<job_id>/results-v<N>-<token>/...                     a retry's merged version
    <cold>/jobs/<job_id>/results-.../...                              after the lifecycle moved them

A part's name is new for every attempt (and every write), so a worker that lost
its lease can never overwrite the part another attempt committed. A results
folder is new for every finalization and never rewritten; ``jobs.result_url``
switches to it once its manifest is written.

Writes are whole-object: a file is written under a temporary name and moved into
place, so a reader never sees half a part (S3 PUTs are atomic already). Objects
written to an ``s3://`` tier get that tier's storage class, if one is set.

The manifest's name starts with ``_`` so that pyarrow, pandas and Spark, which skip
such files, can read a results folder as one dataset.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from schemas.errors import ConfigError, StoreError, TransientError
from schemas.settings import StorageSettings

__all__ = [
    "MANIFEST",
    "MANIFEST_NAMES",
    "Storage",
    "HashingWriter",
    "Tier",
    "copy_file",
    "filesystem",
    "list_files",
    "open_new",
    "read_json",
    "read_manifest",
    "remove_tree",
    "sha256_of",
    "write_json",
    "write_parquet",
]

#: The manifest of a results folder: row counts, sizes, checksums, schema.
MANIFEST = "_manifest.json"
#: Its name before 0.2: results written then are still read (and moved) as they are.
LEGACY_MANIFEST = "manifest.json"
MANIFEST_NAMES = (MANIFEST, LEGACY_MANIFEST)

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


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def write_options(storage_class: str) -> dict[str, str]:
    """Extra ``fs.open`` arguments for an object of ``storage_class`` ("" = none)."""
    return {"StorageClass": storage_class} if storage_class else {}


def _atomic_write(url: str, data: bytes, storage_class: str = "") -> None:
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if _is_local(fs):
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb", **write_options(storage_class)) as fh:
            fh.write(data)


def write_parquet(table: pa.Table, url: str, storage_class: str = "") -> int:
    """Write ``table`` to ``url`` whole; return the number of bytes written.

    ``TransientError`` if storage fails (a 5xx after s3fs's own retries, a full
    disk): the caller retries or hands its work back.
    """
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    try:
        _atomic_write(url, data, storage_class)
    except OSError as exc:
        raise TransientError(f"could not write {url}: {exc}") from exc
    return len(data)


class HashingWriter:
    """A binary sink that counts and SHA-256s what goes through it (so a file is
    checksummed as it is written, never read back for it)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.size += len(view)
        self.raw.write(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


@contextmanager
def open_new(url: str, storage_class: str = "") -> Iterator[HashingWriter]:
    """Write a new file at ``url`` that appears whole or not at all (a temporary name
    and a rename on a local disk; one upload on S3, aborted on error), checksummed
    on the way."""
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    local = _is_local(fs)
    target = f"{parent}/.tmp-{uuid.uuid4().hex}" if local else path
    handle = fs.open(target, "wb", **({} if local else write_options(storage_class)))
    try:
        yield HashingWriter(handle)
    except BaseException:
        if local:
            handle.close()
            fs.rm(target)
        else:
            try:
                handle.discard()  # aborts the multipart upload: nothing appears
            finally:
                handle.closed = True  # closing would complete the upload
        raise
    handle.close()
    if local:
        fs.mv(target, path)


def write_json(obj: Any, url: str, storage_class: str = "") -> None:
    _atomic_write(url, json.dumps(obj, indent=2, sort_keys=True).encode(), storage_class)


def copy_file(source: str, target: str, storage_class: str = "", chunk: int = 1 << 22) -> tuple[int, str | None]:
    """Copy ``source`` to ``target``; return (bytes, sha256 of the bytes read).

    Within one filesystem (one local disk, or one S3 endpoint) the filesystem
    copies (the kernel, or S3 server-side) and nothing is read here: the digest is
    then None and the caller verifies the target. Otherwise the file is streamed.
    Either way the target appears whole or not at all (a temporary name and a
    rename on a local disk, a single copy or upload on S3).
    """
    fs_in, path_in = filesystem(source)
    fs_out, path_out = filesystem(target)
    parent = path_out.rsplit("/", 1)[0]
    fs_out.makedirs(parent, exist_ok=True)
    local = _is_local(fs_out)
    dest = f"{parent}/.tmp-{uuid.uuid4().hex}" if local else path_out
    if fs_in is fs_out:
        # cp_file: one file, never a glob (a name may hold '[' or '*')
        fs_out.cp_file(path_in, dest, **({} if local else write_options(storage_class)))
        if local:
            fs_out.mv(dest, path_out)
        fs_out.invalidate_cache(parent)
        return int(fs_out.size(path_out)), None
    digest, size = hashlib.sha256(), 0
    with (
        fs_in.open(path_in, "rb") as src,
        fs_out.open(dest, "wb", **({} if local else write_options(storage_class))) as dst,
    ):
        while block := src.read(chunk):
            digest.update(block)
            dst.write(block)
            size += len(block)
    if local:
        fs_out.mv(dest, path_out)
    return size, digest.hexdigest()


def read_json(url: str) -> Any:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as fh:
        return json.loads(fh.read())


def list_files(url: str) -> Iterator[tuple[str, int]]:
    """(path relative to ``url``, size) of every file under ``url``, sorted; nothing if absent."""
    fs, root = filesystem(url)
    fs.invalidate_cache()
    if not fs.exists(root):
        return
    root = root.rstrip("/")
    for path, info in sorted(fs.find(root, detail=True).items()):
        if info.get("type") != "directory":
            yield path[len(root) + 1 :], int(info.get("size") or 0)


def remove_tree(url: str) -> None:
    """Delete ``url`` and everything under it; nothing if it is absent."""
    fs, path = filesystem(url)
    fs.invalidate_cache()
    if fs.exists(path):
        fs.rm(path, recursive=True)


def read_manifest(folder: str) -> dict[str, Any]:
    """The manifest of the results folder ``folder`` (either name); ``StoreError`` naming it otherwise."""
    fs, path = filesystem(folder)
    for name in MANIFEST_NAMES:
        url = f"{folder.rstrip('/')}/{name}"
        try:
            manifest = read_json(url)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read the manifest {url}: {exc.__class__.__name__}: {exc}") from exc
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
            raise StoreError(f"the manifest {url} has no list of files")
        return manifest
    raise StoreError(f"no manifest ({MANIFEST}) in {folder}")


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

    def part_url(self, job_id: str, shard_index: int, first_row: int, attempt: int) -> str:
        """A new name for a part of ``attempt``: never the name of a part written before."""
        name = f"part-{first_row}-a{attempt}-{secrets.token_hex(4)}.parquet"
        return _join(self.job_url(job_id, "hot"), "shards", shard_index, name)

    def new_results_url(self, job_id: str, version: int = 1) -> str:
        """A fresh folder for one finalization (or, ``version`` > 1, one retry merge)."""
        name = f"results-{secrets.token_hex(4)}" if version == 1 else f"results-v{version}-{secrets.token_hex(4)}"
        return _join(self.job_url(job_id, "warm"), name)

    def checkpoints_url(self, job_id: str) -> str:
        """The folder of a job's part files (committed or orphan) in the hot tier."""
        return _join(self.job_url(job_id, "hot"), "shards")

    def storage_class(self, tier: Tier) -> str:
        return self.settings.storage_class(tier)
