"""Scheduled runs: ``[[schedules]]`` turned into jobs, each fire time exactly once.

The scheduler (Celery beat) sends ``spotlane.schedules_tick`` every
``scheduler.tick_seconds``; ``tick`` then works out, from the cron expressions,
the clock and the runs already recorded in SQL, which runs are due. It keeps no
state of its own, so a restarted or duplicated beat changes nothing:

- A run is recorded in ``schedule_runs`` before it is submitted, under the unique
  key (schedule, fire time) (for a daily schedule: schedule + date). A second
  tick, beat or ``spotlane schedules run`` for the same fire time finds the row
  and submits nothing. The job id is chosen when the row is recorded, so a submit
  retried after a crash cannot create a second job.
- Fire times missed while the scheduler was down are caught up or skipped by the
  schedule's ``catch_up`` policy; skipped runs are recorded too.
- Missing input (no file matches the template) records a ``skipped`` or
  ``failed`` run by the schedule's ``on_missing``; ``spotlane schedules run``
  tries such a run again.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from typing import Any, TypedDict

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from pipeline import metrics
from pipeline.jobs import submit as producer
from pipeline.runtime import Runtime
from pipeline.store.db import session_scope
from pipeline.store.guards import matched
from schemas.base import utcnow
from schemas.errors import ConfigError, InputError, SpotlaneError
from schemas.schedules import Schedule
from schemas.status import RunStatus
from schemas.tables import Job, ScheduleRecord, ScheduleRun

__all__ = ["RunReport", "ScheduleStatus", "list_schedules", "run_schedule", "tick"]

log = logging.getLogger(__name__)

#: A run left ``submitting`` this long (its submitter died) is submitted again.
STALE_SUBMIT = timedelta(minutes=10)


@dataclass
class RunReport:
    schedule: str
    fire_at: str
    run_date: str
    trigger: str
    status: str
    job_id: str | None
    input_url: str
    message: str | None
    #: False when the run had been recorded before (nothing was submitted now).
    new: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ScheduleStatus(TypedDict):
    """One schedule in ``list_schedules``: its next fire time and its last run (local ISO times)."""

    name: str
    cron: str
    timezone: str
    enabled: bool
    next_run: str | None
    last_run: str | None
    last_run_date: str | None
    last_run_status: str | None
    last_job_id: str | None
    last_job_status: str | None
    last_message: str | None


def _report(run: ScheduleRun, new: bool) -> RunReport:
    return RunReport(
        run.schedule,
        run.fire_at.isoformat(),
        run.run_date,
        run.trigger,
        run.status.value,
        run.job_id,
        run.input_url,
        run.message,
        new,
    )


def _schedule(runtime: Runtime, name: str) -> Schedule:
    for schedule in runtime.settings.schedules:
        if schedule.name == name:
            return schedule
    known = ", ".join(s.name for s in runtime.settings.schedules) or "none configured"
    raise ConfigError(f"no schedule named {name!r} in [[schedules]] (known: {known})", setting="schedules")


def _sync(runtime: Runtime, now: datetime) -> dict[str, ScheduleRecord]:
    """Mirror the configured schedules into the ``schedules`` table; a schedule
    gone from the config is kept there, disabled."""
    records: dict[str, ScheduleRecord] = {}
    configured = [s.name for s in runtime.settings.schedules]
    with session_scope(runtime.engine) as session:
        session.execute(
            update(ScheduleRecord)
            .where(ScheduleRecord.name.not_in(configured), ScheduleRecord.enabled)
            .values(enabled=False, next_fire_at=None, updated_at=now)
        )
    for schedule in runtime.settings.schedules:
        values: dict[str, Any] = {
            "cron": schedule.cron,
            "timezone": schedule.timezone,
            "input_template": schedule.input,
            "enabled": schedule.enabled,
            "next_fire_at": schedule.next_fire(now) if schedule.enabled else None,
            "updated_at": now,
        }
        if not schedule.enabled:
            values["active_since"] = now  # re-enabled later, it starts from then
        try:
            with session_scope(runtime.engine) as session:
                record = session.get(ScheduleRecord, schedule.name)
                if record is None:
                    record = ScheduleRecord(name=schedule.name, **{"active_since": now, **values})
                    session.add(record)
                else:
                    if not record.enabled and schedule.enabled:
                        values["active_since"] = now
                    for key, value in values.items():
                        setattr(record, key, value)
                session.flush()
                session.expunge(record)
        except IntegrityError:  # another scheduler inserted it at the same moment
            with session_scope(runtime.engine) as session:
                record = session.get(ScheduleRecord, schedule.name)
                assert record is not None
                session.expunge(record)
        records[schedule.name] = record
    return records


def _record(
    runtime: Runtime,
    schedule: Schedule,
    fire: datetime,
    trigger: str,
    status: RunStatus = RunStatus.SUBMITTING,
    message: str | None = None,
) -> ScheduleRun | None:
    """Insert the run's row; None if this fire time is already recorded."""
    now = utcnow()
    run = ScheduleRun(
        schedule=schedule.name,
        fire_at=fire,
        run_date=schedule.run_date(fire),
        trigger=trigger,
        status=status,
        job_id=producer.new_job_id() if status is RunStatus.SUBMITTING else None,
        input_url=schedule.input_url(fire),
        message=message,
        created_at=now,
        updated_at=now,
    )
    try:
        with session_scope(runtime.engine) as session:
            session.add(run)
            session.flush()
            session.expunge(run)
    except IntegrityError:
        return None
    return run


