"""Several models on one or more devices: budgets, eviction, priorities, waiting, placement.

    pool = GPUPool(devices=["cuda:0", "cuda:1"], budget_gb=20)
    talk = pool.add("infinitetalk", load_infinitetalk, priority=1, working_gb=4)
    multi = pool.add("multitalk", load_multitalk)
    with talk.use() as model:          # a GPUResourceManager: the single-model API works
        ...

Each model keeps its own `GPUResourceManager`, which still decides *when* its model moves.
Before a load or restore its mover asks the pool for room (the `Admission` hooks, carried out
by a `Slot`, pool_slot.py): the pool admits it where it fits, evicts idle models of equal or
lower priority (offload to the host cache: a pointer swap), or makes it wait in a queue served
by priority, then arrival. This module holds the models, the lock and the status; waiting and
evicting are in pool_arbiter.py, the ledger and its decisions in pool_ledger.py, the devices
and budgets in pool_devices.py, sharing with other processes in pool_share.py and share.py.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .config import DEFAULT_IDLE_TIMEOUT, DEFAULT_RELEASE_TIMEOUT
from .errors import InvalidSetting
from .manager import GPUResourceManager
from .memory import GIB, MemoryReading, read_memory
from .monitor import WatcherGroup
from .pool_arbiter import POLL_S, PoolArbiter
from .pool_devices import (
    DEFAULT_WAIT_TIMEOUT,
    PoolDevice,
    device_budgets,
    host_budget_bytes,
    parse_devices,
    validate_gb,
    validate_wait_timeout,
)
from .pool_ledger import Books, Entry, EntryView, gb_text
from .pool_share import PoolShare
from .pool_slot import Slot
from .security import excerpt
from .states import ActionResult, Location
from .weights import ModelWeights, attach

__all__ = ["GPUPool", "POLL_S"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_PRIORITY = 1_000_000


class GPUPool(PoolArbiter):
    """Several models sharing one or more devices within budgets.

    Args:
        devices: None (every visible CUDA device, else the CPU), or names such as
            ``["cuda:0", "cuda:1"]``; ``"emulated:N"`` is the CPU standing in for a card
            with real copies and its own budget (tests, demos without a GPU).
        budget_gb: GiB the pool may use on each device for weights and working memory: None
            (the device's total minus ``reserve_gb``), one number, or a dict by device.
        reserve_gb: GiB left free on each device whose budget is not given.
        host_budget_gb: GiB of host RAM for the models' host copies; None: the pin limit
            (``GPU_PIN_LIMIT_GB``). Past it, idle cached models are released.
        wait_timeout: seconds a load or restore may wait for room before it fails.
        share_dir: a directory every process (and container) sharing these devices mounts:
            their pools then share each device's budget host-wide (share.py).
        driver_free: free bytes the driver reports for a device name, or None when unknown
            (default: CUDA devices read the driver; emulated and CPU devices have no such bound).
        clock: monotonic clock of the models' timeouts and of ``waited_s`` (tests).

    Raises:
        InvalidSetting: a device, budget or timeout that cannot be used.
    """

    def __init__(
        self,
        devices: str | Sequence[Any] | None = None,
        budget_gb: Any = None,
        reserve_gb: Any = 1.0,
        host_budget_gb: Any = None,
        wait_timeout: Any = DEFAULT_WAIT_TIMEOUT,
        *,
        share_dir: str | os.PathLike[str] | None = None,
        driver_free: Callable[[str], int | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        records = parse_devices(devices)
        device_budgets(records, budget_gb, reserve_gb)
        self.wait_timeout = validate_wait_timeout("wait_timeout", wait_timeout)
        self.host_budget = host_budget_bytes(host_budget_gb)
        self._clock = clock
        self._cond = threading.Condition(threading.RLock())
        self._books = Books(records)
        self._books.driver = _driver_probe(driver_free)
        self._names: dict[str, Entry] = {}
        self._slots: dict[int, Slot] = {}
        self._watchers = WatcherGroup(clock=clock, name="gpu-pool-watcher")
        self._share = None if share_dir is None else PoolShare(self, share_dir)
        logger.info(
            "GPU pool on %s (host budget %s, wait timeout %g s)",
            ", ".join(f"{d.name}: {gb_text(d.budget)}" for d in records),
            gb_text(self.host_budget),
            self.wait_timeout,
        )

    # ------------------------------------------------------------------ models

    def add(
        self,
        name: str,
        load_func: Callable[[], Any] | None,
        priority: int = 0,
        working_gb: float = 0.0,
        device: str | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        release_timeout: float = DEFAULT_RELEASE_TIMEOUT,
        offload_after_use: bool = True,
        *,
        mutable: bool = False,
        engine: Callable[..., ModelWeights] | None = None,
        residency: str = "model",
    ) -> GPUResourceManager:
        """Add a model; nothing is loaded until its first use.

        Args:
            name: letters, digits, ``.``, ``_``, ``-`` (it appears in URLs); unique in the pool.
            load_func: builds the model on the host (CPU); the pool measures it before the
                first copy to a device.
            priority: higher keeps its place longer and is served first.
            working_gb: GiB the model needs on the device beyond its weights while it runs.
            device: keep it on this device; None lets the pool place it.
            idle_timeout, release_timeout, offload_after_use: as for `GPUResourceManager`.
            mutable: the model changes its own weights (see `GPUResourceManager`).
            engine: the weight mover (``weights.attach`` by default; tests record moves).
            residency: ``model`` or ``components`` (see `GPUResourceManager`); a model charged
                whole but larger than every device's budget runs with ``components`` anyway.

        Returns:
            The model's `GPUResourceManager`.

        Raises:
            InvalidSetting: a bad name, a name already used, a bad priority, residency, working memory,
                timeout or device.
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidSetting(
                "A model name is 1 to 64 letters, digits, '.', '_' or '-' (starting with a letter "
                "or digit), "
                f"not {excerpt(name)}."
            )
        if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > _MAX_PRIORITY:
            raise InvalidSetting(
                f"priority must be a whole number from -{_MAX_PRIORITY} to {_MAX_PRIORITY}, "
                f"not {excerpt(priority)}."
            )
        working = int(validate_gb("working_gb", working_gb, positive=False) * GIB)
        pinned = None if device is None else self._device(device)
        entry = Entry(name, priority, working, pinned, view=lambda: EntryView())
        slot = Slot(self, entry)
        target = pinned or self._books.devices[0]
        base = engine or attach
        manager = GPUResourceManager(
            idle_timeout,
            release_timeout,
            offload_after_use,
            device=target.torch_device,
            load_func=load_func,
            name=name,
            mutable=mutable,
            clock=self._clock,
            memory_probe=slot.memory,
            engine=functools.partial(base, emulate_device=True) if target.emulated else base,
            admission=slot,
            watcher_group=self._watchers,
            residency=residency,
        )
        slot.manager = manager
        entry.view = slot.view
        with self._cond:
            if name in self._names:
                raise InvalidSetting(
                    f"A model named {name!r} is already in the pool; remove it first or pick another name."
                )
            self._names[name] = entry
            self._slots[id(entry)] = slot
            self._books.entries.append(entry)
        logger.info(
            "Added %r to the pool (priority %d, working %s%s)",
            name,
            priority,
            gb_text(working),
            "" if pinned is None else f", kept on {pinned.name}",
        )
        return manager

    def remove(self, name: str) -> ActionResult:
        """Take a model out of the pool and release it (when its jobs end, if it is in use).

        Waiting requests get its room once it is released.

        Raises:
            KeyError: no such model (the message names the known ones).
        """
        with self._cond:
            entry = self._entry(name)
            entry.removed = True
            del self._names[name]
            for waiter in [w for w in self._books.waiters if w.entry is entry]:
                self._books.dequeue(waiter)
            self._cond.notify_all()
        manager = self._slots[id(entry)].manager
        result = manager.force_release()
        self._forget_if_gone(entry)
        logger.info("Removed %r from the pool: %s", name, result.message)
        return result

    def __getitem__(self, name: str) -> GPUResourceManager:
        with self._cond:
            return self._slots[id(self._entry(name))].manager

    def __contains__(self, name: object) -> bool:
        with self._cond:
            return isinstance(name, str) and name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        with self._cond:
            return len(self._names)

    def names(self) -> list[str]:
        """The models' names, in the order they were added."""
        with self._cond:
            return list(self._names)

    @property
    def devices(self) -> list[str]:
        """The devices' names (``cuda:0``, ``emulated:1``, …)."""
        return [device.name for device in self._books.devices]

    def priority(self, name: str) -> int:
        """A model's priority."""
        with self._cond:
            return self._entry(name).priority

    def close(self) -> None:
        """Release every model and stop the watcher (tests, shutdown)."""
        for name in self.names():
            self.remove(name)
        self._watchers.stop()
        share, self._share = self._share, None  # jobs still running settle locally from now on
        if share is not None:
            share.close()

    # ------------------------------------------------------------------ status

    def get_status(self) -> dict[str, Any]:
        """The pool's devices, host tier, models and queue; never waits for a move.

        Returns:
            ``{"devices": [{"device", "budget_gb", "used_gb", "free_gb", "models"}],
            "host": {"budget_gb", "used_gb"}, "models": {name: <the manager's status> +
            {"priority", "device", "working_gb"}}, "waiting": [{"model", "priority",
            "device", "needed_gb", "waited_s"}]}`` (sizes in GiB).
        """
        with self._cond:
            entries = [self._names[name] for name in self._names]
            slots = [self._slots[id(entry)] for entry in entries]
        models: dict[str, Any] = {}
        for entry, slot in zip(entries, slots):
            status = slot.manager.get_status()
            status.update(priority=entry.priority, device=slot.device_label(), working_gb=entry.working / GIB)
            models[entry.name] = status
        with self._cond:
            if self._share is not None:
                self._books.remote = self._share.ledger.remote()  # other processes, as of now
            views = self._books.views()
            return {
                "devices": self._books.status_devices(),
                "host": {
                    "budget_gb": self.host_budget / GIB,
                    "used_gb": sum(view.host_bytes for view in views.values()) / GIB,
                },
                "models": models,
                "waiting": self._books.status_waiting(self._clock()),
            }

    def _forget_if_gone(self, entry: Entry) -> None:
        """Drop a removed model from the books once it holds nothing."""
        slot = self._slots.get(id(entry))
        if slot is None:
            return
        if slot.manager.location is Location.UNLOADED and slot.manager.transition is None:
            slot.manager.stop_monitor()
            with self._cond:
                if entry in self._books.entries and entry.charge == 0:
                    self._books.entries.remove(entry)
                    del self._slots[id(entry)]
                    self._reschedule()

    def _reading(self, entry: Entry) -> MemoryReading:
        """An emulated device's memory figures: the pool's own accounting."""
        with self._cond:
            device = entry.device or entry.pinned or self._books.devices[0]
            used = self._books.used(device)
            return MemoryReading(
                allocated=used, reserved=used, free=max(0, device.budget - used), total=device.budget
            )

    def _device(self, name: str) -> PoolDevice:
        wanted = str(name).strip().lower()
        if wanted == "cuda":
            wanted = "cuda:0"
        for device in self._books.devices:
            if device.name == wanted:
                return device
        raise InvalidSetting(
            f"Device {excerpt(name)} is not one of the pool's devices ({', '.join(self.devices)})."
        )

    def _entry(self, name: str) -> Entry:
        entry = self._names.get(name) if isinstance(name, str) else None
        if entry is None:
            known = ", ".join(repr(n) for n in self._names) or "none"
            raise KeyError(f"No model named {excerpt(name)} in the pool; known models: {known}.")
        return entry


def _driver_probe(driver_free: Callable[[str], int | None] | None) -> Callable[[PoolDevice], int | None]:
    """Free bytes on a device as its driver reports them (the last word: memory held outside the pool)."""
    if driver_free is not None:
        return lambda device: driver_free(device.name)

    def probe(device: PoolDevice) -> int | None:
        if device.emulated or device.torch_device.type != "cuda":
            return None
        return read_memory(device.torch_device).free

    return probe
