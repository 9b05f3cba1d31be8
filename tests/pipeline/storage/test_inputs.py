from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

from pipeline.storage.inputs import _hashes, inspect_input, iter_rows
from schemas.arrow import MESSAGE_TYPE
from schemas.errors import InputError
from tests.support import spotlane, write_prompts


def test_a_valid_file_is_described_by_its_footer(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "in.parquet", 5, max_tokens=[4] * 5, team=["a"] * 5, metadata=["{}"] * 5)

    info = inspect_input(str(path))

    assert info.rows == 5
    assert info.kind == "prompt"
    assert info.carried_columns == ("team", "metadata")  # input order
    assert info.request_columns == ("max_tokens",)
    assert info.url == str(path.resolve())


def test_messages_are_accepted_as_a_list_of_role_and_content(tmp_path: Path) -> None:
    path = tmp_path / "chat.parquet"
    messages = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "bye"}]]
    pq.write_table(pa.table({"id": ["a", "b"], "messages": pa.array(messages, MESSAGE_TYPE)}), path)

    assert inspect_input(str(path)).kind == "messages"


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"prompt": ["x"]}, "column 'id': required column is missing"),
        ({"id": ["a"]}, "column 'prompt': required column is missing"),
        ({"id": [1], "prompt": ["x"]}, "column 'id': must be a string"),
        ({"id": ["a"], "prompt": [3]}, "column 'prompt': must be a string"),
        ({"id": ["a"], "prompt": ["x"], "messages": [["y"]]}, "not both"),
        ({"id": ["a"], "messages": [["y"]]}, "column 'messages': must be a list of"),
        ({"id": ["a"], "prompt": ["x"], "max_tokens": ["ten"]}, "column 'max_tokens': must be an integer"),
        ({"id": ["a"], "prompt": ["x"], "temperature": ["hot"]}, "column 'temperature': must be a number"),
    ],
)
def test_a_bad_schema_is_refused_naming_the_column(
    tmp_path: Path, columns: dict[str, list[object]], message: str
) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(columns), path)

    with pytest.raises(InputError, match=message):
        inspect_input(str(path))


def test_a_null_id_is_refused_naming_its_row(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    ids = [f"r{i}" for i in range(200)]
    ids[137] = None  # type: ignore[call-overload]
    pq.write_table(pa.table({"id": ids, "prompt": ["p"] * 200}), path, row_group_size=50)

    with pytest.raises(InputError, match=r"column 'id', row 137: id is null"):
        inspect_input(str(path))


def test_a_duplicate_id_is_refused_naming_both_rows(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    ids = [f"r{i}" for i in range(300)]
    ids[250] = "r17"
    pq.write_table(pa.table({"id": ids, "prompt": ["p"] * 300}), path, row_group_size=64)

    with pytest.raises(InputError, match=r"row 250: duplicate id 'r17' \(first at row 17\)"):
        inspect_input(str(path))


@given(st.lists(st.text(max_size=40), min_size=1, max_size=60), st.data())
@settings(max_examples=150, deadline=None, derandomize=True)
def test_an_id_hashes_alike_in_any_batch_and_every_duplicate_is_found(ids: list[str], data: st.DataObject) -> None:
    """Ids of one length hash word by word, mixed lengths byte by byte: an id must get
    the same hash either way (the two passes and the batches differ), and a duplicate
    anywhere in the file is refused whatever the ids look like."""
    mixed = _hashes(pa.array(ids)).tolist()
    for i, value in enumerate(ids):
        assert _hashes(pa.array([value, value])).tolist()[0] == mixed[i]
        assert _hashes(pa.array(["", value, "x" * 70]).slice(1, 1)).tolist() == [mixed[i]]

    folder = Path(tempfile.mkdtemp())
    try:
        rows = ids + [data.draw(st.sampled_from(ids))] if data.draw(st.booleans()) else ids
        path = folder / "in.parquet"
        pq.write_table(pa.table({"id": rows, "prompt": ["p"] * len(rows)}), path, row_group_size=7)
        if len(set(rows)) == len(rows):
            assert inspect_input(str(path)).rows == len(rows)
        else:
            with pytest.raises(InputError, match="duplicate id"):
                inspect_input(str(path))
    finally:
        shutil.rmtree(folder)


def test_missing_empty_and_unreadable_files_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}), empty)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_text("this is not parquet")

    with pytest.raises(InputError, match="does not exist"):
        inspect_input(str(tmp_path / "nope.parquet"))
    with pytest.raises(InputError, match="no rows"):
        inspect_input(str(empty))
    with pytest.raises(InputError, match="not a readable Parquet file"):
        inspect_input(str(garbage))


def test_row_ranges_are_read_exactly_across_row_groups(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "in.parquet", 1000, row_group_size=97)

    for start, end in [(0, 10), (90, 200), (96, 97), (500, 1000), (999, 1000)]:
        table = pa.Table.from_batches(list(iter_rows(str(path), start, end, ["id"])))
        assert table.column("id").to_pylist() == [f"row-{i:05d}" for i in range(start, end)]


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: pq.write_table(pa.table({"prompt": ["x"]}), d / "in.parquet"), "column 'id'"),
        (
            lambda d: pq.write_table(pa.table({"id": ["a", "a"], "prompt": ["x", "y"]}), d / "in.parquet"),
            "duplicate id",
        ),
        (lambda d: (d / "in.parquet").write_bytes(b"PAR1garbage"), "not a readable Parquet file"),
    ],
)
def test_submit_refuses_bad_input_with_exit_2_and_enqueues_nothing(
    tmp_path: Path, spotlane_home: Path, tiny_model: Path, make: object, needle: str
) -> None:
    make(tmp_path)  # type: ignore[operator]

    result = spotlane("submit", str(tmp_path / "in.parquet"), "--model", str(tiny_model))

    assert result.returncode == 2
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    with create_engine(f"sqlite:///{spotlane_home / 'spotlane.db'}").connect() as conn:
        assert conn.execute(text("select count(*) from jobs")).scalar_one() == 0
    queue = spotlane_home / "broker" / "queue"
    assert not queue.exists() or not any(queue.iterdir())


