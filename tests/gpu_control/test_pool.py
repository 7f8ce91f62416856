"""GPUPool: budgets, eviction order, priorities, waiting, placement, host tier, driver OOM, removal.

Every pool here runs on emulated cards (the CPU standing in, with real copies) whose budgets
are a few MiB, and models of exact MiB sizes, so each rule is checked on real moves.
"""

from __future__ import annotations

import threading

import pytest
import torch

from gpu_control import GPUResourceManager, OutOfMemory, WaitTimeout
from gpu_control.errors import GpuControlError

from .pool_helpers import FlakyEngine, Holder, gib, keep, pool_of, sized, using, wait_until_waiting
from .sync import Worker

MIB = 2**20


def where(pool, *names):
    status = pool.get_status()["models"]
    return [status[name]["model_location"] for name in names]


def used_mib(pool, device=0):
    return pool.get_status()["devices"][device]["used_gb"] * 1024


# ---------------------------------------------------------------------------- the contract's shape


def test_a_pool_model_is_a_manager_and_the_pool_is_a_mapping_of_them():
    with pool_of(budget_gb=gib(4)) as pool:
        a = pool.add("a", sized(1))
        assert isinstance(a, GPUResourceManager)
        assert pool["a"] is a and "a" in pool and "b" not in pool
        assert pool.names() == ["a"] and len(pool) == 1
        with a.use() as model:
            assert model(torch.ones(1, 1024)).shape == (1, 256)
        status = pool.get_status()
        assert set(status) == {"devices", "host", "models", "waiting"}
        assert set(status["devices"][0]) == {"device", "budget_gb", "used_gb", "free_gb", "models"}
        assert status["devices"][0]["device"] == "emulated:0"
        assert status["devices"][0]["budget_gb"] == pytest.approx(gib(4))
        assert set(status["host"]) == {"budget_gb", "used_gb"}
        model = status["models"]["a"]
        assert model["model_location"] == "cpu"  # offloaded after use
        assert (model["priority"], model["device"], model["working_gb"]) == (0, "emulated:0", 0.0)
        assert model["gpu_memory_total_gb"] == pytest.approx(gib(4))  # the emulated card's own figures
        assert status["waiting"] == []
        with pytest.raises(KeyError, match="known models: 'a'"):
            pool["nope"]


def test_the_charge_is_size_plus_working_memory_while_on_the_device():
    with pool_of(budget_gb=gib(8)) as pool:
        a = keep(pool, "a", 2, working_gb=gib(3))
        with a.use():
            assert used_mib(pool) == pytest.approx(5)
            assert pool.get_status()["devices"][0]["models"] == ["a"]
        assert used_mib(pool) == pytest.approx(5)  # still on the device, idle
        a.force_offload()
        assert used_mib(pool) == 0
        assert pool.get_status()["devices"][0]["models"] == []


# ---------------------------------------------------------------------------- eviction


def test_eviction_takes_lower_priority_first_then_the_least_recently_used():
    with pool_of(budget_gb=gib(3)) as pool:
        a, b, c = keep(pool, "a", 1), keep(pool, "b", 1), keep(pool, "c", 1, priority=1)
        for manager in (a, c, b):  # a is the least recently used of the priority-0 models
            with manager.use():
                pass
        assert where(pool, "a", "b", "c") == ["gpu"] * 3
        with keep(pool, "d", 1, priority=1).use():
            assert where(pool, "a", "b", "c", "d") == ["cpu", "gpu", "gpu", "gpu"]
        assert pool["a"].get_status()["last_transition"]["reason"] == "evicted"
        with keep(pool, "e", 1).use():  # priority 0: may evict b only, never c or d
            assert where(pool, "b", "c", "d", "e") == ["cpu", "gpu", "gpu", "gpu"]
        assert used_mib(pool) == pytest.approx(3)