def _finish(runtime: Runtime, run: ScheduleRun, status: RunStatus, message: str | None) -> None:
    with session_scope(runtime.engine) as session:
        session.execute(
            update(ScheduleRun)
            .where(ScheduleRun.id == run.id)
            .values(
                status=status,
                message=message,
                updated_at=utcnow(),
                job_id=run.job_id if status is RunStatus.SUBMITTED else None,
            )
        )
    run.status, run.message = status, message
    metrics.SCHEDULE_RUNS.labels(run.schedule, status.value).inc()
    if status is not RunStatus.SUBMITTED:
        run.job_id = None


def _submit(runtime: Runtime, schedule: Schedule, run: ScheduleRun) -> None:
    """Submit the run's job under its pre-chosen id, and record the outcome."""
    assert run.job_id is not None
    fire = run.fire_at
    options = schedule.job_options()
    options["tags"] = {**schedule.tags, "schedule": schedule.name, "run_date": run.run_date}
    request = producer.JobRequest(run.input_url, deadline=schedule.deadline_at(fire), job_id=run.job_id, **options)
    try:
        producer.submit(runtime, request)
    except InputError as exc:
        if exc.missing and schedule.on_missing == "skip":
            _finish(runtime, run, RunStatus.SKIPPED, f"input missing: {exc}")
            log.warning("schedule %s, run %s: input missing, skipped: %s", schedule.name, run.run_date, exc)
        else:
            _finish(runtime, run, RunStatus.FAILED, f"input {'missing' if exc.missing else 'refused'}: {exc}")
            log.error("schedule %s, run %s failed: %s", schedule.name, run.run_date, exc)
        return
    except SpotlaneError as exc:  # a model that does not resolve, a bad setting
        _finish(runtime, run, RunStatus.FAILED, str(exc))
        log.error("schedule %s, run %s failed: %s", schedule.name, run.run_date, exc)
        return
    except Exception as exc:  # storage or database trouble: recorded; `schedules run` retries it
        _finish(runtime, run, RunStatus.FAILED, f"submit failed: {exc.__class__.__name__}: {exc}")
        log.exception("schedule %s, run %s: submit failed", schedule.name, run.run_date)
        return
    _finish(runtime, run, RunStatus.SUBMITTED, None)
    log.info("schedule %s, run %s (%s): submitted job %s", schedule.name, run.run_date, run.trigger, run.job_id)


def _due(schedule: Schedule, since: datetime, now: datetime) -> list[tuple[datetime, str | None]]:
    """(fire time, None to submit or the reason to skip) for fire times in (since, now]."""
    fires = schedule.fire_times(since, now, limit=schedule.max_catch_up)
    grace = timedelta(minutes=schedule.misfire_grace_minutes)
    plan: list[tuple[datetime, str | None]] = []
    for i, fire in enumerate(fires):
        late = now - fire > grace
        if not late or schedule.catch_up == "all":
            plan.append((fire, None))
        elif schedule.catch_up == "latest" and i == len(fires) - 1:
            plan.append((fire, None))
        elif schedule.catch_up == "latest":
            plan.append(
                (
                    fire,
                    f"missed while the scheduler was down; superseded by the run of "
                    f"{schedule.run_date(fires[-1])} (catch_up = latest)",
                )
            )
        else:
            plan.append((fire, "missed while the scheduler was down (catch_up = none)"))
    return plan


def tick(runtime: Runtime, now: datetime | None = None) -> list[RunReport]:
    """Record and submit every due run; ``now`` is injectable for tests."""
    now = now or utcnow()
    records = _sync(runtime, now)
    reports: list[RunReport] = []
    for schedule in runtime.settings.schedules:
        if not schedule.enabled:
            continue
        try:
            reports.extend(_tick_one(runtime, schedule, records[schedule.name], now))
        except Exception:  # one schedule's trouble does not hold up the others
            log.exception("schedule %s: tick failed; the next tick tries again", schedule.name)
    return reports


