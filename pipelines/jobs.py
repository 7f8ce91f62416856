"""Admitting generation jobs, and stopping them cleanly at shutdown.

    gate = JobGate()
    with gate.job():                 # raises ShuttingDown once the gate is closed
        ...                          # call gate.check() from progress callbacks
    # at SIGTERM (as `serving.GracefulServer` does):
    gate.close()                     # no new jobs
    if gate.running:                 # still running after the grace period
        gate.cancel()                # its next gate.check() raises JobCancelled

A cancelled job unwinds through its ``with`` blocks, so the video writer deletes its partial
file and the manager's lease ends (offloading the model) as on any other error.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from .errors import PipelineError

__all__ = ["JobCancelled", "JobGate", "ShuttingDown"]


class ShuttingDown(PipelineError):
    """A job was asked for while the server is shutting down."""


class JobCancelled(PipelineError):
    """A running job was cancelled because the server is shutting down."""


class JobGate:
    """Counts running jobs; closes for shutdown; cancels jobs that outlive the grace period."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._closed = False
        self._cancelled = threading.Event()

    @property
    def running(self) -> int:
        """How many jobs are running."""
        return self._running

    @contextlib.contextmanager
    def job(self) -> Iterator[None]:
        """Hold a place for one job for the duration of a ``with`` block.

        Raises:
            ShuttingDown: the gate is closed; nothing was started.
        """
        with self._lock:
            if self._closed:
                raise ShuttingDown("The server is shutting down and takes no new jobs; try again in a minute.")
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1

    def check(self) -> None:
        """Raise `JobCancelled` when the running jobs have been cancelled (call it between steps)."""
        if self._cancelled.is_set():
            raise JobCancelled("The job was cancelled: the server is shutting down. Nothing was kept.")

    def close(self) -> None:
        """Refuse new jobs from now on."""
        with self._lock:
            self._closed = True

    def cancel(self) -> None:
        """Make every running job's next `check()` raise `JobCancelled`."""
        self._cancelled.set()
