"""Object-storage contract tests, on local folders and on an S3 server."""

from __future__ import annotations

import hashlib
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.storage.objects import Storage, filesystem, open_new, read_json, sha256_of, write_json, write_parquet
from schemas.settings import StorageSettings


def test_a_parquet_part_round_trips_at_its_layout_path(tier_root: str) -> None:
    storage = Storage(StorageSettings(hot=f"{tier_root}/hot", warm=f"{tier_root}/warm", cold=f"{tier_root}/cold"))
    table = pa.table({"id": ["a", "b"], "output": ["x", None]})
    url = storage.part_url("job-1", 3, 1200, attempt=2)

    size = write_parquet(table, url)

    assert re.fullmatch(rf"{re.escape(tier_root)}/hot/jobs/job-1/shards/3/part-1200-a2-[0-9a-f]{{8}}\.parquet", url)
    fs, path = filesystem(url)
    assert fs.size(path) == size
    with fs.open(path, "rb") as fh:
        assert pq.read_table(fh).equals(table)


def test_every_write_of_a_part_gets_a_name_of_its_own(tier_root: str) -> None:
    """Review H1: a part named by its first row alone let a stale worker overwrite the
    part another attempt had committed."""
    storage = Storage(StorageSettings(hot=f"{tier_root}/hot", warm=f"{tier_root}/warm", cold=f"{tier_root}/cold"))

    names = {storage.part_url("job-1", 0, 0, attempt=a) for a in (1, 1, 2, 2)}

    assert len(names) == 4
    assert len({storage.new_results_url("job-1") for _ in range(3)}) == 3


def test_open_new_shows_nothing_until_the_file_is_whole(tier_root: str) -> None:
    url = f"{tier_root}/warm/results-x/part-00000.parquet"
    fs, path = filesystem(url)

    with pytest.raises(RuntimeError), open_new(url) as sink:
        sink.write(b"half a file")
        raise RuntimeError("the writer died")
    fs.invalidate_cache()
    assert not fs.exists(path)

    with open_new(url) as sink:
        sink.write(b"a whole file")
    fs.invalidate_cache()
    assert fs.cat_file(path) == b"a whole file" and sink.size == 12
    assert sink.digest.hexdigest() == hashlib.sha256(b"a whole file").hexdigest()
    assert [p for p in fs.find(path.rsplit("/", 1)[0]) if ".tmp-" in p] == []


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
