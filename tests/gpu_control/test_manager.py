"""The lifecycle manager: lazy load, leases, deferred requests, timeouts, errors, threads."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from gpu_control import (
    GpuControlError,
    GPUResourceManager,
    InvalidSetting,
    LoadError,
    Outcome,
    TransferError,
)

from .helpers import FakeClock, RecordingEngine, small_model


def make_manager(**kwargs):
    engine = RecordingEngine()
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("auto_monitor", False)
    manager = GPUResourceManager(engine=engine, **kwargs)
    engine.manager = manager
    return manager, engine


class CountingLoader:
    def __init__(self, fail_times: int = 0, gate: threading.Event | None = None) -> None:
        self.calls = 0
        self.fail_times = fail_times
        self.gate = gate
        self.started = threading.Event()
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self.calls += 1
            call = self.calls
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if call <= self.fail_times:
            raise OSError("checkpoint not found: /models/missing.safetensors")
        return small_model()


def location(manager) -> str:
    return manager.get_status()["model_location"]


# ---------------------------------------------------------------- lazy loading (seed: three requests)


def test_constructing_loads_nothing_and_first_use_loads_once():
    loader = CountingLoader()
    manager, engine = make_manager(offload_after_use=False)
    assert loader.calls == 0
    assert location(manager) == "unloaded"
    first = manager.get_model(loader)
    assert (loader.calls, location(manager)) == (1, "gpu")
    manager.force_offload()
    second = manager.get_model(loader)
    third = manager.get_model(loader)
    assert first is second is third
    assert loader.calls == 1
    assert manager.get_status()["counts"] == {"loads": 1, "restores": 1, "offloads": 1, "releases": 0, "uses": 3}
    assert engine.moves() == ["to_device", "to_host", "to_device"]


def test_get_model_without_a_load_function_says_what_to_do():
    manager, _ = make_manager()
    with pytest.raises(Exception, match="No load function"):
        manager.get_model()
    assert location(manager) == "unloaded"


def test_load_func_given_to_the_constructor_is_used():
    loader = CountingLoader()
    manager, _ = make_manager(load_func=loader)
    with manager.use() as model:
        assert isinstance(model, torch.nn.Module)
    assert loader.calls == 1


# ---------------------------------------------------------------- the seed's usage patterns


def test_seed_single_task_offloads_in_finally_also_on_error():
    manager, _ = make_manager(offload_after_use=False)
    loader = CountingLoader()

    def process(fail: bool):
        try:
            model = manager.get_model(loader)
            if fail:
                raise RuntimeError("bad input")
            return model(torch.ones(1, 16))
        finally:
            manager.force_offload()

    assert process(False).shape == (1, 4)
    assert location(manager) == "cpu"
    with pytest.raises(RuntimeError, match="bad input"):
        process(True)
    assert location(manager) == "cpu"
    assert manager.get_status()["counts"]["offloads"] == 2


def test_seed_batch_reuses_the_model_and_offloads_once_at_the_end():
    manager, engine = make_manager(offload_after_use=False)
    loader = CountingLoader()
    outputs = []
    for i in range(5):
        with manager.use(loader) as model:
            outputs.append(model(torch.full((1, 16), float(i))))
        assert location(manager) == "gpu"
    assert manager.force_offload().outcome is Outcome.DONE
    assert len(outputs) == 5
    assert engine.moves() == ["to_device", "to_host"]
    counts = manager.get_status()["counts"]
    assert (counts["loads"], counts["restores"], counts["offloads"], counts["uses"]) == (1, 0, 1, 5)


def test_seed_long_running_service_keeps_the_model_until_the_long_timeout():
    clock = FakeClock()
    manager, _ = make_manager(idle_timeout=300, offload_after_use=False, clock=clock)
    loader = CountingLoader()
    for _ in range(3):
        manager.get_model(loader)
        clock.advance(200)
        assert manager._due(clock()) is not None
        assert location(manager) == "gpu"
    clock.advance(100)
    manager._due(clock())
    assert location(manager) == "cpu"
    assert manager.get_status()["last_transition"]["reason"] == "idle_timeout"


# ---------------------------------------------------------------- leases and immediate offload


def test_use_offloads_immediately_when_the_last_lease_ends():
    manager, engine = make_manager()
    with manager.use(CountingLoader()):
        assert manager.get_status()["in_use"] == 1
        assert location(manager) == "gpu"
    status = manager.get_status()
    assert (status["model_location"], status["in_use"]) == ("cpu", 0)
    assert status["last_transition"]["kind"] == "offload"
    assert status["last_transition"]["reason"] == "after_use"
    assert engine.events == [("to_device", 0), ("to_host", 0)]


def test_an_exception_inside_a_lease_still_ends_it_and_offloads():
    manager, _ = make_manager()
    with pytest.raises(ZeroDivisionError):
        with manager.use(CountingLoader()):
            raise ZeroDivisionError
    status = manager.get_status()
    assert (status["model_location"], status["in_use"]) == ("cpu", 0)


def test_offload_requested_during_a_lease_is_deferred_then_done():
    manager, engine = make_manager(offload_after_use=False)
    with manager.use(CountingLoader()) as model:
        result = manager.force_offload()
        assert result.outcome is Outcome.DEFERRED
        assert "in use" in result.message
        status = manager.get_status()
        assert (status["model_location"], status["pending"]) == ("gpu", ["offload"])
        assert model(torch.ones(1, 16)).shape == (1, 4)
    status = manager.get_status()
    assert (status["model_location"], status["pending"]) == ("cpu", [])
    assert status["last_transition"]["reason"] == "manual"
    assert all(leases == 0 for what, leases in engine.events if what != "to_device")


def test_release_requested_during_a_lease_is_deferred_then_done():
    manager, engine = make_manager()
    with manager.use(CountingLoader()):
        assert manager.force_release().outcome is Outcome.DEFERRED
        assert location(manager) == "gpu"
    assert location(manager) == "unloaded"
    assert engine.moves() == ["to_device", "release"]
    assert manager.get_status()["counts"]["releases"] == 1


def test_deferred_request_waits_for_the_last_of_several_leases():
    manager, engine = make_manager()
    loader = CountingLoader()
    with manager.use(loader):
        with manager.use(loader):
            assert manager.get_status()["in_use"] == 2
            assert manager.force_release().outcome is Outcome.DEFERRED
        assert location(manager) == "gpu"
        assert manager.get_status()["in_use"] == 1
    assert location(manager) == "unloaded"
    assert "to_host" not in engine.moves()


def test_requests_with_nothing_to_do_say_so():
    manager, _ = make_manager()
    assert manager.force_offload().outcome is Outcome.NOTHING_TO_DO
    assert manager.force_release().outcome is Outcome.NOTHING_TO_DO
    with manager.use(CountingLoader()):
        pass
    assert manager.force_offload().outcome is Outcome.NOTHING_TO_DO
    assert manager.force_release().outcome is Outcome.DONE
    assert manager.force_release().outcome is Outcome.NOTHING_TO_DO


def test_offload_after_use_can_be_switched_off_at_run_time():
    manager, _ = make_manager()
    manager.set_offload_after_use(False)
    with manager.use(CountingLoader()):
        pass
    assert location(manager) == "gpu"
    manager.set_offload_after_use("true")
    with manager.use():
        pass
    assert location(manager) == "cpu"


def test_preheat_loads_and_keeps_the_model_on_the_device():
    clock = FakeClock()
    manager, _ = make_manager(idle_timeout=60, clock=clock)
    loader = CountingLoader()
    assert manager.preheat(loader).outcome is Outcome.DONE
    assert location(manager) == "gpu"
    assert manager.get_status()["last_transition"]["reason"] == "preheat"
    assert manager.preheat().outcome is Outcome.NOTHING_TO_DO
    assert manager.get_status()["auto_offload_in"] == pytest.approx(60)


def test_release_drops_the_model_and_the_next_use_loads_again():
    manager, _ = make_manager()
    loader = CountingLoader()
    with manager.use(loader):
        pass
    assert manager.force_release().outcome is Outcome.DONE
    status = manager.get_status()
    assert (status["model_location"], status["model_size_gb"], status["cpu_cache_gb"]) == ("unloaded", None, 0.0)
    with manager.use(loader):
        pass
    assert loader.calls == 2


def test_release_reports_a_model_still_referenced_outside():
    manager, _ = make_manager()
    with manager.use(CountingLoader()) as model:
        kept = model
    manager.force_release()
    assert "still referenced outside the manager" in manager.get_status()["leak"]
    del kept


def test_a_leak_report_clears_once_the_outside_reference_is_dropped():
    manager, _ = make_manager()
    with manager.use(CountingLoader()) as model:
        manager.force_release()
    assert manager.get_status()["leak"] is not None
    del model
    assert manager.get_status()["leak"] is None


def test_release_of_an_unreferenced_model_reports_no_leak():
    manager, _ = make_manager()
    with manager.use(CountingLoader()):
        pass
    manager.force_release()
    assert manager.get_status()["leak"] is None


# ---------------------------------------------------------------- errors


def test_a_failing_load_leaves_unloaded_with_last_error_and_the_next_use_retries():
    manager, _ = make_manager()
    loader = CountingLoader(fail_times=1)
    with pytest.raises(LoadError, match="checkpoint not found"):
        with manager.use(loader):
            pytest.fail("the block must not run when loading failed")
    status = manager.get_status()
    assert (status["model_location"], status["transition"], status["in_use"]) == ("unloaded", None, 0)
    assert "OSError: checkpoint not found" in status["last_error"]
    with manager.use(loader):
        assert location(manager) == "gpu"
    assert loader.calls == 2
    assert manager.get_status()["last_error"] is None


def test_a_load_function_returning_none_is_an_error_that_says_so():
    manager, _ = make_manager()
    with pytest.raises(LoadError, match="returned None"):
        manager.get_model(lambda: None)
    assert location(manager) == "unloaded"


def test_a_failing_restore_keeps_the_model_in_the_host_cache():
    manager, engine = make_manager()
    with manager.use(CountingLoader()):
        pass
    engine.fail_to_device = True
    with pytest.raises(TransferError, match="simulated copy failure"):
        manager.get_model()
    status = manager.get_status()
    assert (status["model_location"], status["transition"]) == ("cpu", None)
    assert "simulated copy failure" in status["last_error"]
    engine.fail_to_device = False
    manager.get_model()
    assert location(manager) == "gpu"


def test_waiters_on_a_failed_load_get_its_error_instead_of_loading_again():
    gate = threading.Event()
    loader = CountingLoader(fail_times=1, gate=gate)
    manager, _ = make_manager()
    errors: list[BaseException] = []

    def worker():
        try:
            manager.get_model(loader)
        except LoadError as error:
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    assert loader.started.wait(5)
    time.sleep(0.05)
    gate.set()
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()
    assert loader.calls == 1
    assert len(errors) == 4


# ---------------------------------------------------------------- threads and status


def test_concurrent_first_use_loads_exactly_once():
    gate = threading.Event()
    loader = CountingLoader(gate=gate)
    manager, _ = make_manager(offload_after_use=False)
    models = []

    def worker():
        with manager.use(loader) as model:
            models.append(model)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    assert loader.started.wait(5)
    gate.set()
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()
    assert loader.calls == 1
    assert len(models) == 8 and all(m is models[0] for m in models)
    counts = manager.get_status()["counts"]
    assert (counts["loads"], counts["uses"]) == (1, 8)


def test_status_answers_at_once_during_a_slow_load():
    gate = threading.Event()
    loader = CountingLoader(gate=gate)
    manager, _ = make_manager()
    thread = threading.Thread(target=manager.get_model, args=(loader,))
    thread.start()
    assert loader.started.wait(5)
    start = time.perf_counter()
    status = manager.get_status()
    elapsed = time.perf_counter() - start
    assert (status["model_location"], status["transition"]) == ("unloaded", "loading")
    assert elapsed < 1.0
    gate.set()
    thread.join(5)
    assert not thread.is_alive()
    assert manager.get_status()["transition"] is None


def test_offload_requested_while_loading_is_deferred_until_the_load_ends():
    gate = threading.Event()
    loader = CountingLoader(gate=gate)
    manager, _ = make_manager(offload_after_use=False)
    thread = threading.Thread(target=manager.preheat, args=(loader,))
    thread.start()
    assert loader.started.wait(5)
    result = manager.force_offload()
    assert result.outcome is Outcome.DEFERRED
    assert "loading" in result.message
    gate.set()
    thread.join(5)
    assert not thread.is_alive()
    assert location(manager) == "cpu"


def test_status_has_the_seed_fields_and_the_design_schema():
    manager, _ = make_manager()
    status = manager.get_status()
    seed_fields = {"model_location", "idle_time", "idle_timeout", "monitor_running", "gpu_memory_allocated_gb",
                   "gpu_memory_reserved_gb"}
    design_fields = {"transition", "in_use", "release_timeout", "offload_after_use", "auto_offload_in",
                     "auto_release_in", "device", "gpu_available", "gpu_name", "gpu_memory_free_gb",
                     "gpu_memory_total_gb", "model_size_gb", "cpu_cache_gb", "last_transition", "last_error",
                     "counts"}
    assert seed_fields | design_fields <= set(status)
    assert (status["device"], status["gpu_available"]) == ("cpu", torch.cuda.is_available())
    with manager.use(CountingLoader()):
        pass
    last = manager.get_status()["last_transition"]
    assert set(last) == {"kind", "reason", "seconds", "bytes_copied", "at"}
    assert last["at"].endswith("Z")


# ---------------------------------------------------------------- timeouts and the watcher


def test_idle_timeout_offloads_at_its_deadline_and_not_before():
    clock = FakeClock()
    manager, _ = make_manager(idle_timeout=60, offload_after_use=False, clock=clock)
    manager.get_model(CountingLoader())
    assert manager._due(clock()) == pytest.approx(clock() + 60)
    clock.advance(59.9)
    manager._due(clock())
    assert location(manager) == "gpu"
    assert manager.get_status()["auto_offload_in"] == pytest.approx(0.1)
    clock.advance(0.1)
    assert manager._due(clock()) is None
    assert location(manager) == "cpu"


def test_using_the_model_moves_the_idle_deadline():
    clock = FakeClock()
    manager, _ = make_manager(idle_timeout=60, offload_after_use=False, clock=clock)
    manager.get_model(CountingLoader())
    clock.advance(50)
    manager.get_model()
    clock.advance(50)
    assert manager._due(clock()) == pytest.approx(clock() + 10)
    assert location(manager) == "gpu"


def test_idle_timer_counts_from_the_end_of_a_lease_not_its_start():
    clock = FakeClock()
    manager, _ = make_manager(idle_timeout=60, offload_after_use=False, clock=clock)
    with manager.use(CountingLoader()):
        clock.advance(100)
        assert manager._due(clock()) is None
        assert location(manager) == "gpu"
    assert manager._due(clock()) == pytest.approx(clock() + 60)


def test_release_timeout_releases_the_cached_model():
    clock = FakeClock()
    manager, _ = make_manager(release_timeout=120, clock=clock)
    with manager.use(CountingLoader()):
        pass
    assert manager.get_status()["auto_release_in"] == pytest.approx(120)
    assert manager._due(clock()) == pytest.approx(clock() + 120)
    clock.advance(120)
    manager._due(clock())
    status = manager.get_status()
    assert status["model_location"] == "unloaded"
    assert status["last_transition"]["reason"] == "release_timeout"


def test_zero_release_timeout_never_releases():
    clock = FakeClock()
    manager, _ = make_manager(release_timeout=0, clock=clock)
    with manager.use(CountingLoader()):
        pass
    clock.advance(10**6)
    assert manager._due(clock()) is None
    assert location(manager) == "cpu"


def test_infinite_idle_timeout_never_offloads():
    clock = FakeClock()
    manager, _ = make_manager(idle_timeout=float("inf"), offload_after_use=False, clock=clock)
    manager.get_model(CountingLoader())
    clock.advance(10**6)
    assert manager._due(clock()) is None
    assert manager.get_status()["auto_offload_in"] is None


def test_the_watcher_thread_sleeps_until_the_deadline_and_replans_on_change():
    clock = FakeClock()
    manager, _ = make_manager(idle_timeout=60, offload_after_use=False, clock=clock)
    assert manager.start_monitor() is True
    assert manager.running
    try:
        manager.get_model(CountingLoader())
        watcher = manager._watcher
        _wait_for(lambda: watcher.next_deadline == pytest.approx(clock() + 60))
        manager.update_timeout(30)
        _wait_for(lambda: watcher.next_deadline == pytest.approx(clock() + 30))
        clock.advance(30)
        watcher.wake()
        _wait_for(lambda: location(manager) == "cpu")
        assert manager.get_status()["last_transition"]["reason"] == "idle_timeout"
        _wait_for(lambda: watcher.next_deadline is None)
    finally:
        assert manager.stop_monitor() is True
    assert not manager.running
    assert manager.stop_monitor() is False


def test_the_watcher_starts_by_itself_on_the_first_load():
    manager, _ = make_manager(auto_monitor=True)
    assert not manager.running
    with manager.use(CountingLoader()):
        assert manager.running
    manager.stop_monitor()


def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError("condition not reached in time")


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("bad", [-1, float("nan"), "abc", None, [], True])
def test_update_timeout_rejects_bad_values_and_changes_nothing(bad):
    manager, _ = make_manager(idle_timeout=60)
    with pytest.raises(ValueError):
        manager.update_timeout(bad)
    with pytest.raises(InvalidSetting):
        manager.update_release_timeout(bad)
    status = manager.get_status()
    assert (status["idle_timeout"], status["release_timeout"]) == (60, 0)


def test_update_timeout_accepts_numbers_and_numeric_strings():
    manager, _ = make_manager()
    assert manager.update_timeout("300").outcome is Outcome.DONE
    assert manager.idle_timeout == 300
    manager.update_release_timeout(600.5)
    assert manager.release_timeout == 600.5
    with pytest.raises(InvalidSetting, match="finite"):
        manager.update_release_timeout(float("inf"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"idle_timeout": -5}, "idle_timeout"),
        ({"release_timeout": "soon"}, "release_timeout"),
        ({"offload_after_use": "maybe"}, "offload_after_use"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_the_constructor_rejects_bad_settings(kwargs, match):
    with pytest.raises(InvalidSetting, match=match):
        GPUResourceManager(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_cuda_without_it_says_so():
    with pytest.raises(InvalidSetting, match="CUDA is not available"):
        GPUResourceManager(device="cuda:0")


# ---------------------------------------------------------------- failures around moves (review findings)


def test_a_request_deferred_during_a_failed_load_does_not_hit_the_next_model():
    gate = threading.Event()
    loader = CountingLoader(fail_times=1, gate=gate)
    manager, _ = make_manager(offload_after_use=False)
    thread = threading.Thread(target=lambda: pytest.raises(LoadError, manager.get_model, loader))
    thread.start()
    assert loader.started.wait(5)
    assert manager.force_release().outcome is Outcome.DEFERRED
    gate.set()
    thread.join(5)
    assert not thread.is_alive()
    assert manager.get_status()["pending"] == []
    manager.get_model(loader)
    status = manager.get_status()
    assert (status["model_location"], status["counts"]["releases"]) == ("gpu", 0)


def test_a_release_deferred_during_a_failed_restore_is_still_carried_out():
    manager, engine = make_manager()
    with manager.use(CountingLoader()):
        pass
    engine.fail_to_device = True
    original = engine._note

    def note(what: str) -> None:
        original(what)
        if what == "to_device":
            manager._state.pending.add("release")

    engine._note = note
    with pytest.raises(TransferError):
        manager.get_model()
    status = manager.get_status()
    assert (status["model_location"], status["pending"]) == ("unloaded", [])


def test_a_failed_release_keeps_the_model_usable():
    manager, engine = make_manager(offload_after_use=False)
    model = manager.get_model(CountingLoader())
    weights = manager._weights

    def broken_release():
        raise RuntimeError("driver error")

    weights.release = broken_release
    with pytest.raises(TransferError, match="driver error"):
        manager.force_release()
    status = manager.get_status()
    assert (status["model_location"], status["transition"]) == ("gpu", None)
    assert "driver error" in status["last_error"]
    assert manager.get_model() is model


def test_an_interrupt_during_an_offload_is_not_turned_into_a_transfer_error():
    manager, _ = make_manager(offload_after_use=False)
    manager.get_model(CountingLoader())

    def interrupted():
        raise KeyboardInterrupt

    manager._weights.to_host = interrupted
    with pytest.raises(KeyboardInterrupt):
        manager.force_offload()
    assert manager.get_status()["transition"] is None


def test_a_load_function_that_uses_the_manager_fails_instead_of_deadlocking():
    manager, _ = make_manager()

    def reentrant_loader():
        return manager.get_model()

    with pytest.raises(GpuControlError, match="must build and return the model without using the manager"):
        manager.get_model(reentrant_loader)
    assert manager.get_status()["transition"] is None


def test_a_watcher_that_cannot_start_does_not_leave_the_manager_loading(monkeypatch):
    manager, _ = make_manager(auto_monitor=True)

    def no_thread() -> bool:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(manager._watcher, "start", no_thread)
    with pytest.raises(LoadError, match="can't start new thread"):
        manager.get_model(CountingLoader())
    status = manager.get_status()
    assert (status["model_location"], status["transition"]) == ("unloaded", None)


def test_a_use_between_deadline_and_offload_replans_instead_of_sleeping():
    clock = FakeClock()
    manager, _ = make_manager(idle_timeout=60, offload_after_use=False, clock=clock)
    manager.get_model(CountingLoader())
    clock.advance(60)
    real_move_out = manager._move_out

    def used_just_before(*args, **kwargs):
        manager.get_model()
        return real_move_out(*args, **kwargs)

    manager._move_out = used_just_before
    assert manager._due(clock()) == pytest.approx(clock() + 60)
    assert location(manager) == "gpu"


def test_a_failing_memory_probe_does_not_break_moves_or_status():
    def broken_probe(device):
        raise RuntimeError("NVML: driver not loaded")

    manager, _ = make_manager(memory_probe=broken_probe)
    with manager.use(CountingLoader()):
        pass
    status = manager.get_status()
    assert (status["model_location"], status["gpu_memory_allocated_gb"]) == ("cpu", 0.0)


def test_a_huge_number_is_an_invalid_setting_not_an_overflow():
    manager, _ = make_manager()
    with pytest.raises(InvalidSetting):
        manager.update_timeout(10**400)


def test_a_first_move_that_fails_keeps_the_loaded_model_in_the_host_cache():
    manager, engine = make_manager()
    loader = CountingLoader()
    engine.fail_to_device = True
    with pytest.raises(TransferError, match="simulated copy failure"):
        manager.get_model(loader)
    status = manager.get_status()
    assert (status["model_location"], status["transition"], status["counts"]["loads"]) == ("cpu", None, 1)
    assert "simulated copy failure" in status["last_error"]
    engine.fail_to_device = False
    with manager.use(loader):
        assert location(manager) == "gpu"
    assert loader.calls == 1
    assert manager.get_status()["counts"]["restores"] == 1
