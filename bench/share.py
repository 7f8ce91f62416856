"""Benchmark: three processes share one device's budget through a share directory, vs each alone.

    python bench/share.py                         # emulated:0 (cuda:0 when CUDA is available)
    python bench/share.py --model-mb 96 --job-ms 200 --seed 2
    python bench/share.py --device cuda:0 --model-mb 4000   # real out-of-memory errors count

Three worker processes (``spawn``), each with its own `GPUPool` on the same device and the same
budget, and one model in it: a stack of MLP blocks with random weights whose size is
``--fraction`` (60 %) of the budget, so the device holds one of the three models, never two.
Each process runs ``--jobs`` jobs, one after another, at seeded random times within
``--window-s`` (the same times in every scenario); a job is ``with pool[name].use() as m:``
one small forward pass, then ``--job-ms`` of sleep standing for the work on the device.
Before each scenario every model is loaded once and offloaded: all start in the host cache.

- **alone, models stay**: no share directory, ``offload_after_use=False`` and a one-hour idle
  timeout. Each process believes it has the whole budget.
- **alone, offload after use**: the same, but each model leaves the device after every job
  (``offload_after_use=True``): processes that are as polite as they can be without a ledger.
- **shared**: the settings of the first row, and all three pools use one share directory. A
  model stays on the device until a peer that needs the room asks its process to evict it.

Device use is sampled every ``--sample-ms`` while the jobs run: each worker writes what it
holds on the device into a shared array from a thread (on an emulated device the bytes its
model's engine holds there, on CUDA ``torch.cuda.memory_allocated``), and the parent sums the
three. A sample above the budget is over budget; an *event* is a run of such samples. With
sharing the parent also reads the host-wide ledger (``read_share_status``) every 20 ms. On
CUDA the parent first fills the card with a ballast tensor so that only the budget (plus
``--slack-mb``) is free: going over the budget is then a real out-of-memory error, counted
as a failed job.

The serial ideal is the sum of every job's duration measured alone: each process in turn
runs ``CALIBRATION`` jobs with its model already on the device and nothing else running
(median); the first, from the host cache, also gives the restore time. Job latency is from a
job's scheduled time to its end (queueing behind the process's own earlier jobs included);
p99 is the nearest-rank percentile (with fewer than 100 jobs, the slowest).

Eviction-request latency is measured where the request is carried out: every request a
process reads from its inbox (the share code's ``PoolShare._answer`` and ``ask_to_evict``
are wrapped to time them) is timed from the moment the asking process wrote it (the
request's ``at``, wall clock, same host) to the end of the offload it caused; the share
thread handles requests one at a time, so the offload has ended when the handler returns.
The wait of each job that restored after a peer's eviction is split into: job start until
the request that succeeded was sent (whoever sent it), that request's latency, and noticing
the freed room plus the restore copy. Also shown: the time some job waited while no job ran
on the device, and pairs of jobs of different processes served out of the order they asked
in. MB = 10^6 bytes, MiB = 2^20.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import multiprocessing
import os
import random
import shlex
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__mp_main__":
    # A worker: spawn imports this file under that name. Ctrl-C reaches the whole process group; the
    # parent decides. Its SIGTERM ends a worker at once, which is clean: the device memory goes with
    # the process, the share files with the parent's temporary directory.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_control import GPUPool  # noqa: E402
from gpu_control.memory import GIB  # noqa: E402
from gpu_control.pool_share import ASK_AGAIN_S, SHARE_POLL_S  # noqa: E402
from gpu_control.share import read_share_status  # noqa: E402

WIDTH = 512
TOKENS = 16
CALIBRATION = 5  # jobs per process measured alone: the first restores, the others are warm
LEDGER_EVERY_S = 0.02
MB = 1e6
MIB = 2**20

SCENARIOS = {
    "alone": "alone, models stay (no share directory)",
    "polite": "alone, offload after use (no share directory)",
    "shared": "**shared**: one share directory",
}


# ---------------------------------------------------------------------------- the model


def _block() -> nn.Module:
    return nn.Sequential(
        nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH)
    )


def block_bytes() -> int:
    with torch.device("meta"):
        return sum(p.nbytes for p in _block().parameters())


def build_model(layers: int, seed: int) -> nn.Module:
    """A stack of ``layers`` pre-norm MLP blocks, fp32, random weights on the CPU (the load function)."""
    torch.manual_seed(seed)
    return nn.Sequential(*(_block() for _ in range(layers))).eval()


def forward(model: nn.Module, x: torch.Tensor) -> float:
    """One small forward pass; reading the result waits for the device."""
    with torch.inference_mode():
        return float(model(x).sum())


# ---------------------------------------------------------------------------- the worker process


@dataclass(frozen=True)
class Config:
    """What every worker needs to know, sent when it starts."""

    device: str
    layers: int
    budget: int
    job_s: float
    wait_timeout: float
    interval: float


@dataclass
class Seat:
    """One worker's pool for one scenario and what it recorded."""

    pool: GPUPool
    manager: Any
    moves: list[tuple[float, str, str]] = field(default_factory=list)  # (end, kind, reason)
    asks: list[float] = field(default_factory=list)  # eviction requests this process sent
    answers: list[dict[str, Any]] = field(default_factory=list)  # requests it received


