"""Scheduled runs: cron + time zone logic, idempotent ticks on an injected clock,
catch-up policies, missing input, manual runs, multi-file inputs, and one real
Celery beat driving a real worker end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select, text

from pipeline.jobs.submit import JobRequest, submit
from pipeline.runtime import Runtime
from pipeline.store.db import session_scope
from pipeline.tasks import scheduler as schedules
from schemas.errors import ConfigError, InputError
from schemas.schedules import Schedule
from schemas.settings import load_settings
from schemas.status import RunStatus
from schemas.tables import Job, ScheduleRun
from tests.support import race, spotlane, stop_process, write_prompts

BERLIN = "Europe/Berlin"


def _at(text_: str) -> datetime:
    """A UTC instant from 'YYYY-MM-DD HH:MM'."""
    return datetime.strptime(text_, "%Y-%m-%d %H:%M").replace(tzinfo=UTC)


def _schedule(**kw: Any) -> Schedule:
    base = {
        "name": "nightly",
        "cron": "0 2 * * *",
        "timezone": BERLIN,
        "input": "/in/{date:%Y-%m-%d}/*.parquet",
        "model": "m",
    }
    return Schedule(**{**base, **kw})


# -- the schedule itself (pure) ----------------------------------------------------------


def test_fire_times_follow_the_local_clock_across_daylight_saving() -> None:
    s = _schedule()
    # Berlin leaves summer time at 03:00 on 2026-10-25: 02:00 happens twice that night
    # (00:00 and 01:00 UTC); the nightly run fires once, at the first.
    fires = s.fire_times(_at("2026-10-23 12:00"), _at("2026-10-26 12:00"))
    assert fires == [_at("2026-10-24 00:00"), _at("2026-10-25 00:00"), _at("2026-10-26 01:00")]
    assert [s.run_date(f) for f in fires] == ["2026-10-24", "2026-10-25", "2026-10-26"]
    # It enters summer time at 02:00 on 2026-03-29: 02:30 does not exist; the run is at 03:00 CEST.
    spring = _schedule(cron="30 2 * * *").fire_times(_at("2026-03-27 12:00"), _at("2026-03-30 12:00"))
    assert spring == [_at("2026-03-28 01:30"), _at("2026-03-29 01:00"), _at("2026-03-30 00:30")]
    assert s.next_fire(_at("2026-11-25 01:00")) == _at("2026-11-26 01:00")
    assert s.previous_fire(_at("2026-11-25 01:00")) == _at("2026-11-25 01:00")


def test_input_template_and_deadlines_are_read_in_the_schedule_zone() -> None:
    s = _schedule(input="s3://b/p/{date:%Y-%m-%d}/{yesterday:%d}-{name}.parquet", deadline="07:00")
    fire = _at("2026-11-25 01:00")  # 02:00 in Berlin
    assert s.input_url(fire) == "s3://b/p/2026-11-25/24-nightly.parquet"
    assert s.deadline_at(fire) == _at("2026-11-25 06:00")  # 07:00 Berlin, same morning
    assert _schedule(deadline="01:30").deadline_at(fire) == _at("2026-11-26 00:30")  # already past: next day
    assert _schedule(deadline="+6h").deadline_at(fire) == _at("2026-11-25 07:00")
    assert _schedule(deadline="").deadline_at(fire) is None
    assert s.fire_on(datetime(2026, 11, 3)) == _at("2026-11-03 01:00")
    weekdays = _schedule(cron="0 2 * * 1-5")
    assert weekdays.fire_on(datetime(2026, 11, 28)) == _at("2026-11-27 23:00")  # a Saturday: local midnight


@pytest.mark.parametrize(
    "template",
    [
        "s3://b/{date.tzinfo.__class__.__module__}/{date:%Y}",
        "s3://b/{name.__class__.__mro__}",
        "s3://b/{date[0]}",
        "s3://b/{0}",
        "s3://b/{date:%Y}/{",
    ],
)
def test_a_template_fills_its_three_fields_and_nothing_else(template: str) -> None:
    """Review L12: str.format let a template read attributes ({name.__class__.__mro__} rendered)."""
    with pytest.raises(ValueError, match="input template"):
        _schedule(input=template)
    assert _schedule(input="s3://b/{{literal}}/{date:%Y}").input_url(_at("2026-11-25 01:00")) == "s3://b/{literal}/2026"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("cron", '"0 25 * * *"', "schedules.0.cron"),
        ("timezone", '"Mars/Olympus"', "unknown time zone"),
        ("input", '"/in/{day}.parquet"', "input template"),
        ("deadline", '"7am"', "neither a local time"),
        ("on_missing", '"wait"', "schedules.0.on_missing"),
        ("catch_up", '"some"', "schedules.0.catch_up"),
        ("colour", '"red"', "unknown setting 'schedules.0.colour'"),
    ],
)
def test_a_bad_schedule_is_refused_naming_the_setting(tmp_path: Path, key: str, value: str, message: str) -> None:
    entries = {
        "name": '"n"',
        "cron": '"0 2 * * *"',
        "input": '"/in/{date:%Y-%m-%d}.parquet"',
        "model": '"m"',
        key: value,
    }
    config = tmp_path / "spotlane.toml"
    config.write_text("[[schedules]]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_settings(config)


# -- ticks on an injected clock ------------------------------------------------------------


def _partition(root: Path, day: str, files: int = 2, rows: int = 3) -> None:
    folder = root / day
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(files):
        table = pa.table(
            {"id": [f"{day}-{n}-{i}" for i in range(rows)], "prompt": [f"ticket {i}" for i in range(rows)]}
        )
        pq.write_table(table, folder / f"part-{n}.parquet")


def _rt(store_url: str, tmp_path: Path, tiny_model: Path, **overrides: Any) -> Runtime:
    from pipeline.store import db

    if not store_url.startswith("sqlite"):
        db.upgrade(db.engine_for(store_url))
    entry = {
        "name": "nightly",
        "cron": "0 2 * * *",
        "timezone": BERLIN,
        "model": str(tiny_model),
        "input": str(tmp_path / "prompts" / "{date:%Y-%m-%d}" / "*.parquet"),
        "deadline": "07:00",
        "budget_usd": 5.0,
        "tags": {"team": "support"},
        "max_tokens": 4,
        **overrides,
    }
    return Runtime.open(database={"url": store_url}, schedules=[entry])


def _runs(runtime: Runtime) -> list[tuple[str, str, str, str | None]]:
    with session_scope(runtime.engine) as session:
        return [
            (r.run_date, r.trigger, r.status.value, r.job_id)
            for r in session.execute(select(ScheduleRun).order_by(ScheduleRun.fire_at)).scalars()
        ]


def _jobs(runtime: Runtime) -> dict[str, Job]:
    with session_scope(runtime.engine) as session:
        jobs = list(session.execute(select(Job)).scalars())
        for job in jobs:
            session.expunge(job)
    return {job.id: job for job in jobs}


def _ticking_at_once(runtime: Runtime, beats: int, now: datetime) -> list[list[schedules.RunReport]]:
    """``beats`` schedulers calling ``tick`` at the same moment, on threads."""
    return race(*[partial(schedules.tick, runtime, now=now)] * beats)


def test_a_tick_submits_each_due_run_once_with_its_date_deadline_and_tags(
    store_url: str, tmp_path: Path, tiny_model: Path
) -> None:
    runtime = _rt(store_url, tmp_path, tiny_model)
    for day in ("2026-11-24", "2026-11-25"):
        _partition(tmp_path / "prompts", day)

    # First seen in the afternoon: that morning's 02:00 is history, not a missed run.
    assert schedules.tick(runtime, now=_at("2026-11-24 14:00")) == []
    reports = schedules.tick(runtime, now=_at("2026-11-25 01:00") + timedelta(seconds=20))
    assert [(r.run_date, r.trigger, r.status) for r in reports] == [("2026-11-25", "beat", "submitted")]
    job = _jobs(runtime)[reports[0].job_id]  # type: ignore[index]
    assert job.rows_total == 6  # two files of the partition, stitched into one input
    assert job.deadline == _at("2026-11-25 06:00")  # 07:00 in Berlin
    assert job.budget_usd == 5.0
    assert job.tags == {"team": "support", "schedule": "nightly", "run_date": "2026-11-25"}
    sources = json.loads(pq.read_schema(job.input_url).metadata[b"spotlane.sources"])
    assert [Path(s).name for s in sources] == ["part-0.parquet", "part-1.parquet"]

    # The same minute again, and two schedulers ticking at once: nothing new.
    assert schedules.tick(runtime, now=_at("2026-11-25 01:02")) == []
    results = _ticking_at_once(runtime, 2, _at("2026-11-25 01:05"))
    assert results == [[], []]
    assert len(_runs(runtime)) == 1 and len(_jobs(runtime)) == 1


def test_two_beats_racing_on_the_same_new_fire_time_make_one_job(
    store_url: str, tmp_path: Path, tiny_model: Path
) -> None:
    runtime = _rt(store_url, tmp_path, tiny_model)
    _partition(tmp_path / "prompts", "2026-11-25")
    schedules.tick(runtime, now=_at("2026-11-24 14:00"))
    reports = _ticking_at_once(runtime, 3, _at("2026-11-25 01:01"))
    assert sorted(len(r) for r in reports) == [0, 0, 1]
    assert [r[1:3] for r in _runs(runtime)] == [("beat", "submitted")]
    assert len(_jobs(runtime)) == 1


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (
            "latest",
            [
                ("2026-11-22", "catch_up", "skipped"),
                ("2026-11-23", "catch_up", "skipped"),
                ("2026-11-24", "catch_up", "skipped"),
                ("2026-11-25", "catch_up", "submitted"),
            ],
        ),
        (
            "all",
            [
                ("2026-11-22", "catch_up", "submitted"),
                ("2026-11-23", "catch_up", "submitted"),
                ("2026-11-24", "catch_up", "submitted"),
                ("2026-11-25", "catch_up", "submitted"),
            ],
        ),
        (
            "none",
            [
                ("2026-11-22", "catch_up", "skipped"),
                ("2026-11-23", "catch_up", "skipped"),
                ("2026-11-24", "catch_up", "skipped"),
                ("2026-11-25", "catch_up", "skipped"),
            ],
        ),
    ],
)
def test_runs_missed_while_the_scheduler_was_down_follow_the_catch_up_policy(
    runtime: Runtime, tmp_path: Path, tiny_model: Path, policy: str, expected: list[tuple[str, str, str]]
) -> None:
    runtime = _rt(str(runtime.engine.url), tmp_path, tiny_model, catch_up=policy)
    for day in ("2026-11-21", "2026-11-22", "2026-11-23", "2026-11-24", "2026-11-25"):
        _partition(tmp_path / "prompts", day, files=1)
    schedules.tick(runtime, now=_at("2026-11-20 14:00"))
    schedules.tick(runtime, now=_at("2026-11-21 01:00"))  # on time: the 21st runs
    # Down from the 21st until the 25th at noon (the 25th's 02:00 is 11 hours late).
    schedules.tick(runtime, now=_at("2026-11-25 12:00"))
    runs = _runs(runtime)
    assert runs[0][:3] == ("2026-11-21", "beat", "submitted")
    assert [r[:3] for r in runs[1:]] == expected
    submitted = [r for r in runs if r[2] == "submitted"]
    assert len(_jobs(runtime)) == len(submitted)
    with session_scope(runtime.engine) as session:
        messages = [
            r.message for r in session.execute(select(ScheduleRun).where(ScheduleRun.status == "skipped")).scalars()
        ]
    assert all(f"catch_up = {policy}" in (m or "") for m in messages)


def test_missing_input_is_skipped_or_failed_by_policy_and_a_manual_run_retries_it(
    runtime: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    url = str(runtime.engine.url)
    skipping = _rt(url, tmp_path, tiny_model, on_missing="skip")
    schedules.tick(skipping, now=_at("2026-11-24 14:00"))
    [report] = schedules.tick(skipping, now=_at("2026-11-25 01:00"))
    assert (report.status, report.job_id) == ("skipped", None)
    assert "no file matches" in (report.message or "") and "2026-11-25" in (report.message or "")

    failing = _rt(url, tmp_path, tiny_model, name="strict", on_missing="fail")
    schedules.tick(failing, now=_at("2026-11-25 01:30"))
    [report] = schedules.tick(failing, now=_at("2026-11-26 01:00"))
    assert report.status == "failed" and "input missing" in (report.message or "")

    # The data lands late; a manual run for that date submits it, once.
    _partition(tmp_path / "prompts", "2026-11-25")
    again = schedules.run_schedule(skipping, "nightly", date(2026, 11, 25))
    assert (again.status, again.new, again.trigger) == ("submitted", True, "manual")
    assert again.job_id in _jobs(skipping)
    twice = schedules.run_schedule(skipping, "nightly", date(2026, 11, 25))
    assert (twice.status, twice.new, twice.job_id) == ("submitted", False, again.job_id)
    assert len(_jobs(skipping)) == 1

    listed = {row["name"]: row for row in schedules.list_schedules(failing, now=_at("2026-11-26 12:00"))}
    assert listed["strict"]["last_run_date"] == "2026-11-26" and listed["strict"]["last_run_status"] == "failed"
    assert listed["strict"]["next_run"] == "2026-11-27T02:00:00+01:00"


def test_a_disabled_schedule_is_not_caught_up_when_enabled_again(
    runtime: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    url = str(runtime.engine.url)
    for day in ("2026-11-22", "2026-11-23", "2026-11-24", "2026-11-25"):
        _partition(tmp_path / "prompts", day, files=1)
    active = _rt(url, tmp_path, tiny_model, catch_up="all")
    schedules.tick(active, now=_at("2026-11-21 14:00"))
    assert len(schedules.tick(active, now=_at("2026-11-22 01:00"))) == 1
    paused = _rt(url, tmp_path, tiny_model, catch_up="all", enabled=False)
    assert schedules.tick(paused, now=_at("2026-11-23 01:00")) == []
    assert schedules.tick(paused, now=_at("2026-11-24 12:00")) == []
    # Enabled again on the 25th before 02:00: the 23rd and 24th were not "missed".
    schedules.tick(active, now=_at("2026-11-25 00:30"))
    schedules.tick(active, now=_at("2026-11-25 01:00"))
    assert [r[:3] for r in _runs(active)] == [("2026-11-22", "beat", "submitted"), ("2026-11-25", "beat", "submitted")]
    # Gone from the config: kept in SQL, disabled.
    schedules.tick(Runtime.open(database={"url": url}), now=_at("2026-11-25 02:00"))
    with session_scope(active.engine) as session:
        assert session.execute(text("select enabled from schedules where name = 'nightly'")).scalar_one() in (False, 0)


def test_a_manual_run_for_a_later_date_does_not_silence_the_days_before(
    runtime: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    runtime = _rt(str(runtime.engine.url), tmp_path, tiny_model)
    for day in ("2026-11-25", "2026-11-28"):
        _partition(tmp_path / "prompts", day, files=1)
    schedules.tick(runtime, now=_at("2026-11-24 14:00"))
    assert schedules.run_schedule(runtime, "nightly", date(2026, 11, 28)).status == "submitted"
    [report] = schedules.tick(runtime, now=_at("2026-11-25 01:00"))
    assert (report.run_date, report.status) == ("2026-11-25", "submitted")


def test_one_schedules_failure_is_recorded_and_does_not_hold_up_the_others(
    runtime: Runtime, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.jobs import submit as producer

    url = str(runtime.engine.url)
    entry = {
        "cron": "0 2 * * *",
        "timezone": BERLIN,
        "model": str(tiny_model),
        "input": str(tmp_path / "prompts" / "{date:%Y-%m-%d}" / "*.parquet"),
    }
    runtime = Runtime.open(database={"url": url}, schedules=[{"name": "a", **entry}, {"name": "b", **entry}])
    _partition(tmp_path / "prompts", "2026-11-25", files=1)
    real = producer.submit

    def storage_trouble_for_a(rt: Runtime, request: producer.JobRequest) -> str:
        if request.tags["schedule"] == "a":
            raise OSError("connection reset by peer")
        return real(rt, request)

    monkeypatch.setattr(producer, "submit", storage_trouble_for_a)
    schedules.tick(runtime, now=_at("2026-11-24 14:00"))
    reports = {r.schedule: r for r in schedules.tick(runtime, now=_at("2026-11-25 01:00"))}
    assert reports["a"].status == "failed" and "OSError: connection reset by peer" in (reports["a"].message or "")
    assert reports["b"].status == "submitted"
    monkeypatch.setattr(producer, "submit", real)
    assert schedules.run_schedule(runtime, "a", date(2026, 11, 25)).status == "submitted"  # retried by hand


def test_a_run_whose_submitter_died_is_submitted_again_under_the_same_job_id(
    runtime: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    runtime = _rt(str(runtime.engine.url), tmp_path, tiny_model)
    _partition(tmp_path / "prompts", "2026-11-25")
    schedules.tick(runtime, now=_at("2026-11-24 14:00"))
    fire = _at("2026-11-25 01:00")
    with session_scope(runtime.engine) as session:  # recorded, then the process died before submitting
        session.add(
            ScheduleRun(
                schedule="nightly",
                fire_at=fire,
                run_date="2026-11-25",
                trigger="beat",
                status=RunStatus.SUBMITTING,
                job_id="20261125-010000-abcdef",
                input_url=str(tmp_path / "prompts/2026-11-25/*.parquet"),
                created_at=fire,
                updated_at=fire,
            )
        )
    reports = schedules.tick(runtime, now=fire + timedelta(minutes=5))
    assert reports == []  # not stale yet: the submitter may still be at it
    reports = schedules.tick(runtime, now=fire + timedelta(minutes=11))
    assert [(r.status, r.job_id, r.new) for r in reports] == [("submitted", "20261125-010000-abcdef", False)]
    assert list(_jobs(runtime)) == ["20261125-010000-abcdef"]


def test_a_glob_input_is_stitched_and_errors_name_the_source_file(
    runtime: Runtime, tmp_path: Path, tiny_model: Path
) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    write_prompts(folder / "a.parquet", 3)
    pq.write_table(pa.table({"id": ["x", "row-00001"], "prompt": ["p", "q"]}), folder / "b.parquet")
    with pytest.raises(InputError) as err:
        submit(runtime, JobRequest(str(folder / "*.parquet"), str(tiny_model)))
    assert f"file {folder / 'b.parquet'}, column 'id', row 1: duplicate id 'row-00001'" in str(err.value)
    assert f"first in {folder / 'a.parquet'} at row 1" in str(err.value)
    pq.write_table(pa.table({"id": ["y"], "text": ["p"]}), folder / "c.parquet")
    with pytest.raises(InputError, match=r"c\.parquet, column 'prompt'"):
        submit(runtime, JobRequest(str(folder), str(tiny_model)))
    with pytest.raises(InputError, match="no file matches") as missing:
        submit(runtime, JobRequest(str(tmp_path / "nowhere" / "*.parquet"), str(tiny_model)))
    assert missing.value.missing
    assert _jobs(runtime) == {}
    (folder / "c.parquet").unlink()
    (folder / "b.parquet").unlink()
    write_prompts(folder / "b.parquet", 2, id=["b-0", "b-1"])
    job_id = submit(runtime, JobRequest(str(folder), str(tiny_model)))
    assert _jobs(runtime)[job_id].rows_total == 5


def test_the_schedules_commands_list_and_run(tmp_path: Path, tiny_model: Path) -> None:
    config = tmp_path / "spotlane.toml"
    config.write_text(
        "[[schedules]]\n"
        'name = "nightly"\ncron = "30 3 * * *"\ntimezone = "America/New_York"\n'
        f'input = "{tmp_path}/prompts/{{date:%Y-%m-%d}}/*.parquet"\nmodel = "{tiny_model}"\n'
        'deadline = "+4h"\non_missing = "fail"\n'
    )
    env = {"SPOTLANE_CONFIG": str(config)}
    listed = spotlane("schedules", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "nightly" in listed.stdout and "30 3 * * *" in listed.stdout and "never" in listed.stdout
    missing = spotlane("schedules", "run", "nightly", "--date", "2026-11-20", env=env)
    assert missing.returncode == 1 and "failed: input missing" in missing.stdout
    _partition(tmp_path / "prompts", "2026-11-20")
    ran = spotlane("schedules", "run", "nightly", "--date", "2026-11-20", env=env)
    assert ran.returncode == 0 and "submitted job" in ran.stdout, ran.stdout + ran.stderr
    rows = json.loads(spotlane("schedules", "--json", env=env).stdout)
    assert rows[0]["last_run_date"] == "2026-11-20" and rows[0]["last_job_status"] == "pending"
    assert spotlane("schedules", "run", "nobody", env=env).returncode != 0
    assert "not a date" in spotlane("schedules", "run", "nightly", "--date", "20/11", env=env).stderr


# -- one real beat, end to end ---------------------------------------------------------


def test_celery_beat_triggers_a_scheduled_run_once_and_the_lifecycle_moves_its_results(
    tmp_path: Path, tiny_model: Path
) -> None:
    """Two schedulers (a duplicated beat) and a worker over the embedded default:
    the run whose fire time just passed is submitted exactly once, the worker
    runs it, and the beat's storage sweep moves its results to cold."""
    now = datetime.now(UTC)
    fire = now.replace(second=0, microsecond=0)
    _partition(tmp_path / "prompts", fire.strftime("%Y-%m-%d"), files=2, rows=4)
    config = tmp_path / "spotlane.toml"
    config.write_text(
        "[scheduler]\ntick_seconds = 1\n"
        "[storage]\nsweep_interval_seconds = 2\ncold_after_days = 0.00003\n"
        "[[schedules]]\n"
        f'name = "nightly"\ncron = "{fire.minute} {fire.hour} * * *"\ntimezone = "UTC"\n'
        f'input = "{tmp_path}/prompts/{{date:%Y-%m-%d}}/*.parquet"\nmodel = "{tiny_model}"\nmax_tokens = 3\n'
    )
    env = {**os.environ, "SPOTLANE_CONFIG": str(config)}
    runtime = Runtime.open(config)
    with session_scope(runtime.engine) as session:  # the schedule was configured yesterday
        session.execute(
            text(
                "insert into schedules (name, cron, timezone, input_template, enabled, active_since, "
                "updated_at) values ('nightly', '', 'UTC', '', true, :t, :t)"
            ),
            {"t": now - timedelta(days=1)},
        )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            env=env,
            stdout=open(tmp_path / f"{name}.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        for name, args in (("worker", ["worker"]), ("beat1", ["scheduler"]), ("beat2", ["scheduler"]))
    ]
    try:
        deadline = time.monotonic() + 120
        state: tuple[Any, ...] = ()
        while time.monotonic() < deadline:
            with runtime.engine.connect() as conn:
                state = tuple(
                    conn.execute(
                        text(
                            "select r.status, j.status, j.result_tier, j.rows_total from schedule_runs r "
                            "left join jobs j on j.id = r.job_id"
                        )
                    ).all()
                )
            if state and state[0][2] == "cold":
                break
            time.sleep(0.5)
        assert state == (("submitted", "succeeded", "cold", 8),), state
    finally:
        for proc in procs:
            stop_process(proc)
    with runtime.engine.connect() as conn:
        assert conn.execute(text("select count(*) from jobs")).scalar_one() == 1
        assert conn.execute(text("select count(*) from schedule_runs")).scalar_one() == 1
        assert conn.execute(text("select action, status from storage_actions where action = 'move_to_cold'")).all() == [
            ("move_to_cold", "done")
        ]
    logs = (tmp_path / "beat1.log").read_text() + (tmp_path / "beat2.log").read_text()
    assert "spotlane.schedules_tick" in logs and "spotlane.storage_sweep" in logs
