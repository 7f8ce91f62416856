"""How a pool admits a model: waiting for room, evicting, the host tier, a driver out-of-memory.

`PoolArbiter` is the part of `GPUPool` (pool.py) that its models' `Slot` hooks call: it waits
(under the pool's lock, in the calling thread), carries out the evictions the ledger
(pool_ledger.py) chose outside that lock, and serves the queue whenever room may have
appeared. `GPUPool` adds the models, the registry and the status around it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import torch

from .errors import GpuControlError, OutOfMemory, TransferError, WaitTimeout
from .pool_devices import PoolDevice
from .pool_ledger import Books, Entry, Grant, Waiter, gb_text
from .residency import ComponentWeights
from .weights import ModelWeights

if TYPE_CHECKING:
    from .pool_share import PoolShare
    from .pool_slot import Slot

__all__ = ["POLL_S", "PoolArbiter"]

logger = logging.getLogger("gpu_control.pool")

POLL_S = 0.5
"""A waiting request re-plans at least this often (room may appear without a signal)."""


class PoolArbiter:
    """Admission for a pool's models; `GPUPool` sets the state below in its constructor."""

    _cond: threading.Condition
    _books: Books
    _slots: dict[int, Slot]
    _share: PoolShare | None
    _clock: object
    wait_timeout: float


    def _room(self, entry: Entry, need: int) -> torch.device:
        """Wait until ``entry`` may move in; return its device. See `Admission.room`."""
        with self._cond:
            if entry.removed:
                raise GpuControlError(f"The model {entry.name!r} was removed from the pool.")
            if self._share is not None:
                self._books.remote = self._share.ledger.remote()  # the peers' budgets bound it too
            if not self._books.candidates(entry, need):
                raise self._never_fits(entry, need)
            waiter = self._books.enqueue(entry, need, self._clock())
        started = time.monotonic()
        deadline = started + self.wait_timeout
        try:
            while True:
                grant = self._await_turn(waiter, deadline)
                if grant is None:
                    break
                self._evict(grant.victims, "evicted")
                if self._grant_done(waiter, grant, deadline):
                    break
        except BaseException:
            with self._cond:
                self._books.dequeue(waiter)
                self._reschedule()
            raise
        assert waiter.admitted is not None
        waited = time.monotonic() - started
        if waited >= POLL_S:
            logger.info("%r admitted on %s after waiting %.2f s", entry.name, waiter.admitted.name, waited)
        return waiter.admitted.torch_device

    def _await_turn(self, waiter: Waiter, deadline: float) -> Grant | None:
        """Wait until the waiter is admitted (None) or granted (its grant). Components models
        holding extra room on its devices give it back first (outside the lock: they take theirs)."""
        while True:
            with self._cond:
                self._reschedule()
                while True:
                    if waiter.admitted is not None:
                        return None
                    if waiter.grant is not None:
                        return waiter.grant
                    self._check_wait(waiter, deadline)
                    extras = self._extras(waiter)
                    if extras:
                        break
                    self._cond.wait(min(POLL_S, max(0.0, deadline - time.monotonic())))
                    self._reschedule()
            if not sum(_trim(weights) for weights in extras):
                with self._cond:  # nothing could leave now (running): no tight retry loop
                    self._cond.wait(min(POLL_S, max(0.0, deadline - time.monotonic())))

    def _extras(self, waiter: Waiter) -> list[ComponentWeights]:
        """Under the lock: the components models holding extra room on the waiter's devices."""
        devices = self._books.candidates(waiter.entry, waiter.need)
        found = []
        for entry in self._books.entries:
            weights = self._slots[id(entry)].manager._state.weights if id(entry) in self._slots else None
            if entry.device in devices and isinstance(weights, ComponentWeights) and weights.extra > 0:
                found.append(weights)
        return found

    def _waits_for(self, device: PoolDevice) -> bool:
        """Under the lock: whether a request (ours or another process's) waits for ``device``."""
        if any(device in self._books.candidates(w.entry, w.need) for w in self._books.waiters):
            return True
        remote = self._books.remote
        return remote is not None and any(device.name in (w.get("devices") or []) for w in remote.waiters)

    def _grant_done(self, waiter: Waiter, grant: Grant, deadline: float) -> bool:
        """After the evictions: admit once the victims have left; False to queue again."""
        with self._cond:
            while True:
                staying = [v for v in grant.victims if v.charge > 0 and v.device is grant.device]
                if not staying:
                    self._books.admit(waiter, grant.device)
                    self._reschedule()
                    return True
                views = self._books.views()
                if any(
                    not views[id(victim)].leaving for victim in staying
                ):  # used again, or its offload failed
                    self._books.drop_grant(waiter)
                    self._check_wait(waiter, deadline)
                    self._cond.wait(min(POLL_S, max(0.0, deadline - time.monotonic())))  # no tight retry loop
                    return False
                self._check_wait(waiter, deadline)
                self._cond.wait(min(POLL_S, max(0.0, deadline - time.monotonic())))

    def _check_wait(self, waiter: Waiter, deadline: float) -> None:
        if waiter.entry.removed:
            raise GpuControlError(
                f"The model {waiter.entry.name!r} was removed from the pool while it waited."
            )
        if time.monotonic() < deadline:
            return
        devices = self._books.candidates(waiter.entry, waiter.need)
        views = self._books.views()
        holders = self._books.describe(devices, views, waiter.entry)
        for device in devices:
            room = self._books.driver_room(device, views)
            if room is not None and room < waiter.need:
                holders += (
                    f"; the driver reports only {gb_text(max(0, room))} free on {device.name} "
                    "(memory held outside the pool)"
                )
        raise WaitTimeout(
            f"No room for {waiter.entry.name!r} ({gb_text(waiter.need)}) "
            f"after waiting {self.wait_timeout:g} s: "
            f"{holders}. Try again when those jobs end, release an idle model, or raise the budget, "
            f"the wait timeout or this model's priority."
        )

    def _never_fits(self, entry: Entry, need: int) -> OutOfMemory:
        devices = [entry.pinned] if entry.pinned is not None else self._books.devices
        budget = self._books.budget  # with a share directory: the smallest budget any process declares
        largest = max(devices, key=budget)
        where = (
            f"the budget of {largest.name}"
            if len(devices) == 1
            else f"the largest device budget ({largest.name})"
        )
        return OutOfMemory(
            largest.name,
            need,
            budget(largest),
            message=(
                f"{entry.name!r} needs {gb_text(need)} (weights {gb_text(need - entry.working)} + working "
                f"{gb_text(entry.working)}), more than {where}, {gb_text(budget(largest))}: it can never "
                f"fit. Raise the budget or use a larger device."
            ),
        )

    def _reschedule(self) -> None:
        """Serve the queue (under the lock; host-wide with a share directory); wake who may go."""
        if self._share is None:
            if self._books.schedule():
                self._cond.notify_all()
            return
        self._share.schedule(self._books)
        self._cond.notify_all()  # a peer may have freed room or died: let every waiter look

    def _more_room(self, entry: Entry) -> bool:
        """The driver ran out of memory moving ``entry`` in: evict every idle model it may evict there."""
        with self._cond:
            device = entry.device
            if device is None:
                return False
            victims = self._books.evictable(device, entry.priority, self._books.views())
            for victim in victims:
                victim.claimed = True
        try:
            self._evict(victims, "evicted")
        finally:
            with self._cond:
                for victim in victims:
                    victim.claimed = False
        return bool(victims)

    def _left(self, entry: Entry) -> None:
        """``entry`` left its device (or never got there): its charge ends; serve the queue."""
        with self._cond:
            self._books.set_charge(entry, None, 0)
            self._reschedule()
            self._cond.notify_all()
        if entry.removed:
            self._forget_if_gone(entry)

    def _changed(self) -> None:
        """A model became idle: waiters may evict it now."""
        with self._cond:
            self._reschedule()
            self._cond.notify_all()

    def _host_tier(self, entry: Entry, weights: ModelWeights) -> None:
        """A load built ``weights`` on the host: release idle cached models past the host budget."""
        with self._cond:
            views = self._books.views()
            used = sum(view.host_bytes for view in views.values()) + weights.host_bytes
            if used <= self.host_budget:
                return
            chosen: list[Entry] = []
            for victim in self._books.host_victims(entry.priority, views):
                if used <= self.host_budget:
                    break
                if victim is not entry:
                    chosen.append(victim)
                    used -= views[id(victim)].host_bytes
        self._evict(chosen, "host_budget", action="release")
        if used > self.host_budget:
            logger.warning(
                "The host copies use %s, past the host budget of %s: no idle cached model of priority "
                "%d or lower is left to release.",
                gb_text(used),
                gb_text(self.host_budget),
                entry.priority,
            )

    def _evict(self, victims: list[Entry], reason: str, action: str = "offload") -> None:
        """Offload (or release) each victim now, outside the pool's lock; failures are logged."""
        for victim in victims:
            manager = self._slots[id(victim)].manager
            logger.info(
                "Pool: %s %r (%s) to make room",
                "offloading" if action == "offload" else "releasing",
                victim.name,
                gb_text(victim.charge) if action == "offload" else "host copy",
            )
            try:
                manager._move_out(action, reason)
            except TransferError:
                pass  # logged by the mover and kept in the victim's last_error; the waiter re-plans


def _trim(weights: ComponentWeights) -> int:
    """Have a components model give back its extra room; 0 when it could not (logged)."""
    try:
        return weights.trim()
    except Exception as error:  # a failed offload leaves the component where it was
        logger.warning("Pool: a components model could not give back its extra room: %s", error)
        return 0
