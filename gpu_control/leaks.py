"""Leak reports after a move, without stalling status reads.

After an offload the engine holds none of the model's device buffers; after a release the
manager no longer holds the model object. Whatever is still alive then is referenced from
outside the manager (a caller's variable, a captured ``param.data``), or it is cyclic garbage
that the collector has not reached yet. Only a garbage collection tells them apart, and a
full one holds the GIL for 100-300 ms in an app-sized heap: every thread stalls, status
reads included. So a leak is judged in steps, cheapest first:

1. right after the move, weak references say whether anything is alive at all (free; the
   usual case ends here, with no collection);
2. if something is, the young generations are collected (about a millisecond): what a job
   leaves behind (frames, tracebacks, activations) is young;
3. what is still alive is reported, and `CONFIRM_DELAY` seconds later (when a caller's
   ``with ... as model`` name is usually gone too) the manager's watcher thread confirms the
   report with one full collection, outside the manager's lock, at most once every
   `FULL_COLLECTION_INTERVAL` seconds in the whole process;
4. status reads look at weak references only, and clear a report whose references are gone.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from .states import Transition, human_bytes
from .weights import ModelWeights

__all__ = [
    "CONFIRM_DELAY",
    "FULL_COLLECTIONS",
    "FULL_COLLECTION_INTERVAL",
    "MODEL_HELD",
    "FullCollections",
    "LeakReport",
    "collect_young",
    "still_alive",
    "weak",
]

# The lifecycle's log lines keep the logger name they have always had.
logger = logging.getLogger("gpu_control.manager")

CONFIRM_DELAY = 2.0
"""Seconds after a move before the watcher confirms a leak report with a full collection."""

FULL_COLLECTION_INTERVAL = 60.0
"""Least seconds between two confirming full collections, in the whole process."""

MODEL_HELD = (
    "the model object is still referenced outside the manager after release; "
    "its memory is freed only when those references are dropped"
)


def collect_young() -> None:
    """Collect the two young generations: about a millisecond, where a full collection takes 100+."""
    gc.collect(1)


def weak(obj: Any) -> weakref.ref[Any] | None:
    """A weak reference to ``obj``; None for None or an object that takes none."""
    if obj is None:
        return None
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


def still_alive(ref: weakref.ref[Any] | None) -> bool:
    """Whether the object behind ``ref`` outlives a collection of the young generations.

    Nothing is collected when the weak reference is already dead.
    """
    if ref is None or ref() is None:
        return False
    collect_young()
    return ref() is not None


class FullCollections:
    """A rate limit on full garbage collections, shared by every manager of the process.

    Args:
        interval: least seconds between two collections.
        clock: the clock the interval is measured with.
    """

    def __init__(
        self, interval: float = FULL_COLLECTION_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None

    def run(self) -> float:
        """Run a full collection unless one ran less than ``interval`` seconds ago.

        Returns:
            0 when it ran, otherwise the seconds until one may run.
        """
        with self._lock:
            now = self._clock()
            if self._last is not None and now - self._last < self.interval:
                return self.interval - (now - self._last)
            self._last = now
        gc.collect()
        return 0.0


FULL_COLLECTIONS = FullCollections()


class LeakReport:
    """What a manager's last move left alive, and when the watcher should look again.

    The manager calls its methods under its lock, while no move is under way (the engine's
    weak-reference lists change during a move); none of them collects garbage.

    Args:
        name: the model's label in log lines.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.bytes = 0
        self.message: str | None = None
        self.confirm_at: float | None = None  # manager clock: when to confirm with a full collection
        self.generation = 0  # counts reports, so that a confirmation can tell a newer one apart
        self._weights: ModelWeights | None = None
        self._model_ref: weakref.ref[Any] | None = None

    def after_move(
        self,
        kind: Transition,
        weights: ModelWeights,
        leaked: int,
        model_ref: weakref.ref[Any] | None,
        now: float,
    ) -> None:
        """Record what a move left alive.

        Args:
            kind: offloading or releasing.
            weights: the engine that moved the model.
            leaked: its device bytes still alive (``weights.leaked_bytes()``).
            model_ref: after a release, the model object if something outside still holds it.
            now: the manager's clock.
        """
        self.generation += 1
        self.bytes = leaked
        self.message = None
        if leaked > 0:
            self.message = f"{human_bytes(leaked)} still referenced outside the manager"
            logger.warning("After %s of %r: %s", kind.value, self.name, self.message)
        elif model_ref is not None:
            self.message = MODEL_HELD
        held = self.message is not None
        self._weights = weights if held else None
        self._model_ref = model_ref if held else None
        self.confirm_at = now + CONFIRM_DELAY if held else None

    def recheck(self) -> bool:
        """Clear the report once the outside references are gone (weak references only).

        Returns:
            Whether a report remains.
        """
        weights = self._weights
        if weights is None:
            return False
        model_alive = self._model_ref is not None and self._model_ref() is not None
        if model_alive or weights.leaked_bytes(collect=False):
            return True
        logger.info("The memory reported as still referenced for %r is now free", self.name)
        self.bytes = 0
        self.message = None
        self.confirm_at = None
        self._weights = None
        self._model_ref = None
        return False
