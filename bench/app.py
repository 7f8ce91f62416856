"""Benchmark the app: start-up time, and /gpu/status latency during generation and control load.

    python bench/app.py [--runs 3] [--pollers 20] [--interval 0.1] [--jobs 3] [--size 512]
                        [--control-calls 200] [--control-senders 4] [--control-interval 0.1]
                        [--load-jobs 5] [--load-only]

1. Start-up: seconds from launching ``python app.py`` to the first 200 from ``/gpu/status``
   (median of ``--runs``; nothing is loaded at start-up, so this is imports + wiring).
2. Latency: ``--pollers`` concurrent clients poll ``/gpu/status``, each every ``--interval``
   seconds (the UI's timer polls every 1.5 s), first with the app idle, then while ``--jobs``
   generations of the first example run one after another (through the Gradio API, as the
   browser does). A sample counts as "during generation" when the status it returned says a
   job holds the model (``in_use`` > 0). The same is repeated with the pollers back to back,
   which saturates the machine and shows queueing rather than the cost of a status read.
3. Control load: the app runs with a control token (``GPU_CONTROL_TOKEN``, so ``app.py`` builds
   it with ``create_app(..., access=ControlAccess(token))``). The same pollers first run alone
   for ``--idle-seconds`` (the baseline), then while, all at once, ``--control-calls`` REST
   controls (offload, release, preheat, timeout in turn, each with ``Authorization: Bearer``)
   are sent from ``--control-senders`` connections, each every ``--control-interval`` seconds,
   and ``--load-jobs`` generations are submitted together through the Gradio API. The load
   comes from a separate process, so the pollers' own process stays idle; it stops after
   ``--load-timeout`` seconds whatever is left. ``--load-only`` runs just this scenario.

Only loopback addresses are used. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import queue
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONTROL_ACTIONS = ("offload", "release", "preheat", "timeout")
TARGET_P99_MS = 50.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(port: int, output_dir: str, token: str) -> tuple[subprocess.Popen[bytes], float]:
    """Launch ``python app.py`` locked by ``token``; return it and the seconds to a 200 from /gpu/status."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_", "GRADIO_SERVER"))}
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    env["GPU_CONTROL_TOKEN"] = token
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


async def _poll(
    url: str, pollers: int, stop: threading.Event, interval: float
) -> list[tuple[float, int, float]]:
    """Poll from ``pollers`` tasks, each every ``interval`` s (0: back to back), until ``stop``.

    Returns:
        (seconds, in_use, perf_counter() when sent) per request.
    """
    samples: list[tuple[float, int, float]] = []
    limits = httpx.Limits(max_connections=pollers, max_keepalive_connections=pollers)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:

        async def poller(offset: float) -> None:
            await asyncio.sleep(offset)
            while not stop.is_set():
                begin = time.perf_counter()
                response = await client.get(url)
                elapsed = time.perf_counter() - begin
                response.raise_for_status()
                samples.append((elapsed, int(response.json()["in_use"]), begin))
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
    idle = [s for s, _, _ in asyncio.run(_poll(url, args.pollers, stop, interval))]
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
    return idle, [s for s, in_use, _ in samples if in_use > 0]


def _poll_while(
    url: str, pollers: int, interval: float, stop: threading.Event
) -> tuple[threading.Thread, list[tuple[float, int, float]]]:
    """Start polling in a thread of its own until ``stop``; the list fills as `_poll`'s does."""
    samples: list[tuple[float, int, float]] = []
    thread = threading.Thread(
        target=lambda: samples.extend(asyncio.run(_poll(url, pollers, stop, interval))), name="pollers"
    )
    thread.start()
    return thread, samples


