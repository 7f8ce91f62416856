"""The reversible hooks through which a component of a `ComponentWeights` is entered (residency.py).

Each component module gets a forward pre-hook (enter; count the call as running), a forward hook
with ``always_call`` (uncount it), and an accelerate-style ``_hf_hook`` whose ``pre_forward`` is
what diffusers' ``apply_forward_hook`` calls from ``encode()``/``decode()``. A user's own
``_hf_hook`` is chained and put back when the hooks are removed.

Also the helpers that group components by shared memory (tied weights) and size a model.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .model_tensors import _entries, _nbytes, find_modules

if TYPE_CHECKING:
    from .residency import ComponentWeights

__all__ = ["Enter", "HfHook", "Hooks", "model_bytes"]


class Enter:
    """Enters one component of a `ComponentWeights` (held weakly: hooks must not keep it alive)."""

    def __init__(self, weights: ComponentWeights, name: str) -> None:
        self._weights = weakref.ref(weights)
        self.name = name

    def __call__(self) -> None:
        weights = self._weights()
        if weights is not None:
            weights.enter(self.name)

    def depth(self, step: int) -> None:
        weights = self._weights()
        if weights is not None:
            weights._running(self.name, step)

    @property
    def device(self) -> torch.device | None:
        weights = self._weights()
        return None if weights is None else weights.device


class HfHook:
    """An accelerate-style ``_hf_hook``: enters the component, then defers to the user's hook.

    diffusers' ``apply_forward_hook`` calls ``pre_forward(module)`` from ``encode()`` and
    ``decode()``; accelerate's wrapped ``forward`` calls ``pre_forward`` and ``post_forward``
    and reads attributes such as ``no_grad``, which come from the user's hook.
    """

    def __init__(self, enter: Enter, inner: Any) -> None:
        self.enter = enter
        self.inner = inner

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self.enter()
        if self.inner is not None and hasattr(self.inner, "pre_forward"):
            return self.inner.pre_forward(module, *args, **kwargs)
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self.inner is not None and hasattr(self.inner, "post_forward"):
            return self.inner.post_forward(module, output)
        return output

    @property
    def execution_device(self) -> torch.device | None:
        device = getattr(self.inner, "execution_device", None)
        return device if device is not None else self.enter.device

    def __getattr__(self, attr: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(attr)
        return getattr(inner, attr)


_MISSING = object()


class Hooks:
    """The hooks on one component's modules, and what to put back when they are removed."""

    def __init__(self, enter: Enter, modules: list[nn.Module]) -> None:
        self.handles: list[Any] = []
        self.installed: list[tuple[nn.Module, HfHook, Any]] = []
        for module in modules:
            if getattr(module, "holds_own_tensors", False):
                continue
            self.handles.append(module.register_forward_pre_hook(lambda _m, _a: _pre(enter)))
            self.handles.append(
                module.register_forward_hook(lambda _m, _a, _o: enter.depth(-1), always_call=True)
            )
            previous = module.__dict__.get("_hf_hook", _MISSING)
            hook = HfHook(enter, None if previous is _MISSING else previous)
            object.__setattr__(module, "_hf_hook", hook)
            self.installed.append((module, hook, previous))

    def remove(self) -> None:
        """Remove the hooks; a user's ``_hf_hook`` is put back (unless the user replaced ours)."""
        for handle in self.handles:
            handle.remove()
        for module, hook, previous in self.installed:
            if module.__dict__.get("_hf_hook") is not hook:
                continue
            if previous is _MISSING:
                del module.__dict__["_hf_hook"]
            else:
                object.__setattr__(module, "_hf_hook", previous)
        self.handles = []
        self.installed = []


def _pre(enter: Enter) -> None:
    """The forward pre-hook: count the call as running (first: the forward hook always uncounts it), enter."""
    enter.depth(1)
    enter()


def _keys(module: nn.Module) -> set[int]:
    """What identifies the memory of a module's tensors: storage addresses, or the tensor objects."""
    keys: set[int] = set()
    for entry in _entries([module]):
        tensor = entry.tensor
        keys.add(id(tensor))
        if tensor.is_meta or tensor.numel() == 0:
            continue
        try:
            keys.add(tensor.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError, TypeError):
            pass
    return keys


def _grouped(named: list[tuple[str, nn.Module]]) -> list[tuple[str, list[nn.Module]]]:
    """Join components that share a tensor (tied weights) into one, named ``a+b``; drop empty ones."""
    groups: list[tuple[list[str], list[nn.Module], set[int]]] = []
    for name, module in named:
        keys = _keys(module)
        if not keys:
            continue
        joined = [g for g in groups if g[2] & keys]
        for group in joined:
            groups.remove(group)
        names = [n for g in joined for n in g[0]] + [name]
        modules = [m for g in joined for m in g[1]] + [module]
        groups.append((names, modules, keys.union(*(g[2] for g in joined))))
    order = {name: i for i, (name, _) in enumerate(named)}
    groups.sort(key=lambda g: min(order[n] for n in g[0]))
    return [("+".join(sorted(names, key=order.__getitem__)), modules) for names, modules, _ in groups]


def model_bytes(model: Any) -> int:
    """Bytes of a model's tensors before it is attached (shared memory counted once)."""
    seen: set[int] = set()
    total = 0
    for entry in _entries(find_modules(model)):
        tensor = entry.tensor
        if tensor.is_meta:
            continue
        try:
            key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        except (RuntimeError, NotImplementedError, TypeError):
            key = id(tensor)
        if key not in seen:
            seen.add(key)
            total += _nbytes(tensor)
    return total
