"""Carrying out one transition: begin it under the lock, do the slow work outside it, commit.

The manager (manager.py) decides which move is wanted and when; a `Mover` carries it out on
the shared `ModelState`: it marks the move as under way (status then says so at once), runs
the load function or the copy with the lock released, and writes the result — or leaves a
consistent state after a failure. Then it tells what happened: the ``last_transition``
record, one log line with the memory after the move, and the transition listeners.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import torch

from . import leaks
from .admission import Admission
from .errors import GpuControlError, LoadError, OutOfMemory, TransferError
from .memory import MemoryReading, empty_cache, to_gb
from .model_state import ModelState
from .residency import ComponentWeights, attach_as
from .states import KIND_NAMES, REASONS, Location, Transition, human_bytes
from .weights import ModelWeights, Transfer

__all__ = ["RETRY_AFTER_FAILURE_MIN", "Mover"]

# The lifecycle's log lines keep the logger name they have always had.
logger = logging.getLogger("gpu_control.manager")

YIELD_POLL_S = 0.05
"""How often a use held back by a pool (its model is being evicted) looks again."""

RETRY_AFTER_FAILURE_MIN = 30.0
"""After a failed offload or release the timeouts wait one more timeout, and at least this long."""

TransitionListener = Callable[[dict[str, Any]], None]


class Mover:
    """Carries out and tells the transitions of one manager's model.

    Args:
        name: the model's label in log lines.
        device: the compute device.
        state: the manager's state (and its lock).
        clock: the manager's clock.
        engine: builds the weight mover for a loaded model (``weights.attach``).
        mutable: passed to the engine (copy the weights back at each offload).
        memory_probe: reads the device's memory figures.
        before_load: called before each load function runs (the manager starts its watcher).
        admission: a pool's hooks (room before each move in, news after each move out), or None.
    """

    def __init__(
        self,
        name: str,
        device: torch.device,
        state: ModelState,
        *,
        clock: Callable[[], float],
        engine: Callable[..., ModelWeights],
        mutable: bool,
        memory_probe: Callable[[torch.device], MemoryReading],
        before_load: Callable[[], object],
        admission: Admission | None = None,
    ) -> None:
        self.name = name
        self.device = device
        self._state = state
        self._clock = clock
        self._engine = engine
        self._mutable = mutable
        self._memory_probe = memory_probe
        self._before_load = before_load
        self.admission = admission
        self._listeners: list[TransitionListener] = []
        self._listeners_lock = threading.Lock()

    # ------------------------------------------------------------------ bringing the model in

    def bring_in(self, load_func: Callable[[], Any] | None, *, lease: bool, reason: str) -> tuple[Any, bool]:
        """Load or restore the model to the device, or take it where it is; count the use.

        Waits while another thread moves the model.

        Returns:
            The model, and whether it was moved to the device now.

        Raises:
            LoadError: the load function raised (also for those who waited for it).
            TransferError: the weights could not be moved (OutOfMemory when short of room).
            GpuControlError: no load function, or the load function called the manager.
        """
        state = self._state
        with state.lock:
            if load_func is not None:
                state.load_func = load_func
            waited_for: int | None = None
            while True:
                if state.transition is not None:
                    if state.mover_thread == threading.get_ident():
                        raise GpuControlError(
                            f"The load function called the manager while {state.transition.value}; "
                            "it must build and return the model without using the manager."
                        )
                    if state.transition is Transition.LOADING:
                        waited_for = state.load_attempt
                    state.lock.wait()
                    continue
                if state.location is Location.UNLOADED and waited_for == state.failed_attempt:
                    raise LoadError(f"Loading the model failed: {state.last_error}")
                if state.location is Location.GPU:
                    if self._must_yield():
                        state.lock.wait(YIELD_POLL_S)  # a waiting request evicts it: queue behind it
                        continue
                    return state.take(lease, self._clock()), False
                break
            kind = Transition.RESTORING if state.location is Location.CPU else Transition.LOADING
            func = state.load_func
            if kind is Transition.LOADING and func is None:
                raise GpuControlError(
                    "No load function: pass one to use(), get_model() or preheat(), "
                    "or to GPUResourceManager(load_func=...)."
                )
            if kind is Transition.LOADING:
                state.load_attempt += 1
            attempt = state.load_attempt
            state.begin(kind)
            weights = state.weights
        start = time.perf_counter()
        loaded: ModelWeights | None = None
        try:
            if kind is Transition.LOADING:
                self._before_load()
                weights = loaded = self._load(func)
                if self.admission is not None:
                    self.admission.loaded(weights)
            assert weights is not None
            if self.admission is not None:
                self._place(weights, self.admission.room(weights, reason))
            transfer = self._to_device(weights)
        except BaseException as error:
            self._bring_in_failed(kind, attempt, error, loaded)
            self.notify(kind, reason, time.perf_counter() - start, 0, ok=False)
            raise self._wrap(Transition.RESTORING if loaded is not None else kind, error) from error
        seconds = time.perf_counter() - start
        with state.lock:
            state.weights = weights
            state.model = weights.model
            state.location = Location.GPU
            state.cached_since = None
            state.retry_at = None
            state.last_error = None
            state.counts["loads" if kind is Transition.LOADING else "restores"] += 1
            state.last_transition = self._record(kind, reason, seconds, transfer.bytes_copied)
            model = state.take(lease, self._clock())
            state.end_move()
        verb = "Loaded" if kind is Transition.LOADING else "Restored"
        self._log(verb, reason, seconds, transfer.bytes_copied)
        self.notify(kind, reason, seconds, transfer.bytes_copied, ok=True)
        return model, True

    def _must_yield(self) -> bool:
        """In a pool, whether a new use of the resident model must wait: a request ranked before it
        is evicting it, or waits for its jobs to end. A thread that already holds a lease on it
        never waits (nested uses). Called under the state's lock; reads the pool's flags only."""
        if self.admission is None or threading.get_ident() in self._state.lease_threads:
            return False
        return self.admission.yielding()

    def _load(self, func: Callable[[], Any]) -> ModelWeights | ComponentWeights:
        model = func()
        if model is None:
            raise LoadError("The load function returned None; it must return the model.")
        return attach_as(
            model, self.device, engine=self._engine, mutable=self._mutable, residency=self._state.residency,
            fits_whole=None if self.admission is None else self.admission.fits_whole, name=self.name,
        )

    def _place(self, weights: ModelWeights, device: torch.device) -> None:
        """Move in to ``device`` (a pool may bring a cached model back on another card)."""
        if device != self.device:
            logger.info("Placing %r on %s (was %s)", self.name, device, self.device)
            weights.device = device
            self.device = device

    def _to_device(self, weights: ModelWeights) -> Transfer:
        """Copy the weights to the device; in a pool, a driver out-of-memory evicts more and retries once."""
        try:
            return weights.to_device()
        except torch.cuda.OutOfMemoryError:
            retry = self.admission is not None and self.admission.more_room(weights)
            if not retry:
                raise OutOfMemory(self.device_name(), weights.size_bytes, self.read_memory().free) from None
        logger.warning(
            "The driver ran out of memory moving %r to %s; evicted more, retrying once",
            self.name,
            self.device,
        )
        try:
            return weights.to_device()
        except torch.cuda.OutOfMemoryError:
            raise OutOfMemory(self.device_name(), weights.size_bytes, self.read_memory().free) from None

    def _bring_in_failed(
        self, kind: Transition, attempt: int, error: BaseException, loaded: ModelWeights | None
    ) -> None:
        """Leave a consistent state after a failed load or restore.

        ``loaded``: the load function succeeded but the first move to the device failed (e.g.
        out of memory); the model is then kept in the host cache, so that the next use
        restores it instead of loading it from disk again.
        """
        state = self._state
        message = f"{type(error).__name__}: {error}"
        if loaded is not None and isinstance(error, Exception):
            kind = Transition.RESTORING
        with state.lock:
            if loaded is not None and kind is Transition.RESTORING:
                state.weights = loaded
                state.model = loaded.model
                state.counts["loads"] += 1
            if kind is Transition.LOADING:
                state.location = Location.UNLOADED
                state.weights = None
                state.model = None
                state.failed_attempt = attempt
                state.pending.clear()
            else:
                state.location = Location.CPU
                state.cached_since = self._clock()
                state.pending.discard("offload")
                state.pending.discard("offload:after_use")
            state.last_error = message
            state.end_move()
        if kind is Transition.LOADING:
            leaks.collect_young()  # what a failed load built is young; a full collection stalls every thread
            empty_cache(self.device)
            action = "Loading"
        elif loaded is not None:
            action = "Loaded into the host cache, but moving to the device of"
        else:
            action = "Restoring"
        logger.error("%s %r failed: %s", action, self.name, message)
        if self.admission is not None:
            self.admission.left()

    @staticmethod
    def _wrap(kind: Transition, error: BaseException) -> BaseException:
        if isinstance(error, GpuControlError) or not isinstance(error, Exception):
            return error
        if kind is Transition.LOADING:
            return LoadError(f"Loading the model failed: {type(error).__name__}: {error}")
        return TransferError(f"Moving the model to the device failed: {type(error).__name__}: {error}")

    # ------------------------------------------------------------------ moving the model out

    def move_out(self, action: str, reason: str, *, if_used_at: float | None = None) -> str | None:
        """Offload or release now if the model is idle.

        Args:
            action: ``offload`` or ``release``.
            reason: why (``REASONS``).
            if_used_at: for timeouts, also require that the model was not used since then.

        Returns:
            A sentence for a person, or None when it was not done (in use, moving, already
            there, or used since ``if_used_at``).

        Raises:
            TransferError: the move failed; the model stays where it was.
        """
        state = self._state
        with state.lock:
            if state.transition is not None or state.leases > 0:
                return None
            if if_used_at is not None and state.last_used != if_used_at:
                return None
            if action == "offload" and state.location is not Location.GPU:
                return None
            if action == "release" and state.location is Location.UNLOADED:
                return None
            kind = Transition.OFFLOADING if action == "offload" else Transition.RELEASING
            state.begin(kind)
            weights = state.weights
            assert weights is not None
        start = time.perf_counter()
        held: weakref.ref[Any] | None = None
        try:
            if kind is Transition.OFFLOADING:
                transfer = weights.to_host()
                empty_cache(self.device)
            else:
                transfer, held = self._release(weights)
        except BaseException as error:
            self._move_out_failed(kind, action, reason, weights, error, time.perf_counter() - start)
            if not isinstance(error, Exception):
                raise
            raise TransferError(f"{kind.value.capitalize()} failed: {error}") from error
        seconds = time.perf_counter() - start
        leaked = weights.leaked_bytes()  # weak references first; young generations only if something is alive
        with state.lock:
            if kind is Transition.OFFLOADING:
                state.location = Location.CPU
                state.cached_since = self._clock()
                state.counts["offloads"] += 1
                state.pending.discard("offload")
                state.pending.discard("offload:after_use")
            else:
                state.location = Location.UNLOADED
                state.weights = None
                state.model = None
                state.cached_since = None
                state.counts["releases"] += 1
                state.pending.clear()
            state.retry_at = None
            state.last_transition = self._record(kind, reason, seconds, transfer.bytes_copied)
            state.leaks.after_move(kind, weights, leaked, held, self._clock())
            state.end_move()
        if self.admission is not None:
            self.admission.left()
        verb = "Offloaded" if kind is Transition.OFFLOADING else "Released"
        self._log(verb, reason, seconds, transfer.bytes_copied)
        self.notify(kind, reason, seconds, transfer.bytes_copied, ok=True)
        where = "in the host cache" if kind is Transition.OFFLOADING else "released"
        return f"The model is {where} ({seconds:.2f} s)."

    def _release(self, weights: ModelWeights) -> tuple[Transfer, weakref.ref[Any] | None]:
        """Drop every copy of the model; also return the model object if something outside holds it."""
        with self._state.lock:
            model_ref = leaks.weak(self._state.model)
            self._state.model = None
        transfer = weights.release()
        held = model_ref if leaks.still_alive(model_ref) else None
        if held is not None:
            logger.warning("Released %r, but %s", self.name, leaks.MODEL_HELD)
        empty_cache(self.device)
        return transfer, held

    def _move_out_failed(
        self,
        kind: Transition,
        action: str,
        reason: str,
        weights: ModelWeights,
        error: BaseException,
        seconds: float,
    ) -> None:
        """Leave the model where it was after a failed offload or release; retry it later.

        The timeouts try again one more timeout later (at least `RETRY_AFTER_FAILURE_MIN`
        seconds), not at once: a move that has just failed would most likely fail again.
        """
        state = self._state
        with state.lock:
            state.last_error = f"{type(error).__name__}: {error}"
            if kind is Transition.RELEASING:
                state.model = weights.model
                if state.model is None:  # the engine had dropped the model: nothing usable is left
                    state.location = Location.UNLOADED
                    state.weights = None
            state.pending.discard(action)
            if action == "offload":
                state.pending.discard("offload:after_use")
            timeout = state.idle_timeout if kind is Transition.OFFLOADING else state.release_timeout
            usable = math.isfinite(timeout) and timeout > RETRY_AFTER_FAILURE_MIN
            state.retry_at = self._clock() + (timeout if usable else RETRY_AFTER_FAILURE_MIN)
            state.end_move()
        logger.exception("%s %r failed; the model stays where it was", kind.value.capitalize(), self.name)
        self.notify(kind, reason, seconds, 0, ok=False)

    # ------------------------------------------------------------------ confirming a leak report

    def confirm_leak(self, now: float) -> None:
        """Confirm the leak report with one full garbage collection, outside the lock.

        Only the watcher thread calls this, when ``state.leaks.confirm_at`` is due; the
        process-wide rate limit may put the confirmation off instead.
        """
        state = self._state
        with state.lock:
            if state.transition is not None or not state.leaks.recheck():
                return
            generation = state.leaks.generation
        wait = leaks.FULL_COLLECTIONS.run()
        with state.lock:
            if state.transition is not None or state.leaks.generation != generation:
                return
            if wait > 0:
                state.leaks.confirm_at = now + wait
                return
            state.leaks.confirm_at = None
            held = state.leaks.recheck()
        if not held:
            empty_cache(self.device)

    # ------------------------------------------------------------------ telling

    @staticmethod
    def _record(kind: Transition, reason: str, seconds: float, bytes_copied: int) -> dict[str, Any]:
        """The ``last_transition`` entry of status for a finished move."""
        assert reason in REASONS, reason
        return {
            "kind": KIND_NAMES[kind],
            "reason": reason,
            "seconds": seconds,
            "bytes_copied": bytes_copied,
            "at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def device_name(self) -> str:
        """The device as status names it (a pool's ``emulated:0`` rather than ``cpu``)."""
        label = None if self.admission is None else self.admission.device_label()
        return label or str(self.device)

    def _log(self, verb: str, reason: str, seconds: float, bytes_copied: int) -> None:
        reading = self.read_memory()
        logger.info(
            "%s %r in %.2f s (reason: %s, %s copied, device %s); GPU memory: allocated %.2f GB, reserved %.2f GB",
            verb,
            self.name,
            seconds,
            reason,
            human_bytes(bytes_copied),
            self.device_name(),
            to_gb(reading.allocated),
            to_gb(reading.reserved),
        )

    def add_listener(self, listener: TransitionListener) -> None:
        """Call ``listener`` after every finished or failed transition."""
        with self._listeners_lock:
            self._listeners.append(listener)

    def notify(self, kind: Transition, reason: str, seconds: float, bytes_copied: int, *, ok: bool) -> None:
        """Tell the transition listeners what happened; outside the lock."""
        with self._listeners_lock:
            listeners = list(self._listeners)
        event = {"kind": KIND_NAMES[kind], "reason": reason, "seconds": seconds, "bytes_copied": bytes_copied, "ok": ok}
        for listener in listeners:
            try:
                listener(dict(event))
            except Exception:  # a broken listener must not break a move
                logger.warning("A transition listener of %r failed", self.name, exc_info=True)

    def read_memory(self) -> MemoryReading:
        """The device's memory figures; unknown (zeros/None) when the probe fails."""
        try:
            return self._memory_probe(self.device)
        except Exception:  # a driver or NVML error must not break a move or a status read
            logger.warning("Reading the memory of %s failed", self.device, exc_info=True)
            return MemoryReading()