def test_a_request_never_evicts_a_higher_priority_idle_model_and_fails_naming_it():
    with pool_of(budget_gb=gib(1), wait_timeout=0.3) as pool:
        high = keep(pool, "high", 1, priority=5)
        with high.use():
            pass
        low = pool.add("low", sized(1))
        with pytest.raises(WaitTimeout) as failed:
            with low.use():
                pass
        message = str(failed.value)
        assert "'high'" in message and "priority 5" in message and "emulated:0" in message
        assert where(pool, "high", "low") == ["gpu", "cpu"]  # loaded into the host cache, nothing half-moved
        assert low.get_status()["transition"] is None
        assert pool.get_status()["waiting"] == []
        assert used_mib(pool) == pytest.approx(1)


def test_a_model_in_use_is_never_evicted_and_its_waiter_goes_when_the_lease_ends():
    with pool_of(budget_gb=gib(1)) as pool:
        a, b = keep(pool, "a", 1), keep(pool, "b", 1)
        holder = Holder(a)
        assert holder.holding.wait(5)
        waiter = using(b)
        wait_until_waiting(pool, ["b"])
        waiting = pool.get_status()["waiting"][0]
        assert waiting["priority"] == 0 and waiting["needed_gb"] == pytest.approx(gib(1))
        assert where(pool, "a") == ["gpu"] and a.get_status()["in_use"] == 1
        holder.end()
        assert waiter.finish() == "b"
        assert where(pool, "a", "b") == ["cpu", "gpu"]
        assert pool.get_status()["waiting"] == []


def test_a_request_that_can_never_fit_fails_at_once_with_the_sizes():
    with pool_of(budget_gb=gib(1), wait_timeout=300) as pool:
        big = pool.add("big", sized(2), working_gb=gib(1))
        with pytest.raises(OutOfMemory) as failed:
            big.preheat()
        message = str(failed.value)
        assert "'big' needs 3.0 MiB (weights 2.0 MiB + working 1.0 MiB)" in message
        assert "budget of emulated:0, 1.0 MiB" in message and "never fit" in message
        assert where(pool, "big") == ["cpu"] and used_mib(pool) == 0


# ---------------------------------------------------------------------------- waiting


def test_waiters_are_served_by_priority_then_arrival():
    with pool_of(budget_gb=gib(1)) as pool:
        holder_model = keep(pool, "holder", 1, priority=9)
        served: list[str] = []
        lock = threading.Lock()
        for name, priority in (("first", 0), ("second", 0), ("urgent", 2)):
            manager = pool.add(name, sized(1), priority=priority)
            manager.add_transition_listener(
                lambda event, name=name: event["kind"] == "load" and event["ok"] and _note(lock, served, name)
            )
        holder = Holder(holder_model)
        assert holder.holding.wait(5)
        workers = []
        for name, queue in (
            ("first", ["first"]),
            ("second", ["first", "second"]),
            ("urgent", ["urgent", "first", "second"]),
        ):
            workers.append(using(pool[name]))
            wait_until_waiting(pool, queue)
        holder.end()  # the holder stays idle on the device at priority 9: nobody may evict it
        holder_model.force_offload()
        for worker in workers:
            worker.finish()
        assert served == ["urgent", "first", "second"]


def _note(lock, served, name):
    with lock:
        served.append(name)
    return True


def test_a_waiter_that_times_out_leaves_the_queue_and_says_what_holds_the_device():
    with pool_of(budget_gb=gib(1), wait_timeout=0.2) as pool:
        a, b = keep(pool, "a", 1), pool.add("b", sized(1))
        holder = Holder(a)
        assert holder.holding.wait(5)
        with pytest.raises(WaitTimeout, match=r"'a' \(1.0 MiB, in use by 1 job"):
            with b.use():
                pass
        assert pool.get_status()["waiting"] == []
        holder.end()
        with b.use():  # room now: a is idle at the same priority
            assert where(pool, "a", "b") == ["cpu", "gpu"]


