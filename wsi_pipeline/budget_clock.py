"""The clock a wall-clock training budget is counted on, with pauses left out.

Why: ``max_minutes`` drives the learning-rate schedule, and on a shared machine a long run is
paused now and then (``kill -STOP`` / ``kill -CONT``, or Ctrl-Z and ``fg``) so that a timing
benchmark has the cores to itself. Counted on a plain wall clock, the step during which the
process was stopped would swallow the whole pause: the schedule would jump ahead and the run
would end that much early. A stopped process cannot see the stop, but it is told when it
continues (``SIGCONT``), so the step that saw a ``SIGCONT`` is counted as a typical step (the
median of the recent ones) instead of its wall time.
"""

from __future__ import annotations

import logging
import signal
import statistics
import threading
import time
from collections import deque
from types import FrameType
from typing import Any

# Steps the "typical step" is the median of: enough to ignore one slow step, few enough
# to follow the machine's speed as it drifts.
RECENT_STEPS = 25

log = logging.getLogger(__name__)


class BudgetClock:
    """Counts the seconds of consecutive steps; a step that spanned a stop counts as a typical one.

    Use as a context manager around the loop (it installs a ``SIGCONT`` handler in the main
    thread and restores the previous one on exit); elsewhere (another thread, a platform
    without ``SIGCONT``) it is a plain wall clock.
    """

    def __init__(self) -> None:
        self._resumed = False
        self._recent: deque[float] = deque(maxlen=RECENT_STEPS)
        self._previous: Any = None
        self._installed = False
        self._t0 = time.perf_counter()
        self.paused_steps = 0

    def __enter__(self) -> BudgetClock:
        if hasattr(signal, "SIGCONT") and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGCONT, self._on_continue)
            self._installed = True
        self.restart()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGCONT, self._previous)
            self._installed = False

    def _on_continue(self, signum: int, frame: FrameType | None) -> None:
        self._resumed = True
        if callable(self._previous):
            self._previous(signum, frame)

    def restart(self) -> None:
        """Start timing anew, not counting what happened since the last step (an evaluation)."""
        self._t0 = time.perf_counter()

    def step(self) -> float:
        """Seconds to count for the step that ends now."""
        now = time.perf_counter()
        seconds, self._t0 = now - self._t0, now
        if self._resumed:
            self._resumed = False
            self.paused_steps += 1
            wall, seconds = seconds, statistics.median(self._recent) if self._recent else 0.0
            log.info("continued after a stop: that step counts %.1f s of its %.1f s towards the budget", seconds, wall)
        else:
            self._recent.append(seconds)
        return seconds