def test_submit_refuses_an_unknown_model_path(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "in.parquet", 3)

    missing = spotlane("submit", str(path), "--model", "./no-such-model")
    not_a_model = spotlane("submit", str(path), "--model", str(tmp_path))

    assert missing.returncode == 2 and "no-such-model" in missing.stderr
    assert not_a_model.returncode == 2 and "config.json" in not_a_model.stderr


def test_an_uncached_hub_model_is_refused_when_offline(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "in.parquet", 3)

    result = spotlane("submit", str(path), "--model", "some-org/not-cached-model", env={"HF_HUB_OFFLINE": "1"})

    assert result.returncode == 2
    assert "some-org/not-cached-model" in result.stderr


@pytest.mark.parametrize("column", ["error", "output", "cost_usd", "backend", "attempt", "embedding"])
def test_a_column_named_like_an_output_column_is_refused_before_any_work(tmp_path: Path, column: str) -> None:
    """Review M6: the job ran and was paid for, then finalizing failed on two 'error' columns."""
    path = write_prompts(tmp_path / "in.parquet", 3, **{column: ["x", "y", "z"]})

    with pytest.raises(InputError, match=f"column '{column}': is also the name of an output column"):
        inspect_input(str(path))


def test_a_row_model_that_is_neither_the_jobs_nor_a_named_one_is_refused_at_submit(tmp_path: Path) -> None:
    """Review M5: any folder or hub id an input row named was loaded by '*' pools."""
    from tests.support.jobs import model_folder

    model = model_folder(tmp_path)
    path = write_prompts(tmp_path / "in.parquet", 4, model=[None, model, "/etc/secret-model", None])

    result = spotlane("submit", str(path), "--model", model)

    assert result.returncode == 2
    assert "column 'model', row 2: model '/etc/secret-model' is neither one of the job's models" in result.stderr


def test_a_row_model_that_cannot_load_fails_its_rows_not_the_shard(tmp_path: Path, tiny_model: Path) -> None:
    """Review M5: one unloadable row model failed the shard, then the job."""
    from pipeline.runtime import Runtime
    from schemas.inference import Request
    from workers.engines.factory import GpuEngines

    settings = Runtime.open().settings.worker
    engine = GpuEngines(str(tiny_model), settings)

    done = engine.generate(
        [Request(prompt="hello", max_tokens=2), Request(prompt="hi", max_tokens=2, model=str(tmp_path / "missing"))]
    )

    assert done[0].error is None and done[1].error is not None and "could not be loaded" in done[1].error


@pytest.mark.parametrize(
    "url",
    [
        "http://reader:Sup3rS3cret@127.0.0.1/in.parquet",
        "s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/in.parquet",
        "https://bucket.s3.amazonaws.com/in.parquet?X-Amz-Credential=AKIA&X-Amz-Signature=abc123",
    ],
)
def test_credentials_in_an_input_url_are_refused_and_never_echoed(url: str) -> None:
    """Review L2: they were stored in jobs.input_url and the manifest, and shown by status."""
    from pipeline.storage.inputs import refuse_credentials

    with pytest.raises(InputError, match="credentials|signature or token") as refused:
        refuse_credentials(url)
    assert "Sup3rS3cret" not in str(refused.value) and "wJalrXUtnFEMI" not in str(refused.value)
    assert "abc123" not in str(refused.value)


def test_a_worker_reads_a_shard_of_huge_prompts_a_few_rows_at_a_time(tmp_path: Path) -> None:
    """Review L7: 4,096-row read batches of 50 kB prompts took 620 MB to read 256 rows."""
    from pipeline.storage.inputs import BATCH_BYTES, iter_rows, open_parquet

    path = write_prompts(tmp_path / "big.parquet", 2000, prompt=[("word " * 10_000) + str(i) for i in range(2000)])

    batches = list(iter_rows(str(path), 0, 2000, ["id", "prompt"], batch_size=256))

    per_row = 50_000
    assert max(len(b) for b in batches) <= BATCH_BYTES // per_row + 1
    assert sum(len(b) for b in batches) == 2000 and open_parquet(str(path)).metadata.num_rows == 2000


def test_a_row_reader_serves_any_ranges_as_reading_each_from_scratch_would(tmp_path: Path) -> None:
    """The router's one pass over the input: ascending shards continue one reader; a range
    behind it, or far ahead, reopens; either way the rows are those of the range."""
    from random import Random

    from pipeline.storage.inputs import REOPEN_GAP, RowReader, iter_rows

    path = str(write_prompts(tmp_path / "in.parquet", 3 * REOPEN_GAP // 2, row_group_size=10_000))
    reader = RowReader(path, ["id"])
    rng = Random(5)
    total = 3 * REOPEN_GAP // 2
    ranges = [(s, s + 500) for s in range(0, 20_000, 500)]  # a router's shards in order
    ranges += [(s, s + rng.randint(0, 3000)) for s in (rng.randrange(total) for _ in range(40))]  # anywhere
    ranges += [(total - 10, total + 50), (5, 5), (0, 1)]  # past the end, empty, back to the start
    for start, end in ranges:
        got = [i for b in reader.take(start, end) for i in b.column(0).to_pylist()]
        want = [i for b in iter_rows(path, start, min(end, total), ["id"]) for i in b.column(0).to_pylist()]
        assert got == want == [f"row-{n:05d}" for n in range(start, min(end, total))], (start, end)