def _control_calls(
    base: str, token: str, count: int, senders: int, interval: float, deadline: float
) -> list[tuple[str, int, float]]:
    """Send ``count`` state-changing REST calls with the bearer token from ``senders`` connections.

    Each sender sends one call every ``interval`` seconds (0: back to back).

    Returns:
        (action, HTTP status, seconds) per call sent before ``deadline``.
    """
    numbers = iter(range(count))
    lock = threading.Lock()
    calls: list[tuple[str, int, float]] = []

    def sender() -> None:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            while time.monotonic() < deadline:
                with lock:
                    number = next(numbers, None)
                if number is None:
                    return
                action = CONTROL_ACTIONS[number % len(CONTROL_ACTIONS)]
                idle = 60 + 60 * (number // len(CONTROL_ACTIONS) % 2)
                body = {"timeout": idle} if action == "timeout" else None
                begin = time.perf_counter()
                response = client.post(f"/gpu/{action}", json=body)
                elapsed = time.perf_counter() - begin
                calls.append((action, response.status_code, elapsed))
                time.sleep(max(0.0, interval - elapsed))

    with ThreadPoolExecutor(senders) as pool:
        for future in [pool.submit(sender) for _ in range(senders)]:
            future.result()
    return calls


def _drive_load(
    base: str, token: str, files: tuple[str, str], options: dict[str, Any], ready: Any, go: Any, out: Any
) -> None:
    """In a child process: control calls and generations at once, when ``go`` is set; results to ``out``."""
    from gradio_client import Client, handle_file

    clients = [Client(base, verbose=False) for _ in range(options["jobs"])]
    ready.set()
    go.wait()
    started = time.monotonic()
    deadline = started + options["timeout"]

    def generate(client: Any) -> float | None:
        begin = time.perf_counter()
        job = client.submit(
            image=handle_file(files[0]),
            audio=handle_file(files[1]),
            size=options["size"],
            api_name="/generate_video",
        )
        try:
            job.result(timeout=max(1.0, deadline - time.monotonic()))
        except Exception as error:  # noqa: BLE001 (a failed or late job is counted, not fatal)
            print(f"a generation failed: {type(error).__name__}: {error}", file=sys.stderr)
            return None
        return time.perf_counter() - begin

    def control() -> tuple[list[tuple[str, int, float]], float]:
        calls = _control_calls(
            base, token, options["calls"], options["senders"], options["interval"], deadline
        )
        return calls, time.monotonic() - started

    with ThreadPoolExecutor(len(clients) + 1) as pool:
        controls = pool.submit(control)
        jobs = [pool.submit(generate, client) for client in clients]
        job_seconds = [job.result() for job in jobs]
        calls, calls_seconds = controls.result()
        out.put(
            {
                "controls": calls,
                "controls_seconds": calls_seconds,
                "jobs": job_seconds,
                "seconds": time.monotonic() - started,
            }
        )


def _measure_load(
    base: str, token: str, files: tuple[str, str], args: argparse.Namespace
) -> tuple[list[float], list[float], dict[str, Any]]:
    """Status latencies with the pollers alone, then under the control and generation load."""
    url = f"{base}/gpu/status"
    stop = threading.Event()
    threading.Timer(args.idle_seconds, stop.set).start()
    baseline = [s for s, _, _ in asyncio.run(_poll(url, args.pollers, stop, args.interval))]

    context = multiprocessing.get_context("spawn")
    ready, go, out = context.Event(), context.Event(), context.Queue()
    options = {
        "jobs": args.load_jobs,
        "size": args.size,
        "calls": args.control_calls,
        "senders": args.control_senders,
        "interval": args.control_interval,
        "timeout": args.load_timeout,
    }
    load_args = (base, token, files, options, ready, go, out)
    child = context.Process(target=_drive_load, args=load_args, name="load")
    child.start()
    try:
        if not ready.wait(120):
            raise RuntimeError("the load process did not get ready in 120 s")
        stop = threading.Event()
        pollers, samples = _poll_while(url, args.pollers, args.interval, stop)
        began = time.perf_counter()
        go.set()
        try:
            result = _receive(out, child, args.load_timeout + 60)
        finally:
            stop.set()
            pollers.join()
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join()
    controls_end = began + result["controls_seconds"]
    result["during_controls"] = [s for s, _, sent in samples if began <= sent <= controls_end]
    result["jobs_only"] = [s for s, _, sent in samples if sent > controls_end]
    return baseline, [s for s, _, sent in samples if sent >= began], result


def _receive(out: Any, child: Any, timeout: float) -> dict[str, Any]:
    """The load process's results; raises if it dies or takes longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return out.get(timeout=0.5)
        except queue.Empty:
            if not child.is_alive():
                raise RuntimeError(f"the load process exited with status {child.exitcode}") from None
    raise RuntimeError(f"the load did not finish in {timeout:g} s")


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def _latency_row(label: str, values: list[float]) -> str:
    if not values:
        return f"| {label} | no samples | |"
    ms = [v * 1000 for v in values]
    median, p99 = statistics.median(ms), _percentile(ms, 0.99)
    return f"| {label} | {median:.1f} ms | {p99:.1f} ms | {max(ms):.1f} ms | {len(ms)} |"


def _quantiles_ms(values: list[float]) -> list[float]:
    """p50, p95, p99 and max of ``values`` (seconds), in milliseconds."""
    ms = [v * 1000 for v in values]
    return [statistics.median(ms), _percentile(ms, 0.95), _percentile(ms, 0.99), max(ms)]


def _cells(ms: list[float]) -> str:
    """Milliseconds as Markdown table cells."""
    return " | ".join(f"{v:.1f} ms" for v in ms)


def _print_load(
    args: argparse.Namespace, baseline: list[float], loaded: list[float], result: dict[str, Any]
) -> None:
    """The control-load tables: status latency alone and under load, then what the load did."""
    if not baseline or not loaded:
        print("| control load | no samples |")
        return
    alone, under = _quantiles_ms(baseline), _quantiles_ms(loaded)
    calls, jobs = result["controls"], result["jobs"]
    every = f"each every {args.interval:g} s"
    print(f"| /gpu/status latency, {args.pollers} pollers {every} | p50 | p95 | p99 | max | samples |")
    print("|---|---|---|---|---|---|")
    print(f"| baseline: pollers alone | {_cells(alone)} | {len(baseline)} |")
    load = (
        f"{len(calls)} control calls ({args.control_senders} senders, each every {args.control_interval:g} s)"
        f" + {len(jobs)} jobs at once"
    )
    print(f"| **under load**: {load} | {_cells(under)} | {len(loaded)} |")
    ratios = " | ".join(f"{u / a:.1f}×" for u, a in zip(under, alone))
    print(f"| ratio, under load / baseline | {ratios} | |")
    for label, part in (
        ("of which while the control calls ran", result["during_controls"]),
        ("of which after them (jobs only)", result["jobs_only"]),
    ):
        if part:
            print(f"| {label} | {_cells(_quantiles_ms(part))} | {len(part)} |")
    verdict = "met" if under[2] <= TARGET_P99_MS else "**missed**"
    print(f"| target | | | ≤ {TARGET_P99_MS:g} ms ({verdict}) | | |")
    print()
    print("| the load | count | p50 | p99 | max | answers |")
    print("|---|---|---|---|---|---|")
    for action in CONTROL_ACTIONS:
        own = [(code, seconds) for name, code, seconds in calls if name == action]
        if not own:
            continue
        codes = [code for code, _ in own]
        answers = ", ".join(f"{code}: {codes.count(code)}" for code in sorted(set(codes)))
        p50, _, p99, most = _quantiles_ms([seconds for _, seconds in own])
        row = f"{len(own)} | {p50:.1f} ms | {p99:.1f} ms | {most:.1f} ms | {answers}"
        print(f"| POST /gpu/{action} | {row} |")
    done = [seconds for seconds in jobs if seconds is not None]
    if done:
        print(
            f"| generation, {args.size} px, submitted together (queued for the GPU slot) | {len(jobs)} | "
            f"{statistics.median(done):.2f} s | | {max(done):.2f} s | finished: {len(done)} of {len(jobs)} |"
        )
    else:
        print(f"| generation, {args.size} px, submitted together | {len(jobs)} | | | | finished: 0 |")
    print(f"| control calls, first to last answer | | | | {result['controls_seconds']:.1f} s | |")
    print(f"| whole load, first call to last answer | | | | {result['seconds']:.1f} s | |")


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
    parser.add_argument("--control-calls", type=int, default=200, help="REST control calls in the load")
    parser.add_argument("--control-senders", type=int, default=4, help="connections sending them")
    parser.add_argument(
        "--control-interval", type=float, default=0.1, help="seconds between one sender's calls (0: none)"
    )
    parser.add_argument("--load-jobs", type=int, default=5, help="generations submitted at once in the load")
    parser.add_argument("--load-timeout", type=float, default=300.0, help="seconds before the load stops")
    parser.add_argument("--load-only", action="store_true", help="run only the control-load scenario")
    args = parser.parse_args()

    from gradio_client import Client, handle_file

    from ui.blocks import example_rows

    rows = example_rows()
    if not rows:
        print("examples/ holds no portrait + speech pair", file=sys.stderr)
        return 1
    image, audio = rows[0]
    token = secrets.token_urlsafe(24)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-app-") as output_dir:
        startups = []
        for _ in range(0 if args.load_only else args.runs):
            process, seconds = _start(_free_port(), output_dir, token)
            startups.append(seconds)
            _stop(process)

        port = _free_port()
        process, _ = _start(port, output_dir, token)
        base = f"http://127.0.0.1:{port}"
        try:
            unlocked = httpx.post(f"{base}/gpu/offload", timeout=10).status_code
            if unlocked != 401:
                raise RuntimeError(f"POST /gpu/offload without the token answered {unlocked}, not 401")
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

            if not args.load_only:
                paced = _measure(base, args, args.interval, generate)
                paced_jobs, job_seconds = job_seconds, []
                stress = _measure(base, args, 0.0, generate)
                stress_jobs = job_seconds

                job_seconds = []
                generate()
                alone = statistics.median(job_seconds)
            load = _measure_load(base, token, (image, audio), args)
        finally:
            _stop(process)

    cpu = f"{os.cpu_count()} CPU cores" + (f", {platform.processor()}" if platform.processor() else "")
    print(f"App benchmark on {platform.node() or 'this machine'} ({cpu}, Python {platform.python_version()})")
    print(
        f"1-minute load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
        "(when it is above the core count, other processes compete and every figure grows)"
    )
    print()
    if not args.load_only:
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
            f"| with {args.pollers} pollers {every} (median of {len(paced_jobs)}) | "
            f"{statistics.median(paced_jobs):.2f} s |"
        )
        print(
            f"| with {args.pollers} pollers back to back (median of {len(stress_jobs)}) | "
            f"{statistics.median(stress_jobs):.2f} s |"
        )
        print()
    _print_load(args, *load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
