"""Thread and watcher doubles for the lifecycle tests: workers whose failures fail the test,
a spy on the watcher's sleep, and an engine whose moves a test can hold or break."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from gpu_control.weights import ModelWeights, attach


class Worker(threading.Thread):
    """Runs ``fn`` on a thread; ``finish()`` joins it and raises what it raised (asserts included)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._fn = fn
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as error:  # handed to the test thread by finish()
            self.error = error

    def finish(self, timeout: float = 10.0) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "the worker thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result


class SleepSpy(threading.Event):
    """Stands in for a watcher's wake event and tells when the watcher really goes to sleep.

    ``asleep`` is set when the watcher starts waiting with no wake-up pending, i.e. after a
    cycle that saw every state committed before the last ``wake()``; ``timeouts`` holds how
    long each such sleep was planned to last (seconds of real time).
    """

    def __init__(self) -> None:
        super().__init__()
        self.asleep = threading.Event()
        self.timeouts: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        if not self.is_set():
            self.timeouts.append(timeout)
            self.asleep.set()
        return super().wait(timeout)


def spy_on_watcher(manager: Any) -> SleepSpy:
    """Put a `SleepSpy` in the manager's watcher (before it starts) and start the watcher."""
    spy = SleepSpy()
    manager._watcher._wake = spy
    assert manager.start_monitor()
    return spy


def settled(manager: Any, spy: SleepSpy) -> float | None:
    """Wait until the watcher sleeps having seen the manager's current state; return the sleep's length."""
    spy.asleep.clear()
    manager._watcher.wake()
    assert spy.asleep.wait(5), "the watcher never went to sleep"
    return spy.timeouts[-1]


class RetryLoop(BaseException):
    """Raised by `GatedEngine` when an offload is retried in a loop; not an Exception, so that
    no handler in the manager swallows it and the loop ends."""


class GatedEngine:
    """The real engine (emulating a device on the CPU, so that copies are real) whose offload
    can be held at a gate or made to fail."""

    def __init__(self) -> None:
        self.to_host_calls = 0
        self.in_to_host = threading.Event()
        self.gate: threading.Event | None = None
        self.fail_to_host: BaseException | None = None
        self.max_to_host_calls = 10  # more is a retry loop: end it instead of spinning
        self.weights: ModelWeights | None = None

    def __call__(self, model: Any, device: torch.device, **kwargs: Any) -> ModelWeights:
        weights = attach(model, device, emulate_device=True, **kwargs)
        real_to_host = weights.to_host

        def to_host() -> Any:
            self.to_host_calls += 1
            if self.to_host_calls > self.max_to_host_calls:
                raise RetryLoop(f"to_host was called {self.to_host_calls} times")
            self.in_to_host.set()
            if self.gate is not None:
                assert self.gate.wait(10), "the test never opened the gate"
            if self.fail_to_host is not None:
                raise self.fail_to_host
            return real_to_host()

        weights.to_host = to_host
        self.weights = weights
        return weights


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; fail the test when it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.005)
