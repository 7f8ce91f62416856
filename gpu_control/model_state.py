"""The state of one manager's model: one record, guarded by one lock.

The manager (manager.py) decides under ``lock`` what happens next and writes the leases,
the deferred requests and the settings; the `Mover` (transitions.py) writes where the model
is when a move it carried out has finished or failed. Nobody reads or writes the record
without holding ``lock``, and nobody holds ``lock`` during a copy.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .leaks import LeakReport
from .states import Location, Transition
from .weights import ModelWeights

__all__ = ["ModelState"]


def _new_counts() -> dict[str, int]:
    return {"loads": 0, "restores": 0, "offloads": 0, "releases": 0, "uses": 0}


@dataclass(eq=False)
class ModelState:
    """Where one model is, what is under way, who uses it, what was asked for, and when."""

    idle_timeout: float
    release_timeout: float
    offload_after_use: bool
    load_func: Callable[[], Any] | None
    leaks: LeakReport
    lock: threading.Condition
    residency: str = "model"  # asked for: "model" or "components" (a pool may choose components)
    location: Location = Location.UNLOADED
    transition: Transition | None = None  # the move under way
    mover_thread: int | None = None  # the thread carrying it out
    model: Any = None
    weights: ModelWeights | None = None
    leases: int = 0
    lease_threads: dict[int, int] = field(default_factory=dict)  # leases held, by thread
    pending: set[str] = field(default_factory=set)  # deferred: offload, release, offload:after_use
    keep_on_device: bool = False  # preheat during a lease: no offload after use when the last one ends
    last_used: float | None = None
    cached_since: float | None = None
    retry_at: float | None = None  # after a failed offload or release: no timeout fires before then
    last_transition: dict[str, Any] | None = None
    last_error: str | None = None
    load_attempt: int = 0
    failed_attempt: int = -1
    counts: dict[str, int] = field(default_factory=_new_counts)

    def begin(self, kind: Transition) -> None:
        """Mark ``kind`` as under way, carried out by the calling thread."""
        self.transition = kind
        self.mover_thread = threading.get_ident()

    def end_move(self) -> None:
        """Mark the move as over and wake the threads waiting for it."""
        self.transition = None
        self.mover_thread = None
        self.lock.notify_all()

    def take(self, lease: bool, now: float) -> Any:
        """Count a use (and a lease) of the resident model and return it."""
        if lease:
            self.leases += 1
            me = threading.get_ident()
            self.lease_threads[me] = self.lease_threads.get(me, 0) + 1
        self.counts["uses"] += 1
        self.last_used = now
        return self.model

    def end_lease_of_thread(self) -> None:
        """Forget one lease of the calling thread (the lease count itself is the caller's)."""
        me = threading.get_ident()
        left = self.lease_threads.get(me, 0) - 1
        if left > 0:
            self.lease_threads[me] = left
        else:
            self.lease_threads.pop(me, None)

    def cancel_moves(self) -> str | None:
        """Drop deferred offloads and releases, and the running jobs' offload after use.

        Returns:
            What was cancelled, in words for a sentence, or None.
        """
        cancelled = [f"the pending {action}" for action in ("offload", "release") if action in self.pending]
        after_use = "offload:after_use" in self.pending or (
            self.leases > 0 and self.offload_after_use and not self.keep_on_device
        )
        if after_use:
            cancelled.append("the offload after use")
        self.keep_on_device = self.leases > 0
        self.pending.clear()
        return " and ".join(cancelled) or None

    def idle_deadline(self) -> float | None:
        """When the idle model is due to be offloaded, or None."""
        if (
            self.location is not Location.GPU
            or self.transition is not None
            or self.leases > 0
            or self.last_used is None
            or not math.isfinite(self.idle_timeout)
        ):
            return None
        return self._not_before_retry(self.last_used + self.idle_timeout)

    def release_deadline(self) -> float | None:
        """When the cached model is due to be released, or None."""
        if (
            self.location is not Location.CPU
            or self.transition is not None
            or self.release_timeout <= 0
            or self.cached_since is None
        ):
            return None
        return self._not_before_retry(self.cached_since + self.release_timeout)

    def _not_before_retry(self, deadline: float) -> float:
        return deadline if self.retry_at is None else max(deadline, self.retry_at)
