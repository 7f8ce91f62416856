"""Moving a model's tensors between the host cache and the compute device.

The manager decides *when* weights move; this module knows *how*. It sees a model through
one small interface, `ModelWeights`, made by `attach()`:

- ``to_device()`` / ``to_host()`` move the weights and return a `Transfer`;
- ``release()`` drops every copy the engine holds;
- ``size_bytes``, ``host_bytes``, ``device_bytes`` and ``leaked_bytes()`` report sizes.

This version moves whole modules with ``.to()``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Transfer", "ModelWeights", "attach", "find_modules"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Transfer:
    """What one move cost: bytes copied and wall seconds (synchronised)."""

    bytes_copied: int
    seconds: float


def find_modules(obj: Any, _seen: set[int] | None = None) -> Iterator[nn.Module]:
    """Yield the top-level nn.Modules in ``obj``: itself, its attributes, dicts and lists."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        yield obj
        return
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        children = list(vars(obj).values())
    else:
        return
    for child in children:
        yield from find_modules(child, seen)


def _tensors(modules: list[nn.Module]) -> Iterator[torch.Tensor]:
    seen: set[int] = set()
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor


class ModelWeights:
    """A model's weights as the manager sees them; this implementation uses ``.to()``."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.host = torch.device("cpu")
        self._modules = list(find_modules(model))
        self.size_bytes = sum(t.numel() * t.element_size() for t in _tensors(self._modules))
        self.on_device = False

    @property
    def host_bytes(self) -> int:
        """Bytes held in host memory for this model."""
        return 0 if self.on_device and self.device.type != "cpu" else self.size_bytes

    @property
    def device_bytes(self) -> int:
        """Bytes of this model on the compute device."""
        return self.size_bytes if self.on_device and self.device.type == "cuda" else 0

    def _move(self, device: torch.device) -> Transfer:
        start = time.perf_counter()
        for module in self._modules:
            module.to(device)
        if device.type == "cuda" or self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return Transfer(self.size_bytes, time.perf_counter() - start)

    def to_device(self) -> Transfer:
        """Move every tensor to the compute device."""
        transfer = self._move(self.device)
        self.on_device = True
        return transfer

    def to_host(self) -> Transfer:
        """Move every tensor back to the host."""
        transfer = self._move(self.host)
        self.on_device = False
        return transfer

    def release(self) -> Transfer:
        """Drop the engine's references to the model."""
        self._modules = []
        self.model = None
        self.on_device = False
        return Transfer(0, 0.0)

    def leaked_bytes(self) -> int:
        """Device bytes of this model still referenced outside the manager (unknown: 0)."""
        return 0


def attach(model: Any, device: torch.device, *, mutable: bool = False) -> ModelWeights:
    """Wrap what a load function returned so the manager can move it.

    Args:
        model: an nn.Module, or an object holding modules in attributes, dicts or lists.
        device: the compute device.
        mutable: the model changes its weights on the device (copy back on offload).

    Returns:
        The ModelWeights handle the manager drives.
    """
    del mutable
    return ModelWeights(model, device)
