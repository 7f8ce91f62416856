"""One model's seat in a pool: the `Admission` hooks its manager's mover calls.

The mover calls them outside the manager's lock; they hand over to the pool (pool.py), which
takes its own lock and may read every model's state (`Slot.view`) under their managers' locks.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .manager import GPUResourceManager
from .memory import MemoryReading, read_memory
from .pool_ledger import Entry, EntryView
from .residency import ComponentWeights, charge_bytes
from .states import Location, Transition
from .weights import ModelWeights

if TYPE_CHECKING:
    from .pool import GPUPool

__all__ = ["Slot"]

_STATE_WORDS = {
    Transition.LOADING: "loading",
    Transition.RESTORING: "restoring",
    Transition.OFFLOADING: "offloading",
    Transition.RELEASING: "offloading",
}


class Slot:
    """One model's `Admission`: its manager's mover calls these, outside the manager's lock."""

    def __init__(self, pool: GPUPool, entry: Entry) -> None:
        self.pool = pool
        self.entry = entry
        self.manager: GPUResourceManager  # set right after the manager is built

    def view(self) -> EntryView:
        """The model's state for the pool's decisions, read under the manager's lock."""
        state = self.manager._state
        with self.manager._cond:
            idle = state.transition is None and state.leases == 0
            weights = state.weights
            return EntryView(
                idle_on_device=idle and state.location is Location.GPU,
                cached_idle=idle and state.location is Location.CPU,
                leaving=state.transition in (Transition.OFFLOADING, Transition.RELEASING),
                in_use=state.leases,
                last_used=state.last_used,
                host_bytes=0 if weights is None else weights.host_bytes,
                state=_STATE_WORDS.get(state.transition)
                if state.transition
                else ("gpu" if state.location is Location.GPU else None),
            )

    def idle_since(self, view: EntryView) -> float | None:
        """When (wall clock) the idle model was last used, for other processes; None when busy."""
        if not view.idle_on_device or view.last_used is None:
            return None
        return time.time() - max(0.0, self.pool._clock() - view.last_used)

    def memory(self, device: torch.device) -> MemoryReading:
        """The manager's memory probe: the driver's figures, or the pool's for an emulated card."""
        placed = self.entry.device or self.entry.pinned or self.pool._books.devices[0]
        if placed.emulated:
            return self.pool._reading(self.entry)
        return read_memory(device)

    def yielding(self) -> bool:
        return self.entry.claimed or self.entry.draining

    def loaded(self, weights: ModelWeights) -> None:
        self.pool._host_tier(self.entry, weights)

    def fits_whole(self, nbytes: int) -> bool:
        """Whether some device's budget holds ``nbytes`` of weights plus the working memory."""
        with self.pool._cond:
            return bool(self.pool._books.candidates(self.entry, nbytes + self.entry.working))

    def room(self, weights: ModelWeights | ComponentWeights, reason: str) -> torch.device:
        # component residency: charged its largest component, not the whole model; more components
        # stay while the device has room (`more`), and leave first when a waiter needs it (`less`)
        if isinstance(weights, ComponentWeights):
            weights.room, weights.give_back = self.more, self.less
        return self.pool._room(self.entry, charge_bytes(weights) + self.entry.working)

    def more(self, nbytes: int) -> bool:
        """Charge ``nbytes`` more for components kept on the device, if its budget has room that
        no waiter waits for (called under the model's `ComponentWeights` lock)."""
        pool, entry = self.pool, self.entry
        with pool._cond:
            device = entry.device
            if device is None or entry.charge <= 0 or entry.removed or pool._waits_for(device):
                return False
            books = pool._books
            room = books.driver_room(device, books.views())
            if books.free(device) < nbytes or (room is not None and room < nbytes):
                return False
            books.set_charge(entry, device, entry.charge + nbytes)
            pool._reschedule()
            return True

    def less(self, nbytes: int) -> None:
        """``nbytes`` charged by `more` are free again."""
        pool, entry = self.pool, self.entry
        with pool._cond:
            if entry.charge > 0:
                pool._books.set_charge(entry, entry.device, max(0, entry.charge - nbytes))
            pool._reschedule()
            pool._cond.notify_all()

    def more_room(self, weights: ModelWeights) -> bool:
        return self.pool._more_room(self.entry)

    def left(self) -> None:
        self.pool._left(self.entry)

    def idle(self) -> None:
        self.pool._changed()

    def device_label(self) -> str | None:
        placed = self.entry.device or self.entry.pinned or self.pool._books.devices[0]
        return placed.name
