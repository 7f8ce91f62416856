"""A deadline-driven watcher: sleeps until the next deadline, not on a fixed interval.

The owner gives a callback that carries out whatever is due at the current time and
returns the next deadline (a value of the owner's clock) or None. The watcher waits until
that deadline or until `wake()` is called (the owner calls it whenever a deadline may
have moved: a timeout changed, the model was used), then calls the callback again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["DeadlineWatcher", "FIRST_RETRY", "MAX_RETRY", "MAX_SLEEP"]

logger = logging.getLogger(__name__)

MAX_SLEEP = 3600.0
"""Longest single wait; bounds the effect of a clock that jumps."""

FIRST_RETRY = 1.0
"""Seconds before the check runs again after it raised; doubled at each failure in a row."""

MAX_RETRY = 60.0
"""Longest wait between two checks that keep failing."""


class DeadlineWatcher:
    """Runs ``due(now) -> next_deadline | None`` on a daemon thread at each deadline.

    Args:
        due: carries out what is due at ``now`` and returns the next deadline or None.
        clock: the clock deadlines are expressed in (``time.monotonic`` by default).
        name: the thread's name.
    """

    def __init__(
        self,
        due: Callable[[float], float | None],
        *,
        clock: Callable[[], float] = time.monotonic,
        name: str = "gpu-control-watcher",
    ) -> None:
        self._due = due
        self._clock = clock
        self._name = name
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.next_deadline: float | None = None
        self.cycles = 0

    @property
    def running(self) -> bool:
        """Whether the watcher thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def start(self) -> bool:
        """Start the thread; returns False if it was already running."""
        with self._lock:
            if self.running:
                return False
            self._stop.clear()
            self._wake.clear()
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
            return True

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the thread and join it; returns False if it was not running."""
        with self._lock:
            thread = self._thread
            if thread is None:
                return False
            self._stop.set()
            self._wake.set()
            thread.join(timeout)
            self._thread = None
            return True

    def wake(self) -> None:
        """Make the watcher re-plan now (a deadline may have moved)."""
        self._wake.set()

    def _run(self) -> None:
        retry = FIRST_RETRY
        while not self._stop.is_set():
            self._wake.clear()
            try:
                deadline = self._due(self._clock())
                retry = FIRST_RETRY
            except Exception:
                logger.exception("The GPU watcher's check failed; retrying in %g s", retry)
                deadline = self._clock() + retry
                retry = min(retry * 2, MAX_RETRY)
            self.next_deadline = deadline
            self.cycles += 1
            if deadline is None:
                self._wake.wait(MAX_SLEEP)
            else:
                self._wake.wait(min(max(deadline - self._clock(), 0.0), MAX_SLEEP))
