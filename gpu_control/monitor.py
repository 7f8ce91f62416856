"""A deadline-driven watcher: sleeps until the next deadline, not on a fixed interval.

The owner gives a callback that carries out whatever is due at the current time and
returns the next deadline (a value of the owner's clock) or None. The watcher waits until
that deadline or until `wake()` is called (the owner calls it whenever a deadline may
have moved: a timeout changed, the model was used), then calls the callback again.

A `WatcherGroup` runs several owners (the models of a pool) on one such thread: each owner
holds a `WatcherMember`, which starts, stops and wakes like a watcher of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["DeadlineWatcher", "FIRST_RETRY", "MAX_RETRY", "MAX_SLEEP", "WatcherGroup", "WatcherMember"]

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
            if thread is not threading.current_thread():  # stopped from its own callback: it ends by itself
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


class WatcherGroup:
    """One `DeadlineWatcher` thread for several owners (a pool's models).

    Each owner gets a `WatcherMember` (``member(due)``) that it starts, stops and wakes as
    if it had a thread of its own. The thread runs while at least one member is started;
    one member's failing check is logged and retried without holding up the others.

    Args:
        clock: the clock the members' deadlines are expressed in.
        name: the thread's name.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, name: str = "gpu-pool-watcher"
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()  # guards the member list
        self._switch = threading.Lock()  # one start or stop of the thread at a time
        self._active: list[WatcherMember] = []
        self._watcher = DeadlineWatcher(self._due, clock=clock, name=name)

    @property
    def running(self) -> bool:
        """Whether the group's thread is alive."""
        return self._watcher.running

    def member(self, due: Callable[[float], float | None], label: str = "") -> WatcherMember:
        """A handle for one owner whose ``due(now)`` returns its next deadline or None."""
        return WatcherMember(self, due, label)

    def stop(self) -> None:
        """Stop every member and the thread."""
        with self._lock:
            self._active.clear()
        self._watcher.stop()

    def _start(self, member: WatcherMember) -> bool:
        with self._switch:
            with self._lock:
                if member in self._active:
                    return False
                self._active.append(member)
            self._watcher.start()
            self._watcher.wake()
            return True

    def _stop(self, member: WatcherMember) -> bool:
        with self._switch:
            with self._lock:
                if member not in self._active:
                    return False
                self._active.remove(member)
                last = not self._active
            if last:
                self._watcher.stop()
            return True

    def _is_active(self, member: WatcherMember) -> bool:
        with self._lock:
            return member in self._active

    def _wake(self) -> None:
        self._watcher.wake()

    def _due(self, now: float) -> float | None:
        with self._lock:
            members = list(self._active)
        deadlines = []
        for member in members:
            try:
                deadline = member.due(now)
            except Exception:
                logger.exception(
                    "The GPU watcher's check of %s failed; retrying in %g s", member.label, FIRST_RETRY
                )
                deadline = self._clock() + FIRST_RETRY
            if deadline is not None:
                deadlines.append(deadline)
        return min(deadlines) if deadlines else None


class WatcherMember:
    """One owner's share of a `WatcherGroup`: the interface of a `DeadlineWatcher`."""

    def __init__(self, group: WatcherGroup, due: Callable[[float], float | None], label: str) -> None:
        self._group = group
        self.due = due
        self.label = label or "a model"

    @property
    def running(self) -> bool:
        """Whether this member is started and the group's thread is alive."""
        return self._group._is_active(self) and self._group.running

    def start(self) -> bool:
        """Have the group check this member; False when it already did."""
        return self._group._start(self)

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop checking this member; False when it was not started."""
        return self._group._stop(self)

    def wake(self) -> None:
        """Make the group re-plan now (a deadline of this member may have moved)."""
        self._group._wake()