def test_a_model_removed_while_it_waits_fails_its_request_clearly():
    with pool_of(budget_gb=gib(1)) as pool:
        a, b = keep(pool, "a", 1), pool.add("b", sized(1))
        holder = Holder(a)
        assert holder.holding.wait(5)
        waiter = using(b)
        wait_until_waiting(pool, ["b"])
        pool.remove("b")
        with pytest.raises(GpuControlError, match="removed from the pool"):
            waiter.finish()
        assert "b" not in pool and pool.get_status()["waiting"] == []
        assert b.get_status()["model_location"] == "unloaded"
        holder.end()


# ---------------------------------------------------------------------------- placement


def test_placement_prefers_the_device_with_most_room_without_eviction():
    with pool_of(
        devices=["emulated:0", "emulated:1"], budget_gb={"emulated:0": gib(2), "emulated:1": gib(4)}
    ) as pool:
        a, b = keep(pool, "a", 1), keep(pool, "b", 1)
        with a.use():
            pass
        with b.use():
            pass
        status = pool.get_status()
        assert status["models"]["a"]["device"] == "emulated:1"  # 4 MiB free beats 2
        assert status["models"]["b"]["device"] == "emulated:1"  # 3 MiB free still beats 2
        assert [d["models"] for d in status["devices"]] == [[], ["a", "b"]]


def test_placement_evicts_where_it_costs_least_and_a_cached_model_may_come_back_elsewhere():
    devices = ["emulated:0", "emulated:1"]
    with pool_of(devices=devices, budget_gb=gib(2)) as pool:
        big = keep(pool, "big", 2, device="emulated:0")
        y, z = keep(pool, "y", 1, device="emulated:1"), keep(pool, "z", 1, device="emulated:1")
        for manager in (big, y, z):
            with manager.use():
                pass
        roamer = keep(pool, "roamer", 1)
        with roamer.use():  # evicting y (1 MiB, least recently used) costs less than big (2 MiB)
            pass
        assert where(pool, "big", "y", "z", "roamer") == ["gpu", "cpu", "gpu", "gpu"]
        assert pool.get_status()["models"]["roamer"]["device"] == "emulated:1"
        roamer.force_offload()
        with y.use():  # y takes emulated:1 back
            pass
        big.force_offload()
        with roamer.use() as model:  # comes back on emulated:0, the one with room
            assert model(torch.ones(1, 1024)).shape == (1, 256)
        assert pool.get_status()["models"]["roamer"]["device"] == "emulated:0"


def test_a_pinned_model_stays_on_its_device():
    with pool_of(
        devices=["emulated:0", "emulated:1"], budget_gb={"emulated:0": gib(1), "emulated:1": gib(8)}
    ) as pool:
        a, b = keep(pool, "a", 1, device="emulated:0"), keep(pool, "b", 1, device="emulated:0")
        with a.use():
            pass
        with b.use():  # emulated:1 has room, but b is pinned: it evicts a instead
            pass
        assert where(pool, "a", "b") == ["cpu", "gpu"]
        assert pool.get_status()["models"]["b"]["device"] == "emulated:0"


# ---------------------------------------------------------------------------- host tier


def test_the_host_tier_releases_idle_cached_models_lower_priority_then_lru():
    with pool_of(budget_gb=gib(8), host_budget_gb=gib(2.5)) as pool:
        a, b = pool.add("a", sized(1)), pool.add("b", sized(1), priority=1)
        old = pool.add("old", sized(1))
        for manager in (old, b, a):
            with manager.use():
                pass
        # Loading 'a' measured 3 MiB of host copies: 'old' (priority 0, least recently used) went.
        assert where(pool, "old", "a", "b") == ["unloaded", "cpu", "cpu"]
        with pool.add("c", sized(1)).use():
            pass
        assert where(pool, "old", "a", "b", "c") == ["unloaded", "unloaded", "cpu", "cpu"]
        assert pool["old"].get_status()["last_transition"]["reason"] == "host_budget"
        assert pool.get_status()["host"]["used_gb"] == pytest.approx(gib(2))


