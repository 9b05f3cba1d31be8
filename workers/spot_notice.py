"""Watching for a spot interruption notice, and draining when one arrives.

The probe polls ``worker.spot_notice_url`` every ``spot_notice_interval_seconds``
over IMDSv2, in the AWS instance-metadata ``spot/instance-action`` format: 404
while nothing is planned, 200 with ``{"action": "terminate"|"stop", "time": ...}``
once the instance is to be reclaimed. On a notice it sets the worker's drain flag: the
shard in hand stops taking micro-batches, commits its checkpoint and goes back to
the queue, exactly as on SIGTERM, before the instance disappears.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.parse
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


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # a metadata service does not redirect; a redirect is an error


#: Seconds an IMDSv2 session token is asked to live (it is fetched again before then).
TOKEN_TTL = 21600


class SpotNoticeProbe(threading.Thread):
    """Polls the notice URL; on a notice sets ``stop`` and returns.

    Speaks IMDSv2 (a session token from ``PUT /latest/api/token``, sent as
    ``X-aws-ec2-metadata-token``), which instances that require it (``HttpTokens
    = required``) answer with 401 otherwise; falls back to a plain GET where no
    token service answers. Only http URLs, no redirects; an answer that is
    neither a notice nor "no notice" is logged, once per kind.
    """

    def __init__(self, url: str, interval: float, stop: StopFlag, on_notice: object = None) -> None:
        super().__init__(daemon=True, name="spot-notice")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"worker.spot_notice_url must be an http:// URL, not {url!r}")
        self.url, self.interval, self.stop = url, interval, stop
        self.on_notice = on_notice
        self.finished = threading.Event()
        self.action: str | None = None
        self._token_url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/latest/api/token", "", ""))
        self._token: str | None = None
        self._token_at = 0.0
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._warned: set[str] = set()

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("spot notice probe: %s", message)

    def _session_token(self) -> str | None:
        if self._token is not None and time.monotonic() - self._token_at < TOKEN_TTL / 2:
            return self._token
        request = urllib.request.Request(
            self._token_url, method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL)}
        )
        try:
            with self._opener.open(request, timeout=2) as response:  # noqa: S310 (http only, checked above)
                self._token, self._token_at = response.read().decode().strip(), time.monotonic()
        except urllib.error.HTTPError as exc:
            if exc.code not in (403, 404, 405):
                self._warn_once(f"token-{exc.code}", f"the token service answered HTTP {exc.code}")
            self._token = None
        except (urllib.error.URLError, OSError, TimeoutError):
            self._token = None
        return self._token

    def _poll(self) -> str | None:
        token = self._session_token()
        headers = {"X-aws-ec2-metadata-token": token} if token else {}
        try:
            with self._opener.open(urllib.request.Request(self.url, headers=headers), timeout=2) as response:  # noqa: S310
                return notice_in(response.status, response.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                self._token = None  # expired: ask for a new one next time
            if exc.code != 404:
                self._warn_once(
                    str(exc.code),
                    f"{self.url} answered HTTP {exc.code}; no notice can be seen until it answers 200 or 404",
                )
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
