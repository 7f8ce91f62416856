"""Benchmark the lifecycle manager's own overhead and the idle watcher's punctuality.

Prints a table: hot ``get_model``, ``use()`` enter+exit, ``get_status()`` (median µs), and
how late the real-clock idle offload fires after its deadline (median and max over N runs).

    python bench/manager.py [--runs 10] [--timeout 1.0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_control import GPUResourceManager  # noqa: E402


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))


def _median_us(fn, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def overhead(repeat: int) -> dict[str, float]:
    """Median microseconds of the manager's hot calls on a resident model."""
    manager = GPUResourceManager(idle_timeout=3600, offload_after_use=False, auto_monitor=False)
    manager.get_model(_model)

    def use_once() -> None:
        with manager.use():
            pass

    return {
        "get_model (resident)": _median_us(manager.get_model, repeat),
        "use() enter+exit (resident)": _median_us(use_once, repeat),
        "get_status()": _median_us(manager.get_status, repeat),
    }


def idle_lateness(runs: int, timeout: float) -> list[float]:
    """Seconds between each idle deadline and the moment the model was in the host cache."""
    late = []
    for _ in range(runs):
        manager = GPUResourceManager(idle_timeout=timeout, offload_after_use=False)
        manager.get_model(_model)
        deadline = time.monotonic() + timeout
        while manager.get_status()["model_location"] != "cpu":
            time.sleep(0.001)
            if time.monotonic() > deadline + 30:
                raise RuntimeError("the idle offload did not fire within 30 s of its deadline")
        late.append(time.monotonic() - deadline)
        manager.stop_monitor()
    return late


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="idle-offload runs (default 10)")
    parser.add_argument("--timeout", type=float, default=1.0, help="idle timeout in seconds (default 1)")
    parser.add_argument("--repeat", type=int, default=20000, help="calls per overhead figure")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# gpu_control manager benchmark — device {device}, torch {torch.__version__}")
    print()
    print("| measure | ours | target | seed original |")
    print("|---|---|---|---|")
    figures = overhead(args.repeat)
    targets = {"get_model (resident)": "≤ 20 µs", "use() enter+exit (resident)": "—", "get_status()": "≤ 200 µs"}
    for name, value in figures.items():
        print(f"| {name}, median | {value:.1f} µs | {targets[name]} | — |")
    late = idle_lateness(args.runs, args.timeout)
    print(
        f"| idle offload after its deadline ({args.timeout:g} s timeout, {args.runs} runs), median | "
        f"{statistics.median(late) * 1000:.1f} ms | ≤ 500 ms | up to 30 s |"
    )
    print(f"| idle offload after its deadline, max | {max(late) * 1000:.1f} ms | ≤ 500 ms | up to 30 s |")


if __name__ == "__main__":
    main()
