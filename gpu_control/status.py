"""The status schema (DESIGN.md): what a manager shows of its model, the device and its memory.

The device's figures are read first, outside the manager's lock (a driver call may be
slow); the lifecycle's are copied under it. A status read never waits for a move and never
collects garbage.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .memory import MemoryReading, device_name, to_gb
from .model_state import ModelState
from .residency import component_locations, residency_of
from .states import Location

__all__ = ["build_status", "device_status"]


def device_status(device: torch.device, *, monitor_running: bool, reading: MemoryReading) -> dict[str, Any]:
    """The device part of status; read it outside the manager's lock.

    Args:
        device: the compute device.
        monitor_running: whether the idle watcher runs.
        reading: the device's memory figures.

    Returns:
        ``monitor_running``, ``device``, ``gpu_available``, ``gpu_name`` and the
        ``gpu_memory_*_gb`` figures (GiB).
    """
    return {
        "monitor_running": monitor_running,
        "device": str(device),
        "gpu_available": torch.cuda.is_available(),
        "gpu_name": device_name(device),
        "gpu_memory_allocated_gb": to_gb(reading.allocated),
        "gpu_memory_reserved_gb": to_gb(reading.reserved),
        "gpu_memory_free_gb": to_gb(reading.free),
        "gpu_memory_total_gb": to_gb(reading.total),
    }


def build_status(
    state: ModelState, *, name: str, now: float, device_fields: dict[str, Any]
) -> dict[str, Any]:
    """The whole status; call it under the manager's lock.

    Args:
        state: the manager's state.
        name: the model's label.
        now: the manager's clock.
        device_fields: what `device_status` returned.

    Returns:
        A JSON-ready dict (the schema in DESIGN.md); sizes ``*_gb`` are GiB.
    """
    location, leases, transition = state.location, state.leases, state.transition
    cached_since = state.cached_since if location is Location.CPU else None
    idle = location is not Location.UNLOADED and leases == 0 and transition is None
    if location is Location.UNLOADED:
        idle_time = None
    else:
        idle_time = (now - state.last_used) if idle and state.last_used is not None else 0.0
    idle_deadline = state.idle_deadline()
    release_deadline = state.release_deadline()
    weights = state.weights
    return {
        "name": name,
        "model_location": location.value,
        "transition": None if transition is None else transition.value,
        "in_use": leases,
        "pending": sorted(state.pending),
        "idle_timeout": state.idle_timeout if math.isfinite(state.idle_timeout) else None,
        "release_timeout": state.release_timeout,
        "offload_after_use": state.offload_after_use,
        "last_transition": None if state.last_transition is None else dict(state.last_transition),
        "last_error": state.last_error,
        "counts": dict(state.counts),
        "leaked_gb": to_gb(state.leaks.bytes),
        "leak": state.leaks.message,
        "idle_time": idle_time,
        "cached_time": (now - cached_since) if cached_since else None,
        "auto_offload_in": None if idle_deadline is None else max(0.0, idle_deadline - now),
        "auto_release_in": None if release_deadline is None else max(0.0, release_deadline - now),
        **device_fields,
        "model_size_gb": to_gb(None if weights is None else weights.size_bytes),
        "cpu_cache_gb": to_gb(0 if weights is None else weights.host_bytes),
        "residency": residency_of(weights, state.residency),
        "components": component_locations(weights, location is Location.GPU),
        "on_device_gb": to_gb(0 if weights is None else weights.device_bytes),
    }
