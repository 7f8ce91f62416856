"""Benchmark: three models taking turns on a device that holds one of them.

    python bench/pool.py                          # 3 models of ~200 MB, 30 requests, 1 then 2 clients
    python bench/pool.py --order random           # seeded random order: some requests are hits
    python bench/pool.py --device cuda:0 --size-mb 2000   # cuda:0 is the default when CUDA is available

The same request stream (each request: one small forward pass of one model) is served three ways:

- **pool**: one `GPUPool` whose device budget holds one model and a bit, not two; the models stay
  on the device after use (``offload_after_use=False``, idle timeout one hour), so eviction to
  the host cache, not a timeout, makes room; a request is ``with pool[name].use() as m: m(x)``.
- **reload from disk**: no host tier; each request builds the model on the ``meta`` device,
  reads its safetensors file (written once, page cache warm: the best case for this way) with
  ``load_safetensors``, copies it to the device with the same engine, runs it and drops it.
- **one process per model**: three processes, each with a standalone `GPUResourceManager`
  (``offload_after_use=True``); the parent sends each request over a pipe to the model's
  process and waits for the answer. Nothing coordinates the processes.

The three are set up side by side and take turns in blocks of ``--block`` requests (A, B, C,
A, B, C, ...), so that a machine whose load drifts slows all three alike. With more than one
client (``--clients``) requests overlap: the pool makes a request wait while the model it would
evict is in use; the other two ways do not wait, so their device use can pass the budget (on a
real GPU: out of memory). A thread samples the device use every ``--sample-ms`` while a
scenario runs: the weight bytes the engines hold on the device (each process's, summed; the
pool's own ledger too, which also counts working memory).

The pool's eviction decision is timed where it runs: every ``schedule()`` of the pool's books
(under the pool's lock) that chose a model to evict. A second table times that step alone with
many idle models on an emulated device (it is bookkeeping: the device does not matter).
Latencies are the time a client waited for its answer; p99 is the nearest-rank percentile
(with fewer than 100 requests, the slowest). MB = 10^6 bytes.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import functools
import gc
import math
import multiprocessing
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_control import GPUPool, GPUResourceManager, attach, load_safetensors  # noqa: E402
from gpu_control.memory import GIB  # noqa: E402

WIDTH = 1024
TOKENS = 32
KINDS = ("encoder", "prenorm", "mlp")
WORKING = 16 * 2**20  # bytes each model needs on the device beyond its weights
MB = 1e6


# ---------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Spec:
    """One model: its architecture, depth and checkpoint."""

    name: str
    kind: str
    layers: int
    path: str
    nbytes: int


def _block(kind: str) -> nn.Module:
    if kind == "mlp":
        up, down = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)
        return nn.Sequential(nn.LayerNorm(WIDTH), up, nn.GELU(), down)
    return nn.TransformerEncoderLayer(WIDTH, 16, 4 * WIDTH, batch_first=True, norm_first=kind == "prenorm")


def build(kind: str, layers: int, device: str = "cpu") -> nn.Module:
    """A stack of ``layers`` transformer or MLP blocks (fp32, random weights on the CPU)."""
    with torch.device(device):
        return nn.Sequential(*(_block(kind) for _ in range(layers))).eval()


def load(spec: Spec) -> nn.Module:
    """The recommended load: a meta model filled from the checkpoint (the pool's load function too)."""
    model = build(spec.kind, spec.layers, "meta")
    load_safetensors(model, spec.path)
    return model


def write_models(folder: str, size_mb: float) -> list[Spec]:
    """Build the three models with random weights and write each as a safetensors file."""
    specs = []
    for index, kind in enumerate(KINDS):
        per_layer = sum(p.nbytes for p in _block_on_meta(kind).parameters())
        layers = max(1, round(size_mb * MB / per_layer))
        torch.manual_seed(index)
        model = build(kind, layers)
        path = os.path.join(folder, f"{kind}.safetensors")
        save_file(model.state_dict(), path)
        specs.append(Spec(kind, kind, layers, path, sum(p.nbytes for p in model.parameters())))
        del model
    return specs


def _block_on_meta(kind: str) -> nn.Module:
    with torch.device("meta"):
        return _block(kind)


def resolve(device: str) -> tuple[torch.device, bool]:
    """The torch device of a bench device name, and whether it is emulated."""
    if device.startswith("emulated"):
        return torch.device("cpu"), True
    return torch.device(device), False


def example(device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, TOKENS, WIDTH, generator=generator).to(device)


def forward(model: nn.Module, x: torch.Tensor) -> float:
    """One small forward pass; reading the result waits for the device."""
    with torch.inference_mode():
        return float(model(x).float().sum())


# ---------------------------------------------------------------------------- measuring


class Sampler:
    """Reads the device use every ``interval`` seconds while entered: peaks and samples over budget.

    ``read`` returns a tuple of byte counts; the first is the one compared with the budget.
    Entering again goes on counting.
    """

    def __init__(self, read: Callable[[], tuple[int, ...]], budget: int, interval: float) -> None:
        self.read, self.budget, self.interval = read, budget, interval
        self.peaks: list[int] = []
        self.samples = self.over = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> Sampler:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._thread is not None
        self._stop.set()
        self._thread.join(10)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            while True:
                values = self.read()
                self.peaks = [max(a, b) for a, b in zip(self.peaks, values)] if self.peaks else list(values)
                self.samples += 1
                self.over += values[0] > self.budget
                if self._stop.wait(self.interval):
                    return
        except BaseException as error:  # re-raised by __exit__ in the main thread
            self._error = error


def run_stream(stream: list[str], clients: int, handle: Callable[[str], None]) -> list[float]:
    """Serve ``stream`` in order with ``clients`` closed-loop clients; seconds per request."""
    latencies = [math.nan] * len(stream)
    pending = iter(enumerate(stream))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client() -> None:
        while not errors:
            with lock:
                item = next(pending, None)
            if item is None:
                return
            index, name = item
            start = time.perf_counter()
            try:
                handle(name)
            except BaseException as error:
                errors.append(error)
                return
            latencies[index] = time.perf_counter() - start

    threads = [threading.Thread(target=client, name=f"bench-client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return latencies


def device_bytes(weights: Any) -> int:
    return 0 if weights is None else weights.device_bytes


# ---------------------------------------------------------------------------- the three ways


class Scenario(abc.ABC):
    """One way of serving the requests."""

    label = ""
    decisions: tuple[float, ...] | list[float] = ()  # the pool's eviction decisions, in seconds

    def warm_up(self, specs: list[Spec]) -> None:
        """The first loads, untimed."""
        for spec in specs:
            self.handle(spec.name)

    @abc.abstractmethod
    def handle(self, name: str) -> None:
        """Serve one request for model ``name``."""

    @abc.abstractmethod
    def read(self) -> tuple[int, ...]:
        """The device use now (bytes), for the sampler."""

    def notes(self, budget: int, sampler: Sampler) -> list[str]:
        return []

    def close(self) -> None:
        """Let go of what it holds."""


class PoolScenario(Scenario):
    """A: one pool; eviction to the host cache and restore make room."""

    label = "pool: evict to host, restore"

    def __init__(self, specs: list[Spec], device: str, budget: int) -> None:
        self.pool = GPUPool(devices=[device], budget_gb=budget / GIB, wait_timeout=600)
        self.names = [spec.name for spec in specs]
        self.events: list[dict[str, Any]] = []
        for spec in specs:
            manager = self.pool.add(spec.name, functools.partial(load, spec), working_gb=WORKING / GIB,
                                    idle_timeout=3600, release_timeout=0, offload_after_use=False)
            manager.add_transition_listener(self.events.append)
        self.x = example(resolve(device)[0])
        self.decisions: list[float] = []
        schedule = self.pool._books.schedule

        def timed_schedule() -> list[Any]:
            start = time.perf_counter()
            served = schedule()
            took = time.perf_counter() - start
            if any(waiter.grant is not None and waiter.grant.victims for waiter in served):
                self.decisions.append(took)
            return served

        self.pool._books.schedule = timed_schedule  # type: ignore[method-assign]

    def handle(self, name: str) -> None:
        with self.pool[name].use() as model:
            forward(model, self.x)

    def read(self) -> tuple[int, int]:
        charged = int(self.pool.get_status()["devices"][0]["used_gb"] * GIB)
        return sum(device_bytes(self.pool[name]._weights) for name in self.names), charged

    def warm_up(self, specs: list[Spec]) -> None:
        super().warm_up(specs)
        self.decisions.clear()
        self.events.clear()

    def notes(self, budget: int, sampler: Sampler) -> list[str]:
        evictions = [e["seconds"] for e in self.events if e["kind"] == "offload" and e["reason"] == "evicted"]
        restores = [e["seconds"] for e in self.events if e["kind"] == "restore"]
        note = (
            f"{len(restores)} restores, median {ms(restores)} (wait for room + eviction + copy); "
            f"{len(evictions)} evictions to the host cache, median {ms(evictions)}; "
            f"the pool's ledger peaked at {sampler.peaks[1] / budget:.2f} of the budget"
        )
        return [note]

    def close(self) -> None:
        self.pool.close()


class ReloadScenario(Scenario):
    """B: no host tier; read the checkpoint, copy it to the device, drop it after use."""

    label = "reload from disk each request"

    def __init__(self, specs: list[Spec], device: str) -> None:
        self.device, self.emulated = resolve(device)
        self.specs = {spec.name: spec for spec in specs}
        self.x = example(self.device)
        self.live: set[Any] = set()
        self.lock = threading.Lock()

    def handle(self, name: str) -> None:
        model = load(self.specs[name])
        weights = attach(model, self.device, emulate_device=self.emulated, pin=False)
        weights.to_device()
        with self.lock:
            self.live.add(weights)
        try:
            forward(model, self.x)
        finally:
            with self.lock:
                self.live.discard(weights)
            weights.release()

    def read(self) -> tuple[int]:
        with self.lock:
            held = list(self.live)
        return (sum(device_bytes(weights) for weights in held),)



def serve(spec: Spec, device: str, conn: Any, use: Any, index: int, interval: float) -> None:
    """A model's own process: a standalone manager answering requests from the pipe."""
    torch_device, emulated = resolve(device)
    engine = functools.partial(attach, emulate_device=True) if emulated else attach
    manager = GPUResourceManager(3600, 0, True, device=torch_device, load_func=functools.partial(load, spec),
                                 name=spec.name, engine=engine)
    x = example(torch_device)
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(interval):
            use[index] = device_bytes(manager._weights)

    def request() -> None:
        with manager.use() as model:
            forward(model, x)

    reporter = threading.Thread(target=report, name="bench-reporter", daemon=True)
    try:
        request()  # the first load, untimed
        reporter.start()
        conn.send(("ready", ""))
        while conn.recv():
            request()
            conn.send(("ok", ""))
    except Exception as error:
        conn.send(("error", f"{spec.name}: {type(error).__name__}: {error}"))
    finally:
        stop.set()
        manager.force_release()
        manager.stop_monitor()


class ProcessScenario(Scenario):
    """C: one process per model, requests over pipes, nothing shared."""

    label = "one process per model"

    def __init__(self, specs: list[Spec], device: str, interval: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.use = context.Array("q", len(specs), lock=False)
        self.conns: dict[str, Any] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.processes = []
        for index, spec in enumerate(specs):
            ours, theirs = context.Pipe()
            process = context.Process(target=serve, args=(spec, device, theirs, self.use, index, interval),
                                      name=f"bench-{spec.name}", daemon=True)
            process.start()
            self.conns[spec.name], self.locks[spec.name] = ours, threading.Lock()
            self.processes.append(process)
        for spec in specs:
            self._answer(spec.name)

    def _answer(self, name: str) -> None:
        if not self.conns[name].poll(600):
            raise RuntimeError(f"The process of {name!r} did not answer within 600 s.")
        try:
            status, detail = self.conns[name].recv()
        except EOFError:
            message = f"The process of {name!r} exited without answering; its error is above."
            raise RuntimeError(message) from None
        if status == "error":
            raise RuntimeError(f"The process of a model failed: {detail}")

    def handle(self, name: str) -> None:
        with self.locks[name]:
            self.conns[name].send(True)
            self._answer(name)

    def read(self) -> tuple[int]:
        return (sum(self.use),)

    def warm_up(self, specs: list[Spec]) -> None:
        """Each process loaded its model before it said it was ready."""

    def close(self) -> None:
        for conn in self.conns.values():
            with contextlib.suppress(OSError):  # a process that failed has closed its end
                conn.send(False)
        for process in self.processes:
            process.join(60)
            if process.is_alive():
                process.terminate()


@dataclass
class Result:
    """One scenario's figures over every block."""

    scenario: Scenario
    sampler: Sampler
    latencies: list[float]
    wall: float = 0.0


def measure(
    specs: list[Spec], device: str, budget: int, stream: list[str], clients: int, block: int, interval: float
) -> list[Result]:
    """Set up the three ways, then let them serve ``stream`` in turns of ``block`` requests."""
    scenarios: list[Scenario] = []
    try:
        scenarios += [PoolScenario(specs, device, budget), ReloadScenario(specs, device)]
        scenarios.append(ProcessScenario(specs, device, interval))
        for scenario in scenarios:
            scenario.warm_up(specs)
        results = [Result(scenario, Sampler(scenario.read, budget, interval), []) for scenario in scenarios]
        for start in range(0, len(stream), block):
            for result in results:
                began = time.perf_counter()
                part = stream[start : start + block]
                with result.sampler:
                    result.latencies += run_stream(part, clients, result.scenario.handle)
                result.wall += time.perf_counter() - began
        return results
    finally:
        for scenario in scenarios:
            scenario.close()


# ---------------------------------------------------------------------------- the decision alone


def decision_cost(idle_models: int, repeat: int) -> list[float]:
    """Seconds of one eviction decision (``schedule()`` under the lock) with N idle models resident."""
    def tiny() -> nn.Module:
        return nn.Linear(64, 64)

    size = attach(tiny(), torch.device("cpu"), emulate_device=True).size_bytes
    pool = GPUPool(devices=["emulated:0"], budget_gb=(idle_models * size + size // 2) / GIB)
    try:
        for index in range(idle_models):
            pool.add(f"m{index}", tiny, idle_timeout=3600, release_timeout=0, offload_after_use=False)
            pool[f"m{index}"].preheat()
        pool.add("probe", tiny)
        books, took = pool._books, []
        with pool._cond:
            entry = pool._names["probe"]
            for _ in range(repeat):
                waiter = books.enqueue(entry, size, 0.0)
                start = time.perf_counter()
                books.schedule()
                took.append(time.perf_counter() - start)
                if waiter.grant is None or len(waiter.grant.victims) != 1:
                    raise RuntimeError("The decision benchmark expected one eviction per decision.")
                books.dequeue(waiter)
        return took
    finally:
        pool.close()


# ---------------------------------------------------------------------------- the report


def ms(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1e3:.1f} ms" if seconds else "-"


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def make_stream(names: list[str], requests: int, order: str, seed: int) -> list[str]:
    if order == "round-robin":
        return [names[i % len(names)] for i in range(requests)]
    rng = torch.Generator().manual_seed(seed)
    return [names[int(i)] for i in torch.randint(len(names), (requests,), generator=rng)]


def clients_text(clients: int) -> str:
    return f"{clients} client{'s' if clients > 1 else ''}"


def row(result: Result, base: float, budget: int, clients: int) -> str:
    median = statistics.median(result.latencies)
    decisions = result.scenario.decisions
    decision = "—"
    if decisions:
        median_us, max_us = statistics.median(decisions) * 1e6, max(decisions) * 1e6
        decision = f"{median_us:.0f} (max {max_us:.0f}, {len(decisions)} decisions)"
    sampler = result.sampler
    cells = [
        f"{result.scenario.label}, {clients_text(clients)}",
        str(len(result.latencies)),
        f"{median * 1e3:.1f}",
        f"{p99(result.latencies) * 1e3:.1f}",
        f"{median / base:.2f}×",
        f"{sampler.peaks[0] / budget:.2f}",
        decision,
        f"{sampler.over} of {sampler.samples}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=200, help="each model's weights in MB (default 200)")
    parser.add_argument("--requests", type=int, default=30, help="requests per scenario (default 30)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2],
                        help="concurrent clients, one round of the three scenarios each (default 1 2)")
    parser.add_argument("--block", type=int, default=6,
                        help="requests a scenario serves before the next one takes its turn (default 6)")
    parser.add_argument("--order", choices=["round-robin", "random"], default="round-robin",
                        help="request order: round-robin (every request needs a swap) or seeded random")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random order")
    parser.add_argument("--device", default=None,
                        help="emulated:0 or cuda:N (default: cuda:0 when CUDA is available, else emulated:0)")
    parser.add_argument("--sample-ms", type=float, default=2.0,
                        help="device-use sampling interval in ms (default 2)")
    parser.add_argument("--decision-models", type=int, nargs="*", default=[3, 30, 300],
                        help="idle models on the device for the decision-alone table (default 3 30 300)")
    args = parser.parse_args()
    if args.size_mb <= 0 or args.sample_ms <= 0 or min(args.requests, args.block, *args.clients) < 1:
        parser.error("--size-mb and --sample-ms must be above 0, --requests, --block and --clients 1 or more")
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "emulated:0")
    torch_device, emulated = resolve(device)
    card = "no GPU: the CPU stands in, real copies" if emulated else torch.cuda.get_device_name(torch_device)
    interval = args.sample_ms / 1e3

    with tempfile.TemporaryDirectory() as folder:
        specs = write_models(folder, args.size_mb)
        largest = max(spec.nbytes for spec in specs)
        budget = int(largest * 1.25) + WORKING
        if budget >= 2 * (min(spec.nbytes for spec in specs) + WORKING):
            parser.error("at this --size-mb the models differ too much in size for a budget that holds "
                         "one and not two; use a larger --size-mb")
        stream = make_stream([spec.name for spec in specs], args.requests, args.order, args.seed)
        load_before = os.getloadavg()[0]
        rounds = []
        for clients in args.clients:
            rounds.append((clients, measure(specs, device, budget, stream, clients, args.block, interval)))
            gc.collect()
    decisions = {n: decision_cost(n, 2000) for n in args.decision_models}

    print(f"# gpu_control pool benchmark — 3 models taking turns on {device} ({card})")
    print()
    print(f"    python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print()
    described = ", ".join(f"{s.name} {s.nbytes / MB:.1f} MB ({s.layers} blocks)" for s in specs)
    print(f"Models (fp32, random weights): {described}; each request is one forward pass of "
          f"(1, {TOKENS}, {WIDTH}). Device budget {budget / MB:.1f} MB: one model + {WORKING / MB:.1f} MB "
          f"working memory + 25 %, not two. {args.requests} requests, {args.order} order, in turns of "
          f"{args.block}; torch "
          f"{torch.__version__}, {os.cpu_count()} CPUs, load average {load_before:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end.")
    print()
    print("| scenario | requests | median ms | p99 ms | ratio vs pool (median) | peak device / budget "
          "| decision µs (pool only) | over-budget samples |")
    print("|---|---|---|---|---|---|---|---|")
    for clients, results in rounds:
        base = statistics.median(results[0].latencies)
        for result in results:
            print(row(result, base, budget, clients))
    print()
    for clients, results in rounds:
        for note in results[0].scenario.notes(budget, results[0].sampler):
            print(f"- pool, {clients_text(clients)}: {note}.")
        walls = ", ".join(f"{result.scenario.label} {result.wall:.1f} s" for result in results)
        print(f"- {clients_text(clients)}, the whole stream took: {walls}.")
    if decisions:
        print()
        print("| idle models on the device | eviction decision, median | p99 | max |")
        print("|---|---|---|---|")
        for n, took in decisions.items():
            cells = [statistics.median(took), p99(took), max(took)]
            print(f"| {n} | " + " | ".join(f"{value * 1e6:.1f} µs" for value in cells) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
