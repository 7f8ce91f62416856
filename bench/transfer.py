"""Benchmark: restore and offload of synthetic mixed-dtype models, engine vs naive .to().

    python bench/transfer.py                      # CUDA: 1, 4, 16 GB; CPU: 0.25, 1 GB
    python bench/transfer.py --sizes 2 8 --repeat 5

Prints one Markdown table per model size. Each row is timed ``--repeat`` times and the median
is shown (GB = 10^9 bytes). The ceilings are measured in the same run: a raw copy of one
pinned tensor as large as the model, each way. On a machine without CUDA the naive and pinned
rows are n/a and the engine runs in emulation mode (its "device" is a second CPU buffer), so
its copies are real; the ceiling there is a raw host-to-host tensor copy.

On CUDA a second table compares the two ways of page-locking the master copy: registering an
exact-size buffer with ``cudaHostRegister`` (what the engine does) and ``torch.empty(...,
pin_memory=True)`` (PyTorch's caching host allocator, which rounds up to a power of two).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_control.weights import _engine_memory, _pin, attach, new_host_buffer, pin_limit_bytes

HIDDEN = 2048
GB = 1e9


class Layer(nn.Module):
    """One transformer-like block: bf16 attention, fp16 MLP, fp32 norms and biases (~92 MB)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        h = HIDDEN

        def param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype).fill_(index % 7 + 0.5), requires_grad=False)

        self.qkv = param(3 * h, h, dtype=torch.bfloat16)
        self.qkv_bias = param(3 * h, dtype=torch.float32)
        self.out = param(h, h, dtype=torch.bfloat16)
        self.up = param(4 * h, h, dtype=torch.float16)
        self.down = param(h, 4 * h, dtype=torch.float16)
        self.up_bias = param(4 * h, dtype=torch.float32)
        self.norm1 = param(h, dtype=torch.float32)
        self.norm2 = param(h, dtype=torch.float32)


def layer_bytes() -> int:
    h = HIDDEN
    return (3 * h * h + h * h) * 2 + 8 * h * h * 2 + (3 * h + 4 * h + 2 * h) * 4


def make_model(size: float) -> nn.Module:
    return nn.Sequential(*(Layer(i) for i in range(max(1, round(size * GB / layer_bytes())))))


def model_bytes(model: nn.Module) -> int:
    return sum(p.nbytes for p in model.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], object], device: torch.device, repeat: int, before: Callable[[], object] = lambda: None
) -> float:
    """Median wall seconds of ``fn`` (synchronised), ``before`` run untimed ahead of each try."""
    times = []
    for _ in range(repeat):
        before()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Table:
    def __init__(self, title: str) -> None:
        self.title = title
        self.rows: list[tuple[str, ...]] = []

    def add(self, *cells: str) -> None:
        self.rows.append(cells)

    def print(self, header: tuple[str, ...]) -> None:
        print(f"\n### {self.title}\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")
        sys.stdout.flush()


def rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / GB:.2f}" if seconds > 0 and nbytes else "-"


