"""Adversarial tests for the pool and the share directory (review of issues 10 and 11).

Part 1: problems an adversarial review found (each failed before its fix). Part 2: tests that kill
mutants of the pool and the share directory the other tests let live.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from pathlib import Path

import pytest

from gpu_control import GPUPool, InvalidSetting, OutOfMemory
from gpu_control.share import read_share_status

from .pool_helpers import Holder, gib, keep, pool_of, sized, using, wait_until_waiting

MIB = 2**20


def bounded(fn, seconds: float = 5.0):
    """Run ``fn`` in a thread: (returned value or raised error, finished in time)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as error:  # noqa: BLE001 - reported to the test
            box["value"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return box.get("value"), not thread.is_alive()


@pytest.fixture
def live_peer(tmp_path):
    """A member of ``tmp_path`` that is alive (its lock held) and publishes whatever the test writes."""
    handles = []

    def make(body, member: str = "4242-feedface") -> Path:
        lock = open(tmp_path / f"{member}.lock", "a+b")  # noqa: SIM115
        fcntl.flock(lock, fcntl.LOCK_EX)
        handles.append(lock)
        path = tmp_path / f"{member}.json"
        if isinstance(body, dict):
            body = json.dumps(body)
        path.write_text(body)
        return path

    yield make
    for handle in handles:
        handle.close()


def use_once(manager):
    with manager.use():
        return "ok"


# ============================================================================ part 1: real problems


def test_close_while_a_job_holds_a_lease_does_not_break_the_job(tmp_path):
    pool = GPUPool(devices=["emulated:0"], budget_gb=gib(3), share_dir=tmp_path)
    model = pool.add("m", sized(1))
    holder = Holder(model)
    assert holder.holding.wait(5)
    pool.close()  # shutdown while a request is still running
    holder.end()  # before the fix: ValueError: I/O operation on closed file, raised from the job's `with`
    assert model.get_status()["model_location"] == "unloaded"


@pytest.mark.parametrize(
    "holder",
    [
        '{"model": "x", "device": "emulated:0", "bytes": 1048576, "state": "gpu", "priority": NaN, "in_use": 0}',  # noqa: E501
        '{"model": "x", "device": "emulated:0", "bytes": 1048576, "state": "gpu", "priority": Infinity, "in_use": 0}',  # noqa: E501
        '{"model": "x", "device": "emulated:0", "bytes": 1048576, "state": "gpu", "priority": 0, "in_use": NaN}',  # noqa: E501
        '{"model": "x", "device": "emulated:0", "bytes": 1048576, "state": "gpu", "priority": 0, "in_use": 0,'
        ' "idle_since": "yesterday"}',
    ],
    ids=["priority-nan", "priority-inf", "in_use-nan", "idle_since-text"],
)
def test_a_peer_holding_with_odd_numbers_breaks_neither_status_nor_the_status_command(
    tmp_path, live_peer, holder
):
    live_peer(f'{{"pid": 4242, "budgets": {{}}, "holders": [{holder}], "waiters": []}}')
    with pool_of(budget_gb=gib(3), share_dir=tmp_path) as pool:
        pool.get_status()  # before the fix: ValueError / OverflowError (GET /gpu/models answers 500)
    read_share_status(tmp_path)  # before the fix: the same error, a traceback from `python -m gpu_control status`  # noqa: E501


@pytest.mark.parametrize(
    "waiter",
    [
        {"model": "w", "priority": "high", "devices": ["emulated:0"], "need": 1, "arrived": 1.0},
        {"model": "w", "priority": 0, "devices": 5, "need": 1, "arrived": 1.0},
    ],
    ids=["priority-text", "devices-int"],
)
def test_a_peer_waiter_with_odd_fields_does_not_fail_this_processs_jobs(tmp_path, live_peer, waiter):
    live_peer({"pid": 4242, "budgets": {}, "holders": [], "waiters": [waiter]})
    with pool_of(budget_gb=gib(3), share_dir=tmp_path, wait_timeout=1) as pool:
        model = pool.add("m", sized(1))
        value, done = bounded(lambda: use_once(model))
        assert done and value == "ok", value  # before the fix: TransferError wrapping ValueError / TypeError


@pytest.mark.parametrize(
    "body",
    [
        '{"pid": 4242, "budgets": {"emulated:0": Infinity}, "holders": [], "waiters": []}',
        "[" * 100_000 + "]" * 100_000,  # 200 KB, under the 1 MiB cap: RecursionError
    ],
    ids=["budget-infinity", "nested-200kb"],
)
def test_a_damaged_peer_file_counts_as_empty_and_never_raises(tmp_path, live_peer, body):
    live_peer(body)
    pool = GPUPool(devices=["emulated:0"], budget_gb=gib(3), share_dir=tmp_path, wait_timeout=1)
    model = pool.add("m", sized(1))
    outcomes = {}
    for what, call in (
        ("use", lambda: use_once(model)),  # before the fix: OverflowError / RecursionError from use()
        ("status", lambda: pool.get_status() and "ok"),
        ("command", lambda: read_share_status(tmp_path) and "ok"),
        ("close", lambda: pool.close() or "ok"),  # before the fix: close() raises too, leaving the pool half closed  # noqa: E501
    ):
        value, done = bounded(call)
        outcomes[what] = value if done and value == "ok" else f"{type(value).__name__}: {str(value)[:80]}"
    assert outcomes == dict.fromkeys(outcomes, "ok"), outcomes


def test_a_peer_state_file_that_blocks_on_read_does_not_hang_the_pool(tmp_path, live_peer):
    path = live_peer({})
    path.unlink()
    os.mkfifo(path)  # a FIFO (or /dev/zero symlink): open()/read() never return
    pool = GPUPool(devices=["emulated:0"], budget_gb=gib(3), share_dir=tmp_path, wait_timeout=1)
    model = pool.add("m", sized(1))
    value, done = bounded(lambda: use_once(model), seconds=5)
    assert done, "use() hung past the wait timeout (the pool's lock and the host-wide lock are held)"
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)  # let a hung reader go before closing
    os.close(fd)
    pool.close()


