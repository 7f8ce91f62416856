"""Doubles for the pool tests: models of exact sizes, a pool on emulated cards, lease holders."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from gpu_control import GPUPool
from gpu_control.weights import ModelWeights, attach

from .sync import Worker

MIB = 2**20


def sized(mib: int, seed: int = 0) -> Callable[[], nn.Module]:
    """A load function for a bias-free linear layer of exactly ``mib`` MiB of float32 weights."""

    def load() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(1024, 256 * mib, bias=False)

    return load


def gib(mib: float) -> float:
    """MiB as the GiB figure a budget takes."""
    return mib / 1024


@contextmanager
def pool_of(**kwargs: Any) -> Iterator[GPUPool]:
    """A pool on emulated cards, closed at the end."""
    kwargs.setdefault("devices", ["emulated:0"])
    pool = GPUPool(**kwargs)
    try:
        yield pool
    finally:
        pool.close()


def keep(pool: GPUPool, name: str, mib: int, **kwargs: Any) -> Any:
    """Add a model that stays on its device until evicted (no offload after use, no idle timeout)."""
    kwargs.setdefault("idle_timeout", float("inf"))
    kwargs.setdefault("offload_after_use", False)
    return pool.add(name, sized(mib), **kwargs)


class Holder:
    """Holds a lease on a model from a worker thread until ``end()``."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.holding = threading.Event()
        self._end = threading.Event()
        self.worker = Worker(self._run)
        self.worker.start()

    def _run(self) -> None:
        with self.manager.use():
            self.holding.set()
            assert self._end.wait(10), "the test never ended the lease"

    def end(self) -> None:
        self._end.set()
        self.worker.finish()


def using(manager: Any) -> Worker:
    """Start a worker that uses the model once (it may wait for room); ``finish()`` raises its error."""

    def run() -> str:
        with manager.use():
            return manager.name

    worker = Worker(run)
    worker.start()
    return worker


def wait_until_waiting(pool: GPUPool, names: list[str], timeout: float = 5.0) -> None:
    """Poll the pool's queue until exactly ``names`` wait, in that order."""
    deadline = time.monotonic() + timeout
    while [w["model"] for w in pool.get_status()["waiting"]] != names:
        assert time.monotonic() < deadline, f"the queue never became {names}: {pool.get_status()['waiting']}"
        time.sleep(0.005)


class FlakyEngine:
    """The real engine on an emulated card whose next ``fail`` restores raise a driver out-of-memory."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.attempts = 0

    def __call__(self, model: Any, device: torch.device, **kwargs: Any) -> ModelWeights:
        weights = attach(model, device, **kwargs)
        real = weights.to_device

        def to_device() -> Any:
            self.attempts += 1
            if self.fail > 0:
                self.fail -= 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return real()

        weights.to_device = to_device
        return weights