def secs(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def ratio(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def ceilings(nbytes: int, device: torch.device, repeat: int) -> dict[str, float]:
    """Raw copies of one tensor as large as the model, measured now on this machine."""
    if device.type != "cuda":
        return host_ceilings(nbytes, device, repeat)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    result = pinned_ceilings(dev, repeat)
    torch._C._host_emptyCache()
    pageable = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    result["h2d_pageable"] = timed(lambda: dev.copy_(pageable), device, repeat)
    return result


def host_ceilings(nbytes: int, device: torch.device, repeat: int) -> dict[str, float]:
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8).fill_(0)
    fresh: list[torch.Tensor] = []

    def allocate_and_copy() -> None:
        fresh.append(torch.empty_like(src).copy_(src))

    return {
        "memcpy": timed(lambda: dst.copy_(src), device, repeat),
        "alloc_copy": timed(allocate_and_copy, device, repeat, before=fresh.clear),
        "free": timed(fresh.clear, device, repeat, before=allocate_and_copy),
    }


def pinned_ceilings(dev: torch.Tensor, repeat: int) -> dict[str, float]:
    pinned = torch.empty(dev.numel(), dtype=torch.uint8, pin_memory=True).fill_(1)
    return {
        "h2d": timed(lambda: dev.copy_(pinned, non_blocking=True), dev.device, repeat),
        "d2h": timed(lambda: pinned.copy_(dev, non_blocking=True), dev.device, repeat),
    }


def naive(size: float, device: torch.device, repeat: int) -> tuple[float | None, float | None]:
    """Seconds of model.to(device) from pageable memory and model.to('cpu') back."""
    if device.type != "cuda":
        return None, None
    model = make_model(size)
    up = timed(lambda: model.to(device), device, repeat, before=lambda: model.to("cpu"))
    down = timed(lambda: model.to("cpu"), device, repeat, before=lambda: model.to(device))
    return up, down


def ours(size: float, device: torch.device, repeat: int, bucket_bytes: int) -> dict[str, Any]:
    """Time the engine on a fresh model: attach, restore, offloads unchanged/10%/all changed."""
    model = make_model(size)
    params = list(model.parameters())
    start = time.perf_counter()
    weights = attach(model, device, emulate_device=device.type != "cuda", bucket_bytes=bucket_bytes)
    result: dict[str, Any] = {"attach": time.perf_counter() - start, "stats": weights.stats()}
    result["tensors"] = len(params)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    def change(fraction: float) -> Callable[[], None]:
        chosen = params[:: max(1, round(1 / fraction))]

        def run() -> None:
            weights.to_device()
            with torch.no_grad():
                for p in chosen:
                    p.mul_(1)  # an in-place op: bumps the version counter, keeps the values

        return run

    result["restore"] = timed(weights.to_device, device, repeat, before=weights.to_host)
    result["offload_same"] = timed(weights.to_host, device, repeat, before=weights.to_device)
    if device.type != "cuda":
        kept: list[torch.Tensor | None] = []

        def restore_and_keep() -> None:
            weights.to_device()
            kept[:] = [bucket.device for bucket in weights._buckets]  # their free is not timed

        result["offload_same_work"] = timed(weights.to_host, device, repeat, before=restore_and_keep)
        kept.clear()
    result["offload_some"] = timed(weights.to_host, device, repeat, before=change(0.1))
    change(0.1)()
    result["some_bytes"] = weights.to_host().bytes_copied
    result["offload_all"] = timed(weights.to_host, device, repeat, before=change(1.0))
    weights.to_device()
    weights.to_host()
    result["empty_cache"] = 0.0
    if device.type == "cuda":
        start = time.perf_counter()
        torch.cuda.empty_cache()
        result["empty_cache"] = time.perf_counter() - start
    result["held"] = (torch.cuda.memory_allocated(device) - base) if device.type == "cuda" else 0
    result["leaked"] = weights.leaked_bytes()
    weights.release()
    return result


def bench_size(size: float, device: torch.device, repeat: int, bucket_bytes: int) -> None:
    nbytes = max(1, round(size * GB / layer_bytes())) * layer_bytes()
    emulate = device.type != "cuda"
    ceiling = ceilings(nbytes, device, repeat)
    h2d, d2h = ceiling.get("h2d"), ceiling.get("d2h")
    naive_up, naive_down = naive(size, device, repeat)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    measured = ours(size, device, repeat, bucket_bytes)
    gc.collect()
    stats = measured["stats"]
    restore, offload_same = measured["restore"], measured["offload_same"]
    offload_some, offload_all, some_bytes = (
        measured["offload_some"],
        measured["offload_all"],
        measured["some_bytes"],
    )

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU: emulated device"
    pin = f"{stats['pinned_bytes'] / GB:.2f} GB pinned" if not emulate else "pageable (CPU)"
    table = Table(
        f"{nbytes / GB:.2f} GB model, {measured['tensors']} tensors (bf16/fp16/fp32) on {device} ({card}); "
        f"master in {stats['buckets']} buffers, {pin}"
    )
    if emulate:
        memcpy, fresh = ceiling["memcpy"], ceiling["alloc_copy"]
        table.add(
            "ceiling: raw tensor copy host→host, warm buffers (memcpy)",
            secs(memcpy),
            rate(nbytes, memcpy),
            "",
            "",
            "",
        )
        table.add(
            "ceiling: allocate a fresh buffer + copy (an emulated restore's floor)",
            secs(fresh),
            rate(nbytes, fresh),
            "100%",
            "",
            "",
        )
        table.add(
            "freeing that buffer (an emulated offload pays it; CUDA's allocator does not)",
            secs(ceiling["free"]),
            "",
            "",
            "",
            "",
        )
    else:
        assert h2d is not None and d2h is not None
        table.add("ceiling: pinned tensor copy host→device", secs(h2d), rate(nbytes, h2d), "100%", "", "")
        table.add("ceiling: pinned tensor copy device→host", secs(d2h), rate(nbytes, d2h), "100%", "", "")
        pageable = ceiling["h2d_pageable"]
        table.add(
            "pageable tensor copy host→device",
            secs(pageable),
            rate(nbytes, pageable),
            f"{h2d / pageable:.0%}",
            "",
            "",
        )
    na = "n/a (no GPU)"
    table.add(
        "naive restore: model.to(device)",
        secs(naive_up) if naive_up else na,
        rate(nbytes, naive_up) if naive_up else na,
        ratio(None if naive_up is None or h2d is None else h2d / naive_up, "{:.0%}"),
        "1.00×" if naive_up else "n/a",
        f"{nbytes:,}" if naive_up else "",
    )
    table.add(
        "naive offload: model.to('cpu')",
        secs(naive_down) if naive_down else na,
        rate(nbytes, naive_down) if naive_down else na,
        ratio(None if naive_down is None or d2h is None else d2h / naive_down, "{:.0%}"),
        "1.00×" if naive_down else "n/a",
        f"{nbytes:,}" if naive_down else "",
    )
    ceiling_up = h2d if h2d is not None else ceiling["alloc_copy"]
    ceiling_down = d2h if d2h is not None else ceiling["memcpy"]
    attach_s = measured["attach"]
    table.add(
        "ours: attach (master copy + pinning, once per load)",
        secs(attach_s),
        rate(nbytes, attach_s),
        "",
        "",
        f"{nbytes:,}",
    )
    table.add(
        "ours: restore",
        secs(restore),
        rate(stats["host_bytes"], restore),
        f"{ceiling_up / restore:.0%}",
        ratio(None if naive_up is None else naive_up / restore, "{:.2f}×"),
        f"{stats['host_bytes']:,}",
    )
    table.add(
        "ours: offload, unchanged",
        secs(offload_same),
        "-",
        "",
        ratio(None if naive_down is None else naive_down / offload_same, "{:.0f}×"),
        "0",
    )
    if "offload_same_work" in measured:
        table.add(
            "ours: offload, unchanged, without freeing the emulated device buffers",
            secs(measured["offload_same_work"]),
            "-",
            "",
            "",
            "0",
        )
    table.add(
        "ours: offload, 10% of tensors changed",
        secs(offload_some),
        rate(some_bytes, offload_some),
        "",
        ratio(None if naive_down is None else naive_down / offload_some, "{:.1f}×"),
        f"{some_bytes:,}",
    )
    table.add(
        "ours: offload, all changed",
        secs(offload_all),
        rate(stats["host_bytes"], offload_all),
        f"{ceiling_down / offload_all:.0%}",
        ratio(None if naive_down is None else naive_down / offload_all, "{:.2f}×"),
        f"{stats['host_bytes']:,}",
    )
    if device.type == "cuda":
        table.add(
            "torch.cuda.empty_cache() after offload (the manager does it)",
            secs(measured["empty_cache"]),
            "",
            "",
            "",
            "",
        )
        held, leaked = measured["held"], measured["leaked"]
        table.add(
            f"device memory held by the model after offload: {held:,} B; leaked: {leaked:,} B",
            "",
            "",
            "",
            "",
            "",
        )
    else:
        zero = attach(make_model(min(size, 0.1)), device)
        z = timed(zero.to_device, device, repeat)
        table.add("ours, default on CPU (zero-copy): restore", secs(z), "-", "", "", "0")
        table.add(f"leaked after offload: {measured['leaked']:,} B", "", "", "", "", "")
    table.print(("operation", "time", "GB/s", "vs ceiling", "vs naive", "bytes copied"))


def bench_overhead(device: torch.device, repeat: int) -> None:
    """Per-tensor Python work of a restore and an unchanged offload, at real models' tensor counts."""
    table = Table(f"engine work per move vs number of tensors (4 KiB each) on {device}")
    for count in (1_600, 10_000):
        restore, offload = overhead(count, device, repeat)
        table.add(
            f"{count:,}",
            secs(restore),
            f"{restore / count * 1e6:.2f} µs",
            secs(offload),
            f"{offload / count * 1e6:.2f} µs",
        )
    table.print(("tensors", "restore", "per tensor", "offload, unchanged", "per tensor"))


def overhead(count: int, device: torch.device, repeat: int) -> tuple[float, float]:
    """(restore s, unchanged offload s) of ``count`` small tensors; device buffers freed untimed."""
    model = nn.ParameterList(nn.Parameter(torch.ones(1024), requires_grad=False) for _ in range(count))
    weights = attach(model, device, emulate_device=device.type != "cuda")
    kept: list[torch.Tensor | None] = []

    def restore_and_keep() -> None:
        weights.to_device()
        kept[:] = [bucket.device for bucket in weights._buckets]

    restore = timed(weights.to_device, device, repeat, before=weights.to_host)
    offload = timed(weights.to_host, device, repeat, before=restore_and_keep)
    weights.release()
    return restore, offload


def bench_pinning(size: float, device: torch.device) -> None:
    nbytes = int(size * GB)
    table = Table(f"page-locking {nbytes / GB:.2f} GB on {torch.cuda.get_device_name(device)}")
    start = time.perf_counter()
    buffer = new_host_buffer(nbytes)
    memory = _engine_memory(buffer.untyped_storage())
    assert memory is not None
    note = _pin(memory, device, pin_limit_bytes())
    registered = time.perf_counter() - start
    table.add("cudaHostRegister, exact size (engine)", secs(registered), f"{nbytes:,}", note or "pinned")
    del buffer, memory
    gc.collect()
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    start = time.perf_counter()
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    allocated = time.perf_counter() - start
    held = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) - before
    table.add("torch.empty(pin_memory=True), caching host allocator", secs(allocated), f"{held:,}", "pinned")
    del pinned
    torch._C._host_emptyCache()
    table.print(("method", "time", "bytes page-locked", "result"))


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16] if cuda else [0.25, 1])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--bucket-mb", type=int, default=1024, help="largest master buffer, MiB")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    print(
        f"# bench/transfer.py — torch {torch.__version__}, device {device}, repeat {args.repeat} (median), "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}"
    )
    if device.type != "cuda":
        print(
            "\nNo CUDA device: the GPU columns are n/a; the engine runs in emulation mode (real host copies)."
        )
    for size in args.sizes:
        bench_size(size, device, args.repeat, args.bucket_mb * 2**20)
        if device.type == "cuda":
            bench_pinning(size, device)
    bench_overhead(device, args.repeat)


if __name__ == "__main__":
    main()
