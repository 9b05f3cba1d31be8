"""A new user's first hours, as ``first-hours-2026-11-26.md`` walked them: each finding,
attacked through the real CLI in child processes (the stub engine keeps them fast)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from tests.support import spotlane, write_prompts
from tests.support.jobs import model_folder

STUB = {"SPOTLANE_WORKER__ENGINE": "stub", "SPOTLANE_WORKER__STUB_SECONDS_PER_ROW": "0.01"}


def _sql(home: Path, query: str, **params: object) -> list[tuple[object, ...]]:
    engine = create_engine(f"sqlite:///{home / 'spotlane.db'}")
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(query), params)]
    finally:
        engine.dispose()


def _first_checkpoint(home: Path) -> bool:
    """Whether a checkpoint is written; the store may not exist, or hold its tables, yet."""
    if not (home / "spotlane.db").exists():
        return False
    try:
        return bool(_sql(home, "select 1 from checkpoints limit 1"))
    except OperationalError:  # no such table yet, or the store is locked by a migration
        return False


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_stopping_run_drains_keeps_the_rows_says_how_to_go_on_and_leaves_nothing_running(
    tmp_path: Path, spotlane_home: Path, sig: signal.Signals
) -> None:
    """Findings 1 and 5: SIGTERM/SIGHUP left an orphan worker; Ctrl-C said nothing and resume refused the job."""
    path = write_prompts(tmp_path / "in.parquet", 600)
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            str(path),
            "--model",
            model_folder(tmp_path),
            "--rows-per-shard",
            "100",
        ],
        env={**os.environ, **STUB, "SPOTLANE_WORKER__CHECKPOINT_ROWS": "20"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not _first_checkpoint(spotlane_home):
        assert time.monotonic() < deadline and run.poll() is None, run.communicate()
        time.sleep(0.1)
    children = _children(run.pid)
    run.send_signal(sig)
    out, err = run.communicate(timeout=60)

    assert run.returncode == 128 + sig, err
    assert children == []  # the job was worked in the process: nothing to orphan
    ((job_id, status, error),) = _sql(spotlane_home, "select id, status, error from jobs")
    kept = sum(int(r[0]) for r in _sql(spotlane_home, "select rows_done from shards"))
    assert status == "cancelled" and signal.Signals(sig).name in str(error)
    assert f"stopped: {kept:,} of 600 rows kept; `spotlane resume {job_id}` continues" in err
    assert 0 < kept < 600

    resumed = spotlane("run", "--job", job_id[:12], env=STUB)  # a unique prefix names the job
    assert resumed.returncode == 0, resumed.stderr
    out = tmp_path / "out.parquet"
    assert spotlane("results", "latest", "--to", str(out)).returncode == 0
    assert pq.read_table(out).column("id").to_pylist() == [f"row-{i:05d}" for i in range(600)]


def test_run_works_only_its_own_job_and_resume_says_when_no_worker_will(tmp_path: Path, spotlane_home: Path) -> None:
    """Finding 16: run's worker consumed every queue (and finished an interrupted job too)."""
    other = spotlane("submit", str(write_prompts(tmp_path / "other.parquet", 10)), "--model", model_folder(tmp_path))
    assert other.returncode == 0
    mine = spotlane(
        "run", str(write_prompts(tmp_path / "mine.parquet", 10)), "--model", model_folder(tmp_path), env=STUB
    )

    assert mine.returncode == 0 and "succeeded: 10 rows ok" in mine.stdout
    other_id = other.stdout.strip()
    assert _sql(spotlane_home, "select status from jobs where id = :j", j=other_id) == [("pending",)]
    assert _sql(
        spotlane_home,
        "select count(*) from shard_attempts a join shards s on s.id = a.shard_id where s.job_id = :j",
        j=other_id,
    ) == [(0,)]
    assert spotlane("cancel", other_id).returncode == 0
    resumed = spotlane("resume", other_id)
    assert resumed.returncode == 0 and "no worker consumes the 'control' queue" in resumed.stderr


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("demo/tiny-modle", "model path demo/tiny-modle is not a folder (did you mean demo/tiny-model?)"),
        ("someorg/no-such-model", "neither a local folder nor in the Hugging Face cache"),
        ("demo/broken", "config.json is not readable JSON"),
    ],
)
def test_a_model_that_will_not_resolve_is_refused_at_submit(tmp_path: Path, model: str, message: str) -> None:
    """Finding 4: a mistyped path was taken for a hub id, accepted, and failed ~50 s later."""
    (tmp_path / "demo" / "tiny-model").mkdir(parents=True)
    (tmp_path / "demo" / "tiny-model" / "config.json").write_text("{}")
    (tmp_path / "demo" / "broken").mkdir()
    (tmp_path / "demo" / "broken" / "config.json").write_text("{not json")
    path = write_prompts(tmp_path / "in.parquet", 3)

    submitted = spotlane("submit", str(path), "--model", model)
    planned = spotlane("plan", str(path), "--model", model)

    assert submitted.returncode == 2 and message in submitted.stderr
    assert planned.returncode == 2 and message in planned.stderr


