"""``spotlane run`` waits for its runner thread through an Event: a signal handler that
raises while ``Thread.join`` waits (Python < 3.13) marks the running thread as ended,
and ``run`` read the rows kept before the chunk in hand had committed (a stop said
"20 of 600 rows kept" while 40 were)."""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

import pytest

from pipeline.cli.run import Worked


class _Signalled(Exception):
    pass


def _raise(_signum: int, _frame: FrameType | None) -> None:
    raise _Signalled


def test_a_signal_raised_while_waiting_leaves_the_runner_running_and_the_next_wait_waits_for_it() -> None:
    finished = threading.Event()

    def work() -> None:
        time.sleep(1.0)
        finished.set()

    worked = Worked(work, name="test-runner")
    saved = signal.signal(signal.SIGALRM, _raise)
    try:
        worked.start()
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(_Signalled):
            worked.wait(5)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, saved)
    assert worked.running and not finished.is_set()
    assert worked.wait(10)
    assert finished.is_set() and not worked.running


def test_what_the_work_raised_is_raised_in_the_waiting_thread() -> None:
    def work() -> None:
        raise RuntimeError("boom")

    worked = Worked(work, name="test-runner")
    worked.start()
    assert worked.wait(5) and not worked.running
    with pytest.raises(RuntimeError, match="boom"):
        worked.raise_error()