def test_a_dead_members_inbox_symlinked_elsewhere_does_not_delete_foreign_files(tmp_path):
    share, precious = tmp_path / "share", tmp_path / "precious"
    share.mkdir()
    precious.mkdir()
    (precious / "weights.bin").write_bytes(b"x")
    (share / "666-dead.lock").write_bytes(b"")  # nobody holds it: the member is "dead"
    os.symlink(precious, share / "666-dead.inbox")
    with pool_of(budget_gb=gib(3), share_dir=share) as pool:
        pool.get_status()  # reading the peers cleans the "dead" member
    assert os.listdir(precious) == ["weights.bin"]  # before the fix: deleted through the symlink


def test_eviction_requests_are_not_written_through_a_symlinked_inbox(tmp_path, live_peer):
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    os.symlink(outside, tmp_path / "4242-feedface.inbox")
    live_peer(
        {
            "pid": 4242,
            "budgets": {"emulated:0": 3 * MIB},
            "holders": [
                {"model": "x", "device": "emulated:0", "bytes": 3 * MIB, "state": "gpu", "priority": 0}
            ],
            "waiters": [],
        }
    )
    with pool_of(budget_gb=gib(3), share_dir=tmp_path, wait_timeout=0.5) as pool:
        value, done = bounded(lambda: use_once(pool.add("m", sized(1))))
        assert done
    assert os.listdir(outside) == []  # before the fix: the request file lands in the symlink's target


def test_a_model_larger_than_a_peers_budget_fails_at_once_naming_that_budget(tmp_path):
    small = GPUPool(devices=["emulated:0"], budget_gb=gib(1), share_dir=tmp_path)
    try:
        deadline = time.monotonic() + 3
        while not list(tmp_path.glob("*.json")):  # the small process has published its budget
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pool_of(budget_gb=gib(3), share_dir=tmp_path, wait_timeout=3) as big:
            model = big.add("m", sized(2))
            started = time.monotonic()
            with pytest.raises(
                OutOfMemory
            ) as failed:  # before the fix: WaitTimeout after 3 s "...: ." (nothing named)
                use_once(model)
            assert time.monotonic() - started < 1
            assert "1.0 MiB" in str(failed.value)  # the host-wide budget, not this process's 3 MiB
            with pytest.raises(OutOfMemory) as again:  # once the peers are known: "more than ... 3.0 MiB"
                use_once(model)
            assert "3.0 MiB" not in str(again.value), str(again.value)
    finally:
        small.close()