# ---------------------------------------------------------------------------- the driver


def test_a_driver_out_of_memory_evicts_more_and_retries_once():
    with pool_of(budget_gb=gib(8)) as pool:
        idle = keep(pool, "idle", 1)
        with idle.use():
            pass
        engine = FlakyEngine(fail=1)
        a = pool.add("a", sized(1), engine=engine)
        with a.use() as model:  # the ledger had room; the driver did not
            assert model(torch.ones(1, 1024)).shape == (1, 256)
        assert engine.attempts == 2
        assert where(pool, "idle") == ["cpu"]
        assert pool["idle"].get_status()["last_transition"]["reason"] == "evicted"


def test_a_second_driver_out_of_memory_fails_clearly_and_leaves_nothing_half_moved():
    with pool_of(budget_gb=gib(8)) as pool:
        engine = FlakyEngine(fail=2)
        a = pool.add("a", sized(1), engine=engine)
        with pytest.raises(OutOfMemory, match="Not enough memory"):
            with a.use():
                pass
        assert engine.attempts == 1  # nothing to evict: no retry
        assert where(pool, "a") == ["cpu"] and used_mib(pool) == 0
        assert a.get_status()["transition"] is None
        engine.fail = 0
        with a.use():  # the next use restores from the host cache
            assert used_mib(pool) == pytest.approx(1)


# ---------------------------------------------------------------------------- removal and the watcher


def test_removing_a_model_in_use_releases_it_when_its_job_ends_and_gives_its_room_to_a_waiter():
    with pool_of(budget_gb=gib(1)) as pool:
        a, b = keep(pool, "a", 1, priority=3), pool.add("b", sized(1))
        holder = Holder(a)
        assert holder.holding.wait(5)
        waiter = using(b)
        wait_until_waiting(pool, ["b"])
        result = pool.remove("a")
        assert result.outcome.value == "deferred"
        assert "a" not in pool and pool.names() == ["b"]
        holder.end()
        assert waiter.finish() == "b"
        assert a.get_status()["model_location"] == "unloaded"
        with pytest.raises(GpuControlError, match="removed from the pool"):
            with a.use():
                pass
        with pytest.raises(KeyError, match="known models: 'b'"):
            pool.remove("a")


def test_one_watcher_thread_serves_every_model_of_the_pool():
    with pool_of(budget_gb=gib(8)) as pool:
        managers = [keep(pool, name, 1, idle_timeout=30) for name in ("a", "b", "c")]
        for manager in managers:
            with manager.use():
                pass
        names = [t.name for t in threading.enumerate()]
        assert names.count("gpu-pool-watcher") == 1
        assert not {"gpu-watcher-a", "gpu-watcher-b", "gpu-watcher-c"} & set(names)  # no thread per model
        assert all(m.running for m in managers)
        managers[0].stop_monitor()
        assert not managers[0].running and managers[1].running


def test_an_idle_timeout_in_the_pool_frees_the_budget_for_a_waiter():
    with pool_of(budget_gb=gib(1)) as pool:
        high = keep(pool, "high", 1, priority=5, idle_timeout=0.2)
        with high.use():
            pass
        with pool.add("low", sized(1)).use():  # waits for high's idle timeout, then goes
            assert where(pool, "high", "low") == ["cpu", "gpu"]
        assert high.get_status()["last_transition"]["reason"] == "idle_timeout"


