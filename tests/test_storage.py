"""Object-storage contract tests, on local folders and on an S3 server."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import Storage, filesystem, read_json, sha256_of, write_json, write_parquet
from schemas.settings import StorageSettings


def test_a_parquet_part_round_trips_at_its_layout_path(tier_root: str) -> None:
    storage = Storage(StorageSettings(hot=f"{tier_root}/hot", warm=f"{tier_root}/warm", cold=f"{tier_root}/cold"))
    table = pa.table({"id": ["a", "b"], "output": ["x", None]})
    url = storage.part_url("job-1", 3, 1200)

    size = write_parquet(table, url)

    assert url == f"{tier_root}/hot/jobs/job-1/shards/3/part-1200.parquet"
    fs, path = filesystem(url)
    assert fs.size(path) == size
    with fs.open(path, "rb") as fh:
        assert pq.read_table(fh).equals(table)


def test_rewriting_a_part_replaces_it_whole(tier_root: str) -> None:
    url = f"{tier_root}/hot/part-0.parquet"
    write_parquet(pa.table({"id": ["old"] * 1000}), url)

    write_parquet(pa.table({"id": ["new"]}), url)

    fs, path = filesystem(url)
    with fs.open(path, "rb") as fh:
        assert pq.read_table(fh).column("id").to_pylist() == ["new"]
    leftovers = [p for p in fs.ls(path.rsplit("/", 1)[0]) if ".tmp-" in p]
    assert leftovers == []


def test_json_and_checksums(tier_root: str) -> None:
    url = f"{tier_root}/warm/manifest.json"

    write_json({"rows": 3, "files": []}, url)

    assert read_json(url) == {"rows": 3, "files": []}
    fs, path = filesystem(url)
    assert sha256_of(url) == hashlib.sha256(fs.cat(path)).hexdigest()