def _open_seat(index: int, config: Config, mode: str, share_dir: str | None) -> Seat:
    """A fresh pool with the worker's model, loaded once and offloaded (all start in the host cache)."""
    pool = GPUPool(
        devices=[config.device],
        budget_gb=config.budget / GIB,
        wait_timeout=config.wait_timeout,
        share_dir=share_dir,
    )
    manager = pool.add(
        f"model-{index}",
        functools.partial(build_model, config.layers, index),
        idle_timeout=3600,
        offload_after_use=mode == "polite",
    )
    seat = Seat(pool, manager)
    manager.add_transition_listener(lambda e: seat.moves.append((time.time(), e["kind"], e["reason"])))
    if pool._share is not None:
        _record_requests(seat)
    return seat


def _record_requests(seat: Seat) -> None:
    """Time the eviction requests this process sends and the ones it carries out.

    A request for a model in use is kept by the peer and carried out when its jobs end; one
    record is made when it is settled: when it was sent (``at``), first read (``picked``) and
    settled (``done``), and whether an offload came of it.
    """
    share = seat.pool._share
    ask, remember, answer = share.ledger.ask_to_evict, share._remember, share._answer
    pending: dict[str, tuple[float, float, bool]] = {}  # model -> (sent, first read, seen in use)

    def timed_ask(peer: Any, model: str, priority: int) -> None:
        seat.asks.append(time.time())
        ask(peer, model, priority)

    def timed_remember(request: dict[str, Any], now: float) -> None:
        model = str(request.get("model"))
        if model not in pending:
            pending[model] = (float(request.get("at", time.time())), time.time(), False)
        remember(request, now)

    def timed_answer(model: str, priority: int) -> bool:
        before = sum(1 for _, kind, reason in seat.moves if kind == "offload" and reason == "evicted")
        in_use = seat.manager.get_status()["in_use"] > 0
        settled = answer(model, priority)
        after = sum(1 for _, kind, reason in seat.moves if kind == "offload" and reason == "evicted")
        sent, picked, was_busy = pending.get(model, (time.time(), time.time(), False))
        if not settled:
            pending[model] = (sent, picked, was_busy or in_use)
            return settled
        pending.pop(model, None)
        seat.answers.append(
            {"at": sent, "picked": picked, "done": time.time(), "honored": after > before, "in_use": was_busy}
        )
        return settled

    share.ledger.ask_to_evict = timed_ask
    share._remember = timed_remember
    share._answer = timed_answer


def _job(seat: Seat, x: torch.Tensor, job_s: float, scheduled: float) -> dict[str, Any]:
    asked = time.time()
    record: dict[str, Any] = {
        "scheduled": scheduled,
        "asked": asked,
        "got": math.nan,
        "ok": False,
        "error": None,
    }
    try:
        with seat.manager.use() as model:
            record["got"] = time.time()
            forward(model, x)
            time.sleep(job_s)
        record["ok"] = True
    except Exception as error:  # a failed job is a result (out of memory, wait timeout)
        record["error"] = type(error).__name__
    record["done"] = time.time()
    return record


def _run(
    seat: Seat, x: torch.Tensor, job_s: float, start_at: float, offsets: list[float]
) -> list[dict[str, Any]]:
    """The jobs at their times; what the process does for its peers afterwards is collected later."""
    seat.moves.clear()
    seat.asks.clear()
    seat.answers.clear()
    jobs = []
    for offset in offsets:
        time.sleep(max(0.0, start_at + offset - time.time()))
        jobs.append(_job(seat, x, job_s, start_at + offset))
    return jobs


