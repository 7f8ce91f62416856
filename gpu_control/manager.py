"""One model's GPU-memory lifecycle: lazy load, leases, offload, release, timeouts, status.

Where the weights are is a `Location`; while they move, `Transition` names the move. One
lock owns the state: decisions are made under it, slow work (loading, copying) runs
outside it while the state says what is under way, and results are committed under it.
Status reads never wait for a copy and never collect garbage.

`GPUResourceManager` below is the state machine: it decides which move is due and when.
Around it: the vocabulary (states.py), the state record and its lock (model_state.py),
carrying out and telling each move (transitions.py), leak reports (leaks.py), the status
schema (status.py) and the idle watcher (monitor.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .admission import Admission
from .config import DEFAULT_IDLE_TIMEOUT, DEFAULT_RELEASE_TIMEOUT, Settings, validate_bool, validate_timeout
from .errors import TransferError
from .leaks import LeakReport
from .memory import MemoryReading, read_memory, resolve_device
from .model_state import ModelState
from .monitor import DeadlineWatcher, WatcherGroup, WatcherMember
from .residency import validate_residency
from .states import ActionResult, Location, Outcome, Transition, seconds_text
from .status import build_status, device_status
from .transitions import Mover
from .weights import ModelWeights, attach

__all__ = ["Location", "Transition", "Outcome", "ActionResult", "GPUResourceManager"]

logger = logging.getLogger(__name__)

LoadFunc = Callable[[], Any]


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
        admission: a pool's hooks: room on a device before each move in (`GPUPool.add`
            passes them; None for a standalone manager).
        watcher_group: share one watcher thread with other managers (a pool's).
        residency: ``model`` (the whole model on the device during a lease) or ``components``
            (one top-level component at a time, for models larger than the GPU; residency.py).

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
        admission: Admission | None = None,
        watcher_group: WatcherGroup | None = None,
        residency: str = "model",
    ) -> None:
        settings = Settings(
            idle_timeout=idle_timeout,
            release_timeout=release_timeout,
            offload_after_use=offload_after_use,
            device=None if device is None else str(device),
        )
        self.name = name
        device = resolve_device(settings.device)
        self._clock = clock
        self._auto_monitor = auto_monitor
        self._cond = threading.Condition(threading.Lock())
        self._state = ModelState(
            idle_timeout=settings.idle_timeout,
            release_timeout=settings.release_timeout,
            offload_after_use=settings.offload_after_use,
            load_func=load_func,
            leaks=LeakReport(name),
            lock=self._cond,
            residency=validate_residency(residency),
        )
        self._admission = admission
        self._mover = Mover(
            name, device, self._state, clock=clock, engine=engine, mutable=mutable,
            memory_probe=memory_probe, before_load=self._before_load, admission=admission,
        )
        if watcher_group is not None:
            self._watcher: DeadlineWatcher | WatcherMember = watcher_group.member(self._due, repr(name))
        else:
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
    def device(self) -> torch.device:
        """The compute device (in a pool: where the model was placed last)."""
        return self._mover.device

    @property
    def idle_timeout(self) -> float:
        """Seconds idle on the device before the model is offloaded."""
        return self._state.idle_timeout

    @property
    def release_timeout(self) -> float:
        """Seconds in the host cache before the model is released (0 = never)."""
        return self._state.release_timeout

    @property
    def offload_after_use(self) -> bool:
        """Whether the model is offloaded as soon as the last lease ends."""
        return self._state.offload_after_use

    @property
    def location(self) -> Location:
        """Where the model is now."""
        return self._state.location

    @property
    def transition(self) -> Transition | None:
        """The move under way, if any."""
        return self._state.transition

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

        Returns:
            done, with the new value in words.

        Raises:
            InvalidSetting: not a valid timeout (see ``config.validate_timeout``); nothing is changed.
        """
        value = validate_timeout("idle timeout", seconds)
        with self._cond:
            self._state.idle_timeout = value
        self._watcher.wake()
        logger.info("Idle timeout of %r set to %s", self.name, seconds_text(value))
        return ActionResult("timeout", Outcome.DONE, f"Idle timeout set to {seconds_text(value)}.")

    def update_release_timeout(self, seconds: float) -> ActionResult:
        """Set the release timeout (seconds in the host cache before releasing; 0 = never).

        Args:
            seconds: 0 (never) or more.

        Returns:
            done, with the new value in words.

        Raises:
            InvalidSetting: not a valid timeout, or infinite; nothing is changed.
        """
        value = validate_timeout("release timeout", seconds, allow_inf=False)
        with self._cond:
            self._state.release_timeout = value
        self._watcher.wake()
        text = "never" if value == 0 else seconds_text(value)
        logger.info("Release timeout of %r set to %s", self.name, text)
        return ActionResult("timeout", Outcome.DONE, f"Release timeout set to {text}.")

    def set_offload_after_use(self, enabled: bool) -> ActionResult:
        """Choose whether the model is offloaded as soon as the last lease ends.

        Args:
            enabled: a boolean, or a true/false string.

        Returns:
            done, with the new state in words.

        Raises:
            InvalidSetting: not a boolean (or a true/false string).
        """
        value = validate_bool("offload_after_use", enabled)
        with self._cond:
            self._state.offload_after_use = value
        self._watcher.wake()
        state = "on" if value else "off"
        return ActionResult("timeout", Outcome.DONE, f"Offload after use turned {state}.")

    def add_transition_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener`` after every finished or failed transition (metrics, audit logs).

        It receives ``{"kind": "load"|"restore"|"offload"|"release", "reason", "seconds",
        "bytes_copied", "ok"}``, outside the manager's lock, in the thread that moved the
        model; an exception it raises is logged and ignored.

        Args:
            listener: called with one event dict per transition.
        """
        self._mover.add_listener(listener)

    def start_monitor(self) -> bool:
        """Start the idle watcher; returns False when it already runs."""
        started = self._watcher.start()
        if started:
            logger.info("GPU watcher started for %r (idle timeout %s)", self.name, seconds_text(self._state.idle_timeout))
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

        Whatever would take it away sooner is cancelled: an offload or release deferred
        while the model is in use or moving, and the offload after use of the jobs running
        now.

        Args:
            load_func: loads the model (on the first use, or after a release).

        Returns:
            done (loaded, restored, or a pending move cancelled), or nothing to do (already
            on the device with nothing pending).

        Raises:
            LoadError: the load function raised.
            TransferError: the weights could not be moved.
        """
        with self._cond:
            cancelled = self._state.cancel_moves()
            already = self._state.location is Location.GPU and self._state.transition is None
        self._acquire(load_func, lease=False, reason="preheat")
        if cancelled:
            logger.info("Preheat of %r cancelled %s", self.name, cancelled)
            return ActionResult(
                "preheat",
                Outcome.DONE,
                f"Preheat cancelled {cancelled}: the model stays on {self._mover.device_name()} "
                "until the idle timeout.",
            )
        if already:
            return ActionResult("preheat", Outcome.NOTHING_TO_DO, "The model is already on the device.")
        where = self._mover.device_name()
        return ActionResult("preheat", Outcome.DONE, f"The model is on {where}, kept until the idle timeout.")

    def get_status(self) -> dict[str, Any]:
        """Return a snapshot of the lifecycle and memory; never waits for a move.

        Returns:
            A JSON-ready dict (the schema in DESIGN.md); sizes ``*_gb`` are GiB.
        """
        fields = device_status(self.device, monitor_running=self.running, reading=self._mover.read_memory())
        fields["device"] = self._mover.device_name()
        now = self._clock()
        with self._cond:
            if self._state.transition is None:
                self._state.leaks.recheck()
            return build_status(self._state, name=self.name, now=now, device_fields=fields)

    @property
    def _weights(self) -> ModelWeights | None:
        """The engine of the loaded model, for tests and tools that look inside."""
        return self._state.weights

    # ------------------------------------------------------------------ internals: the state machine

    def _acquire(self, load_func: LoadFunc | None, *, lease: bool, reason: str) -> Any:
        """Bring the model to the device (loading or restoring it) and return it."""
        try:
            model, moved = self._mover.bring_in(load_func, lease=lease, reason=reason)
        except BaseException:
            self._watcher.wake()
            self._settle_quietly()  # requests deferred while it moved are carried out now
            raise
        if moved:
            self._watcher.wake()
            if not lease:
                self._settle_quietly()
        return model

    def _before_load(self) -> None:
        """Start the idle watcher with the first load (``auto_monitor``)."""
        if self._auto_monitor:
            self.start_monitor()

    def _end_lease(self) -> None:
        """End a lease; after the last one, offload after use (unless preheat said keep) and re-plan."""
        state = self._state
        with self._cond:
            state.leases -= 1
            state.end_lease_of_thread()
            state.last_used = self._clock()
            if state.leases > 0:
                return
            keep, state.keep_on_device = state.keep_on_device, False
            if (
                state.offload_after_use
                and not keep
                and state.location is Location.GPU
                and "release" not in state.pending
            ):
                state.pending.add("offload:after_use")
        self._settle_quietly()
        self._watcher.wake()
        if self._admission is not None:
            self._admission.idle()

    def _request(self, action: str) -> ActionResult:
        """A manual offload or release: done now, deferred, or nothing to do."""
        state = self._state
        with self._cond:
            target = Location.CPU if action == "offload" else Location.UNLOADED
            moving = state.transition
            if moving is not None:
                already = (action == "offload" and moving is Transition.OFFLOADING) or moving is Transition.RELEASING
                if already:
                    return ActionResult(action, Outcome.NOTHING_TO_DO, f"The model is already {moving.value}.")
                state.pending.add(action)
                return ActionResult(
                    action, Outcome.DEFERRED, f"Deferred: the model is {moving.value}; the {action} follows."
                )
            if state.location is target or state.location is Location.UNLOADED:
                where = "released" if state.location is Location.UNLOADED else "in the host cache"
                return ActionResult(action, Outcome.NOTHING_TO_DO, f"Nothing to do: the model is {where}.")
            if state.leases > 0:
                state.pending.add(action)
                return ActionResult(
                    action,
                    Outcome.DEFERRED,
                    f"Deferred: the model is in use ({state.leases} job(s)); the {action} follows when they end.",
                )
        done = self._move_out(action, "manual")
        if done is None:
            return self._request(action)
        return ActionResult(action, Outcome.DONE, done)

    def _settle_quietly(self) -> None:
        """`_settle`, where a failed move (logged, in ``last_error``) must not hide the caller's result."""
        try:
            self._settle()
        except TransferError:
            pass

    def _settle(self) -> None:
        """Carry out deferred requests once no lease is held and nothing moves."""
        state = self._state
        while True:
            with self._cond:
                if state.leases > 0 or state.transition is not None or not state.pending:
                    return
                if "release" in state.pending and state.location is not Location.UNLOADED:
                    action, reason = "release", "manual"
                elif state.location is Location.GPU and "offload" in state.pending:
                    action, reason = "offload", "manual"
                elif state.location is Location.GPU and "offload:after_use" in state.pending:
                    action, reason = "offload", "after_use"
                else:
                    state.pending.clear()
                    return
            if self._move_out(action, reason) is None:
                return

    def _move_out(self, action: str, reason: str, *, if_used_at: float | None = None) -> str | None:
        """Offload or release now if idle (timeouts: and unused since ``if_used_at``); a sentence or None."""
        try:
            done = self._mover.move_out(action, reason, if_used_at=if_used_at)
        except BaseException:
            self._watcher.wake()
            raise
        if done is not None:
            self._watcher.wake()
            self._settle()
        return done

    def _due(self, now: float) -> float | None:
        """Carry out whatever is due at ``now`` (the watcher's callback); return the next deadline."""
        state = self._state
        while True:
            with self._cond:
                idle_at = state.idle_deadline()
                release_at = state.release_deadline()
                confirm_at = state.leaks.confirm_at if state.transition is None else None
                used_at = state.last_used
            if idle_at is not None and now >= idle_at:
                logger.info("Idle %.0f s, auto-offloading %r to the host cache", now - (used_at or now), self.name)
                self._timed_move_out("offload", "idle_timeout", if_used_at=used_at)
                continue
            if release_at is not None and now >= release_at:
                logger.info("Cached %.0f s, auto-releasing %r", state.release_timeout, self.name)
                self._timed_move_out("release", "release_timeout")
                continue
            if confirm_at is not None and now >= confirm_at:
                self._mover.confirm_leak(now)
                continue
            deadlines = [d for d in (idle_at, release_at, confirm_at) if d is not None]
            return min(deadlines) if deadlines else None

    def _timed_move_out(self, action: str, reason: str, *, if_used_at: float | None = None) -> None:
        """A move a timeout asked for; a failure is logged, kept in ``last_error`` and retried later."""
        try:
            self._move_out(action, reason, if_used_at=if_used_at)
        except TransferError:
            pass
