"""Benchmark: the first load of a large checkpoint, the recommended path vs torch.load.

    python bench/first_load.py                 # 1.5 GB checkpoint, page cache warm
    python bench/first_load.py --cold          # drop the page cache before every load (root)
    python bench/first_load.py --size 4 --dir /mnt/nvme

Writes one synthetic mixed-dtype model (the same layers as bench/transfer.py) as
``model.safetensors`` and as ``model.pt`` (``torch.save`` of the same state dict) into a
temporary directory, then loads it several ways into a model and prints a Markdown table:
the load, the engine's ``attach()`` that follows every load (it builds the host master copy:
a copy of everything, unless the load already put the tensors in engine buffers), and the
sum of both — the time until the weights are in host memory, ready for the first restore —
with MB/s and the share of the raw read speed of the file measured in the same run. (A lazy
load such as safetensors' memory-mapped ``load_file`` looks instant; its reading happens
during ``attach()``.) Each row is the median of ``--repeat`` runs (MB = 10^6 bytes).

``--cold`` writes 1 to /proc/sys/vm/drop_caches before each run (needs root; it empties the
whole machine's page cache, which other processes then refill from disk).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transfer import make_model

from gpu_control import attach, load_safetensors
from gpu_control.weights import new_host_buffer

MB = 1e6
CHUNK = 64 * 2**20


def drop_caches() -> bool:
    """Empty the page cache; False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("1")
    except OSError:
        return False
    return True


def raw_read(path: Path, workers: int, engine_memory: bool) -> None:
    """Read the whole file into memory with parallel preadv calls (the ceiling)."""
    size = path.stat().st_size
    buffer = new_host_buffer(size) if engine_memory else torch.empty(size, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    fd = os.open(path, os.O_RDONLY)

    def read(at: int) -> None:
        part = view[at : at + CHUNK]
        done = 0
        while done < len(part):
            done += os.preadv(fd, [part[done:]], at + done)

    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(read, range(0, size, CHUNK)))
    finally:
        os.close(fd)


def build(size: float, device: str) -> nn.Module:
    with torch.device(device):
        return make_model(size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, default=1.5, help="checkpoint size, GB")
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every run (root)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        st_path, pt_path = Path(folder, "model.safetensors"), Path(folder, "model.pt")
        model = build(args.size, "cpu")
        state = model.state_dict()
        save_file(state, str(st_path))
        torch.save(state, pt_path)
        nbytes = sum(t.nbytes for t in state.values())
        del model, state
        gc.collect()
        cold = args.cold and drop_caches()

        def run(load: Callable[[], nn.Module | None]) -> tuple[float, float]:
            """Median (load seconds, attach seconds) over the repeats."""
            loads, attaches = [], []
            for _ in range(args.repeat):
                if cold:
                    drop_caches()
                start = time.perf_counter()
                model = load()
                loads.append(time.perf_counter() - start)
                if model is not None:
                    start = time.perf_counter()
                    weights = attach(model, torch.device("cpu"), emulate_device=True)
                    attaches.append(time.perf_counter() - start)
                    weights.release()
                    del weights
                del model
                gc.collect()
            return statistics.median(loads), (statistics.median(attaches) if attaches else 0.0)

        def ours() -> nn.Module:
            model = build(args.size, "meta")
            load_safetensors(model, st_path, workers=args.workers)
            return model

        def safetensors_assign() -> nn.Module:
            model = build(args.size, "meta")
            model.load_state_dict(load_file(str(st_path)), assign=True)
            return model

        def torch_load_assign() -> nn.Module:
            model = build(args.size, "meta")
            model.load_state_dict(torch.load(pt_path, weights_only=True), assign=True)
            return model

        def torch_load_copy() -> nn.Module:
            model = build(args.size, "meta").to_empty(device="cpu")
            model.load_state_dict(torch.load(pt_path, weights_only=True))
            return model

        raw_read(st_path, args.workers, engine_memory=True)  # untimed warm-up: memory pools, huge pages
        raw_read(pt_path, args.workers, engine_memory=True)
        rows: list[tuple[str, float, float]] = []
        raw, _ = run(lambda: raw_read(st_path, args.workers, engine_memory=True))
        rows.append(
            (f"raw read of the .safetensors file into an engine buffer ({args.workers} threads)", raw, 0.0)
        )
        rows.append(
            (
                "same, into torch.empty memory",
                run(lambda: raw_read(st_path, args.workers, engine_memory=False))[0],
                0.0,
            )
        )
        rows.append(
            (
                "raw read of the .pt file into an engine buffer",
                run(lambda: raw_read(pt_path, args.workers, True))[0],
                0.0,
            )
        )
        rows.append(("**ours**: meta model + load_safetensors", *run(ours)))
        rows.append(
            (
                "safetensors.torch.load_file (lazy mmap) + load_state_dict(assign=True)",
                *run(safetensors_assign),
            )
        )
        rows.append(("torch.load + load_state_dict(assign=True) into a meta model", *run(torch_load_assign)))
        rows.append(("torch.load + load_state_dict (copy into an allocated model)", *run(torch_load_copy)))

    cache = "cold (page cache dropped before each run)" if cold else "warm (file in the page cache)"
    if args.cold and not cold:
        cache += "; --cold asked, but dropping the page cache was not allowed"
    print(
        f"# bench/first_load.py — {nbytes / 1e9:.2f} GB checkpoint, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, {args.repeat} runs (median), {cache}, {time.strftime('%Y-%m-%d %H:%M %Z')}\n"
    )
    print("| load path | load | then attach() | ready in host memory | MB/s | vs raw read |")
    print("|---|---|---|---|---|---|")
    for name, seconds, attach_s in rows:
        total = seconds + attach_s
        then = f"{attach_s:.3f} s" if attach_s else ""
        print(
            f"| {name} | {seconds:.3f} s | {then} | {total:.3f} s | {nbytes / total / MB:,.0f} | {raw / total:.0%} |"
        )


if __name__ == "__main__":
    main()