def _calibrate(seat: Seat, x: torch.Tensor, job_s: float) -> dict[str, float]:
    seat.moves.clear()
    durations = []
    for _ in range(CALIBRATION):
        record = _job(seat, x, job_s, time.time())
        if not record["ok"]:
            raise RuntimeError(f"A calibration job failed alone: {record['error']}")
        durations.append(record["done"] - record["asked"])
    restore = durations[0] - statistics.median(durations[1:])
    return {"job_s": statistics.median(durations[1:]), "restore_s": restore}


def worker(index: int, config: Config, conn: Any, use: Any) -> None:
    """A worker process: answers the parent's commands over ``conn``; writes its device bytes into ``use``."""
    torch.set_num_threads(1)
    device = torch.device(config.device if config.device.startswith("cuda") else "cpu")
    x = torch.randn(1, TOKENS, WIDTH, generator=torch.Generator().manual_seed(0)).to(device)
    if device.type == "cuda":
        forward(nn.Linear(WIDTH, WIDTH).to(device), x)  # the context and cuBLAS exist before the ballast
    seat: Seat | None = None
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(config.interval):
            if device.type == "cuda":
                use[index] = torch.cuda.memory_allocated(device)
            else:
                weights = None if seat is None else seat.manager._weights
                use[index] = 0 if weights is None else weights.device_bytes

    threading.Thread(target=report, name="bench-reporter", daemon=True).start()
    try:
        conn.send(("ok", os.getpid()))
        while True:
            try:
                command, *payload = conn.recv()
            except EOFError:  # the parent is gone
                return
            if command == "quit":
                return
            try:
                if command == "open":
                    seat = _open_seat(index, config, *payload)
                    first = _job(seat, x, 0.0, time.time())
                    if not first["ok"]:
                        raise RuntimeError(f"The first load failed: {first['error']}")
                    seat.manager.force_offload()
                    answer: Any = None
                elif command == "calibrate":
                    answer = _calibrate(seat, x, config.job_s)
                    seat.manager.force_offload()
                elif command == "run":
                    answer = _run(seat, x, config.job_s, *payload)
                elif command == "collect":
                    answer = {
                        "moves": list(seat.moves),
                        "asks": list(seat.asks),
                        "answers": list(seat.answers),
                    }
                elif command == "close":
                    seat.pool.close()
                    seat, answer = None, None
                else:
                    raise ValueError(f"unknown command {command!r}")
                conn.send(("ok", answer))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        stop.set()
        if seat is not None:
            seat.pool.close()


# ---------------------------------------------------------------------------- the parent


