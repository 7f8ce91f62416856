"""The app's lifecycle on the compute device: load → generate → offload → restore → release.

Runs the built-in pipeline through the manager as the app does and prints the status after
each step (where the model is, device memory, what the last move cost), as a table.

    python bench/lifecycle.py [--device cuda] [--size 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu_control import GPUResourceManager  # noqa: E402
from pipelines import GenerateOptions, default_pipeline, run_pipeline  # noqa: E402


def _row(step: str, status: dict, seconds: float) -> str:
    last = status["last_transition"] or {}

    def gb(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    def mb(value: float | None) -> str:
        return "n/a" if value is None else f"{value * 1024:.3f}"

    return (
        f"| {step} | {status['model_location']} | {seconds:.3f} | {last.get('kind', '-')} "
        f"({last.get('reason', '-')}) | {last.get('seconds', 0.0):.4f} | {last.get('bytes_copied', 0):,} | "
        f"{gb(status['gpu_memory_allocated_gb'])} | {gb(status['gpu_memory_reserved_gb'])} | "
        f"{mb(status['model_size_gb'])} | {status['leak'] or '-'} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--size", type=int, default=512, help="video long side, px")
    args = parser.parse_args()

    pipeline = default_pipeline()
    manager = GPUResourceManager(device=args.device, load_func=pipeline.load, name=pipeline.name)
    image, audio = ROOT / "examples" / "portrait.jpg", ROOT / "examples" / "speech.wav"
    out = Path(tempfile.mkdtemp(prefix="lifecycle-"))
    name = torch.cuda.get_device_name() if manager.device.type == "cuda" else "CPU"
    print(f"# lifecycle on {manager.device} ({name}), torch {torch.__version__}, {args.size} px")
    print()
    print("| step | location | step s | last move (reason) | move s | bytes copied | allocated GB "
          "| reserved GB | model MB | leak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(_row("start (nothing loaded)", manager.get_status(), 0.0))

    def generate(step: str, index: int) -> None:
        options = GenerateOptions(size=args.size, output_path=str(out / f"{index}.mp4"))
        start = time.perf_counter()
        video = run_pipeline(manager, pipeline, image, audio, options)
        seconds = time.perf_counter() - start
        print(_row(f"{step}: {video.duration_s:.1f} s video, RTF {video.timings['generate'] / video.duration_s:.3f}",
                   manager.get_status(), seconds))

    generate("job 1 (load, generate, offload)", 1)
    generate("job 2 (restore, generate, offload)", 2)
    start = time.perf_counter()
    manager.preheat()
    print(_row("preheat (restore)", manager.get_status(), time.perf_counter() - start))
    start = time.perf_counter()
    manager.force_offload()
    print(_row("force_offload", manager.get_status(), time.perf_counter() - start))
    start = time.perf_counter()
    manager.force_release()
    print(_row("force_release", manager.get_status(), time.perf_counter() - start))
    manager.stop_monitor()


if __name__ == "__main__":
    main()
