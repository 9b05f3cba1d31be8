"""Deadlines: one grammar for the command line, the Python API and schedules.

A deadline is written as

- a duration from a start: ``+90s``, ``+30m``, ``+6h``, ``+1.5d``;
- a local clock time, the next one after the start: ``07:00``;
- (not in schedules, whose runs repeat) an ISO time: ``2026-11-26T07:00+01:00``,
  read in the local zone when it names none.

``parse_deadline`` turns one into a UTC time; ``check_deadline`` only validates.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, tzinfo

__all__ = ["check_deadline", "parse_deadline"]

_DURATION = re.compile(r"\+(\d+(?:\.\d+)?)([smhd])")
_CLOCK = re.compile(r"(\d{1,2}):(\d{2})")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_FORMS = "a duration (+90s, +30m, +6h, +1d), a local time (07:00) or an ISO time (2026-11-26T07:00)"


def _clock(text: str) -> tuple[int, int] | None:
    match = _CLOCK.fullmatch(text)
    if not match:
        return None
    hour, minute = int(match.group(1)), int(match.group(2))
    return (hour, minute) if hour < 24 and minute < 60 else None


def check_deadline(text: str, *, absolute: bool = True) -> str:
    """``text`` stripped if it is a deadline (an ISO time only if ``absolute``); ``ValueError`` otherwise."""
    text = text.strip()
    if not text or _DURATION.fullmatch(text) or _clock(text):
        return text
    if absolute:
        try:
            datetime.fromisoformat(text)
            return text
        except ValueError:
            pass
        raise ValueError(f"{text!r} is not a deadline: use {_FORMS}")
    raise ValueError(f"{text!r} is neither a local time (07:00) nor a duration (+90s, +30m, +6h, +1d)")


def parse_deadline(text: str, start: datetime | None = None, zone: tzinfo | None = None) -> datetime | None:
    """The UTC time ``text`` names, counted from ``start`` (default: now) in ``zone``
    (default: this machine's); None for an empty text. ``ValueError`` if it is none."""
    text = check_deadline(text)
    if not text:
        return None
    start = start or datetime.now(UTC)
    if match := _DURATION.fullmatch(text):
        return (start + timedelta(seconds=float(match.group(1)) * _UNIT[match.group(2)])).astimezone(UTC)
    if clock := _clock(text):
        local = start.astimezone(zone) if zone else start.astimezone()
        at = local.replace(hour=clock[0], minute=clock[1], second=0, microsecond=0)
        if at <= local:
            at = (local + timedelta(days=1)).replace(hour=clock[0], minute=clock[1], second=0, microsecond=0)
        return at.astimezone(UTC)
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=zone) if zone else parsed.astimezone()
    return parsed.astimezone(UTC)