def test_names_and_settings_are_validated():
    with pool_of(budget_gb=gib(1)) as pool:
        pool.add("ok.name-1_x", sized(1))
        for bad in ("", "../x", "a b", "x" * 65, "<b>", None):
            with pytest.raises(ValueError, match="model name"):
                pool.add(bad, sized(1))
        with pytest.raises(ValueError, match="already in the pool"):
            pool.add("ok.name-1_x", sized(1))
        for bad in (True, 1.5, "1", 10**9):
            with pytest.raises(ValueError, match="priority"):
                pool.add("p", sized(1), priority=bad)
        for bad in (-1, float("nan"), "lots"):
            with pytest.raises(ValueError, match="working_gb"):
                pool.add("w", sized(1), working_gb=bad)
        with pytest.raises(ValueError, match="not one of the pool's devices"):
            pool.add("d", sized(1), device="emulated:7")
        with pytest.raises(ValueError, match="idle_timeout"):
            pool.add("t", sized(1), idle_timeout=-1)
        assert pool.names() == ["ok.name-1_x"]


def test_a_victim_whose_offload_fails_does_not_make_the_waiter_spin_past_its_timeout():
    class StuckEngine(FlakyEngine):
        def __call__(self, model, device, **kwargs):
            weights = super().__call__(model, device, **kwargs)

            def to_host():
                self.offload_attempts += 1
                raise RuntimeError("simulated copy-back failure")

            weights.to_host = to_host
            return weights

    stuck = StuckEngine()
    stuck.offload_attempts = 0
    with pool_of(budget_gb=gib(1), wait_timeout=0.6) as pool:
        victim = keep(pool, "victim", 1, engine=stuck)
        with victim.use():
            pass
        with pytest.raises(WaitTimeout, match="'victim'"):
            with pool.add("b", sized(1)).use():
                pass
        assert 1 <= stuck.offload_attempts <= 3  # one try per re-plan, not a busy loop
        assert where(pool, "victim", "b") == ["gpu", "cpu"]
        stuck.offload_attempts = -100  # let close() fail quietly


def test_the_driver_has_the_last_word_memory_held_outside_the_pool_makes_a_request_wait():
    outside = {"emulated:0": 1 * MIB}  # what the "driver" says is free: another program holds the rest
    with pool_of(budget_gb=gib(8), wait_timeout=0.3, driver_free=outside.get) as pool:
        idle = keep(pool, "idle", 1)
        outside["emulated:0"] = 2 * MIB
        with idle.use():  # 1 MiB fits in the 2 MiB the driver reports
            pass
        outside["emulated:0"] = 1 * MIB  # idle holds 1 MiB of the device now
        with pool.add("two", sized(2)).use():  # budget has room, the driver has not: evict idle (1 + 1 MiB)
            assert where(pool, "idle") == ["cpu"]
        outside["emulated:0"] = 0
        with pytest.raises(WaitTimeout, match="the driver reports only 0.0 MiB free on emulated:0"):
            with pool.add("three", sized(1)).use():
                pass


def test_a_busy_model_takes_no_new_job_while_a_request_waits_for_its_room():
    with pool_of(budget_gb=gib(1)) as pool:
        a, b = keep(pool, "a", 1), pool.add("b", sized(1))
        order: list[str] = []
        b.add_transition_listener(lambda event: event["kind"] == "load" and order.append("b loaded"))
        first, second = Holder(a), Holder(a)  # overlapping jobs: 'a' is never idle on its own
        assert first.holding.wait(5) and second.holding.wait(5)
        waiter = using(b)
        wait_until_waiting(pool, ["b"])
        first.end()

        def late_job() -> None:
            with a.use():
                order.append("late job on a")

        late = Worker(late_job)
        late.start()
        assert a.get_status()["in_use"] == 1  # the late job waits behind 'b' though 'a' is resident
        second.end()
        assert waiter.finish() == "b"
        late.finish()
        assert order == ["b loaded", "late job on a"]


def test_a_nested_use_of_a_draining_model_does_not_wait():
    with pool_of(budget_gb=gib(1), wait_timeout=5) as pool:
        a, b = keep(pool, "a", 1), pool.add("b", sized(1))
        with a.use():
            waiter = using(b)
            wait_until_waiting(pool, ["b"])
            with a.use():  # the same thread holds a lease: no deadlock on its own model
                assert a.get_status()["in_use"] == 2
        assert waiter.finish() == "b"
