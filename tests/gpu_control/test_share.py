"""Several processes share one emulated device through a share directory: real processes, real kills.

Each worker (share_worker.py) is a separate Python process with its own GPUPool on
``emulated:0`` and a budget of a few MiB; they meet only through the directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gpu_control import GPUPool
from gpu_control.__main__ import main as cli
from gpu_control.share import read_share_status

from .pool_helpers import gib, sized

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20


class Worker:
    """One share_worker process; ``ask()`` sends a command and reads its JSON answer."""

    def __init__(self, share_dir: Path, name: str, mib: int, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.gpu_control.share_worker", str(share_dir), name, str(mib), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        ready = self.read(timeout=60)
        self.pid = ready["ready"]

    def read(self, timeout: float = 30) -> dict[str, Any]:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        assert box and box[0], f"worker {self.proc.pid} answered nothing within {timeout} s"
        return json.loads(box[0])

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def ask(self, command: str, timeout: float = 30) -> dict[str, Any]:
        self.send(command)
        return self.read(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def workers(tmp_path):
    started: list[Worker] = []

    def start(name: str, mib: int, *args: str) -> Worker:
        worker = Worker(tmp_path, name, mib, *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def holders(share_dir: Path) -> list[tuple[str, str]]:
    return [(h["model"], h["state"]) for d in read_share_status(share_dir)["devices"] for h in d["holders"]]


def wait_until(predicate, timeout: float) -> float:
    """Poll until ``predicate()`` holds; return how long it took (fails past ``timeout``)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "the condition did not hold in time"
        time.sleep(0.01)
    return time.monotonic() - start


def test_an_idle_model_of_another_process_is_offloaded_when_asked(tmp_path, workers):
    keeper = workers("keeper", 2, "--keep")
    asker = workers("asker", 2)
    assert keeper.ask("use")["ok"]
    assert holders(tmp_path) == [("keeper", "gpu")]
    answer = asker.ask("use")
    assert answer["ok"], answer
    assert answer["seconds"] < 0.5 + 0.3  # the peer's offload within 0.5 s, plus this process's own copy
    models = keeper.ask("status")["status"]["models"]
    assert models["keeper"]["model_location"] == "cpu"
    assert models["keeper"]["last_transition"]["reason"] == "evicted"


def test_three_processes_taking_turns_never_pass_the_budget(tmp_path, workers):
    procs = [workers(name, 2) for name in ("p1", "p2", "p3")]  # each 2 MiB of a 3 MiB budget
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for device in read_share_status(tmp_path)["devices"]:
                samples.append(device["used_gb"] / device["budget_gb"])
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(4):
        for proc in procs:
            proc.send("use")
        answers = [proc.read() for proc in procs]
        assert all(a["ok"] for a in answers), answers
    stop.set()
    sampler.join(5)
    assert samples and max(samples) <= 1.0 + 1e-9
    assert max(samples) > 0.5  # the sampler saw models on the device


def test_a_killed_holder_gives_its_share_back_within_two_seconds(tmp_path, workers):
    holder = workers("holder", 2)
    waiter = workers("waiter", 2)
    assert holder.ask("hold")["ok"]
    waiter.send("use")
    wait_until(lambda: any(w for p in _peers(tmp_path) for w in p), timeout=10)  # the waiter is queued
    os.kill(holder.pid, signal.SIGKILL)
    killed = time.monotonic()
    answer = waiter.read(timeout=10)
    assert answer["ok"], answer
    assert time.monotonic() - killed < 2.0
    assert [p for p in os.listdir(tmp_path) if p.startswith(f"{holder.pid}-")] == []


def test_a_process_killed_in_the_middle_of_a_restore_frees_its_share(tmp_path, workers):
    slow = workers("slow", 2, "--slow-restore", "30")
    other = workers("other", 2)
    slow.send("use")
    assert slow.read() == {"restoring": True}
    assert holders(tmp_path) == [("slow", "loading")]
    os.kill(slow.pid, signal.SIGKILL)
    killed = time.monotonic()
    assert other.ask("use", timeout=10)["ok"]
    assert time.monotonic() - killed < 2.0


def test_a_damaged_shared_file_is_counted_as_empty_and_rewritten(tmp_path, workers):
    keeper = workers("keeper", 2, "--keep")
    assert keeper.ask("use")["ok"]
    state = next(p for p in tmp_path.iterdir() if p.name.startswith(f"{keeper.pid}-") and p.suffix == ".json")
    state.write_bytes(b'{"holders": [{"device": "emulated:0", "bytes": "lots"')  # truncated mid-write
    assert holders(tmp_path) == []  # read as holding nothing, and nothing crashes
    wait_until(lambda: holders(tmp_path) == [("keeper", "gpu")], timeout=3)  # its owner rewrote it


