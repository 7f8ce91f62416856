"""Finding a model's tensors, and handling the ones that cannot live in a byte bucket.

`find_modules()` walks what a load function returned (a module, or a diffusers-style
pipeline holding modules in attributes, dicts and lists) and `_entries()` lists every distinct
parameter and buffer of those modules once, with every module slot that holds it, so tied
weights stay tied. `_unusual()` names the tensors the engine cannot view as bytes (subclasses,
quantized, sparse, nested, lazy conjugate views); those become a `_Fallback`, moved with a
plain ``.to()`` and put back with `_install()`.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

_MAX_DEPTH = 8  # how deep find_modules looks into plain objects, dicts and lists

_LEAVES = (
    str,
    bytes,
    bytearray,
    int,
    float,
    complex,
    bool,
    type(None),
    type,
    torch.Tensor,
    torch.device,
    torch.dtype,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
)


def find_modules(obj: Any) -> list[nn.Module]:
    """Return the top-level nn.Modules in ``obj``: itself, or those in its attributes, dicts,
    lists, tuples and sets (diffusers-style pipelines), each once, cycles ignored.

    Args:
        obj: what a load function returned.

    Returns:
        The modules in the order first met.
    """
    # A loop over a stack, not a recursive closure: a closure that calls itself is a reference
    # cycle, and it would keep ``found`` (the model) alive until a garbage collection.
    found: list[nn.Module] = []
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if id(item) in seen or depth > _MAX_DEPTH or isinstance(item, _LEAVES):
            continue
        seen.add(id(item))
        if isinstance(item, nn.Module):
            found.append(item)
            continue
        if isinstance(item, Mapping):
            children: list[Any] = list(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            children = list(item)
        else:
            try:
                children = list(vars(item).values())
            except TypeError:  # no instance __dict__
                continue
        stack.extend((child, depth + 1) for child in reversed(children))
    return found


class _Entry:
    """One distinct tensor object of the model and the module slots that hold it."""

    __slots__ = ("owners", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.owners: list[tuple[nn.Module, str, str]] = []


def _entries(modules: list[nn.Module]) -> list[_Entry]:
    """Every distinct parameter and buffer object of ``modules``, in module order."""
    entries: dict[int, _Entry] = {}
    seen_modules: set[int] = set()
    for top in modules:
        for module in top.modules():
            if id(module) in seen_modules:
                continue
            seen_modules.add(id(module))
            for kind in ("_parameters", "_buffers"):
                for name, tensor in getattr(module, kind).items():
                    if tensor is None:
                        continue
                    entry = entries.get(id(tensor))
                    if entry is None:
                        entry = entries[id(tensor)] = _Entry(tensor)
                    entry.owners.append((module, kind, name))
    return list(entries.values())


def _unusual(tensor: torch.Tensor) -> str | None:
    """Why ``tensor`` cannot live in a byte bucket, or None when it can."""
    if type(tensor) not in (torch.Tensor, nn.Parameter):
        return f"tensor subclass {type(tensor).__name__}"
    if tensor.is_quantized:
        return "quantized"
    if tensor.layout != torch.strided:
        return str(tensor.layout).replace("torch.", "")
    if tensor.is_nested:
        return "nested"
    if tensor.is_conj() or tensor.is_neg():
        return "lazy conjugate/negative view"
    return None


def _nbytes(tensor: torch.Tensor) -> int:
    """Bytes of memory behind a tensor of any kind (best effort for unusual ones)."""
    try:
        return tensor.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    if tensor.layout == torch.sparse_coo:
        return _nbytes(tensor._values()) + _nbytes(tensor._indices())
    return tensor.numel() * tensor.element_size()


class _Fallback:
    """A tensor moved with ``.to()``: its module slots, the host original and its version."""

    __slots__ = ("host", "nbytes", "owners", "reason", "tensor", "version")

    def __init__(self, entry: _Entry, reason: str) -> None:
        self.tensor = entry.tensor
        self.owners = entry.owners
        self.host: torch.Tensor | None = None
        self.version: int | None = None
        self.reason = reason
        self.nbytes = _nbytes(entry.tensor)


def _install(fallback: _Fallback, value: torch.Tensor) -> None:
    """Make the model's tensor hold ``value``: in place when possible, else in every owner slot."""
    current = fallback.tensor
    if type(current) is type(value) or torch._has_compatible_shallow_copy_type(current, value):
        try:
            current.data = value
            return
        except RuntimeError:
            pass
    replacement: torch.Tensor = value
    if isinstance(current, nn.Parameter) and not isinstance(value, nn.Parameter):
        replacement = nn.Parameter(value, requires_grad=current.requires_grad)
    for module, kind, name in fallback.owners:
        getattr(module, kind)[name] = replacement
    fallback.tensor = replacement


def _copy_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` as a new copy (a clone when it is already there)."""
    data = tensor.detach()
    if data.device == device:
        return data.clone()
    return data.to(device)


def _version_or_none(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter, or None when it has none (made under inference_mode)."""
    try:
        return tensor._version
    except RuntimeError:
        return None
