"""A stateful property test of the pool: random interleavings of uses (held on worker threads),
offloads, releases, preheats, timeouts, removals and re-adds over four models and two emulated
cards never pass a budget, never move a leased model, never deadlock, and every request is
served or fails in time with one of the pool's own errors."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gpu_control import GPUPool
from gpu_control.errors import GpuControlError
from gpu_control.weights import ModelWeights, attach

from .helpers import FakeClock
from .pool_helpers import gib, sized

WAIT_S = 0.15
MODELS = {  # name: (MiB, priority, pinned device)
    "a": (1, 0, None),
    "b": (2, 1, None),
    "c": (1, 2, "emulated:0"),
    "d": (2, 0, None),
}
NAMES = st.sampled_from(sorted(MODELS))


class CheckingEngine:
    """The real engine; records a violation when a leased model's weights would move out."""

    def __init__(self, violations: list[str], name: str) -> None:
        self.violations = violations
        self.name = name
        self.manager: Any = None

    def __call__(self, model: Any, device: torch.device, **kwargs: Any) -> ModelWeights:
        weights = attach(model, device, **kwargs)
        for move in ("to_host", "release"):
            real = getattr(weights, move)

            def checked(real=real, move=move) -> Any:
                leases = self.manager._state.leases  # stable: no lease is taken while a move is under way
                if leases:
                    self.violations.append(f"{move} of {self.name!r} with {leases} lease(s)")
                return real()

            setattr(weights, move, checked)
        return weights


class Use(threading.Thread):
    """One request: takes a lease (waiting for room if need be), holds it until released."""

    def __init__(self, manager: Any, errors: list[str]) -> None:
        super().__init__(daemon=True)
        self.manager = manager
        self.errors = errors
        self.release = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        try:
            with self.manager.use():
                if not self.release.wait(30):
                    self.errors.append(f"the lease on {self.manager.name!r} was never ended")
        except GpuControlError:
            pass  # WaitTimeout, OutOfMemory, removed: the pool's own answers
        except BaseException as error:  # anything else fails the property
            self.errors.append(f"{type(error).__name__}: {error}")
        finally:
            self.done.set()


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.violations: list[str] = []
        self.errors: list[str] = []
        self.uses: list[Use] = []
        self.pool = GPUPool(
            devices=["emulated:0", "emulated:1"],
            budget_gb={"emulated:0": gib(2), "emulated:1": gib(3)},
            host_budget_gb=gib(5),
            wait_timeout=WAIT_S,
            clock=self.clock,
        )
        for name in MODELS:
            self._add(name)

    def _add(self, name: str) -> None:
        mib, priority, device = MODELS[name]
        engine = CheckingEngine(self.violations, name)
        engine.manager = self.pool.add(
            name,
            sized(mib),
            priority=priority,
            device=device,
            idle_timeout=5,
            release_timeout=20,
            offload_after_use=False,
            engine=engine,
        )

    # ------------------------------------------------------------------ rules

    @rule(name=NAMES)
    def start_use(self, name: str) -> None:
        if name in self.pool and len(self.uses) < 8:
            use = Use(self.pool[name], self.errors)
            use.start()
            self.uses.append(use)

    @precondition(lambda self: bool(self.uses))
    @rule(index=st.integers(0, 7))
    def end_use(self, index: int) -> None:
        use = self.uses.pop(index % len(self.uses))
        use.release.set()
        assert use.done.wait(10), "a request neither got its lease nor failed in time"

    @rule(name=NAMES, action=st.sampled_from(["force_offload", "force_release", "preheat"]))
    def control(self, name: str, action: str) -> None:
        if name not in self.pool:
            return
        try:
            getattr(self.pool[name], action)()
        except GpuControlError:
            pass

    @rule(seconds=st.sampled_from([1, 6, 25]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.pool._watchers._wake()

    @rule(name=NAMES)
    def remove_or_add(self, name: str) -> None:
        if name in self.pool:
            self.pool.remove(name)
        else:
            self._add(name)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def budgets_hold(self) -> None:
        status = self.pool.get_status()
        for device in status["devices"]:
            assert device["used_gb"] <= device["budget_gb"] + 1e-12, device
        with self.pool._cond:
            entries = list(self.pool._books.entries)
            slots = dict(self.pool._slots)
        real: dict[str, int] = {}
        for entry in entries:
            weights = slots[id(entry)].manager._weights if id(entry) in slots else None
            if weights is not None and entry.device is not None:
                real[entry.device.name] = real.get(entry.device.name, 0) + weights.device_bytes
        for device in status["devices"]:
            assert real.get(device["device"], 0) <= device["budget_gb"] * 2**30, (real, device)

    @invariant()
    def leased_models_stay_put(self) -> None:
        assert not self.violations, self.violations
        for name, model in self.pool.get_status()["models"].items():
            if model["in_use"]:
                assert model["model_location"] == "gpu", (name, model)

    @invariant()
    def nothing_unexpected_failed(self) -> None:
        assert not self.errors, self.errors

    def teardown(self) -> None:
        for use in self.uses:
            use.release.set()
        deadline = time.monotonic() + 10
        for use in self.uses:
            assert use.done.wait(max(0.0, deadline - time.monotonic())), "deadlock: a request never ended"
        self.pool.close()
        assert not self.errors, self.errors
        assert not self.violations, self.violations
        assert all(d["used_gb"] == 0 for d in self.pool.get_status()["devices"])


PoolMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPoolProperties = PoolMachine.TestCase