def test_a_bad_output_target_is_refused_before_any_work(tmp_path: Path, spotlane_home: Path) -> None:
    """Finding 7: --output was checked only after the whole job had run (and paid)."""
    path = write_prompts(tmp_path / "in.parquet", 3)
    for target, message in (
        (str(tmp_path), "is a folder"),
        ("/proc/answers.parquet", "cannot write in /proc"),
        (str(tmp_path / "answers.txt"), "export to .parquet, .csv or .jsonl"),
    ):
        result = spotlane("run", str(path), "--model", model_folder(tmp_path), "--output", target, env=STUB)
        assert result.returncode == 2 and message in result.stderr, (target, result.stderr)
    assert not (spotlane_home / "spotlane.db").exists() or _sql(spotlane_home, "select count(*) from jobs") == [(0,)]


def test_exports_write_the_format_asked_for_and_errors_alone(tmp_path: Path) -> None:
    """Finding 19: --to x.csv wrote Parquet under that name; there was no --errors."""
    path = tmp_path / "in.parquet"
    pq.write_table(
        pa.table({"id": ["a", "b", "c"], "prompt": ["one question", "   ", "another one"], "team": ["x", "y", "z"]}),
        path,
    )
    assert spotlane("run", str(path), "--model", model_folder(tmp_path), env=STUB).returncode == 0

    assert spotlane("results", "latest", "--to", str(tmp_path / "all.csv")).returncode == 0
    assert spotlane("results", "latest", "--errors", str(tmp_path / "errors.jsonl")).returncode == 0

    lines = (tmp_path / "all.csv").read_text().splitlines()
    assert lines[0].startswith('"id","output"') and len(lines) == 4
    errors = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert [(e["id"], e["error"], e["team"]) for e in errors] == [("b", "prompt is empty", "y")]


def test_a_cancelled_jobs_finished_rows_can_be_exported(tmp_path: Path, spotlane_home: Path) -> None:
    """Finding 20: a cancelled job's kept rows could not be read."""
    from pipeline.routing.router import route_job
    from pipeline.runtime import Runtime
    from pipeline.store import transitions
    from pipeline.store.db import session_scope
    from workers.runner import ShardRunner

    submitted = spotlane(
        "submit",
        str(write_prompts(tmp_path / "in.parquet", 40)),
        "--model",
        model_folder(tmp_path),
        "--rows-per-shard",
        "20",
    )
    job_id = submitted.stdout.strip()
    runtime = Runtime.open(worker={"engine": "stub"})
    route_job(runtime, job_id)
    ((first,),) = _sql(spotlane_home, "select id from shards where job_id = :j and shard_index = 0", j=job_id)
    with session_scope(runtime.engine) as session:
        record = transitions.run_record(session, int(first))  # type: ignore[call-overload]
    ShardRunner(runtime).run(record)  # the first shard is done, then the job is cancelled
    assert spotlane("cancel", job_id).returncode == 0

    exported = spotlane("results", job_id, "--to", str(tmp_path / "kept.parquet"))

    assert exported.returncode == 0 and "exported 20 rows" in exported.stdout
    assert pq.read_table(tmp_path / "kept.parquet").column("id").to_pylist() == [f"row-{i:05d}" for i in range(20)]


