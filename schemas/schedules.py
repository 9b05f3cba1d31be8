"""``[[schedules]]``: jobs submitted on a cron schedule (nightly runs).

A schedule names a cron expression in a time zone, an input URL template filled
with the run's date, and the job's model, budget and deadline. The time of each
run is a *fire time* of the cron expression; a run is identified by (schedule,
fire time), which for a daily schedule is (schedule, date). Everything here is
pure: the clock is always an argument.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import Field, field_validator, model_validator

from schemas.backends import Section
from schemas.deadline import check_deadline, parse_deadline
from schemas.jobspec import JobOptions

__all__ = ["Schedule"]


#: A template field (``{date:%Y-%m-%d}``), or an escaped brace.
_FIELD = re.compile(r"\{\{|\}\}|\{([A-Za-z_]+(?::[^{}]*)?)\}")


class Schedule(Section, JobOptions):
    """One scheduled job: when, on what input, and the job's options (``JobOptions``:
    model, task, max_tokens, temperature, rows_per_shard, budget_usd, tags)."""

    name: str
    #: Five-field cron expression, e.g. ``"0 2 * * *"`` (02:00 every day).
    cron: str
    #: IANA time zone the cron expression, the dates and the deadline are read in.
    timezone: str = "UTC"
    #: Input URL template: ``{date:%Y-%m-%d}`` (the run's local date and time),
    #: ``{yesterday:%Y-%m-%d}`` and ``{name}``; a glob or a folder takes every
    #: Parquet file it matches.
    input: str
    #: ``"07:00"``: the first 07:00 (local) after the run fires; ``"+6h"``: six
    #: hours after it fires. Empty: no deadline.
    deadline: str = ""
    #: No file matches the input: ``skip`` records a skipped run, ``fail`` a failed one.
    on_missing: Literal["skip", "fail"] = "skip"
    #: Runs missed while the scheduler was down: ``latest`` submits only the most
    #: recent one, ``all`` submits each (at most ``max_catch_up``), ``none`` skips
    #: them all. Skipped runs are recorded.
    catch_up: Literal["latest", "all", "none"] = "latest"
    max_catch_up: int = Field(default=7, ge=1)
    #: A run this late (minutes after its fire time) counts as missed.
    misfire_grace_minutes: float = Field(default=15.0, gt=0)
    enabled: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError("use letters, digits, '.', '-' and '_' only")
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        value = " ".join(value.split())
        if len(value.split()) != 5 or not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a five-field cron expression (e.g. '0 2 * * *')")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Europe/Berlin)") from None
        return value

    @field_validator("deadline")
    @classmethod
    def _deadline(cls, value: str) -> str:
        return check_deadline(value, absolute=False)  # a run repeats: relative forms only

    @model_validator(mode="after")
    def _template(self) -> Schedule:
        if urlsplit(self.input).password is not None:
            raise ValueError("input carries a password; give storage credentials through the environment")
        try:
            self.input_url(datetime(2026, 1, 2, 3, 4, tzinfo=UTC))
        except Exception as exc:  # KeyError, AttributeError, ValueError...: a template that cannot be filled
            raise ValueError(
                f"input template {self.input!r} cannot be filled ({exc!r}); "
                "use {date:%Y-%m-%d}, {yesterday:%Y-%m-%d} or {name}"
            ) from None
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def job_options(self) -> dict[str, Any]:
        """This schedule's ``JobOptions`` as keywords, for each run's job."""
        return {name: getattr(self, name) for name in JobOptions.model_fields}

    def local(self, moment: datetime) -> datetime:
        return moment.astimezone(self.zone)

    def next_fire(self, after: datetime) -> datetime:
        """The first fire time strictly after ``after`` (UTC)."""
        return _utc(croniter(self.cron, self.local(after)).get_next(datetime))

    def previous_fire(self, at: datetime) -> datetime:
        """The last fire time at or before ``at`` (UTC)."""
        probe = self.local(at) + timedelta(seconds=1)
        return _utc(croniter(self.cron, probe).get_prev(datetime))

    def fire_times(self, after: datetime, until: datetime, limit: int = 1000) -> list[datetime]:
        """The newest ``limit`` fire times in ``(after, until]``, oldest first."""
        found: list[datetime] = []
        it = croniter(self.cron, self.local(until) + timedelta(seconds=1))
        while len(found) < limit:
            moment = _utc(it.get_prev(datetime))
            if moment <= after:
                break
            found.append(moment)
        # When clocks go back, a wall-clock time happens twice: fire at the first only.
        unique: list[datetime] = []
        for moment in reversed(found):
            wall = self.local(moment).replace(tzinfo=None)
            if not unique or self.local(unique[-1]).replace(tzinfo=None) != wall:
                unique.append(moment)
        return unique

    def fire_on(self, day: datetime) -> datetime:
        """The first fire time on local calendar day ``day`` (midnight if none that day)."""
        start = datetime(day.year, day.month, day.day, tzinfo=self.zone)
        first = self.next_fire(start - timedelta(seconds=1))
        if self.local(first).date() == start.date():
            return first
        return _utc(start)

    def run_date(self, fire: datetime) -> str:
        return self.local(fire).strftime("%Y-%m-%d")

    def input_url(self, fire: datetime) -> str:
        """The template filled in for the run firing at ``fire``: ``{date:FORMAT}``,
        ``{yesterday:FORMAT}`` (strftime formats) and ``{name}``, nothing else (no
        attribute or index lookups, unlike ``str.format``); ``{{`` and ``}}`` are braces."""
        local = self.local(fire)
        values = {"date": local, "yesterday": local - timedelta(days=1)}

        def fill(match: re.Match[str]) -> str:
            if match.group(0) in ("{{", "}}"):
                return match.group(0)[0]
            field, _, spec = match.group(1).partition(":")
            if field == "name" and not spec:
                return self.name
            if field in values:
                return values[field].strftime(spec or "%Y-%m-%d")
            raise ValueError(f"unknown template field {{{match.group(1)}}}")

        filled = _FIELD.sub(fill, self.input)
        if "{" in _FIELD.sub("", self.input) or "}" in _FIELD.sub("", self.input):
            raise ValueError("a '{' or '}' that opens or closes no field (write {{ or }} for a brace)")
        return filled

    def deadline_at(self, fire: datetime) -> datetime | None:
        return parse_deadline(self.deadline, fire, self.zone)


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)
