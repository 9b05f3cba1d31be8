"""The shard's heartbeat: renews the lease while chunks make progress, and calls a
hung engine (no progress for far longer than a chunk's estimate) what it is."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from pipeline.runtime import Runtime
from pipeline.store import claims
from pipeline.store.db import session_scope

__all__ = ["Heartbeat"]

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Renews the lease while the shard makes progress; hands it back if the engine hangs."""

    def __init__(self, runtime: Runtime, claim: claims.Claim, on_hang: Callable[[], None]) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{claim.shard_id}")
        self.runtime, self.claim, self.on_hang = runtime, claim, on_hang
        self.stopped = threading.Event()
        self.lost = threading.Event()
        self.hung = threading.Event()
        self._progress = time.monotonic()
        #: Seconds without progress that mean a hung engine (None: not watched yet).
        self.hang_after: float | None = None

    def progress(self, hang_after: float | None = None) -> None:
        """A chunk was committed (or the model loaded): the engine is alive."""
        self._progress = time.monotonic()
        if hang_after is not None:
            self.hang_after = hang_after

    def run(self) -> None:
        settings = self.runtime.settings.worker
        while not self.stopped.wait(settings.heartbeat_seconds):
            if self.hang_after is not None and time.monotonic() - self._progress > self.hang_after:
                log.error(
                    "shard %s of job %s made no progress for %.0f s: the engine is hung; handing it back",
                    self.claim.shard_index,
                    self.claim.job_id,
                    time.monotonic() - self._progress,
                )
                self.hung.set()
                self.lost.set()
                self.on_hang()
                return
            try:
                with session_scope(self.runtime.engine) as session:
                    if not claims.heartbeat(session, self.claim, settings.lease_seconds):
                        self.lost.set()
                        return
            except Exception:  # a database blip: try again next beat
                log.warning("heartbeat for shard %s failed", self.claim.shard_id, exc_info=True)

    def stop(self) -> None:
        self.stopped.set()
        if self is not threading.current_thread():
            self.join(timeout=5)
