"""Benchmark the built-in talking-portrait pipeline and print a table.

    python bench/pipeline.py                 # RTF at 256 and 512 px, RSS for 10 s vs 120 s
    python bench/pipeline.py --repeats 5 --sizes 256,512,1024

Real-time factor (RTF) = generation time / audio duration, through `run_pipeline` and a
`GPUResourceManager` as the app runs it (model already loaded: one warm-up run first); the
median and the best of ``--repeats`` runs (the CPUs may be shared, so the best shows what
the code does undisturbed). Peak memory is the highest RSS sampled every 10 ms during one
generation, in a fresh process per audio length so one run cannot hide another. The audio is the example
speech clip (with its pauses) repeated to the length wanted; the portrait is the example one.
The GPU column is filled when CUDA is available.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import soundfile
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_control import GPUResourceManager
from pipelines import GenerateOptions, default_pipeline, media, run_pipeline

IMAGE = ROOT / "examples" / "portrait.jpg"
SPEECH = ROOT / "examples" / "speech.wav"
RTF_TARGET = 0.5
RSS_TARGET_MB = 100


def speech_of(seconds: float, folder: Path) -> Path:
    """The example speech repeated to ``seconds``, as a WAV in ``folder``."""
    clip, rate = soundfile.read(SPEECH, dtype="float32")
    repeats = int(np.ceil(seconds * rate / len(clip)))
    path = folder / f"speech_{seconds:g}s.wav"
    soundfile.write(path, np.tile(clip, repeats)[: int(seconds * rate)], rate)
    return path


def rtf(device: str, size: int, audio: Path, repeats: int, fps: int) -> tuple[float, float, dict[str, float]]:
    """Median and best real-time factor, and the median phase timings, of ``repeats`` runs after a warm-up."""
    manager = GPUResourceManager(offload_after_use=False, device=device)
    pipeline = default_pipeline()
    duration = media.read_audio(audio).duration
    factors, phases = [], []
    with tempfile.TemporaryDirectory() as folder:
        for run in range(repeats + 1):
            options = GenerateOptions(size=size, fps=fps, output_path=str(Path(folder) / f"{run}.mp4"))
            started = time.perf_counter()
            video = run_pipeline(manager, pipeline, IMAGE, audio, options)
            if run:
                factors.append((time.perf_counter() - started) / duration)
                phases.append(video.timings)
    manager.force_release()
    manager.stop_monitor()
    median = {
        key: statistics.median(p[key] for p in phases) / duration for key in ("analyse", "render", "encode")
    }
    return statistics.median(factors), min(factors), median


def peak_rss_child(seconds: float, size: int) -> None:
    """Generate once in this fresh process; print the RSS before and the peak during it (MB) as JSON."""
    process = psutil.Process()
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            done.wait(0.01)

    with tempfile.TemporaryDirectory() as folder:
        audio = speech_of(seconds, Path(folder))
        manager = GPUResourceManager(device="cpu")
        before = process.memory_info().rss
        sampler = threading.Thread(target=sample)
        sampler.start()
        run_pipeline(
            manager,
            default_pipeline(),
            IMAGE,
            audio,
            GenerateOptions(size=size, output_path=str(Path(folder) / "v.mp4")),
        )
        done.set()
        sampler.join()
    print(json.dumps({"seconds": seconds, "before_mb": before / 2**20, "peak_mb": peak / 2**20}))


def peak_rss(seconds: float, size: int) -> dict[str, float]:
    """Run `peak_rss_child` in a new interpreter."""
    result = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(seconds), "--rss-size", str(size)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,512", help="output sizes (long side, px)")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length for the RTF runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-seconds", default="10,120", help="two audio lengths to compare peak RSS")
    parser.add_argument("--rss-size", type=int, default=512)
    parser.add_argument("--rss-child", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child is not None:
        peak_rss_child(args.rss_child, args.rss_size)
        return

    cuda = torch.cuda.is_available()
    print(
        f"# pipelines bench: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
        + (f", GPU {torch.cuda.get_device_name(0)}" if cuda else ", no CUDA")
    )
    print(
        f"# audio: example speech repeated to {args.seconds:g} s; median of {args.repeats} runs after a warm-up\n"
    )
    print(
        "| size (px) | fps | CPU RTF median | CPU RTF best | CPU analyse / render / encode | GPU RTF | target: CPU <= 0.5 at 512 px |"
    )
    print("|---:|---:|---:|---:|---|---:|---|")
    with tempfile.TemporaryDirectory() as folder:
        audio = speech_of(args.seconds, Path(folder))
        for size in (int(s) for s in args.sizes.split(",")):
            cpu_rtf, cpu_best, phases = rtf("cpu", size, audio, args.repeats, args.fps)
            gpu_rtf = f"{rtf('cuda', size, audio, args.repeats, args.fps)[0]:.3f}" if cuda else "n/a"
            verdict = ("met" if cpu_rtf <= RTF_TARGET else "MISSED") if size == 512 else ""
            split = " / ".join(f"{phases[key]:.3f}" for key in ("analyse", "render", "encode"))
            print(
                f"| {size} | {args.fps} | {cpu_rtf:.3f} | {cpu_best:.3f} | {split} | {gpu_rtf} | {verdict} |"
            )

    short, long = (float(s) for s in args.rss_seconds.split(","))
    rows = [peak_rss(seconds, args.rss_size) for seconds in (short, long)]
    growth = rows[1]["peak_mb"] - rows[0]["peak_mb"]
    print(
        f"\n| audio (s) | RSS before generating (MB) | peak RSS while generating at {args.rss_size} px (MB) |"
    )
    print("|---:|---:|---:|")
    for row in rows:
        print(f"| {row['seconds']:g} | {row['before_mb']:.0f} | {row['peak_mb']:.0f} |")
    verdict = "met" if growth <= RSS_TARGET_MB else "MISSED"
    print(f"\n{long:g} s vs {short:g} s: {growth:+.0f} MB (target <= +{RSS_TARGET_MB} MB: {verdict})")


if __name__ == "__main__":
    main()
