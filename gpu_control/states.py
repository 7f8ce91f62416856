"""The lifecycle's vocabulary: where a model is, which move is under way, what a request did,
and the words its messages use for sizes and timeouts.

`GPUResourceManager` (manager.py) is the state machine that uses these; the public package
re-exports them from there.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

__all__ = [
    "KIND_NAMES",
    "REASONS",
    "ActionResult",
    "Location",
    "Outcome",
    "Transition",
    "human_bytes",
    "seconds_text",
]


class Location(enum.Enum):
    """Where a manager's model is."""

    UNLOADED = "unloaded"  # nothing in memory; the next use calls the load function
    CPU = "cpu"  # in the host cache; the next use restores it to the device
    GPU = "gpu"  # on the compute device, ready to run


class Transition(enum.Enum):
    """A move under way."""

    LOADING = "loading"  # load function running, then first copy to the device
    RESTORING = "restoring"  # host cache -> device
    OFFLOADING = "offloading"  # device -> host cache
    RELEASING = "releasing"  # dropping every copy


class Outcome(str, enum.Enum):
    """What a control request (offload, release, preheat, timeout) did."""

    DONE = "done"  # carried out now
    DEFERRED = "deferred"  # the model is in use or moving; carried out when that ends
    NOTHING_TO_DO = "nothing_to_do"  # already in the asked-for state


@dataclass(frozen=True)
class ActionResult:
    """The answer to a control request.

    Attributes:
        action: ``offload``, ``release``, ``preheat`` or ``timeout``.
        outcome: done, deferred or nothing to do.
        message: one sentence for a person.
    """

    action: str
    outcome: Outcome
    message: str

    def to_dict(self) -> dict[str, str]:
        """The result as JSON-ready data."""
        return {"action": self.action, "outcome": self.outcome.value, "message": self.message}


KIND_NAMES = {
    Transition.LOADING: "load",
    Transition.RESTORING: "restore",
    Transition.OFFLOADING: "offload",
    Transition.RELEASING: "release",
}
"""A transition's name in status (``last_transition.kind``) and in listener events."""

REASONS = (
    "request",
    "after_use",
    "idle_timeout",
    "release_timeout",
    "manual",
    "preheat",
    "evicted",
    "host_budget",
)
"""Why a transition happened (``last_transition.reason``): ``evicted`` when a pool made room on
the device for another model, ``host_budget`` when it released a cached model to stay within
the host budget."""


def human_bytes(n_bytes: int) -> str:
    """``n_bytes`` in GB, MB or B for a log line or message."""
    if n_bytes >= 2**30:
        return f"{n_bytes / 2**30:.2f} GB"
    if n_bytes >= 2**20:
        return f"{n_bytes / 2**20:.1f} MB"
    return f"{n_bytes} B"


def seconds_text(seconds: float) -> str:
    """A timeout for a message: ``60 s``, ``2592000 s``, ``0.25 s`` or ``never``."""
    if math.isinf(seconds):
        return "never"
    if float(seconds).is_integer():
        return f"{int(seconds)} s"
    return f"{seconds:.6g} s"