def test_a_hung_peers_queued_request_does_not_block_a_free_device_forever(tmp_path, live_peer):
    # A peer queued a request, then hung (SIGSTOP, a stuck driver call): its waiter stays published.
    live_peer(
        {
            "pid": 4242,
            "budgets": {"emulated:0": 3 * MIB},
            "holders": [],
            "waiters": [
                {
                    "model": "w",
                    "priority": 0,
                    "devices": ["emulated:0"],
                    "need": MIB,
                    "arrived": time.time() - 60,
                }
            ],
        }
    )
    with pool_of(budget_gb=gib(3), share_dir=tmp_path, wait_timeout=1) as pool:
        model = pool.add("m", sized(1))
        for _ in range(2):  # before the fix: every request fails, "No room ... emulated:0 is free."
            value, done = bounded(lambda: use_once(model))
            assert done and value == "ok", value


def test_one_bad_eviction_request_does_not_drop_the_others(tmp_path):
    with pool_of(budget_gb=gib(3), share_dir=tmp_path) as pool:
        idle = keep(pool, "idle", 1)
        idle.preheat()
        inbox = pool._share.ledger.inbox
        (inbox / "0.json").write_text('{"model": "idle", "priority": 1e400}')  # OverflowError in _remember
        (inbox / "1.json").write_text('{"model": "idle", "priority": 0}')
        deadline = time.monotonic() + 0.5  # the contract: offloaded within 0.5 s of the request
        while idle.get_status()["model_location"] != "cpu":
            assert time.monotonic() < deadline, "the valid request was lost with the bad one"
            time.sleep(0.01)


def test_a_share_directory_whose_lock_is_not_a_file_is_refused_with_a_sentence(tmp_path):
    (tmp_path / "ledger.lock").mkdir()
    with pytest.raises(InvalidSetting, match="share directory"):  # before the fix: IsADirectoryError
        GPUPool(devices=["emulated:0"], budget_gb=gib(3), share_dir=tmp_path)


def test_a_budget_that_rounds_to_zero_bytes_is_refused():
    with pytest.raises(InvalidSetting, match="budget_gb"):  # before the fix: accepted, a 0-byte device
        GPUPool(devices=["emulated:0"], budget_gb="1e-30")


# ============================================================================ part 2: kill surviving mutants


def test_the_host_tier_never_releases_a_cached_model_of_higher_priority():  # kills m10
    with pool_of(budget_gb=gib(8), host_budget_gb=gib(1.5)) as pool:
        high = pool.add("high", sized(1), priority=5)
        with high.use():
            pass
        with pool.add("low", sized(1)).use():  # 2 MiB of host copies: past the budget, nothing may go
            pass
        assert pool.get_status()["models"]["high"]["model_location"] == "cpu"


def test_a_peers_request_below_a_models_priority_is_ignored(tmp_path):  # kills m13
    with pool_of(budget_gb=gib(3), share_dir=tmp_path) as pool:
        high = keep(pool, "high", 1, priority=5)
        high.preheat()
        inbox = pool._share.ledger.inbox
        (inbox / "a.json").write_text(json.dumps({"model": "high", "priority": 1}))
        time.sleep(0.3)  # several share polls
        assert high.get_status()["model_location"] == "gpu"
        (inbox / "b.json").write_text(json.dumps({"model": "high", "priority": 5}))
        deadline = time.monotonic() + 0.5
        while high.get_status()["model_location"] != "cpu":
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_peers_are_asked_only_for_models_of_equal_or_lower_priority(tmp_path, live_peer):  # kills m16
    inbox = tmp_path / "4242-feedface.inbox"
    inbox.mkdir()
    held = {"device": "emulated:0", "state": "gpu", "in_use": 0}
    live_peer(
        {
            "pid": 4242,
            "budgets": {"emulated:0": 3 * MIB},
            "holders": [
                {**held, "model": "lo", "bytes": MIB, "priority": 0},
                {**held, "model": "hi", "bytes": 2 * MIB, "priority": 9},
            ],
            "waiters": [],
        }
    )
    with pool_of(budget_gb=gib(3), share_dir=tmp_path, wait_timeout=0.5) as pool:
        bounded(lambda: use_once(pool.add("m", sized(2))))
    asked = {json.loads(p.read_text())["model"] for p in inbox.iterdir()}
    assert asked == {"lo"}


