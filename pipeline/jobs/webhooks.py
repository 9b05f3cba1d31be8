"""Job events to webhooks: signed the Standard Webhooks way, delivered at least once.

Events are read off the jobs themselves, so nothing can be lost between a job's
change and its message: a job that ended (``batch.completed``, ``batch.failed``,
``batch.cancelled``, ``batch.expired``: OpenAI's names) or was paused for money
(``job.paused``) within ``LOOKBACK`` is an event for every ``[[webhooks]]`` entry
that takes it. ``deliver_due`` (the control queue's ``deliver_webhooks`` task, sent
when a job ends or pauses and by every reaper sweep that finds one due) posts each
event that has no delivery yet, and again each one whose last attempt failed once its
backoff has passed, until ``max_attempts``. Every attempt is first inserted as a
``webhook_deliveries`` row (unique per event, webhook and attempt: two deliverers
never post the same attempt), then posted, then its outcome recorded; an attempt
whose deliverer died is tried again after its backoff. Receivers dedupe on
``webhook-id``, the event's id, the same on every attempt.

Signing (https://www.standardwebhooks.com): ``webhook-signature: v1,<base64 of
HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>``, the secret taken from the
environment variable ``secret_env`` names (``whsec_<base64>``, or any text).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import aiohttp
from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pipeline.runtime import Runtime
from pipeline.store.db import db_now, session_scope
from schemas.settings import WebhookSettings
from schemas.status import JobStatus
from schemas.tables import Job, WebhookDelivery

__all__ = ["EXPIRED", "LOOKBACK", "Event", "deliver_due", "due_events", "event_of", "sign"]

log = logging.getLogger(__name__)

#: Jobs that changed longer ago than this are not events any more (a webhook added
#: today does not hear about last month's jobs).
LOOKBACK = timedelta(hours=24)
#: The error a job cancelled at the end of its completion window carries.
EXPIRED = "expired: the batch's completion window ended"
#: The longest wait between two attempts.
MAX_BACKOFF_SECONDS = 3600.0


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    job_id: str
    at: datetime
    status: str

    def body(self) -> bytes:
        """OpenAI's event object; ``data.id`` is the batch (``batch_<job>``)."""
        return json.dumps(
            {
                "object": "event",
                "id": self.id,
                "type": self.type,
                "created_at": int(self.at.timestamp()),
                "data": {"id": f"batch_{self.job_id}", "job_id": self.job_id, "status": self.status},
            },
            separators=(",", ":"),
        ).encode()


def event_of(job: Job) -> Event | None:
    """The event a job's state is, if any."""
    status = job.status
    if status is JobStatus.PAUSED:
        kind, at = "job.paused", job.updated_at
    elif status in (JobStatus.SUCCEEDED, JobStatus.SUCCEEDED_WITH_ERRORS):
        kind, at = "batch.completed", job.finished_at or job.updated_at
    elif status is JobStatus.FAILED:
        kind, at = "batch.failed", job.finished_at or job.updated_at
    elif status is JobStatus.CANCELLED:
        expired = (job.error or "").startswith(EXPIRED)
        kind, at = ("batch.expired" if expired else "batch.cancelled"), job.finished_at or job.updated_at
    else:
        return None
    digest = hashlib.sha256(f"{job.id}:{kind}:{at.isoformat()}".encode()).hexdigest()[:24]
    return Event(f"evt_{digest}", kind, job.id, at, status.value)


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for ``body``."""
    key = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()
    signed = f"{event_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def _backoff(hook: WebhookSettings, attempt: int) -> float:
    return float(min(MAX_BACKOFF_SECONDS, hook.backoff_seconds * 2 ** (attempt - 1)))


def due_events(session: Session, hooks: list[WebhookSettings]) -> list[tuple[WebhookSettings, Event, int]]:
    """(webhook, event, attempt number) of every delivery to make now."""
    if not hooks:
        return []
    now = db_now(session)
    since = now - LOOKBACK
    jobs = session.scalars(
        select(Job).where(
            Job.status.in_(
                (
                    JobStatus.PAUSED,
                    JobStatus.SUCCEEDED,
                    JobStatus.SUCCEEDED_WITH_ERRORS,
                    JobStatus.FAILED,
                    JobStatus.CANCELLED,
                )
            ),
            or_(Job.finished_at >= since, Job.updated_at >= since),
        )
    ).all()
    events = [e for e in (event_of(job) for job in jobs) if e is not None]
    if not events:
        return []
    last: dict[tuple[str, str], WebhookDelivery] = {}
    for row in session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.event_id.in_([e.id for e in events]))
    ).all():
        seen = last.get((row.event_id, row.webhook))
        if seen is None or row.attempt > seen.attempt:
            last[(row.event_id, row.webhook)] = row
    due: list[tuple[WebhookSettings, Event, int]] = []
    for event in events:
        for hook in hooks:
            if hook.events and event.type not in hook.events:
                continue
            previous = last.get((event.id, hook.name))
            if previous is None:
                due.append((hook, event, 1))
            elif not previous.delivered and previous.attempt < hook.max_attempts:
                if previous.created_at + timedelta(seconds=_backoff(hook, previous.attempt)) <= now:
                    due.append((hook, event, previous.attempt + 1))
    return due


def deliver_due(runtime: Runtime) -> int:
    """Post every due delivery (see the module docstring); return how many were delivered."""
    hooks = runtime.settings.webhooks
    if not hooks:
        return 0
    with session_scope(runtime.engine) as session:
        due = due_events(session, hooks)
    delivered = 0
    for hook, event, attempt in due:
        try:
            with session_scope(runtime.engine) as session:
                row = WebhookDelivery(
                    event_id=event.id,
                    webhook=hook.name,
                    event=event.type,
                    job_id=event.job_id,
                    attempt=attempt,
                    delivered=False,
                    created_at=db_now(session),
                )
                session.add(row)
                session.flush()
                row_id = row.id
        except IntegrityError:
            continue  # another deliverer took this attempt
        status, error = asyncio.run(_post(hook, event))
        ok = status is not None and 200 <= status < 300
        with session_scope(runtime.engine) as session:
            stored = session.get(WebhookDelivery, row_id)
            if stored is not None:
                stored.status_code, stored.error, stored.delivered = status, error, ok
        if ok:
            delivered += 1
        else:
            log.warning(
                "webhook %s: %s of job %s, attempt %d of %d failed: %s",
                hook.name,
                event.type,
                event.job_id,
                attempt,
                hook.max_attempts,
                error or f"HTTP {status}",
            )
    return delivered


async def _post(hook: WebhookSettings, event: Event) -> tuple[int | None, str | None]:
    secret = os.environ.get(hook.secret_env, "")
    if not secret:
        return None, f"the environment variable {hook.secret_env} (secret_env) is not set"
    body = event.body()
    stamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "spotlane-webhooks",
        "webhook-id": event.id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(secret, event.id, stamp, body),
    }
    try:
        timeout = aiohttp.ClientTimeout(total=hook.timeout_seconds)
        async with aiohttp.ClientSession(timeout=timeout) as http, http.post(hook.url, data=body, headers=headers) as r:
            await r.read()
            return r.status, None if r.status < 300 else f"HTTP {r.status}"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return None, f"{exc.__class__.__name__}: {exc}"[:500]
