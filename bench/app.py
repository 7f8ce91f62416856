"""Benchmark the app: start-up time, and /gpu/status latency while a video is generated.

    python bench/app.py [--runs 3] [--pollers 20] [--interval 0.1] [--jobs 3] [--size 512]

1. Start-up: seconds from launching ``python app.py`` to the first 200 from ``/gpu/status``
   (median of ``--runs``; nothing is loaded at start-up, so this is imports + wiring).
2. Latency: ``--pollers`` concurrent clients poll ``/gpu/status``, each every ``--interval``
   seconds (the UI's timer polls every 1.5 s), first with the app idle, then while ``--jobs``
   generations of the first example run one after another (through the Gradio API, as the
   browser does). A sample counts as "during generation" when the status it returned says a
   job holds the model (``in_use`` > 0). The same is repeated with the pollers back to back,
   which saturates the machine and shows queueing rather than the cost of a status read.

Only loopback addresses are used. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(port: int, output_dir: str) -> tuple[subprocess.Popen[bytes], float]:
    """Launch ``python app.py``; return the process and the seconds until /gpu/status answered 200."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_", "GRADIO_SERVER"))}
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), "--output-dir", output_dir],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/gpu/status"
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"python app.py exited with status {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return process, time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.02)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(20)


async def _poll(url: str, pollers: int, stop: threading.Event, interval: float) -> list[tuple[float, int]]:
    """Poll from ``pollers`` tasks, each every ``interval`` s (0: back to back), until ``stop``.

    Returns:
        (seconds, in_use) per request.
    """
    samples: list[tuple[float, int]] = []
    limits = httpx.Limits(max_connections=pollers, max_keepalive_connections=pollers)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:

        async def poller(offset: float) -> None:
            await asyncio.sleep(offset)
            while not stop.is_set():
                begin = time.perf_counter()
                response = await client.get(url)
                elapsed = time.perf_counter() - begin
                response.raise_for_status()
                samples.append((elapsed, int(response.json()["in_use"])))
                await asyncio.sleep(max(0.0, interval - elapsed))

        await asyncio.gather(*(poller(interval * i / pollers) for i in range(pollers)))
    return samples


def _measure(
    base: str, args: argparse.Namespace, interval: float, job: Any
) -> tuple[list[float], list[float]]:
    """Latencies with the app idle, then while ``job`` runs (samples whose status shows a job)."""
    url = f"{base}/gpu/status"
    stop = threading.Event()
    timer = threading.Timer(args.idle_seconds, stop.set)
    timer.start()
    idle = [s for s, _ in asyncio.run(_poll(url, args.pollers, stop, interval))]
    stop = threading.Event()

    def run() -> None:
        try:
            job()
        finally:
            stop.set()

    worker = threading.Thread(target=run)
    worker.start()
    samples = asyncio.run(_poll(url, args.pollers, stop, interval))
    worker.join()
    return idle, [s for s, in_use in samples if in_use > 0]


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def _latency_row(label: str, values: list[float]) -> str:
    if not values:
        return f"| {label} | no samples | |"
    ms = [v * 1000 for v in values]
    return f"| {label} | {statistics.median(ms):.1f} ms | {_percentile(ms, 0.99):.1f} ms | {max(ms):.1f} ms | {len(ms)} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="start-ups to time (median reported)")
    parser.add_argument("--pollers", type=int, default=20, help="concurrent /gpu/status pollers")
    parser.add_argument("--jobs", type=int, default=3, help="generations to run while polling")
    parser.add_argument("--size", type=int, default=512, help="video size (long side, px)")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="how long to poll the idle app")
    parser.add_argument(
        "--interval",
        type=float,
        default=0.1,
        help="seconds between one poller's requests (the UI polls every 1.5 s)",
    )
    args = parser.parse_args()

    from gradio_client import Client, handle_file

    from ui.blocks import example_rows

    rows = example_rows()
    if not rows:
        print("examples/ holds no portrait + speech pair", file=sys.stderr)
        return 1
    image, audio = rows[0]

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-app-") as output_dir:
        startups = []
        for _ in range(args.runs):
            process, seconds = _start(_free_port(), output_dir)
            startups.append(seconds)
            _stop(process)

        port = _free_port()
        process, _ = _start(port, output_dir)
        base = f"http://127.0.0.1:{port}"
        try:
            client = Client(base, verbose=False)
            job_seconds: list[float] = []

            def generate() -> None:
                for _ in range(args.jobs):
                    begin = time.perf_counter()
                    client.predict(
                        image=handle_file(image),
                        audio=handle_file(audio),
                        size=args.size,
                        api_name="/generate_video",
                    )
                    job_seconds.append(time.perf_counter() - begin)

            paced = _measure(base, args, args.interval, generate)
            paced_jobs, job_seconds = job_seconds, []
            stress = _measure(base, args, 0.0, generate)
            stress_jobs = job_seconds

            job_seconds = []
            generate()
            alone = statistics.median(job_seconds)
        finally:
            _stop(process)

    cpu = f"{os.cpu_count()} CPU cores" + (f", {platform.processor()}" if platform.processor() else "")
    print(f"App benchmark on {platform.node() or 'this machine'} ({cpu}, Python {platform.python_version()})")
    print(
        f"1-minute load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
        "(above the core count, other processes compete and every figure grows)"
    )
    print()
    print("| start-up | median | min | max | runs | target |")
    print("|---|---|---|---|---|---|")
    print(
        f"| `python app.py` → first 200 from /gpu/status | {statistics.median(startups):.2f} s | "
        f"{min(startups):.2f} s | {max(startups):.2f} s | {len(startups)} | ≤ 5 s |"
    )
    print()
    print(f"| /gpu/status latency, {args.pollers} concurrent pollers | median | p99 | max | samples |")
    print("|---|---|---|---|---|")
    every = f"each every {args.interval:g} s"
    print(_latency_row(f"app idle, {every}", paced[0]))
    print(_latency_row(f"**during generation**, {every} (target p99 ≤ 50 ms)", paced[1]))
    print(_latency_row("app idle, back to back (saturating)", stress[0]))
    print(_latency_row("during generation, back to back (saturating)", stress[1]))
    print()
    print(f"| generation of the first example, {args.size} px (Gradio API, end to end) | seconds |")
    print("|---|---|")
    print(f"| alone (median of {args.jobs}) | {alone:.2f} s |")
    print(
        f"| with {args.pollers} pollers {every} (median of {len(paced_jobs)}) | {statistics.median(paced_jobs):.2f} s |"
    )
    print(
        f"| with {args.pollers} pollers back to back (median of {len(stress_jobs)}) | {statistics.median(stress_jobs):.2f} s |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