def test_the_smallest_budget_a_peer_declares_is_the_devices(tmp_path):  # kills m17
    small = GPUPool(devices=["emulated:0"], budget_gb=gib(1), share_dir=tmp_path)
    try:
        deadline = time.monotonic() + 3
        while not list(tmp_path.glob("*.json")):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pool_of(budget_gb=gib(3), share_dir=tmp_path) as big:
            assert big.get_status()["devices"][0]["budget_gb"] == pytest.approx(gib(1))
    finally:
        small.close()


def test_room_a_peer_promised_to_its_waiter_counts_as_taken(tmp_path, live_peer):  # kills m18
    live_peer(
        {
            "pid": 4242,
            "budgets": {"emulated:0": 3 * MIB},
            "holders": [],
            "waiters": [],
            "promised": [{"model": "p", "device": "emulated:0", "bytes": 2 * MIB}],
        }
    )
    with pool_of(budget_gb=gib(3), share_dir=tmp_path, wait_timeout=0.3) as pool:
        assert pool.get_status()["devices"][0]["used_gb"] == pytest.approx(gib(2))
        value, done = bounded(lambda: use_once(pool.add("m", sized(2))))
        assert done and type(value).__name__ == "WaitTimeout", value


def test_a_small_request_does_not_overtake_a_large_one_waiting_before_it():  # kills m21
    with pool_of(budget_gb=gib(2)) as pool:
        first = pool.add("first", sized(1), priority=9)  # offloads after use
        big, small = pool.add("big", sized(2)), pool.add("small", sized(1))
        order: list[str] = []
        for manager in (big, small):
            manager.add_transition_listener(
                lambda event, name=manager.name: event["kind"] in ("load", "restore") and order.append(name)
            )
        holder = Holder(first)
        assert holder.holding.wait(5)
        big_job = using(big)
        wait_until_waiting(pool, ["big"])
        small_job = using(small)
        wait_until_waiting(pool, ["big", "small"])  # 1 MiB is free, but 'big' asked first
        holder.end()
        big_job.finish()
        small_job.finish()
        assert order == ["big", "small"]


def test_a_busy_model_of_higher_priority_keeps_taking_jobs_while_a_lower_request_waits():  # kills m22
    with pool_of(budget_gb=gib(1), wait_timeout=3) as pool:
        high, low = keep(pool, "high", 1, priority=5), pool.add("low", sized(1))
        holder = Holder(high)
        assert holder.holding.wait(5)
        waiter = using(low)
        wait_until_waiting(pool, ["low"])
        value, done = bounded(lambda: use_once(high), seconds=1)  # not drained for a lower request
        assert done and value == "ok", value
        holder.end()
        pool.remove("low")
        with pytest.raises(Exception):  # noqa: B017 - removed while it waited
            waiter.finish()


def test_the_driver_check_counts_an_idle_victim_as_freeing_its_weights_only():  # kills m23
    driver = {"emulated:0": 1 * MIB}
    with pool_of(budget_gb=gib(8), wait_timeout=0.3, driver_free=driver.get) as pool:
        victim = keep(pool, "victim", 1, working_gb=gib(1))
        driver["emulated:0"] = 8 * MIB
        victim.preheat()
        driver["emulated:0"] = 1 * MIB  # evicting 'victim' frees 1 MiB (its weights): 2 MiB, not 3
        value, done = bounded(lambda: use_once(pool.add("three", sized(3))))
        assert done and type(value).__name__ == "WaitTimeout", value
        assert victim.get_status()["model_location"] == "gpu"


def test_a_peers_earlier_larger_request_is_not_overtaken(tmp_path, live_peer):  # kills m24
    live_peer(
        {
            "pid": 4242,
            "updated": time.time(),
            "budgets": {"emulated:0": 3 * MIB},
            "holders": [],
            "waiters": [
                {
                    "model": "w",
                    "priority": 5,
                    "devices": ["emulated:0"],
                    "need": 3 * MIB,
                    "arrived": time.time(),
                }
            ],
        }
    )
    with pool_of(budget_gb=gib(3), share_dir=tmp_path, wait_timeout=0.3) as pool:
        value, done = bounded(lambda: use_once(pool.add("m", sized(1))))
        assert done and type(value).__name__ == "WaitTimeout", value


