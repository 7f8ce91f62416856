"""The pool's books: who holds what on which device, who waits, and who may go next.

Plain data and decisions, no threads and no moves: `GPUPool` (pool.py) holds the lock while
it calls these, and carries out the evictions they choose outside it.

How the budget stays exact:

- A model's *charge* (``size + working``) counts against its device from the moment it is
  admitted (before its first byte is copied in) until its offload or release has ended.
- A waiter whose admission needs evictions gets a *grant*: the idle models it will evict
  are *claimed* (nobody else plans with them) and its need is *promised* on the device. Free
  room for planning is ``budget - charges - promises + claimed charges``, so that a promised
  waiter keeps the room its victims free up, and the charges alone never pass the budget.
- With a share directory (share.py), ``remote`` holds what the other processes hold and wait
  for: their charges count against the device too, the smallest budget any of them declares
  is the device's, and their waiters rank with ours (priority, then arrival).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .memory import GIB
from .pool_devices import PoolDevice
from .share import RemoteView

__all__ = ["Books", "Entry", "EntryView", "Grant", "Waiter", "gb_text"]


def gb_text(n_bytes: int) -> str:
    """Bytes for a message: ``1.50 GiB``, or ``24.0 MiB`` below a tenth of a GiB."""
    if abs(n_bytes) >= GIB / 10:
        return f"{n_bytes / GIB:.2f} GiB"
    return f"{n_bytes / 2**20:.1f} MiB"


@dataclass(frozen=True)
class EntryView:
    """What the pool needs to know of a model's state, read under its manager's lock."""

    idle_on_device: bool = False  # on the device, no lease, nothing moving: may be evicted
    cached_idle: bool = False  # in the host cache, no lease, nothing moving: may be released
    leaving: bool = False  # an offload or release is under way
    in_use: int = 0
    last_used: float | None = None
    host_bytes: int = 0
    state: str | None = None  # loading, restoring, gpu, offloading (the shared files' words)


@dataclass(eq=False)
class Entry:
    """One model in the books."""

    name: str
    priority: int
    working: int
    pinned: PoolDevice | None
    view: Callable[[], EntryView] = field(repr=False)
    device: PoolDevice | None = None  # where it is charged now, or was placed last
    charge: int = 0  # bytes counted against ``device`` now
    claimed: bool = False  # a grant will evict it
    draining: bool = False  # in use; a waiter ranked before new uses needs its room: no new leases
    removed: bool = False


@dataclass(eq=False)
class Grant:
    """Admission on ``device`` once ``victims`` have left it."""

    device: PoolDevice
    victims: list[Entry]


@dataclass(eq=False)
class Waiter:
    """A load or restore waiting for room."""

    entry: Entry
    need: int
    seq: int
    since: float
    arrived: float = field(default_factory=time.time)  # wall clock: ranks with other processes' waiters
    grant: Grant | None = None
    admitted: PoolDevice | None = None  # set when the charge is made

    def rank(self) -> tuple[int, float, int]:
        """Served by priority (higher first), then arrival."""
        return (-self.entry.priority, self.arrived, self.seq)


class Books:
    """The ledger of one pool. Every method expects the pool's lock to be held."""

    def __init__(self, devices: list[PoolDevice]) -> None:
        self.devices = devices
        self.entries: list[Entry] = []  # removed ones stay until they hold nothing
        self.waiters: list[Waiter] = []
        self.remote: RemoteView | None = None  # other processes, when the pool shares a directory
        self.driver: Callable[[PoolDevice], int | None] | None = None  # the driver's free bytes
        self._seq = 0
        self._used: dict[int, int] = {}  # bytes charged per device (by id)

    # ------------------------------------------------------------------ figures

    def used(self, device: PoolDevice) -> int:
        """Bytes charged on ``device`` by this process (kept as a running sum: read per status)."""
        return self._used.get(id(device), 0)

    def set_charge(self, entry: Entry, device: PoolDevice | None, nbytes: int) -> None:
        """Charge ``entry`` ``nbytes`` on ``device`` (0: its charge ends; it stays placed there)."""
        if entry.device is not None and entry.charge:
            self._used[id(entry.device)] -= entry.charge
        entry.device = device if device is not None else entry.device
        entry.charge = nbytes
        if entry.device is not None and nbytes:
            self._used[id(entry.device)] = self._used.get(id(entry.device), 0) + nbytes

    def others(self, device: PoolDevice) -> int:
        """Bytes other processes hold on ``device`` (0 without a share directory)."""
        return 0 if self.remote is None else self.remote.used.get(device.name, 0)

    def budget(self, device: PoolDevice) -> int:
        """The device's budget: ours, or a smaller one another process declares."""
        if self.remote is None:
            return device.budget
        return min(device.budget, self.remote.budgets.get(device.name, device.budget))

    def free(self, device: PoolDevice) -> int:
        """Room left for planning: budget - charges (ours and others') - promises + claimed charges."""
        claimed = sum(e.charge for e in self.entries if e.claimed and e.device is device)
        return self.budget(device) - self.used(device) - self.others(device) - self.promised(device) + claimed

    def promised(self, device: PoolDevice) -> int:
        """Bytes granted to waiters on ``device`` that are not charged yet."""
        return sum(w.need for w in self.waiters if w.grant is not None and w.grant.device is device)

    def holders(self, device: PoolDevice) -> list[Entry]:
        """The models charged on ``device``."""
        return [entry for entry in self.entries if entry.device is device and entry.charge > 0]

    def candidates(self, entry: Entry, need: int) -> list[PoolDevice]:
        """The devices ``entry`` may ever use: its pinned one, else any whose budget is large enough."""
        devices = [entry.pinned] if entry.pinned is not None else self.devices
        return [device for device in devices if need <= self.budget(device)]

    # ------------------------------------------------------------------ waiting

    def enqueue(self, entry: Entry, need: int, now: float) -> Waiter:
        """Put a request in the queue (its rank is fixed now)."""
        self._seq += 1
        waiter = Waiter(entry, need, self._seq, now)
        self.waiters.append(waiter)
        return waiter

    def dequeue(self, waiter: Waiter) -> None:
        """Take a request out of the queue (admitted, timed out or failed); unclaim its victims."""
        self.drop_grant(waiter)
        if waiter in self.waiters:
            self.waiters.remove(waiter)

    def drop_grant(self, waiter: Waiter) -> None:
        """Give up a grant (a victim could not be evicted): the waiter queues again, same rank."""
        if waiter.grant is not None:
            for victim in waiter.grant.victims:
                victim.claimed = False
            waiter.grant = None

    def admit(self, waiter: Waiter, device: PoolDevice) -> None:
        """Charge the waiter's model on ``device`` and take it out of the queue."""
        self.dequeue(waiter)
        self.set_charge(waiter.entry, device, waiter.need)
        waiter.admitted = device

    def schedule(self) -> list[Waiter]:
        """Serve the queue in rank order; return the waiters granted or admitted now.

        A waiter that cannot go blocks its devices for the waiters ranked after it, so a
        large or high-priority request is not starved by a stream of small ones.
        """
        served: list[Waiter] = []
        blocked: set[str] = set()
        for entry in self.entries:
            entry.draining = False
        if not self.waiters:
            return served
        views = self._views()
        remote = sorted(
            ((-int(w.get("priority", 0)), float(w.get("arrived", 0.0))), set(w.get("devices") or []))
            for w in (self.remote.waiters if self.remote is not None else [])
        )
        for waiter in sorted((w for w in self.waiters if w.grant is None), key=Waiter.rank):
            for rank, names in remote:  # another process's request ranked before this one
                if rank < waiter.rank()[:2]:
                    blocked.update(names)
            devices = [d for d in self.candidates(waiter.entry, waiter.need) if d.name not in blocked]
            grant = self.plan(waiter, devices, views)
            if grant is None:
                blocked.update(d.name for d in self.candidates(waiter.entry, waiter.need))
                continue
            if grant.victims:
                for victim in grant.victims:
                    victim.claimed = True
                waiter.grant = grant
            else:
                self.admit(waiter, grant.device)
            served.append(waiter)
        self._drain(views)
        return served

    def _drain(self, views: dict[int, EntryView]) -> None:
        """Stop new uses of busy models that the first waiter of a device needs gone.

        A model in use is never evicted, but a stream of overlapping jobs would keep it busy
        forever; new uses of it queue behind the waiter instead (nested uses excepted), so
        that its jobs end and the waiter is served in its turn.
        """
        handled: set[str] = set()
        for waiter in sorted((w for w in self.waiters if w.grant is None), key=Waiter.rank):
            for device in self.candidates(waiter.entry, waiter.need):
                if device.name in handled:
                    continue
                handled.add(device.name)
                busy = sorted(
                    (
                        e
                        for e in self.holders(device)
                        if not e.claimed and e.priority <= waiter.entry.priority and views[id(e)].in_use
                    ),
                    key=lambda e: (e.priority, _age(views[id(e)].last_used)),
                )
                free = self.free(device) + sum(
                    e.charge for e in self.evictable(device, waiter.entry.priority, views)
                )
                chosen = []
                for entry in busy:
                    if free >= waiter.need:
                        break
                    chosen.append(entry)
                    free += entry.charge
                if free >= waiter.need:
                    for entry in chosen:
                        entry.draining = True

    def plan(
        self, waiter: Waiter, devices: Iterable[PoolDevice], views: dict[int, EntryView]
    ) -> Grant | None:
        """Where ``waiter`` goes: the device with most free room that fits it without eviction,
        else the one where eviction frees the fewest bytes; None when neither exists."""
        options = []
        for device in devices:
            victims = self.victims(device, waiter.entry.priority, waiter.need, views)
            if victims is not None:
                options.append((device, victims))
        fits = [device for device, victims in options if not victims]
        if fits:
            return Grant(max(fits, key=self.free), [])
        best: tuple[int, int] | None = None
        chosen: Grant | None = None
        for device, victims in options:
            cost = (sum(v.charge for v in victims), len(victims))
            if best is None or cost < best:
                best, chosen = cost, Grant(device, victims)
        return chosen

    def victims(
        self, device: PoolDevice, priority: int, need: int, views: dict[int, EntryView]
    ) -> list[Entry] | None:
        """Idle models to offload from ``device`` so that ``need`` fits, in eviction order
        (lower priority first, then least recently used); only priorities up to ``priority``.
        None when evicting every such model would not be enough. On a real GPU the driver's
        free memory must also fit it (memory held outside the pool counts there)."""
        free = self.free(device)
        room = self.driver_room(device, views)
        chosen: list[Entry] = []
        for entry in self.evictable(device, priority, views):
            if free >= need and (room is None or room >= need):
                break
            chosen.append(entry)
            free += entry.charge
            if room is not None:
                room += entry.charge - entry.working  # idle: it holds its weights, not its working memory
        return chosen if free >= need and (room is None or room >= need) else None

    def driver_room(self, device: PoolDevice, views: dict[int, EntryView]) -> int | None:
        """What the driver says is free on ``device``, less what was admitted but is not copied yet;
        None when unknown (emulated and CPU devices, no driver figures)."""
        free = None if self.driver is None else self.driver(device)
        if free is None:
            return None
        moving_in = sum(
            e.charge for e in self.holders(device) if views[id(e)].state in ("loading", "restoring")
        )
        return free - moving_in - self.promised(device)

    def evictable(self, device: PoolDevice, priority: int, views: dict[int, EntryView]) -> list[Entry]:
        """Idle models on ``device`` of priority up to ``priority``, in eviction order."""
        found = [
            entry
            for entry in self.holders(device)
            if not entry.claimed and entry.priority <= priority and views[id(entry)].idle_on_device
        ]
        return sorted(found, key=lambda e: (e.priority, _age(views[id(e)].last_used)))

    def host_victims(self, priority: int, views: dict[int, EntryView]) -> list[Entry]:
        """Idle cached models the host tier may release, in order (lower priority, then LRU)."""
        found = [e for e in self.entries if e.priority <= priority and views[id(e)].cached_idle]
        return sorted(found, key=lambda e: (e.priority, _age(views[id(e)].last_used)))

    def _views(self) -> dict[int, EntryView]:
        return {id(entry): entry.view() for entry in self.entries}

    def views(self) -> dict[int, EntryView]:
        """Every model's state now (each read under its manager's lock)."""
        return self._views()

    # ------------------------------------------------------------------ words

    def describe(self, devices: Iterable[PoolDevice], views: dict[int, EntryView], requester: Entry) -> str:
        """What holds ``devices``, for the message of a request that waited in vain."""
        parts = []
        for device in devices:
            words = []
            for entry in self.holders(device):
                view = views.get(id(entry), EntryView())
                if view.in_use:
                    state = f"in use by {view.in_use} job(s)"
                elif view.leaving:
                    state = "leaving"
                elif entry.priority > requester.priority:
                    state = f"idle, priority {entry.priority} above {requester.priority}"
                else:
                    state = "moving in"
                words.append(f"'{entry.name}' ({gb_text(entry.charge)}, {state})")
            for peer, held in self.remote.holders(device.name) if self.remote is not None else []:
                if held.get("in_use"):
                    state = f"in use by {held.get('in_use')} job(s)"
                elif int(held.get("priority", 0)) > requester.priority:
                    state = f"idle, priority {held.get('priority')} above {requester.priority}"
                else:
                    state = f"{held.get('state')}, asked to offload"
                words.append(
                    f"'{held.get('model')}' of process {peer.pid} "
                    f"({gb_text(int(held.get('bytes', 0)))}, {state})"
                )
            if not words:
                promised = self.free(device) < self.budget(device)
                parts.append(
                    f"{device.name} is promised to other waiting models"
                    if promised
                    else f"{device.name} is free"
                )
                continue
            used = self.used(device) + self.others(device)
            parts.append(
                f"{device.name} ({gb_text(used)} of {gb_text(self.budget(device))}) holds " + ", ".join(words)
            )
        return "; ".join(parts)

    def status_devices(self) -> list[dict[str, Any]]:
        """The ``devices`` part of the pool status (with a share directory, ``others``: peers' holdings)."""
        now = time.time()
        result = []
        for device in self.devices:
            used = self.used(device) + self.others(device)
            item: dict[str, Any] = {
                "device": device.name,
                "budget_gb": self.budget(device) / GIB,
                "used_gb": used / GIB,
                "free_gb": max(0, self.budget(device) - used) / GIB,
                "models": [entry.name for entry in self.holders(device)],
            }
            if self.remote is not None:
                item["others"] = [
                    {
                        "pid": peer.pid,
                        "model": held.get("model"),
                        "state": held.get("state"),
                        "gb": int(held.get("bytes", 0)) / GIB,
                        "in_use": int(held.get("in_use", 0)),
                        "priority": int(held.get("priority", 0)),
                        "idle_s": None
                        if held.get("idle_since") is None
                        else max(0.0, now - float(held["idle_since"])),
                    }
                    for peer, held in self.remote.holders(device.name)
                ]
            result.append(item)
        return result

    def status_waiting(self, now: float) -> list[dict[str, Any]]:
        """The ``waiting`` part of the pool status, in serving order."""
        return [
            {
                "model": w.entry.name,
                "priority": w.entry.priority,
                "device": None if w.entry.pinned is None else w.entry.pinned.name,
                "needed_gb": w.need / GIB,
                "waited_s": max(0.0, now - w.since),
            }
            for w in sorted(self.waiters, key=Waiter.rank)
        ]


def _age(last_used: float | None) -> float:
    """Sort key: never used counts as the oldest."""
    return float("-inf") if last_used is None else last_used
