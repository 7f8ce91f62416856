"""The reversible hooks through which a component of a `ComponentWeights` is entered (residency.py).

Each component module gets a forward pre-hook (enter; count the call as running), a forward hook
with ``always_call`` (uncount it), and an accelerate-style ``_hf_hook`` whose ``pre_forward`` is
what diffusers' ``apply_forward_hook`` calls from ``encode()``/``decode()``. A user's own
``_hf_hook`` is chained and put back when the hooks are removed.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .residency import ComponentWeights

__all__ = ["Enter", "HfHook", "Hooks"]


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