def test_a_negative_holding_in_a_peer_file_is_dropped(tmp_path, live_peer):  # kills m26
    held = {"model": "x", "device": "emulated:0", "state": "gpu", "priority": 0, "in_use": 0}
    live_peer(
        {
            "pid": 4242,
            "budgets": {"emulated:0": 3 * MIB},
            "holders": [{**held, "bytes": 3 * MIB}, {**held, "model": "y", "bytes": -3 * MIB}],
            "waiters": [],
        }
    )
    with pool_of(budget_gb=gib(3), share_dir=tmp_path) as pool:
        assert pool.get_status()["devices"][0]["used_gb"] == pytest.approx(gib(3))


def test_a_waiter_goes_as_soon_as_the_model_it_waits_for_has_left():  # kills m30 (not at the next 0.5 s poll)
    with pool_of(budget_gb=gib(1)) as pool:
        first, second = keep(pool, "first", 1, priority=9), pool.add("second", sized(1))
        admitted: list[float] = []
        second.add_transition_listener(lambda event: event["ok"] and admitted.append(time.monotonic()))
        for _ in range(3):  # a poll-driven wake-up lands under 0.1 s three times in a row < 1 % of the time
            first.preheat()
            job = using(second)
            wait_until_waiting(pool, ["second"])
            time.sleep(0.05)
            admitted.clear()
            left = time.monotonic()
            first.force_offload()  # no lease ends here: only the offload's own signal wakes the waiter
            job.finish()
            assert admitted and admitted[0] - left < 0.1, admitted[0] - left


def test_memory_freed_outside_the_pool_lets_a_waiter_go_within_a_poll():  # kills m38
    driver = {"emulated:0": 0}
    with pool_of(budget_gb=gib(8), wait_timeout=3, driver_free=driver.get) as pool:
        job = using(pool.add("m", sized(1)))
        wait_until_waiting(pool, ["m"])
        started = time.monotonic()
        driver["emulated:0"] = 8 * MIB  # another program ended: no signal reaches the pool
        assert job.finish() == "m"
        assert time.monotonic() - started < 1.5


def test_a_driver_out_of_memory_never_evicts_a_higher_priority_model():  # kills m33
    from .pool_helpers import FlakyEngine

    with pool_of(budget_gb=gib(8)) as pool:
        high = keep(pool, "high", 1, priority=5)
        high.preheat()
        low = pool.add("low", sized(1), engine=FlakyEngine(fail=1))
        with pytest.raises(OutOfMemory):
            use_once(low)
        assert high.get_status()["model_location"] == "gpu"


def test_peers_are_asked_for_idle_models_before_busy_ones(tmp_path, live_peer):  # kills m34
    inbox = tmp_path / "4242-feedface.inbox"
    inbox.mkdir()
    held = {"device": "emulated:0", "state": "gpu", "bytes": MIB, "priority": 0}
    live_peer(
        {
            "pid": 4242,
            "budgets": {"emulated:0": 3 * MIB},
            "holders": [
                {**held, "model": "busy", "in_use": 1},
                {**held, "model": "idle", "in_use": 0, "idle_since": time.time()},
                {**held, "model": "pinned", "in_use": 0, "priority": 9},
            ],
            "waiters": [],
        }
    )
    with pool_of(budget_gb=gib(3), share_dir=tmp_path, wait_timeout=0.3) as pool:
        bounded(lambda: use_once(pool.add("m", sized(1))))
    assert {json.loads(p.read_text())["model"] for p in inbox.iterdir()} == {"idle"}


def test_a_peer_file_past_the_size_cap_counts_as_empty(tmp_path, live_peer):  # kills m36
    held = {
        "model": "x",
        "device": "emulated:0",
        "state": "gpu",
        "bytes": 3 * MIB,
        "priority": 0,
        "in_use": 0,
    }
    live_peer({"pid": 4242, "budgets": {}, "holders": [held], "waiters": [], "pad": "x" * (2 * MIB)})
    with pool_of(budget_gb=gib(3), share_dir=tmp_path) as pool:
        assert pool.get_status()["devices"][0]["used_gb"] == 0
