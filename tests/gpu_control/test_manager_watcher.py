"""The idle watcher thread re-plans whenever a deadline may have moved, and never spins.

Each test lets the real watcher thread fall asleep (a `SleepSpy` tells when it does and for
how long), then makes one change and checks that the watcher acts on it with no other call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from gpu_control import GPUResourceManager
from gpu_control.monitor import MAX_SLEEP
from gpu_control.transitions import RETRY_AFTER_FAILURE_MIN

from .helpers import FakeClock, small_model
from .sync import GatedEngine, SleepSpy, settled, spy_on_watcher, wait_for


def make_manager(**kwargs):
    engine = GatedEngine()
    kwargs.setdefault("device", "cpu")
    return GPUResourceManager(engine=engine, auto_monitor=False, **kwargs), engine


@contextlib.contextmanager
def watched(**kwargs) -> Iterator[tuple[GPUResourceManager, GatedEngine, FakeClock, SleepSpy]]:
    """A manager on a `FakeClock` whose watcher runs with a `SleepSpy`; its monitor stops at the end."""
    clock = FakeClock()
    manager, engine = make_manager(clock=clock, **kwargs)
    spy = spy_on_watcher(manager)
    try:
        yield manager, engine, clock, spy
    finally:
        manager.stop_monitor()


def test_changing_the_release_timeout_of_a_cached_model_wakes_the_watcher():
    with watched(release_timeout=0) as (manager, _, clock, spy):
        with manager.use(small_model):
            pass
        assert manager.get_status()["model_location"] == "cpu"
        clock.advance(100)
        assert settled(manager, spy) == MAX_SLEEP  # nothing to wait for: release timeout "never"

        spy.asleep.clear()
        manager.update_release_timeout(500)
        assert spy.asleep.wait(5), "the watcher did not re-plan"
        assert spy.timeouts[-1] == pytest.approx(400)  # the new deadline, 500 s after caching

        spy.asleep.clear()
        manager.update_release_timeout(60)  # a deadline already past
        wait_for(lambda: manager.get_status()["model_location"] == "unloaded")
        assert manager.get_status()["last_transition"]["reason"] == "release_timeout"


def test_a_lease_ending_with_offload_after_use_off_wakes_the_watcher():
    with watched(idle_timeout=0, offload_after_use=False) as (manager, _, clock, spy):
        with manager.use(small_model):
            assert settled(manager, spy) == MAX_SLEEP  # in use: no deadline
            assert manager.get_status()["model_location"] == "gpu"
        wait_for(lambda: manager.get_status()["model_location"] == "cpu")
        assert manager.get_status()["last_transition"]["reason"] == "idle_timeout"


def test_a_lease_ending_plans_the_idle_deadline_from_its_end():
    with watched(idle_timeout=30, offload_after_use=False) as (manager, _, clock, spy):
        with manager.use(small_model):
            clock.advance(100)
            assert settled(manager, spy) == MAX_SLEEP
            spy.asleep.clear()
        assert spy.asleep.wait(5), "the watcher did not re-plan when the lease ended"
        assert spy.timeouts[-1] == pytest.approx(30)
        assert manager.get_status()["model_location"] == "gpu"


def test_a_failing_idle_offload_is_retried_after_a_back_off_not_in_a_loop():
    with watched(idle_timeout=0, offload_after_use=False) as (manager, engine, clock, spy):
        engine.fail_to_host = RuntimeError("simulated copy failure")
        manager.get_model(small_model)
        wait_for(lambda: engine.to_host_calls == 1 and manager.get_status()["transition"] is None)
        assert settled(manager, spy) == pytest.approx(RETRY_AFTER_FAILURE_MIN)
        assert engine.to_host_calls == 1
        status = manager.get_status()
        assert (status["model_location"], status["auto_offload_in"]) == ("gpu", RETRY_AFTER_FAILURE_MIN)

        engine.fail_to_host = None
        clock.advance(RETRY_AFTER_FAILURE_MIN)
        manager._watcher.wake()  # stands in for the real seconds the watcher would sleep
        wait_for(lambda: manager.get_status()["model_location"] == "cpu")
        assert engine.to_host_calls == 2
