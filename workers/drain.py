"""The drain flag: set when a worker must hand its shard back and stop.

Set by a warm shutdown (SIGTERM, Ctrl-C) and read by the shard runner between
checkpoints; a spot-interruption notice (``workers.spot_notice``) sets it too.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

__all__ = ["StopFlag"]


@dataclass
class StopFlag:
    event: threading.Event = field(default_factory=threading.Event)

    def set(self) -> None:
        self.event.set()

    def clear(self) -> None:
        self.event.clear()

    def __bool__(self) -> bool:
        return self.event.is_set()
