"""Test doubles shared by the gpu_control tests: a fake clock and a recording engine."""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from gpu_control.weights import attach


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class RecordingEngine:
    """Wraps the real engine and records each weight move with the lease count at that moment."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.manager: Any = None
        self.fail_to_device = False

    def __call__(self, model: Any, device: torch.device, **kwargs: Any) -> Any:
        inner = attach(model, device, **kwargs)
        engine = self

        class Recorded:
            def __getattr__(self, name: str) -> Any:
                return getattr(inner, name)

            def to_device(self) -> Any:
                engine._note("to_device")
                if engine.fail_to_device:
                    raise RuntimeError("simulated copy failure")
                return inner.to_device()

            def to_host(self) -> Any:
                engine._note("to_host")
                return inner.to_host()

            def release(self) -> Any:
                engine._note("release")
                return inner.release()

        return Recorded()

    def _note(self, what: str) -> None:
        leases = self.manager.get_status()["in_use"] if self.manager is not None else -1
        self.events.append((what, leases))

    def moves(self) -> list[str]:
        return [what for what, _ in self.events]


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