def _tick_one(runtime: Runtime, schedule: Schedule, record: ScheduleRecord, now: datetime) -> list[RunReport]:
    reports: list[RunReport] = []
    with session_scope(runtime.engine) as session:
        # Runs recorded ahead of time by hand (--date in the future) do not count.
        last = session.execute(
            select(func.max(ScheduleRun.fire_at)).where(
                ScheduleRun.schedule == schedule.name, ScheduleRun.fire_at <= now
            )
        ).scalar_one_or_none()
        stale = list(
            session.execute(
                select(ScheduleRun).where(
                    ScheduleRun.schedule == schedule.name,
                    ScheduleRun.status == RunStatus.SUBMITTING,
                    ScheduleRun.updated_at < now - STALE_SUBMIT,
                )
            ).scalars()
        )
        for run in stale:
            session.expunge(run)
    for run in stale:  # its submitter died: claim it, then submit under the same job id
        with session_scope(runtime.engine) as session:
            claimed = matched(
                session.execute(
                    update(ScheduleRun)
                    .where(
                        ScheduleRun.id == run.id,
                        ScheduleRun.status == RunStatus.SUBMITTING,
                        ScheduleRun.updated_at == run.updated_at,
                    )
                    .values(updated_at=now)
                )
            )
        if claimed:
            _submit(runtime, schedule, run)
            reports.append(_report(run, False))
    since = max(filter(None, [last, record.active_since]))
    for fire, skip in _due(schedule, since, now):
        trigger = "beat" if now - fire <= timedelta(minutes=schedule.misfire_grace_minutes) else "catch_up"
        recorded = _record(runtime, schedule, fire, trigger, *((RunStatus.SKIPPED, skip) if skip else ()))
        if recorded is not None and skip is not None:
            metrics.SCHEDULE_RUNS.labels(schedule.name, RunStatus.SKIPPED.value).inc()
        if recorded is not None and skip is None:
            _submit(runtime, schedule, recorded)
        if recorded is not None:
            reports.append(_report(recorded, True))
    return reports


def run_schedule(runtime: Runtime, name: str, on: date | None = None) -> RunReport:
    """Trigger schedule ``name`` by hand for local date ``on`` (default: today there).

    The run is the cron's fire time on that date (midnight if the cron does not
    fire that day), so a manual run and the beat's never both submit. A run that
    was skipped or failed is tried again; a submitted one is reported as it is.
    """
    schedule = _schedule(runtime, name)
    now = utcnow()
    _sync(runtime, now)
    day = on or schedule.local(now).date()
    fire = schedule.fire_on(datetime(day.year, day.month, day.day))
    run = _record(runtime, schedule, fire, "manual")
    if run is not None:
        _submit(runtime, schedule, run)
        return _report(run, True)
    with session_scope(runtime.engine) as session:
        retried = matched(
            session.execute(
                update(ScheduleRun)
                .where(
                    ScheduleRun.schedule == name,
                    ScheduleRun.fire_at == fire,
                    ScheduleRun.status.in_((RunStatus.SKIPPED, RunStatus.FAILED)),
                )
                .values(
                    status=RunStatus.SUBMITTING,
                    job_id=producer.new_job_id(),
                    trigger="manual",
                    input_url=schedule.input_url(fire),
                    message=None,
                    updated_at=utcnow(),
                )
            )
        )
        existing = session.execute(
            select(ScheduleRun).where(ScheduleRun.schedule == name, ScheduleRun.fire_at == fire)
        ).scalar_one()
        session.expunge(existing)
    if retried:
        _submit(runtime, schedule, existing)
    return _report(existing, bool(retried))


def list_schedules(runtime: Runtime, now: datetime | None = None) -> list[ScheduleStatus]:
    """Each configured schedule with its next fire time and its last run (and that run's job)."""
    now = now or utcnow()
    rows: list[ScheduleStatus] = []
    with session_scope(runtime.engine) as session:
        for schedule in runtime.settings.schedules:
            last = session.execute(
                select(ScheduleRun, Job.status)
                .outerjoin(Job, Job.id == ScheduleRun.job_id)
                .where(ScheduleRun.schedule == schedule.name)
                .order_by(ScheduleRun.fire_at.desc())
                .limit(1)
            ).first()
            run, job_status = (last[0], last[1]) if last else (None, None)
            rows.append(
                ScheduleStatus(
                    name=schedule.name,
                    cron=schedule.cron,
                    timezone=schedule.timezone,
                    enabled=schedule.enabled,
                    next_run=schedule.local(schedule.next_fire(now)).isoformat() if schedule.enabled else None,
                    last_run=schedule.local(run.fire_at).isoformat() if run else None,
                    last_run_date=run.run_date if run else None,
                    last_run_status=run.status.value if run else None,
                    last_job_id=run.job_id if run else None,
                    last_job_status=job_status.value if job_status is not None else None,
                    last_message=run.message if run else None,
                )
            )
    return rows