def test_the_cli_follows_the_conventions_of_the_tools_people_trust(tmp_path: Path, spotlane_home: Path) -> None:
    """Findings 9 and 13."""
    bare = spotlane()
    assert bare.returncode == 0 and "Usage: spotlane" in bare.stdout and "error" not in bare.stderr
    assert spotlane("config").returncode == 0
    version = spotlane("--version")
    assert version.returncode == 0 and version.stdout.startswith("spotlane ")
    missing = spotlane("status")
    assert missing.returncode == 2 and "Missing argument 'JOB'" in missing.stderr
    bad_limit = spotlane("jobs", "--limit", "abc")
    assert bad_limit.returncode == 2 and "'--limit'" in bad_limit.stderr
    bad_status = spotlane("jobs", "--status", "bogus")
    assert bad_status.returncode == 2 and "'succeeded_with_errors'" in bad_status.stderr
    bad_task = spotlane("submit", "x.parquet", "--model", "m", "--task", "summarize")
    assert bad_task.returncode == 2 and "'generate'" in bad_task.stderr and "'embed'" in bad_task.stderr

    config = tmp_path / "elsewhere.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "other.db"}"\n')
    ids = []
    for n in range(2):
        result = spotlane(
            "submit",
            str(write_prompts(tmp_path / f"in{n}.parquet", 3)),
            "--model",
            model_folder(tmp_path),
            "--config",
            str(config),
        )  # --config after the command
        assert result.returncode == 0, result.stderr
        ids.append(result.stdout.strip())
    listed = spotlane("jobs", "--config", str(config), env={"COLUMNS": "80"})
    assert all(job_id in listed.stdout for job_id in ids)  # never cut at 80 columns
    assert spotlane("status", "latest", "--config", str(config), "--json").returncode == 0
    assert json.loads(spotlane("status", "latest", "-c", str(config), "--json").stdout)["job_id"] == ids[1]
    ambiguous = spotlane("status", ids[0][:9], "--config", str(config))
    assert ambiguous.returncode == 2 and "names 2 jobs" in ambiguous.stderr
    debug = spotlane("status", "nope", "--config", str(config), "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert (tmp_path / "other.db").exists() and not (spotlane_home / "spotlane.db").exists()


def test_odd_values_are_refused_naming_the_option(tmp_path: Path, spotlane_home: Path) -> None:
    """Finding 8: --temperature nan dumped SQL, -1 and --budget nan were accepted, past deadlines too."""
    path = write_prompts(tmp_path / "in.parquet", 3)
    for option, value, message in (
        ("--temperature", "nan", "--temperature must be a number in [0, 5]"),
        ("--temperature", "-1", "--temperature must be a number in [0, 5]"),
        ("--budget", "nan", "--budget must be a number of USD"),
        ("--deadline", "2020-01-01T00:00", "--deadline '2020-01-01T00:00' is in the past"),
    ):
        result = spotlane("submit", str(path), "--model", model_folder(tmp_path), option, value)
        assert result.returncode == 2 and message in result.stderr and "SQL" not in result.stderr, result.stderr


def test_read_only_commands_create_no_store_and_name_the_one_they_looked_for(tmp_path: Path) -> None:
    """Finding 15: `spotlane status` in another folder said 'no job' and created an empty store there."""
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "jobs"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "SPOTLANE_HOME"},
    )

    assert result.returncode == 2 and f"no job store at {elsewhere / '.spotlane' / 'spotlane.db'}" in result.stderr
    assert list(elsewhere.iterdir()) == []


def test_an_unwritable_home_is_named(tmp_path: Path) -> None:
    """Finding 25: a read-only home gave `OSError: [Errno 30] ... .migrate.lock`."""
    if os.geteuid() == 0:
        blocked = tmp_path / "file-not-folder"
        blocked.write_text("")
        home = blocked / "home"  # a home under a file: cannot be created even by root
    else:
        home = tmp_path / "ro"
        home.mkdir(mode=0o500)
    result = spotlane(
        "submit",
        str(write_prompts(tmp_path / "in.parquet", 3)),
        "--model",
        model_folder(tmp_path),
        env={"SPOTLANE_HOME": str(home)},
    )

    assert result.returncode != 0 and str(home) in result.stderr and "Traceback" not in result.stderr


def test_rows_a_request_cannot_be_made_of_become_error_rows_that_count_no_tokens(tmp_path: Path) -> None:
    """Findings 18 and 22: whitespace prompts ran, null content was sent as 'None', roles were not checked."""
    from workers.engines.chunks import prepare

    chat = pa.table(
        {
            "id": ["a", "b", "c", "d", "e"],
            "messages": pa.array(
                [
                    [{"role": "user", "content": "fine"}],
                    [{"role": "user", "content": None}],
                    [],
                    [{"role": "wizard", "content": "hi"}],
                    [{"role": "system", "content": "  "}],
                ],
                pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])),
            ),
        }
    )
    chunk = prepare(chat, 0, kind="messages", default_max_tokens=4, default_temperature=0.0, serves=lambda m: True)

    assert chunk.problems == [
        None,
        "message 0 has no content",
        "messages is empty",
        "message 0 has role 'wizard' (use system, developer, user, assistant, tool)",
        "every message is empty",
    ]