def test_a_peer_that_stops_answering_blocks_no_one_past_the_wait_timeout(tmp_path, workers):
    deaf = workers("deaf", 2, "--keep")
    asker = workers("asker", 2, "--wait", "1")
    assert deaf.ask("use")["ok"]
    os.kill(deaf.pid, signal.SIGSTOP)  # alive (its lock held), but it will not offload
    try:
        answer = asker.ask("use", timeout=10)
    finally:
        os.kill(deaf.pid, signal.SIGCONT)
    assert not answer["ok"]
    assert answer["error"].startswith("WaitTimeout: No room for 'asker'")
    assert f"'deaf' of process {deaf.pid}" in answer["error"]
    assert answer["seconds"] < 3


def test_two_pools_of_one_process_share_a_directory_too(tmp_path):
    first = GPUPool(devices=["emulated:0"], budget_gb=gib(3), share_dir=tmp_path)
    second = GPUPool(devices=["emulated:0"], budget_gb=gib(3), share_dir=tmp_path)
    try:
        a = first.add("a", sized(2), offload_after_use=False, idle_timeout=float("inf"))
        b = second.add("b", sized(2))
        with a.use():
            pass
        with b.use():
            assert first.get_status()["models"]["a"]["model_location"] == "cpu"

            def others() -> list[tuple[str, str, int]]:
                found = first.get_status()["devices"][0]["others"]
                return [(o["model"], o["state"], o["in_use"]) for o in found]

            wait_until(lambda: others() == [("b", "gpu", 1)], timeout=2)  # published within a share poll
    finally:
        first.close()
        second.close()
    assert os.listdir(tmp_path) == ["ledger.lock"]


def test_the_status_command_shows_every_holder(tmp_path, workers, capsys):
    keeper = workers("keeper", 2, "--keep")
    assert keeper.ask("use")["ok"]
    assert cli(["status", "--share-dir", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    device = data["devices"][0]
    assert device["device"] == "emulated:0" and device["budget_gb"] == pytest.approx(gib(3))
    holder = device["holders"][0]
    assert set(holder) == {"pid", "model", "state", "gb", "in_use", "priority", "idle_s"}
    assert (holder["pid"], holder["model"], holder["state"], holder["in_use"]) == (
        keeper.pid,
        "keeper",
        "gpu",
        0,
    )
    assert holder["gb"] == pytest.approx(gib(2))
    assert cli(["status", "--share-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "emulated:0: 2.0 MiB used of 3.0 MiB" in table and "keeper" in table
    assert cli(["status", "--share-dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _peers(share_dir: Path) -> list[list[Any]]:
    """Each live member's published waiters."""
    found = []
    for path in share_dir.glob("*.json"):
        try:
            found.append(json.loads(path.read_text()).get("waiters", []))
        except ValueError:
            pass
    return found


def test_a_peer_busy_when_asked_offloads_when_its_job_ends_and_takes_no_new_job_meanwhile(tmp_path):
    from .pool_helpers import Holder
    from .sync import Worker as Thread

    holder_pool = GPUPool(devices=["emulated:0"], budget_gb=gib(3), share_dir=tmp_path)
    asker_pool = GPUPool(devices=["emulated:0"], budget_gb=gib(3), share_dir=tmp_path, wait_timeout=20)
    try:
        a = holder_pool.add("a", sized(2), offload_after_use=False, idle_timeout=float("inf"))
        b = asker_pool.add("b", sized(2))
        order: list[str] = []
        b.add_transition_listener(lambda event: event["kind"] == "load" and order.append("b loaded"))
        busy = Holder(a)
        assert busy.holding.wait(5)
        asking = Thread(lambda: b.use().__enter__() and None)  # noqa: PLC2801 - held until close()
        asking.start()
        wait_until(lambda: "a" in holder_pool._share._asks, timeout=5)  # the request is kept, not refused

        def late_job() -> None:
            with a.use():
                order.append("late job on a")

        late = Thread(late_job)
        late.start()
        busy.end()  # the job ends: 'a' leaves at once, before the late job may take it again
        asking.finish()
        late.finish()
        assert order[0] == "b loaded"
        assert a.get_status()["last_transition"]["reason"] in ("evicted", "request")
    finally:
        asker_pool.close()
        holder_pool.close()
