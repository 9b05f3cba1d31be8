"""Watching for a spot interruption notice, and draining when one arrives.

The probe polls ``worker.spot_notice_url`` every ``spot_notice_interval_seconds``
(the AWS instance-metadata ``spot/instance-action`` format by default: 404 while
nothing is planned, 200 with ``{"action": "terminate"|"stop", "time": ...}`` once
the instance is to be reclaimed). On a notice it sets the worker's drain flag: the
shard in hand stops taking micro-batches, commits its checkpoint and goes back to
the queue, exactly as on SIGTERM, before the instance disappears.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request

from workers.drain import StopFlag

__all__ = ["SpotNoticeProbe", "notice_in"]

log = logging.getLogger(__name__)


def notice_in(status: int, body: bytes) -> str | None:
    """The planned action if the response announces an interruption, else None."""
    if status != 200:
        return None
    try:
        action = json.loads(body or b"{}").get("action")
    except (ValueError, AttributeError):
        return None
    return str(action) if action else None


class SpotNoticeProbe(threading.Thread):
    """Polls the notice URL; on a notice sets ``stop`` and returns."""

    def __init__(self, url: str, interval: float, stop: StopFlag, on_notice: object = None) -> None:
        super().__init__(daemon=True, name="spot-notice")
        self.url, self.interval, self.stop = url, interval, stop
        self.on_notice = on_notice
        self.finished = threading.Event()
        self.action: str | None = None

    def _poll(self) -> str | None:
        try:
            with urllib.request.urlopen(self.url, timeout=2) as response:  # noqa: S310 (configured URL)
                return notice_in(response.status, response.read())
        except urllib.error.HTTPError as exc:
            return notice_in(exc.code, b"")
        except (urllib.error.URLError, OSError, TimeoutError):
            return None  # metadata service unreachable: no news is no notice

    def run(self) -> None:
        while not self.finished.wait(self.interval):
            action = self._poll()
            if action:
                self.action = action
                log.warning("spot interruption notice (%s): draining", action)
                self.stop.set()
                if callable(self.on_notice):
                    self.on_notice()
                return
