"""What status says while an offload runs and after one fails, and what preheat cancels."""

from __future__ import annotations

import threading

import pytest

from gpu_control import GPUResourceManager, Outcome, TransferError
from gpu_control.transitions import RETRY_AFTER_FAILURE_MIN

from .helpers import FakeClock, small_model
from .sync import GatedEngine, Worker, wait_for


def make_manager(**kwargs):
    engine = GatedEngine()
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("auto_monitor", False)
    kwargs.setdefault("offload_after_use", False)
    return GPUResourceManager(engine=engine, **kwargs), engine


def weights_location(engine: GatedEngine) -> str:
    assert engine.weights is not None
    return engine.weights.stats()["location"]


# ---------------------------------------------------------------- an offload under way, a failed one


def test_status_says_gpu_and_offloading_while_an_offload_is_under_way():
    clock = FakeClock()
    manager, engine = make_manager(idle_timeout=60, clock=clock)
    manager.get_model(small_model)
    engine.gate = threading.Event()
    offload = Worker(manager.force_offload)
    offload.start()
    try:
        assert engine.in_to_host.wait(10)
        status = manager.get_status()
        assert (status["model_location"], status["transition"], status["auto_offload_in"]) == (
            "gpu",
            "offloading",
            None,
        )
        assert weights_location(engine) == "device"
    finally:
        engine.gate.set()
    assert offload.finish().outcome is Outcome.DONE
    status = manager.get_status()
    assert (status["model_location"], status["transition"]) == ("cpu", None)
    assert weights_location(engine) == "host"


@pytest.mark.parametrize(("idle_timeout", "retry_in"), [(60.0, 60.0), (0.0, RETRY_AFTER_FAILURE_MIN)])
def test_a_failed_idle_offload_keeps_the_model_on_the_device_and_retries_after_a_back_off(
    idle_timeout, retry_in
):
    clock = FakeClock()
    manager, engine = make_manager(idle_timeout=idle_timeout, clock=clock)
    manager.get_model(small_model)
    engine.fail_to_host = RuntimeError("simulated copy failure")
    clock.advance(idle_timeout)

    assert manager._due(clock()) == pytest.approx(clock() + retry_in)

    status = manager.get_status()
    assert (status["model_location"], status["transition"]) == ("gpu", None)
    assert "simulated copy failure" in status["last_error"]
    assert status["auto_offload_in"] == pytest.approx(retry_in)
    assert weights_location(engine) == "device"
    assert manager._due(clock()) == pytest.approx(clock() + retry_in)  # no second try before the back-off
    assert engine.to_host_calls == 1

    clock.advance(retry_in - 0.1)
    manager._due(clock())
    assert engine.to_host_calls == 1
    engine.fail_to_host = None
    clock.advance(0.1)
    assert manager._due(clock()) is None
    status = manager.get_status()
    assert (status["model_location"], status["last_transition"]["reason"]) == ("cpu", "idle_timeout")
    assert weights_location(engine) == "host"
    assert engine.to_host_calls == 2


def test_a_failed_manual_offload_says_so_and_keeps_the_idle_deadline():
    clock = FakeClock()
    manager, engine = make_manager(idle_timeout=120, clock=clock)
    manager.get_model(small_model)
    engine.fail_to_host = RuntimeError("simulated copy failure")
    with pytest.raises(TransferError, match="simulated copy failure"):
        manager.force_offload()
    status = manager.get_status()
    assert (status["model_location"], status["transition"], status["auto_offload_in"]) == ("gpu", None, 120)
    assert weights_location(engine) == "device"


# ---------------------------------------------------------------- preheat cancels pending moves


def hold_a_lease(manager: GPUResourceManager) -> tuple[Worker, threading.Event, threading.Event]:
    inside, leave = threading.Event(), threading.Event()

    def job() -> None:
        with manager.use(small_model):
            inside.set()
            assert leave.wait(10), "the test never let the job end"

    worker = Worker(job)
    worker.start()
    assert inside.wait(10)
    return worker, inside, leave


@pytest.mark.parametrize("action", ["offload", "release"])
def test_preheat_during_a_job_cancels_a_deferred_request(action):
    clock = FakeClock()
    manager, _ = make_manager(idle_timeout=60, clock=clock)
    worker, _, leave = hold_a_lease(manager)
    try:
        request = manager.force_offload if action == "offload" else manager.force_release
        assert request().outcome is Outcome.DEFERRED
        assert manager.get_status()["pending"] == [action]
        result = manager.preheat()
        assert (result.action, result.outcome, result.message) == (
            "preheat",
            Outcome.DONE,
            f"Preheat cancelled the pending {action}: the model stays on cpu until the idle timeout.",
        )
        assert manager.get_status()["pending"] == []
    finally:
        leave.set()
    worker.finish()
    status = manager.get_status()
    assert (status["model_location"], status["pending"], status["auto_offload_in"]) == ("gpu", [], 60)
    assert (status["counts"]["offloads"], status["counts"]["releases"]) == (0, 0)


def test_preheat_during_a_job_keeps_the_model_on_the_device_after_it_despite_offload_after_use():
    clock = FakeClock()
    manager, _ = make_manager(idle_timeout=60, clock=clock, offload_after_use=True)
    worker, _, leave = hold_a_lease(manager)
    try:
        assert manager.force_release().outcome is Outcome.DEFERRED
        assert manager.preheat().message == (
            "Preheat cancelled the pending release and the offload after use: "
            "the model stays on cpu until the idle timeout."
        )
        assert manager.preheat().outcome is Outcome.NOTHING_TO_DO
    finally:
        leave.set()
    worker.finish()
    status = manager.get_status()
    assert (status["model_location"], status["auto_offload_in"]) == ("gpu", 60)
    with manager.use():  # the next job offloads after use again
        pass
    assert manager.get_status()["model_location"] == "cpu"


def test_a_request_made_after_preheat_is_still_carried_out():
    manager, _ = make_manager()
    worker, _, leave = hold_a_lease(manager)
    try:
        manager.force_release()
        manager.preheat()
        assert manager.force_release().outcome is Outcome.DEFERRED
    finally:
        leave.set()
    worker.finish()
    assert manager.get_status()["model_location"] == "unloaded"


def test_preheat_during_a_job_with_nothing_pending_has_nothing_to_do():
    manager, _ = make_manager()
    worker, _, leave = hold_a_lease(manager)
    try:
        result = manager.preheat()
        assert result.outcome is Outcome.NOTHING_TO_DO
        assert result.message == "The model is already on the device."
    finally:
        leave.set()
    worker.finish()
    assert manager.get_status()["model_location"] == "gpu"


def test_preheat_cancels_a_release_deferred_during_a_load_and_waits_for_the_model():
    manager, _ = make_manager()
    gate = threading.Event()

    def slow_load():
        assert gate.wait(10), "the test never opened the gate"
        return small_model()

    load = Worker(lambda: manager.get_model(slow_load))
    load.start()
    try:
        wait_for(lambda: manager.get_status()["transition"] == "loading")
        assert manager.force_release().outcome is Outcome.DEFERRED
        preheat = Worker(manager.preheat)
        preheat.start()
        wait_for(lambda: manager.get_status()["pending"] == [])
    finally:
        gate.set()
    load.finish()
    assert preheat.finish().message == (
        "Preheat cancelled the pending release: the model stays on cpu until the idle timeout."
    )
    status = manager.get_status()
    counts = status["counts"]
    assert (status["model_location"], counts["loads"], counts["releases"]) == ("gpu", 1, 0)
