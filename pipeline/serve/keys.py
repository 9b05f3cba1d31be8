"""Tenant keys of ``spotlane serve``: created once, stored hashed, revoked by name.

A key is ``sk-spl-`` and 43 URL-safe characters (256 random bits), shown once when
it is created; the store keeps its SHA-256 (a plain hash is enough for a secret of
that strength, and lets a request be looked up by it) and its first characters,
to tell keys apart in lists. A key's budget caps the spend of all its jobs
together (``pipeline.store.ledger.budget_for``); its tags are added to its jobs.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from pipeline.runtime import Runtime
from pipeline.store.db import session_scope
from schemas.base import utcnow
from schemas.errors import InputError, NotFound
from schemas.tables import ApiKey, CostLedgerEntry, Job

__all__ = ["KEY_PREFIX", "KeyInfo", "authenticate", "create_key", "hash_key", "list_keys", "revoke_key"]

KEY_PREFIX = "sk-spl-"


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    prefix: str
    budget_usd: float | None
    tags: dict[str, Any]
    admin: bool
    created_at: datetime
    revoked_at: datetime | None
    #: Reserved + spent by all the key's jobs now.
    committed_usd: float = 0.0


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _info(key: ApiKey, committed: float = 0.0) -> KeyInfo:
    return KeyInfo(
        key.id,
        key.name,
        key.prefix,
        key.budget_usd,
        dict(key.tags),
        key.admin,
        key.created_at,
        key.revoked_at,
        committed,
    )


def create_key(
    runtime: Runtime,
    name: str,
    *,
    budget_usd: float | None = None,
    tags: dict[str, Any] | None = None,
    admin: bool = False,
) -> tuple[KeyInfo, str]:
    """A new key named ``name``: its record, and the secret (shown once, never stored)."""
    if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,128}", name):
        raise InputError(f"key name {name!r}: use 1 to 128 letters, digits, '_', '.', '@' or '-'")
    if budget_usd is not None and budget_usd < 0:
        raise InputError(f"--budget {budget_usd}: a budget cannot be negative")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id="key_" + secrets.token_hex(12),
        name=name,
        key_hash=hash_key(secret),
        prefix=secret[: len(KEY_PREFIX) + 4],
        budget_usd=budget_usd,
        tags=dict(tags or {}),
        admin=admin,
        created_at=utcnow(),
    )
    try:
        with session_scope(runtime.engine) as session:
            session.add(key)
            session.flush()
            info = _info(key)
    except IntegrityError:
        raise InputError(f"a key named {name!r} exists already (`spotlane keys list`)") from None
    return info, secret


def list_keys(runtime: Runtime) -> list[KeyInfo]:
    with session_scope(runtime.engine) as session:
        committed = dict(
            session.execute(
                select(Job.api_key_id, func.coalesce(func.sum(CostLedgerEntry.amount_usd), 0.0))
                .join(CostLedgerEntry, CostLedgerEntry.job_id == Job.id)
                .where(Job.api_key_id.is_not(None))
                .group_by(Job.api_key_id)
            ).all()
        )
        keys = session.scalars(select(ApiKey).order_by(ApiKey.created_at)).all()
        return [_info(k, float(committed.get(k.id, 0.0))) for k in keys]


def revoke_key(runtime: Runtime, name: str) -> KeyInfo:
    """Revoke the key named ``name`` (or with that id): its requests are refused from now on."""
    with session_scope(runtime.engine) as session:
        key = session.scalars(select(ApiKey).where((ApiKey.name == name) | (ApiKey.id == name))).first()
        if key is None:
            raise NotFound(f"no key named {name!r} (see `spotlane keys list`)")
        if key.revoked_at is None:
            key.revoked_at = utcnow()
        return _info(key)


def authenticate(runtime: Runtime, secret: str) -> KeyInfo | None:
    """The live key whose secret this is, or None."""
    if not secret.startswith(KEY_PREFIX):
        return None
    with session_scope(runtime.engine) as session:
        key = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(secret))).first()
        if key is None or key.revoked_at is not None:
            return None
        return _info(key)