def test_a_job_whose_only_errors_are_the_rows_own_is_not_retried(tmp_path: Path) -> None:
    """Finding 20: retry-errors re-ran rows that fail the same way every time."""
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["fine", ""]}), path)
    assert spotlane("run", str(path), "--model", model_folder(tmp_path), env=STUB).returncode == 0

    retried = spotlane("retry-errors", "latest")

    assert retried.returncode == 1 and "failed for reasons a retry cannot change" in retried.stderr


def test_dictionary_encoded_text_columns_are_read_as_text(tmp_path: Path) -> None:
    """Finding 21: pandas categories and polars Categoricals were refused."""
    path = tmp_path / "in.parquet"
    pq.write_table(
        pa.table(
            {
                "id": pa.array(["a", "b", "c"]).dictionary_encode(),
                "prompt": pa.array(["x y", "x y", "z"]).dictionary_encode(),
            }
        ),
        path,
    )

    result = spotlane(
        "run", str(path), "--model", model_folder(tmp_path), "--output", str(tmp_path / "o.parquet"), env=STUB
    )

    assert result.returncode == 0, result.stderr
    assert pq.read_table(tmp_path / "o.parquet").column("output").to_pylist() == ["stub: x y", "stub: x y", "stub: z"]


def test_plan_prices_what_submit_would_run(tmp_path: Path) -> None:
    """Findings 10 and 14: a glob was refused, one huge max_tokens priced at $500,000."""
    for n in range(2):
        write_prompts(
            tmp_path / f"part-{n}.parquet", 5, max_tokens=[10**9] + [4] * 4, id=[f"{n}-{i}" for i in range(5)]
        )
    model = tmp_path / "ctx-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    config = tmp_path / "spotlane.toml"
    config.write_text('[[gpu_pools]]\nname = "local"\nprice_per_hour = 360.0\ntokens_per_second = 100\n')

    planned = spotlane(
        "--config", str(config), "plan", str(tmp_path / "part-*.parquet"), "--model", str(model), "--json"
    )

    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert plan["rows"] == 10 and plan["worst_case_usd"] < 2.0  # each row capped at the 512-token context


def test_config_errors_name_the_setting_and_odd_devices_are_refused(tmp_path: Path) -> None:
    """Finding 23."""
    device = spotlane("config", "show", env={"SPOTLANE_WORKER__DEVICE": "tpu"})
    tiers = spotlane(
        "config", "show", env={"SPOTLANE_STORAGE__WARM": "file:///data/r", "SPOTLANE_STORAGE__COLD": "file:///data/r"}
    )

    assert device.returncode == 2 and "worker.device" in device.stderr
    assert tiers.returncode == 2 and "setting ''" not in tiers.stderr and "must be separate places" in tiers.stderr


def test_run_takes_an_openai_batch_file_and_results_write_openais_output_and_error_files(tmp_path: Path) -> None:
    """Issue 15: a team's existing batch JSONL runs as it is; the results come back in OpenAI's format."""
    model = model_folder(tmp_path)
    path = tmp_path / "requests.jsonl"
    lines = [
        {
            "custom_id": "q1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        },
        {
            "custom_id": "q2",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": "   "}]},
        },
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    ran = spotlane("run", str(path), env=STUB)  # no --model: the lines name it
    assert ran.returncode == 0, ran.stderr
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    exported = spotlane("results", "latest", "--format", "openai", "--to", str(out), "--errors", str(err))
    assert exported.returncode == 0, exported.stderr
    answered = [json.loads(line) for line in out.read_text().splitlines()]
    failed = [json.loads(line) for line in err.read_text().splitlines()]
    assert [a["custom_id"] for a in answered] == ["q1"] and answered[0]["response"]["body"][
        "object"
    ] == "chat.completion"
    assert [f["custom_id"] for f in failed] == ["q2"] and failed[0]["error"]["code"] == "request_failed"

    path.write_text(json.dumps(lines[0]) + "\n" + "{not json\n")
    refused = spotlane("run", str(path), env=STUB)
    assert refused.returncode == 2 and "line 2" in refused.stderr and str(path) in refused.stderr
