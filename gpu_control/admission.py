"""What a manager asks of a pool before and after it moves its model (the `Admission` hooks).

A standalone `GPUResourceManager` has no admission: it moves its model whenever it decides
to. A manager in a `GPUPool` is given one (the pool's `Slot` for that model), and its mover
calls these hooks outside the manager's lock, so that the pool may take its own lock and
read other models' states without a lock-order inversion.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .weights import ModelWeights

__all__ = ["Admission"]


class Admission(Protocol):
    """The pool's side of one model's moves."""

    def loaded(self, weights: ModelWeights) -> None:
        """A load built the host copy (the host tier may release idle cached models now)."""

    def fits_whole(self, nbytes: int) -> bool:
        """Whether a model of ``nbytes`` could ever fit whole; if not, it runs with component residency."""

    def yielding(self) -> bool:
        """New uses of the resident model must wait: a request ranked before them is evicting it,
        or waits for its jobs to end. Reads flags only: called under the manager's lock."""

    def room(self, weights: ModelWeights, reason: str) -> torch.device:
        """Wait until a device has room for the model; return the device to move it to.

        Raises:
            OutOfMemory: the model can never fit (larger than every device's budget).
            TransferError: no room came within the wait timeout, or the model was removed.
        """

    def more_room(self, weights: ModelWeights) -> bool:
        """The driver ran out of memory: evict more; True when a retry is worth it."""

    def left(self) -> None:
        """The model left the device (offload or release ended, or a move in failed)."""

    def idle(self) -> None:
        """The last lease ended: the model may now be evicted."""

    def device_label(self) -> str | None:
        """The device's name in status (``emulated:0``), or None for the manager's own."""
