"""Which rows of a shard a lane will not be sent: the answer cache holds them, or they
repeat a row priced before. The router and ``plan`` leave them out of the estimate (never
out of the worst case); workers do the same when they run (``workers.feed.answer_known``).
"""

from __future__ import annotations

import json
from datetime import datetime

from sqlalchemy.orm import Session

from pipeline.jobs.models import lane_identity
from pipeline.routing.estimate import ShardProfile, Sharing
from pipeline.store import answers
from schemas.backends import Backend
from schemas.fingerprint import fingerprint
from schemas.settings import Settings
from schemas.tables import Job

__all__ = ["answered_rows", "sharing_of"]


def sharing_of(job: Job) -> Sharing | None:
    """What fingerprints of the job's rows need, if the job shares answers."""
    if not job.use_cache:
        return None
    schema = json.dumps(job.response_schema) if job.response_schema is not None else None
    return Sharing(job.model, job.task, job.temperature, schema, job.schema_retries)


def answered_rows(
    session: Session,
    settings: Settings,
    job: Job,
    profile: ShardProfile,
    backend: Backend,
    model: str,
    now: datetime,
    seen: set[str],
) -> tuple[int, set[str]]:
    """Rows of ``profile`` that will not be sent on ``backend``: held by the answer cache
    for that lane, or repeating a row priced before (``seen``: this shard's, and the job's
    earlier shards', whose answers the cache holds by the time a later shard asks, when
    shards run one after another; ``workers.feed.answer_known`` does the same), and this
    shard's fingerprints, for ``seen`` once every lane is priced."""
    if not job.use_cache or not profile.asked:
        return 0, set()
    identity: dict[str, str] = {}
    found: list[str | None] = []
    for row in profile.asked:
        if row is None:
            found.append(None)
            continue
        name = row.model or model
        if name not in identity:
            identity[name] = lane_identity(backend, name)
        found.append(fingerprint(row.request, identity[name], job.task))
    since = answers.usable_since(now, settings.cache.ttl_days, job.created_at, job.refresh_cache)
    cached = answers.lookup(session, (f for f in found if f), since)
    answered = 0
    mine: set[str] = set()
    for key in found:
        if key is None:
            continue
        if key in cached or key in seen or key in mine:
            answered += 1
        else:
            mine.add(key)
    return answered, mine
