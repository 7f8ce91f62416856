"""One model's GPU-memory lifecycle: lazy load, leases, offload, release, timeouts, status.

Where the weights are is a `Location`; while they move, `Transition` names the move. One
lock owns the state: decisions are made under it, slow work (loading, copying) runs
outside it while the state says what is under way, and results are committed under it.
Status reads never wait for a copy.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch

from .config import DEFAULT_IDLE_TIMEOUT, DEFAULT_RELEASE_TIMEOUT, Settings, validate_bool, validate_timeout
from .errors import GpuControlError, LoadError, OutOfMemory, TransferError
from .memory import MemoryReading, device_name, empty_cache, read_memory, resolve_device, to_gb
from .monitor import DeadlineWatcher
from .weights import ModelWeights, Transfer, attach

__all__ = [
    "Location",
    "Transition",
    "Outcome",
    "ActionResult",
    "GPUResourceManager",
]

logger = logging.getLogger(__name__)

LoadFunc = Callable[[], Any]


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


_KIND_NAMES = {
    Transition.LOADING: "load",
    Transition.RESTORING: "restore",
    Transition.OFFLOADING: "offload",
    Transition.RELEASING: "release",
}

_REASONS = ("request", "after_use", "idle_timeout", "release_timeout", "manual", "preheat")


def _human_bytes(n_bytes: int) -> str:
    if n_bytes >= 2**30:
        return f"{n_bytes / 2**30:.2f} GB"
    if n_bytes >= 2**20:
        return f"{n_bytes / 2**20:.1f} MB"
    return f"{n_bytes} B"


class GPUResourceManager:
    """Owns one model's GPU-memory lifecycle.

    Nothing is loaded until the first use. ``with manager.use(load) as model:`` loads or
    restores the model to the device and holds a lease: offload and release requested
    meanwhile are deferred until the last lease ends. When it ends the model goes to the
    host cache at once (``offload_after_use``); an idle model on the device is offloaded
    after ``idle_timeout`` seconds; a cached one is released after ``release_timeout``
    seconds (0 = never).

    Args:
        idle_timeout: seconds idle on the device before offloading (0: as soon as idle,
            ``math.inf``: never).
        release_timeout: seconds in the host cache before releasing (0: never).
        offload_after_use: offload as soon as the last lease ends.
        device: ``cpu``, ``cuda`` or ``cuda:N``; None picks ``cuda`` when available.
        load_func: the default load function (``use()`` and ``get_model()`` may pass one).
        name: a label for logs and status.
        mutable: the model changes its own weights on the device; copy them back on offload.
        clock: monotonic clock for deadlines (tests inject a fake one).
        memory_probe: reads a device's memory figures.
        engine: builds the weight mover for a loaded model (``weights.attach``).
        auto_monitor: start the idle watcher when the first model is loaded.

    Raises:
        InvalidSetting: a timeout, flag or device is not valid.
    """

    def __init__(
        self,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        release_timeout: float = DEFAULT_RELEASE_TIMEOUT,
        offload_after_use: bool = True,
        device: str | torch.device | None = None,
        *,
        load_func: LoadFunc | None = None,
        name: str = "model",
        mutable: bool = False,
        clock: Callable[[], float] = time.monotonic,
        memory_probe: Callable[[torch.device], MemoryReading] = read_memory,
        engine: Callable[..., ModelWeights] = attach,
        auto_monitor: bool = True,
    ) -> None:
        settings = Settings(
            idle_timeout=idle_timeout,
            release_timeout=release_timeout,
            offload_after_use=offload_after_use,
            device=None if device is None else str(device),
        )
        self.name = name
        self.device = resolve_device(settings.device)
        self._idle_timeout = settings.idle_timeout
        self._release_timeout = settings.release_timeout
        self._offload_after_use = settings.offload_after_use
        self._load_func = load_func
        self._mutable = mutable
        self._clock = clock
        self._memory_probe = memory_probe
        self._engine = engine
        self._auto_monitor = auto_monitor

        self._cond = threading.Condition(threading.Lock())
        self._location = Location.UNLOADED
        self._transition: Transition | None = None
        self._mover: int | None = None  # thread id of the thread carrying out the transition
        self._model: Any = None
        self._weights: ModelWeights | None = None
        self._leases = 0
        self._pending: set[str] = set()
        self._last_used: float | None = None
        self._cached_since: float | None = None
        self._last_transition: dict[str, Any] | None = None
        self._last_error: str | None = None
        self._load_attempt = 0
        self._failed_attempt = -1
        self._leak_bytes = 0
        self._leak_message: str | None = None
        self._release_note: str | None = None
        self._released_ref: weakref.ref[Any] | None = None
        self._leak_source: tuple[ModelWeights, weakref.ref[Any] | None] | None = None
        self._leak_checked_at = 0.0
        self._counts = {"loads": 0, "restores": 0, "offloads": 0, "releases": 0, "uses": 0}
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._watcher = DeadlineWatcher(self._due, clock=clock, name=f"gpu-watcher-{name}")

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> GPUResourceManager:
        """Build a manager from a validated `Settings` (other keyword arguments pass through)."""
        return cls(
            idle_timeout=settings.idle_timeout,
            release_timeout=settings.release_timeout,
            offload_after_use=settings.offload_after_use,
            device=settings.device,
            **kwargs,
        )

    # ------------------------------------------------------------------ properties

    @property
    def running(self) -> bool:
        """Whether the idle watcher runs (the seed's attribute)."""
        return self._watcher.running

    @property
    def idle_timeout(self) -> float:
        """Seconds idle on the device before the model is offloaded."""
        return self._idle_timeout

    @property
    def release_timeout(self) -> float:
        """Seconds in the host cache before the model is released (0 = never)."""
        return self._release_timeout

    @property
    def offload_after_use(self) -> bool:
        """Whether the model is offloaded as soon as the last lease ends."""
        return self._offload_after_use

    @property
    def location(self) -> Location:
        """Where the model is now."""
        return self._location

    @property
    def transition(self) -> Transition | None:
        """The move under way, if any."""
        return self._transition

    # ------------------------------------------------------------------ seed API

    def get_model(self, load_func: LoadFunc | None = None) -> Any:
        """Return the model on the device: load it, restore it, or return it at once.

        No lease is held: the idle timeout or a manual offload may move the model while
        the caller still uses it. Prefer ``use()``, which holds a lease.

        Args:
            load_func: loads the model (on the first use, or after a release).

        Returns:
            The model object the load function returned, with its weights on the device.

        Raises:
            LoadError: the load function raised (the next call retries).
            TransferError: the weights could not be moved (OutOfMemory when short of room).
        """
        return self._acquire(load_func, lease=False, reason="request")

    def force_offload(self) -> ActionResult:
        """Move the model to the host cache now (deferred while it is in use).

        Returns:
            done, deferred (in use or moving; carried out when that ends) or nothing to do.
        """
        return self._request("offload")

    def force_release(self) -> ActionResult:
        """Drop the model from the device and the host cache (deferred while in use).

        Returns:
            done, deferred (in use or moving; carried out when that ends) or nothing to do.
        """
        return self._request("release")

    def update_timeout(self, seconds: float) -> ActionResult:
        """Set the idle timeout (seconds on the device before offloading).

        Args:
            seconds: 0 or more; 0 offloads as soon as the model is idle, ``inf`` never.

        Raises:
            InvalidSetting: negative, NaN or not a number; nothing is changed.
        """
        value = validate_timeout("idle timeout", seconds)
        with self._cond:
            self._idle_timeout = value
        self._watcher.wake()
        logger.info("Idle timeout of %r set to %s", self.name, _seconds_text(value))
        return ActionResult("timeout", Outcome.DONE, f"Idle timeout set to {_seconds_text(value)}.")

    def update_release_timeout(self, seconds: float) -> ActionResult:
        """Set the release timeout (seconds in the host cache before releasing; 0 = never).

        Raises:
            InvalidSetting: negative, infinite, NaN or not a number; nothing is changed.
        """
        value = validate_timeout("release timeout", seconds, allow_inf=False)
        with self._cond:
            self._release_timeout = value
        self._watcher.wake()
        text = "never" if value == 0 else _seconds_text(value)
        logger.info("Release timeout of %r set to %s", self.name, text)
        return ActionResult("timeout", Outcome.DONE, f"Release timeout set to {text}.")

    def set_offload_after_use(self, enabled: bool) -> ActionResult:
        """Choose whether the model is offloaded as soon as the last lease ends.

        Raises:
            InvalidSetting: not a boolean (or a true/false string).
        """
        value = validate_bool("offload_after_use", enabled)
        with self._cond:
            self._offload_after_use = value
        self._watcher.wake()
        state = "on" if value else "off"
        return ActionResult("timeout", Outcome.DONE, f"Offload after use turned {state}.")

    def add_transition_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener`` after every finished or failed transition (metrics, audit logs).

        It receives ``{"kind": "load"|"restore"|"offload"|"release", "reason", "seconds",
        "bytes_copied", "ok"}``, outside the manager's lock, in the thread that moved the
        model; an exception it raises is logged and ignored.
        """
        with self._cond:
            self._listeners.append(listener)

    def start_monitor(self) -> bool:
        """Start the idle watcher; returns False when it already runs."""
        started = self._watcher.start()
        if started:
            logger.info("GPU watcher started for %r (idle timeout %s)", self.name, _seconds_text(self._idle_timeout))
        return started

    def stop_monitor(self) -> bool:
        """Stop the idle watcher; returns False when it was not running."""
        return self._watcher.stop()

    # ------------------------------------------------------------------ beyond the seed

    @contextlib.contextmanager
    def use(self, load_func: LoadFunc | None = None) -> Iterator[Any]:
        """Hold the model on the device for the duration of a ``with`` block.

        Offload and release requested meanwhile are deferred until the last lease ends.
        When it ends the model is offloaded at once if ``offload_after_use`` is on (also
        when the block raised).

        Args:
            load_func: loads the model (on the first use, or after a release).

        Yields:
            The model, its weights on the device.

        Raises:
            LoadError: the load function raised (the next use retries).
            TransferError: the weights could not be moved.
        """
        model = self._acquire(load_func, lease=True, reason="request")
        try:
            yield model
        finally:
            del model
            self._end_lease()

    def preheat(self, load_func: LoadFunc | None = None) -> ActionResult:
        """Load or restore the model now and keep it on the device until the idle timeout.

        Raises:
            LoadError: the load function raised.
            TransferError: the weights could not be moved.
        """
        with self._cond:
            already = self._location is Location.GPU and self._transition is None
        self._acquire(load_func, lease=False, reason="preheat")
        if already:
            return ActionResult("preheat", Outcome.NOTHING_TO_DO, "The model is already on the device.")
        return ActionResult("preheat", Outcome.DONE, f"The model is on {self.device}, kept until the idle timeout.")

    def get_status(self) -> dict[str, Any]:
        """Return a snapshot of the lifecycle and memory; never waits for a move.

        Returns:
            A JSON-ready dict (the schema in DESIGN.md); sizes ``*_gb`` are GiB.
        """
        self._recheck_leak()
        now = self._clock()
        with self._cond:
            location = self._location
            transition = self._transition
            leases = self._leases
            last_used = self._last_used
            cached_since = self._cached_since
            weights = self._weights
            status: dict[str, Any] = {
                "name": self.name,
                "model_location": location.value,
                "transition": None if transition is None else transition.value,
                "in_use": leases,
                "pending": sorted(self._pending),
                "idle_timeout": self._idle_timeout if math.isfinite(self._idle_timeout) else None,
                "release_timeout": self._release_timeout,
                "offload_after_use": self._offload_after_use,
                "last_transition": None if self._last_transition is None else dict(self._last_transition),
                "last_error": self._last_error,
                "counts": dict(self._counts),
                "leaked_gb": to_gb(self._leak_bytes),
                "leak": self._leak_message,
            }
            idle_deadline = self._idle_deadline()
            release_deadline = self._release_deadline()
            model_size = None if weights is None else weights.size_bytes
            host_bytes = 0 if weights is None else weights.host_bytes
        idle = location is not Location.UNLOADED and leases == 0 and transition is None
        if location is Location.UNLOADED:
            status["idle_time"] = None
        else:
            status["idle_time"] = (now - last_used) if idle and last_used is not None else 0.0
        status["cached_time"] = (now - cached_since) if location is Location.CPU and cached_since else None
        status["auto_offload_in"] = None if idle_deadline is None else max(0.0, idle_deadline - now)
        status["auto_release_in"] = None if release_deadline is None else max(0.0, release_deadline - now)
        status["monitor_running"] = self.running
        status["device"] = str(self.device)
        status["gpu_available"] = torch.cuda.is_available()
        status["gpu_name"] = device_name(self.device)
        reading = self._read_memory()
        status["gpu_memory_allocated_gb"] = to_gb(reading.allocated)
        status["gpu_memory_reserved_gb"] = to_gb(reading.reserved)
        status["gpu_memory_free_gb"] = to_gb(reading.free)
        status["gpu_memory_total_gb"] = to_gb(reading.total)
        status["model_size_gb"] = to_gb(model_size)
        status["cpu_cache_gb"] = to_gb(host_bytes)
        return status

    # ------------------------------------------------------------------ internals: acquire

    def _acquire(self, load_func: LoadFunc | None, *, lease: bool, reason: str) -> Any:
        """Bring the model to the device (loading or restoring it) and return it."""
        with self._cond:
            if load_func is not None:
                self._load_func = load_func
            waited_for: int | None = None
            while True:
                if self._transition is not None:
                    if self._mover == threading.get_ident():
                        raise GpuControlError(
                            f"The load function called the manager while {self._transition.value}; "
                            "it must build and return the model without using the manager."
                        )
                    if self._transition is Transition.LOADING:
                        waited_for = self._load_attempt
                    self._cond.wait()
                    continue
                if self._location is Location.UNLOADED and waited_for == self._failed_attempt:
                    raise LoadError(f"Loading the model failed: {self._last_error}")
                if self._location is Location.GPU:
                    return self._take_locked(lease)
                break
            kind = Transition.RESTORING if self._location is Location.CPU else Transition.LOADING
            func = self._load_func
            if kind is Transition.LOADING and func is None:
                raise GpuControlError(
                    "No load function: pass one to use(), get_model() or preheat(), "
                    "or to GPUResourceManager(load_func=...)."
                )
            if kind is Transition.LOADING:
                self._load_attempt += 1
            attempt = self._load_attempt
            self._transition = kind
            self._mover = threading.get_ident()
        start = time.perf_counter()
        loaded: ModelWeights | None = None
        try:
            if self._auto_monitor and kind is Transition.LOADING:
                self.start_monitor()
            if kind is Transition.LOADING:
                weights = loaded = self._load(func)
            else:
                assert self._weights is not None
                weights = self._weights
            transfer = self._to_device(weights)
        except BaseException as error:
            self._fail(kind, attempt, error, loaded)
            self._notify(kind, reason, time.perf_counter() - start, 0, ok=False)
            raise self._wrap(Transition.RESTORING if loaded is not None else kind, error) from error
        seconds = time.perf_counter() - start
        with self._cond:
            self._weights = weights
            self._model = weights.model
            self._location = Location.GPU
            self._transition = None
            self._mover = None
            self._cached_since = None
            self._last_error = None
            self._counts["loads" if kind is Transition.LOADING else "restores"] += 1
            self._record(kind, reason, seconds, transfer.bytes_copied)
            model = self._take_locked(lease)
            self._cond.notify_all()
        verb = "Loaded" if kind is Transition.LOADING else "Restored"
        self._log(verb, reason, seconds, transfer.bytes_copied)
        self._notify(kind, reason, seconds, transfer.bytes_copied, ok=True)
        self._watcher.wake()
        if not lease:
            self._settle_quietly()
        return model

    def _take_locked(self, lease: bool) -> Any:
        """Count a use (and a lease) of the resident model; caller holds the lock."""
        if lease:
            self._leases += 1
        self._counts["uses"] += 1
        self._last_used = self._clock()
        return self._model

    def _load(self, func: LoadFunc) -> ModelWeights:
        model = func()
        if model is None:
            raise LoadError("The load function returned None; it must return the model.")
        return self._engine(model, self.device, mutable=self._mutable)

    def _to_device(self, weights: ModelWeights) -> Transfer:
        try:
            return weights.to_device()
        except torch.cuda.OutOfMemoryError:
            free = self._read_memory().free
            raise OutOfMemory(str(self.device), weights.size_bytes, free) from None

    def _fail(
        self, kind: Transition, attempt: int, error: BaseException, loaded: ModelWeights | None = None
    ) -> None:
        """Leave a consistent state after a failed load or restore.

        ``loaded``: the load function succeeded but the first move to the device failed (e.g.
        out of memory); the model is then kept in the host cache, so that the next use
        restores it instead of loading it from disk again.
        """
        message = f"{type(error).__name__}: {error}"
        if loaded is not None and isinstance(error, Exception):
            kind = Transition.RESTORING
        with self._cond:
            if loaded is not None and kind is Transition.RESTORING:
                self._weights = loaded
                self._model = loaded.model
                self._counts["loads"] += 1
            if kind is Transition.LOADING:
                self._location = Location.UNLOADED
                self._weights = None
                self._model = None
                self._failed_attempt = attempt
                self._pending.clear()
            else:
                self._location = Location.CPU
                self._cached_since = self._clock()
                self._pending.discard("offload")
                self._pending.discard("offload:after_use")
            self._transition = None
            self._mover = None
            self._last_error = message
            self._cond.notify_all()
        if kind is Transition.LOADING:
            gc.collect()
            empty_cache(self.device)
        if kind is Transition.LOADING:
            action = "Loading"
        elif loaded is not None:
            action = "Loaded into the host cache, but moving to the device of"
        else:
            action = "Restoring"
        logger.error("%s %r failed: %s", action, self.name, message)
        self._watcher.wake()
        if kind is Transition.RESTORING:
            self._settle_quietly()

    @staticmethod
    def _wrap(kind: Transition, error: BaseException) -> BaseException:
        if isinstance(error, GpuControlError) or not isinstance(error, Exception):
            return error
        if kind is Transition.LOADING:
            return LoadError(f"Loading the model failed: {type(error).__name__}: {error}")
        return TransferError(f"Moving the model to the device failed: {type(error).__name__}: {error}")

    # ------------------------------------------------------------------ internals: leases

    def _end_lease(self) -> None:
        with self._cond:
            self._leases -= 1
            self._last_used = self._clock()
            if self._leases > 0:
                return
            if self._offload_after_use and self._location is Location.GPU and "release" not in self._pending:
                self._pending.add("offload:after_use")
        self._settle_quietly()
        self._watcher.wake()

    def _request(self, action: str) -> ActionResult:
        """A manual offload or release: done now, deferred, or nothing to do."""
        with self._cond:
            target = Location.CPU if action == "offload" else Location.UNLOADED
            moving = self._transition
            if moving is not None:
                already = (action == "offload" and moving is Transition.OFFLOADING) or moving is Transition.RELEASING
                if already:
                    return ActionResult(action, Outcome.NOTHING_TO_DO, f"The model is already {moving.value}.")
                self._pending.add(action)
                return ActionResult(
                    action, Outcome.DEFERRED, f"Deferred: the model is {moving.value}; the {action} follows."
                )
            if self._location is target or self._location is Location.UNLOADED:
                where = "released" if self._location is Location.UNLOADED else "in the host cache"
                return ActionResult(action, Outcome.NOTHING_TO_DO, f"Nothing to do: the model is {where}.")
            if self._leases > 0:
                self._pending.add(action)
                return ActionResult(
                    action,
                    Outcome.DEFERRED,
                    f"Deferred: the model is in use ({self._leases} job(s)); the {action} follows when they end.",
                )
        done = self._move_out(action, "manual")
        if done is None:
            return self._request(action)
        return ActionResult(action, Outcome.DONE, done)

    def _settle_quietly(self) -> None:
        """`_settle`, where a failed move must not hide the caller's own result or error.

        The failure is logged and kept in ``last_error``.
        """
        try:
            self._settle()
        except TransferError:
            pass

    def _settle(self) -> None:
        """Carry out deferred requests once no lease is held and nothing moves."""
        while True:
            with self._cond:
                if self._leases > 0 or self._transition is not None or not self._pending:
                    return
                if "release" in self._pending and self._location is not Location.UNLOADED:
                    action, reason = "release", "manual"
                elif self._location is Location.GPU and "offload" in self._pending:
                    action, reason = "offload", "manual"
                elif self._location is Location.GPU and "offload:after_use" in self._pending:
                    action, reason = "offload", "after_use"
                else:
                    self._pending.clear()
                    return
            if self._move_out(action, reason) is None:
                return

    # ------------------------------------------------------------------ internals: moving out

    def _move_out(self, action: str, reason: str, *, if_used_at: float | None = None) -> str | None:
        """Offload or release now if the model is idle; returns a sentence, or None if not done.

        ``if_used_at`` (for timeouts) also requires that the model was not used since.
        """
        with self._cond:
            if self._transition is not None or self._leases > 0:
                return None
            if if_used_at is not None and self._last_used != if_used_at:
                return None
            if action == "offload" and self._location is not Location.GPU:
                return None
            if action == "release" and self._location is Location.UNLOADED:
                return None
            kind = Transition.OFFLOADING if action == "offload" else Transition.RELEASING
            self._transition = kind
            self._mover = threading.get_ident()
            weights = self._weights
            assert weights is not None
        start = time.perf_counter()
        try:
            transfer = weights.to_host() if kind is Transition.OFFLOADING else self._release(weights)
            empty_cache(self.device)
        except BaseException as error:
            with self._cond:
                self._transition = None
                self._mover = None
                self._last_error = f"{type(error).__name__}: {error}"
                if kind is Transition.RELEASING:
                    self._model = weights.model
                    if self._model is None:  # the engine had dropped the model: nothing usable is left
                        self._location = Location.UNLOADED
                        self._weights = None
                self._pending.discard(action)
                if action == "offload":
                    self._pending.discard("offload:after_use")
                self._cond.notify_all()
            logger.exception("%s %r failed; the model stays where it was", kind.value.capitalize(), self.name)
            self._notify(kind, reason, time.perf_counter() - start, 0, ok=False)
            self._watcher.wake()
            if not isinstance(error, Exception):
                raise
            raise TransferError(f"{kind.value.capitalize()} failed: {error}") from error
        seconds = time.perf_counter() - start
        leak = weights.leaked_bytes()
        with self._cond:
            self._transition = None
            self._mover = None
            if kind is Transition.OFFLOADING:
                self._location = Location.CPU
                self._cached_since = self._clock()
                self._counts["offloads"] += 1
                self._pending.discard("offload")
                self._pending.discard("offload:after_use")
            else:
                self._location = Location.UNLOADED
                self._weights = None
                self._model = None
                self._cached_since = None
                self._counts["releases"] += 1
                self._pending.clear()
            self._record(kind, reason, seconds, transfer.bytes_copied)
            self._set_leak_locked(leak, kind, weights)
            self._cond.notify_all()
        verb = "Offloaded" if kind is Transition.OFFLOADING else "Released"
        self._log(verb, reason, seconds, transfer.bytes_copied)
        self._notify(kind, reason, seconds, transfer.bytes_copied, ok=True)
        self._watcher.wake()
        self._settle()
        where = "in the host cache" if kind is Transition.OFFLOADING else "released"
        return f"The model is {where} ({seconds:.2f} s)."

    def _release(self, weights: ModelWeights) -> Transfer:
        """Drop every copy of the model and check that it is really gone."""
        with self._cond:
            model_ref = _weak(self._model)
            self._model = None
        transfer = weights.release()
        gc.collect()
        self._release_note = None
        self._released_ref = model_ref
        if model_ref is not None and model_ref() is not None:
            self._release_note = (
                "the model object is still referenced outside the manager after release; "
                "its memory is freed only when those references are dropped"
            )
            logger.warning("Released %r, but %s", self.name, self._release_note)
        return transfer

    def _set_leak_locked(self, leak: int, kind: Transition, weights: ModelWeights) -> None:
        """Record what a move left behind; caller holds the lock."""
        self._leak_bytes = leak
        self._leak_message = None
        self._leak_source = None
        if leak > 0:
            self._leak_message = f"{_human_bytes(leak)} still referenced outside the manager"
            logger.warning("After %s of %r: %s", kind.value, self.name, self._leak_message)
        elif kind is Transition.RELEASING and self._release_note:
            self._leak_message = self._release_note
        if self._leak_message is not None:
            released = self._released_ref if kind is Transition.RELEASING else None
            self._leak_source = (weights, released)

    def _recheck_leak(self) -> None:
        """Clear a leak report once the outside references are gone (checked at most once a second).

        A caller often still holds the model for a moment after its lease ends (the ``as``
        name of its ``with`` block), so a leak seen right after a deferred move may vanish.
        """
        with self._cond:
            source = self._leak_source
            if source is None or time.monotonic() - self._leak_checked_at < 1.0:
                return
            self._leak_checked_at = time.monotonic()
        weights, released = source
        leak = weights.leaked_bytes(collect=False)
        model_alive = released is not None and released() is not None
        if leak or model_alive:
            return
        with self._cond:
            if self._leak_source is source:
                logger.info("The memory reported as still referenced for %r is now free", self.name)
                self._leak_source = None
                self._leak_bytes = 0
                self._leak_message = None

    # ------------------------------------------------------------------ internals: deadlines

    def _idle_deadline(self) -> float | None:
        """When the idle model is due to be offloaded; caller holds the lock."""
        if (
            self._location is not Location.GPU
            or self._transition is not None
            or self._leases > 0
            or self._last_used is None
            or not math.isfinite(self._idle_timeout)
        ):
            return None
        return self._last_used + self._idle_timeout

    def _release_deadline(self) -> float | None:
        """When the cached model is due to be released; caller holds the lock."""
        if (
            self._location is not Location.CPU
            or self._transition is not None
            or self._release_timeout <= 0
            or self._cached_since is None
        ):
            return None
        return self._cached_since + self._release_timeout

    def _due(self, now: float) -> float | None:
        """Carry out whatever timeout is due at ``now``; return the next deadline."""
        while True:
            with self._cond:
                idle_at = self._idle_deadline()
                release_at = self._release_deadline()
                used_at = self._last_used
            if idle_at is not None and now >= idle_at:
                logger.info("Idle %.0f s, auto-offloading %r to the host cache", now - (used_at or now), self.name)
                self._move_out("offload", "idle_timeout", if_used_at=used_at)
                continue
            if release_at is not None and now >= release_at:
                logger.info("Cached %.0f s, auto-releasing %r", self._release_timeout, self.name)
                self._move_out("release", "release_timeout")
                continue
            deadlines = [d for d in (idle_at, release_at) if d is not None]
            return min(deadlines) if deadlines else None

    # ------------------------------------------------------------------ internals: records

    def _record(self, kind: Transition, reason: str, seconds: float, bytes_copied: int) -> None:
        """Remember the last transition; caller holds the lock."""
        assert reason in _REASONS, reason
        self._last_transition = {
            "kind": _KIND_NAMES[kind],
            "reason": reason,
            "seconds": seconds,
            "bytes_copied": bytes_copied,
            "at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def _notify(self, kind: Transition, reason: str, seconds: float, bytes_copied: int, *, ok: bool) -> None:
        """Tell the transition listeners what happened; outside the lock."""
        with self._cond:
            listeners = list(self._listeners)
        event = {"kind": _KIND_NAMES[kind], "reason": reason, "seconds": seconds, "bytes_copied": bytes_copied, "ok": ok}
        for listener in listeners:
            try:
                listener(dict(event))
            except Exception:  # a broken listener must not break a move
                logger.warning("A transition listener of %r failed", self.name, exc_info=True)

    def _log(self, verb: str, reason: str, seconds: float, bytes_copied: int) -> None:
        reading = self._read_memory()
        logger.info(
            "%s %r in %.2f s (reason: %s, %s copied, device %s); GPU memory: allocated %.2f GB, reserved %.2f GB",
            verb,
            self.name,
            seconds,
            reason,
            _human_bytes(bytes_copied),
            self.device,
            to_gb(reading.allocated),
            to_gb(reading.reserved),
        )


    def _read_memory(self) -> MemoryReading:
        """The device's memory figures; unknown (zeros/None) when the probe fails."""
        try:
            return self._memory_probe(self.device)
        except Exception:  # a driver or NVML error must not break a move or a status read
            logger.warning("Reading the memory of %s failed", self.device, exc_info=True)
            return MemoryReading()


def _weak(obj: Any) -> weakref.ref[Any] | None:
    if obj is None:
        return None
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


def _seconds_text(seconds: float) -> str:
    if math.isinf(seconds):
        return "never"
    return f"{seconds:g} s"
