"""The handles one process needs: settings, job store, storage, Celery app.

``Runtime.open`` is the single place that turns configuration into live
connections. On the embedded default it also creates the home folder and brings
the SQLite job store up to the newest migration, so ``spotlane run`` needs no
set-up; a server database must be migrated with ``spotlane db upgrade``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from pipeline.storage.objects import Storage
from pipeline.store import db
from schemas.errors import NotFound, StoreError
from schemas.records import (
    DELIVER_WEBHOOKS,
    FINALIZE_JOB,
    POLL_BATCHES,
    ROUTE_JOB,
    RUN_SHARD,
    DeliverWebhooks,
    FinalizeJob,
    PollBatches,
    RouteJob,
    RunShard,
    TaskRecord,
)
from schemas.secrets import mask_url
from schemas.settings import Settings, load_settings

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["Runtime"]

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    _celery: Any = field(default=None, repr=False)
    #: Where this runtime's messages go instead of the broker (a process working one job
    #: here, ``workers.inline``); None: to Celery.
    outbox: Callable[[str, TaskRecord, str], None] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, config: str | Path | None = None, *, create: bool = True, **overrides: Any) -> Runtime:
        """Load settings (file, env, ``overrides``) and check the job store is ready.

        ``create=False`` (commands that only read): an embedded job store that does not
        exist is an error naming where it was looked for, not a new empty store.
        """
        runtime = cls(load_settings(config, **overrides))
        runtime.prepare(create=create)
        return runtime

    def prepare(self, *, create: bool = True) -> None:
        home = self.settings.home
        if self.settings.database.url.startswith("sqlite:///"):
            store = Path(self.settings.database.url.removeprefix("sqlite:///"))
            if not create and not store.exists():
                raise NotFound(
                    f"no job store at {store}: nothing was submitted with this home (SPOTLANE_HOME={home}); "
                    "run from the folder you submitted in, or set SPOTLANE_HOME or --config"
                )
            if not create and db.current_revision(self.engine) == db.head_revision():
                return  # reading an up-to-date store needs no write (a read-only home works)
        try:
            home.mkdir(parents=True, exist_ok=True)
            if self.engine.dialect.name == "sqlite":
                # Two CLIs started at once on a fresh home must not both create tables.
                with open(home / ".migrate.lock", "a") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    if db.current_revision(self.engine) != db.head_revision():
                        db.upgrade(self.engine)
                return
        except PermissionError as exc:
            raise StoreError(
                f"the spotlane home {home} is not writable ({exc.strerror}); "
                "set SPOTLANE_HOME to a folder you can write"
            ) from exc
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES):
                raise StoreError(
                    f"the spotlane home {home} is not writable ({exc.strerror}); "
                    "set SPOTLANE_HOME to a folder you can write"
                ) from exc
            raise
        current, head = db.current_revision(self.engine), db.head_revision()
        if current != head:
            raise StoreError(
                f"the job store at {mask_url(self.settings.database.url)} is at migration "
                f"{current or 'none'}, not {head}: run `spotlane db upgrade`"
            )

    @property
    def store_name(self) -> str:
        """The job store, as a person recognises it (a file, or a masked server URL)."""
        url = self.settings.database.url
        return url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else mask_url(url)

    @cached_property
    def engine(self) -> Engine:
        return db.engine_for(self.settings.database.url, self.settings.database.pool_size)

    @cached_property
    def storage(self) -> Storage:
        return Storage(self.settings.storage)

    @property
    def celery(self) -> Celery:
        if self._celery is None:
            from pipeline.tasks.app import make_celery

            self._celery = make_celery(self)
        return self._celery

    def send(self, name: str, record: TaskRecord, queue: str) -> None:
        """Enqueue task ``name`` with ``record`` as its only argument (raises if the broker fails)."""
        if self.outbox is not None:
            self.outbox(name, record, queue)
            return
        self.celery.send_task(name, args=[record.encode()], queue=queue)

    def _send_after_commit(self, name: str, record: TaskRecord, queue: str) -> bool:
        """``send``, for a message that follows a committed SQL change; False if the broker failed.

        SQL already says what must happen, and the reaper sends again whatever SQL
        shows a message was lost for; so a broker error is logged, never raised to
        a caller whose work is done (a submit that raised after its commit would be
        retried into a second job).
        """
        try:
            self.send(name, record, queue)
        except Exception as exc:  # kombu/redis errors of every kind: the reaper resends
            log.warning(
                "could not send %s (%s) to queue %s: %s: %s; the reaper will send it again",
                name,
                record,
                queue,
                exc.__class__.__name__,
                exc,
            )
            return False
        return True

    def send_route(self, job_id: str) -> bool:
        """Ask the control plane to route the job's pending shards."""
        return self._send_after_commit(ROUTE_JOB, RouteJob(job_id=job_id), self.settings.control_queue)

    def send_run(self, record: RunShard) -> bool:
        """Send a queued shard to its backend's queue."""
        return self._send_after_commit(RUN_SHARD, record, self.settings.backend(record.backend).queue)

    def send_finalize(self, job_id: str) -> bool:
        """Ask the control plane to finalize the job (or finish a retry job's merge)."""
        return self._send_after_commit(FINALIZE_JOB, FinalizeJob(job_id=job_id), self.settings.control_queue)

    def send_poll_batches(self) -> bool:
        """Ask the control plane to look at the provider batches that are due."""
        return self._send_after_commit(POLL_BATCHES, PollBatches(), self.settings.control_queue)

    def send_webhooks(self) -> bool:
        """Ask the control plane to post the job events due to ``[[webhooks]]`` (none configured: nothing sent)."""
        if not self.settings.webhooks:
            return False
        return self._send_after_commit(DELIVER_WEBHOOKS, DeliverWebhooks(), self.settings.control_queue)
