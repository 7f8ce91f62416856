"""Memory probes: what the torch allocator and the driver say about a device.

Every CUDA-only call is guarded: on a machine without CUDA the GPU figures are 0 or None
and nothing raises. Reading the status must not create a CUDA context (a few hundred MB of
GPU memory, and an error on ZeroGPU Spaces): until this process has initialised CUDA, free
and total memory and the card's name come from NVML when ``pynvml`` is installed, else they
are None.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidSetting

__all__ = ["GIB", "MemoryReading", "to_gb", "read_memory", "device_name", "resolve_device", "empty_cache"]

GIB = 2**30


def to_gb(n_bytes: int | float | None) -> float | None:
    """Bytes to GiB (``bytes / 2**30``), full precision; None stays None."""
    return None if n_bytes is None else n_bytes / GIB


@dataclass(frozen=True)
class MemoryReading:
    """One reading of a device's memory, in bytes (None where it cannot be known)."""

    allocated: int = 0
    reserved: int = 0
    free: int | None = None
    total: int | None = None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return the compute device: the one given, else ``cuda`` when available, else ``cpu``.

    A bare ``cuda`` becomes ``cuda:<current device>`` so that figures name one card.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidSetting(f"Device {device!r} was asked for but CUDA is not available here.")
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise InvalidSetting(
                f"Device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible."
            )
        dev = torch.device("cuda", index)
    return dev


@functools.lru_cache(maxsize=None)
def _nvml_handle(index: int) -> Any | None:
    """An NVML handle for the CUDA device ``index`` of this process, or None.

    Cached: NVML is initialised once, not at every status read.
    """
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    if os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID" and torch.cuda.device_count() > 1:
        return None  # CUDA numbers the cards fastest first, NVML by PCI bus: the index may differ
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [part.strip() for part in visible.split(",") if part.strip()]
        if index >= len(ids) or not ids[index].isdigit():
            return None
        index = int(ids[index])
    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # NVML missing or the driver refused: figures stay unknown
        return None


def read_memory(device: torch.device) -> MemoryReading:
    """Read allocator and driver figures for ``device`` (zeros/None for a CPU device)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return MemoryReading()
    if torch.cuda.is_initialized():
        free, total = torch.cuda.mem_get_info(device)
        return MemoryReading(
            allocated=torch.cuda.memory_allocated(device),
            reserved=torch.cuda.memory_reserved(device),
            free=free,
            total=total,
        )
    handle = _nvml_handle(device.index or 0)
    if handle is None:
        return MemoryReading()
    import pynvml  # type: ignore[import-not-found]

    info = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return MemoryReading(free=int(info.free), total=int(info.total))


def device_name(device: torch.device) -> str | None:
    """The card's name for a CUDA device, else None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if torch.cuda.is_initialized():
        return _initialised_device_name(device)
    return _nvml_name(device.index or 0)


@functools.lru_cache(maxsize=None)
def _nvml_name(index: int) -> str | None:
    """The card's name from NVML (cached: it does not change)."""
    handle = _nvml_handle(index)
    if handle is None:
        return None
    import pynvml  # type: ignore[import-not-found]

    name = pynvml.nvmlDeviceGetName(handle)
    return name.decode() if isinstance(name, bytes) else str(name)


@functools.lru_cache(maxsize=None)
def _initialised_device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def empty_cache(device: torch.device) -> None:
    """Return the allocator's cached, unused blocks of ``device`` to the driver."""
    if device.type == "cuda" and torch.cuda.is_available():
        with torch.cuda.device(device):
            torch.cuda.empty_cache()