class Workers:
    """The worker processes; leaving the ``with`` block ends them, however it is left."""

    def __init__(self, config: Config, count: int, reply_timeout: float) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.use = self.context.Array("q", count, lock=False)
        self.config, self.count, self.reply_timeout = config, count, reply_timeout
        self.conns: list[Any] = []
        self.processes: list[Any] = []

    def __enter__(self) -> Workers:
        try:
            for index in range(self.count):
                ours, theirs = self.context.Pipe()
                process = self.context.Process(
                    target=worker,
                    args=(index, self.config, theirs, self.use),
                    name=f"bench-share-{index}",
                    daemon=True,
                )
                process.start()
                theirs.close()
                self.conns.append(ours)
                self.processes.append(process)
            for index in range(self.count):
                self._reply(index)
        except BaseException as error:
            self.__exit__(type(error))
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None = None, *exc: object) -> None:
        """Quit politely after a finished run; after an error or Ctrl-C, SIGTERM at once."""
        if exc_type is None:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.send(("quit",))
            deadline = time.monotonic() + 10
            for process in self.processes:
                process.join(max(0.1, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        for conn in self.conns:
            conn.close()

    def _reply(self, index: int) -> Any:
        conn = self.conns[index]
        if not conn.poll(self.reply_timeout):
            raise RuntimeError(f"Worker {index} did not answer within {self.reply_timeout:g} s.")
        status, value = conn.recv()
        if status == "error":
            raise RuntimeError(f"Worker {index} failed:\n{value}")
        return value

    def call(self, index: int, *message: Any) -> Any:
        self.conns[index].send(message)
        return self._reply(index)

    def call_all(self, *messages: tuple[Any, ...]) -> list[Any]:
        """Send one message to each worker (all at once), then collect the answers."""
        for conn, message in zip(self.conns, messages):
            conn.send(message)
        return [self._reply(index) for index in range(self.count)]


class Sampler:
    """Sums the workers' device bytes every ``interval`` s on a thread: peak, samples and runs over budget.

    With ``share_dir`` it also reads the host-wide ledger every `LEDGER_EVERY_S` (its peak).
    """

    def __init__(self, use: Any, budget: int, interval: float, share_dir: str | None) -> None:
        self.use, self.budget, self.interval, self.share_dir = use, budget, interval, share_dir
        self.samples = self.over = self.events = self.peak = 0
        self.ledger_peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        above = False
        ledger_at = 0.0
        while not self._stop.wait(self.interval):
            total = sum(self.use)
            self.samples += 1
            self.peak = max(self.peak, total)
            self.over += total > self.budget
            self.events += total > self.budget and not above
            above = total > self.budget
            if self.share_dir is not None and time.monotonic() - ledger_at >= LEDGER_EVERY_S:
                ledger_at = time.monotonic()
                for device in read_share_status(self.share_dir)["devices"]:
                    used = device["used_gb"] * GIB
                    self.ledger_peak = max(self.ledger_peak or 0.0, used)


@dataclass
class Outcome:
    """One scenario's records, from every worker."""

    key: str
    runs: list[dict[str, Any]]
    sampler: Sampler

    @property
    def jobs(self) -> list[dict[str, Any]]:
        return [dict(job, worker=i) for i, run in enumerate(self.runs) for job in run["jobs"]]

    @property
    def wall(self) -> float:
        jobs = self.jobs
        return max(j["done"] for j in jobs) - min(j["scheduled"] for j in jobs)


def arrivals(seed: int, workers: int, jobs: int, window: float) -> list[list[float]]:
    """Each worker's job times (seconds after the start), sorted; the same in every scenario."""
    rng = random.Random(seed)
    return [sorted(rng.uniform(0, window) for _ in range(jobs)) for _ in range(workers)]


def run_scenario(
    workers: Workers, key: str, schedule: list[list[float]], share_dir: str | None, interval: float
) -> Outcome:
    """One scenario: fresh pools, the jobs at their times, the records. After an error the pools
    are not closed here: `Workers` ends the processes."""
    for index in range(workers.count):  # one at a time: alone, three loads at once could not fit on CUDA
        workers.call(index, "open", key, share_dir)
    with Sampler(workers.use, workers.config.budget, interval, share_dir) as sampler:
        start_at = time.time() + 0.3
        jobs = workers.call_all(*[("run", start_at, offsets) for offsets in schedule])
    records = workers.call_all(*[("collect",)] * workers.count)  # a peer may evict after its own last job
    workers.call_all(*[("close",)] * workers.count)
    return Outcome(key, [dict(record, jobs=run) for run, record in zip(jobs, records)], sampler)


def calibrate(workers: Workers) -> list[dict[str, float]]:
    """Each worker in turn, the others idle: its job duration alone and its restore time."""
    for index in range(workers.count):
        workers.call(index, "open", "alone", None)
    figures = [workers.call(index, "calibrate") for index in range(workers.count)]
    workers.call_all(*[("close",)] * workers.count)
    return figures


def hold_ballast(device: str, budget: int, slack: int) -> torch.Tensor | None:
    """On CUDA, fill the card so that only ``budget + slack`` bytes stay free (None elsewhere)."""
    if not device.startswith("cuda"):
        return None
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    extra = free - budget - slack
    if extra < 0:
        raise SystemExit(f"{device} has {free / GIB:.2f} GiB free, less than the budget plus slack.")
    return torch.empty(extra, dtype=torch.uint8, device=device)


# ---------------------------------------------------------------------------- figures


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def spread(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{ms(statistics.median(values))} / {ms(percentile(values, 99))} (n={len(values)})"


def restores_in(run: dict[str, Any], start: float, end: float) -> int:
    return sum(1 for at, kind, _ in run["moves"] if kind in ("restore", "load") and start <= at <= end)


def handoffs(outcome: Outcome) -> dict[str, list[float]]:
    """Jobs that restored after a peer's model was evicted for the room: the parts of their wait."""
    evictions = sorted(
        (a for run in outcome.runs for a in run["answers"] if a["honored"]), key=lambda a: a["done"]
    )
    parts: dict[str, list[float]] = {"wait": [], "before": [], "request": [], "restore": []}
    for run in outcome.runs:
        for job in run["jobs"]:
            if not job["ok"] or not restores_in(run, job["asked"], job["got"]):
                continue
            freed = [a for a in evictions if job["asked"] <= a["at"] and a["done"] <= job["got"]]
            if not freed:
                continue
            last = freed[-1]  # the request (of any waiting process) whose eviction made the room
            parts["wait"].append(job["got"] - job["asked"])
            parts["before"].append(last["at"] - job["asked"])
            parts["request"].append(last["done"] - last["at"])
            parts["restore"].append(job["got"] - last["done"])
    return parts


def idle_while_waiting(outcome: Outcome, step: float = 0.001) -> float:
    """Seconds in which some job waited for the device and no job ran on it (moves included)."""
    jobs = [j for j in outcome.jobs if j["ok"]]
    start, end = min(j["asked"] for j in jobs), max(j["done"] for j in jobs)
    idle = 0
    for tick in range(int((end - start) / step)):
        t = start + tick * step
        waiting = any(j["asked"] <= t < j["got"] for j in jobs)
        idle += waiting and not any(j["got"] <= t < j["done"] for j in jobs)
    return idle * step


def inversions(outcome: Outcome) -> tuple[int, int]:
    """Pairs of jobs of different processes served out of the order they asked in; and of those,
    how many the later job won without a restore (its model was still on the device)."""
    jobs = [j for j in outcome.jobs if j["ok"]]
    total = resident = 0
    for a in jobs:
        for b in jobs:
            if a["worker"] != b["worker"] and a["asked"] < b["asked"] and b["got"] < a["got"]:
                total += 1
                resident += restores_in(outcome.runs[b["worker"]], b["asked"], b["got"]) == 0
    return total, resident


def failures(jobs: list[dict[str, Any]]) -> str:
    errors: dict[str, int] = {}
    for job in jobs:
        if not job["ok"]:
            errors[job["error"]] = errors.get(job["error"], 0) + 1
    return ", ".join(f"{n} {name}" for name, n in errors.items()) or "0"


def print_tables(outcomes: list[Outcome], ideal: float, budget: int) -> None:
    print(
        "| scenario | jobs ok | failed | samples over budget | over-budget events | peak use / budget "
        "| wall time | vs serial ideal | job latency p50 / p99 | wait for the model p50 / p99 | restores |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| serial ideal: every job as measured alone, back to back | | | | | | {ms(ideal)} | 1.00× | | | |"
    )
    for outcome in outcomes:
        jobs = outcome.jobs
        ok = [j for j in jobs if j["ok"]]
        latency = [j["done"] - j["scheduled"] for j in ok]
        wait = [j["got"] - j["asked"] for j in ok]
        sampler = outcome.sampler
        restores = sum(restores_in(run, -math.inf, math.inf) for run in outcome.runs)
        print(
            f"| {SCENARIOS[outcome.key]} | {len(ok)} of {len(jobs)} | {failures(jobs)} "
            f"| {sampler.over} of {sampler.samples} ({100 * sampler.over / max(1, sampler.samples):.0f} %) "
            f"| {sampler.events} | {sampler.peak / budget:.2f} | {ms(outcome.wall)} "
            f"| {outcome.wall / ideal:.2f}× | {pair(latency)} | {pair(wait)} | {restores} |"
        )
    shared = next((o for o in outcomes if o.key == "shared"), None)
    if shared is None:
        return
    answers = [a for run in shared.runs for a in run["answers"]]
    honored = [a for a in answers if a["honored"]]
    busy = sum(1 for a in honored if a["in_use"])
    parts = handoffs(shared)
    total, resident = inversions(shared)
    asks = sum(len(run["asks"]) for run in shared.runs)
    ledger = "—" if shared.sampler.ledger_peak is None else f"{shared.sampler.ledger_peak / budget:.2f}"
    rows = [
        (
            "eviction request → the peer's offload done (in the peer, from the request's time stamp)",
            spread([a["done"] - a["at"] for a in honored]),
            f"{asks} sent (renewed every {ASK_AGAIN_S:g} s while waiting), {len(answers)} settled, "
            f"{len(honored)} carried out ({busy} once the model's jobs ended), "
            f"{len(answers) - len(honored)} found it gone already",
        ),
        (
            "… of which until the peer's share thread read it",
            spread([a["picked"] - a["at"] for a in honored]),
            f"it polls every {SHARE_POLL_S:g} s",
        ),
        ("… of which the offload", spread([a["done"] - a["picked"] for a in honored]), ""),
        ("jobs that restored after a peer's eviction: their wait for the model", spread(parts["wait"]), ""),
        (
            "… job start → the request that succeeded was sent",
            spread(parts["before"]),
            "the peer busy: the request is kept until its jobs end",
        ),
        ("… that request → the peer's offload done", spread(parts["request"]), ""),
        (
            "… offload done → the model in hand (noticing the room + own restore)",
            spread(parts["restore"]),
            "",
        ),
        (
            "device idle while a job waited for it (handoffs, requests, restores)",
            ms(idle_while_waiting(shared)),
            f"of a {ms(shared.wall)} run",
        ),
        (
            "jobs of different processes served out of the order they asked in",
            f"{total} pairs",
            f"{resident} won by a job whose model was still on the device (its use began before the request)",
        ),
        ("host-wide ledger: peak charged / budget", ledger, f"read every {LEDGER_EVERY_S * 1000:.0f} ms"),
    ]
    print()
    print("| with sharing | median / p99 (n) | |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def pair(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{ms(statistics.median(values))} / {ms(percentile(values, 99))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="emulated:0 (default without CUDA) or cuda:N")
    parser.add_argument(
        "--model-mb", type=float, default=48.0, help="each model's weights in MB (default 48)"
    )
    parser.add_argument(
        "--fraction", type=float, default=0.6, help="model size / device budget (default 0.6)"
    )
    parser.add_argument("--processes", type=int, default=3, help="worker processes (default 3)")
    parser.add_argument("--jobs", type=int, default=10, help="jobs per process (default 10)")
    parser.add_argument("--job-ms", type=float, default=100.0, help="sleep inside each job (default 100)")
    parser.add_argument(
        "--window-s", type=float, default=2.0, help="jobs arrive within this window (default 2)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times (default 0)")
    parser.add_argument(
        "--sample-ms", type=float, default=2.0, help="device-use sampling interval (default 2)"
    )
    parser.add_argument("--wait-timeout", type=float, default=60.0, help="the pools' wait timeout in s")
    parser.add_argument("--slack-mb", type=float, default=256.0, help="CUDA: MB left free above the budget")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    args = parser.parse_args()

    device = args.device or ("cuda:0" if torch.cuda.is_available() else "emulated:0")
    if not (device.startswith("emulated:") or device.startswith("cuda:")):
        parser.error("--device is emulated:N or cuda:N")
    layers = max(1, round(args.model_mb * MB / block_bytes()))
    model_bytes = layers * block_bytes()
    budget = int(model_bytes / args.fraction)
    config = Config(device, layers, budget, args.job_ms / 1000, args.wait_timeout, args.sample_ms / 1000)
    schedule = arrivals(args.seed, args.processes, args.jobs, args.window_s)

    kind = "CUDA, over budget = out of memory" if device.startswith("cuda") else "the CPU standing in, no GPU"
    print(
        f"# gpu_control cross-process sharing benchmark — {device} ({kind}), torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs"
    )
    print()
    print(
        f"budget {budget / MIB:.1f} MiB; each model {model_bytes / MB:.1f} MB ({layers} MLP blocks of width "
        f"{WIDTH}, {model_bytes / budget:.0%} of the budget); {args.processes} processes × {args.jobs} jobs "
        f"within {args.window_s:g} s, each a forward pass + {args.job_ms:g} ms; seed {args.seed}"
    )
    print(f"command: python bench/share.py {shlex.join(sys.argv[1:])}".rstrip())
    sys.stdout.flush()

    reply_timeout = args.wait_timeout * args.jobs + 120
    outcomes = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-share-") as tmp,
        Workers(config, args.processes, reply_timeout) as w,
    ):
        ballast = hold_ballast(device, budget, int(args.slack_mb * MB))
        calibration = calibrate(w)
        ideal = sum(c["job_s"] * args.jobs for c in calibration)
        for key in args.scenarios:
            share_dir = os.path.join(tmp, "share") if key == "shared" else None
            outcomes.append(run_scenario(w, key, schedule, share_dir, config.interval))
        del ballast
    restore = statistics.median(c["restore_s"] for c in calibration)
    job = statistics.median(c["job_s"] for c in calibration)
    print(
        f"alone, per job: {ms(job)} with the model on the device (median of the processes), "
        f"a restore from the host cache adds {ms(restore)}"
    )
    print()
    print_tables(outcomes, ideal, budget)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\nInterrupted: the workers are stopped and the temporary directory removed.", file=sys.stderr)
        sys.exit(130)
