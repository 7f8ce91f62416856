"""Leak detection stays truthful without full garbage collections on hot or locked paths.

A spy on ``gc.collect`` records the generation of every collection: 1 (young generations)
is cheap, 2 (a full collection) stalls every thread for 100+ ms in an app-sized heap.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from gpu_control import GPUResourceManager, LoadError
from gpu_control import leaks
from gpu_control.leaks import CONFIRM_DELAY, FullCollections
from gpu_control.weights import attach

from .helpers import FakeClock, small_model
from .sync import GatedEngine


@pytest.fixture
def collections(monkeypatch):
    """The generations of the collections run during the test; Python's automatic ones are off."""
    calls: list[int] = []
    real = gc.collect

    def spy(generation: int = 2) -> int:
        calls.append(generation)
        return real(generation)

    monkeypatch.setattr(gc, "collect", spy)
    enabled = gc.isenabled()
    gc.disable()
    yield calls
    if enabled:
        gc.enable()


@pytest.fixture
def fresh_rate_limit(monkeypatch):
    """A process-wide rate limit of full collections that has not run yet, on a fake clock."""
    clock = FakeClock()
    limit = FullCollections(interval=60, clock=clock)
    monkeypatch.setattr(leaks, "FULL_COLLECTIONS", limit)
    return clock


def make_manager(**kwargs):
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("auto_monitor", False)
    kwargs.setdefault("offload_after_use", False)
    return GPUResourceManager(**kwargs)


def cyclic_model() -> nn.Module:
    model = small_model()
    model.loop = [model]  # a reference cycle: only a garbage collection frees it
    return model


def test_releasing_an_unreferenced_model_collects_nothing(collections):
    manager = make_manager()
    manager.get_model(small_model)
    manager.force_release()
    manager.get_status()
    assert collections == []
    assert manager.get_status()["leak"] is None


def test_a_model_held_outside_is_reported_after_young_collections_only(collections):
    manager = make_manager()
    kept = manager.get_model(small_model)
    manager.force_release()
    assert collections == [1]
    assert "still referenced outside the manager" in manager.get_status()["leak"]
    for _ in range(5):
        manager.get_status()
    assert collections == [1]  # status reads look at weak references only
    del kept
    assert manager.get_status()["leak"] is None
    assert collections == [1]


def test_status_reads_never_collect_while_device_memory_is_reported_held(collections):
    engine = GatedEngine()
    manager = make_manager(engine=engine)
    model = manager.get_model(small_model)
    alias = model[0].weight.data  # shares the device buffer
    manager.force_offload()
    assert collections == [1]
    assert manager.get_status()["leaked_gb"] > 0
    for _ in range(5):
        manager.get_status()
    assert collections == [1]
    del alias
    status = manager.get_status()
    assert (status["leaked_gb"], status["leak"]) == (0.0, None)
    assert collections == [1]


def test_cyclic_garbage_is_confirmed_free_by_one_deferred_full_collection(collections, fresh_rate_limit):
    clock = FakeClock()
    manager = make_manager(clock=clock)
    model_ref = weakref.ref(manager.get_model(cyclic_model))
    gc.collect()  # the model is old now, as a model loaded minutes ago is
    collections.clear()

    manager.force_release()

    assert collections == [1]  # the young generations do not hold the old cycle
    assert manager.get_status()["leak"] is not None
    assert manager._due(clock()) == pytest.approx(clock() + CONFIRM_DELAY)
    assert collections == [1]
    clock.advance(CONFIRM_DELAY)
    assert manager._due(clock()) is None
    assert collections == [1, 2]
    assert model_ref() is None
    assert manager.get_status()["leak"] is None


def test_a_confirmation_waits_for_the_process_wide_rate_limit(collections, fresh_rate_limit):
    clock = FakeClock()
    manager = make_manager(clock=clock)
    kept = manager.get_model(small_model)
    assert leaks.FULL_COLLECTIONS.run() == 0.0  # another manager has just collected
    fresh_rate_limit.advance(10)
    collections.clear()
    manager.force_release()
    clock.advance(CONFIRM_DELAY)

    assert manager._due(clock()) == pytest.approx(clock() + 50)
    assert collections == [1]
    clock.advance(50)
    fresh_rate_limit.advance(50)
    assert manager._due(clock()) is None
    assert collections == [1, 2]
    assert manager.get_status()["leak"] is not None  # truly held: the report stands
    del kept


def test_full_collections_are_rate_limited(collections):
    clock = FakeClock()
    limit = FullCollections(interval=60, clock=clock)
    assert limit.run() == 0.0
    clock.advance(59)
    assert limit.run() == pytest.approx(1)
    clock.advance(1)
    assert limit.run() == 0.0
    assert collections == [2, 2]


def test_a_failed_load_collects_only_young_generations(collections):
    manager = make_manager()

    def broken_load():
        raise OSError("checkpoint not found")

    with pytest.raises(LoadError):
        manager.get_model(broken_load)
    assert collections == [1]


def test_the_engine_collects_only_young_generations_and_only_when_something_is_alive(collections):
    model = small_model()
    weights = attach(model, torch.device("cpu"), emulate_device=True)
    weights.to_device()
    alias = model[0].weight.data  # shares the device buffer
    weights.to_host()
    assert weights.leaked_bytes() > 0
    assert collections == [1]
    del alias
    assert weights.leaked_bytes() == 0
    assert collections == [1]
    weights.release()
    assert weights.leaked_host_bytes() > 0  # the test still holds the model
    assert collections == [1, 1]
