"""Component residency: during a lease only the component being run is on the device.

A manager made with ``residency="components"`` (or a pool model too large for any device's
budget) attaches what its load function returned as a `ComponentWeights`: one engine
(`ModelWeights`) per *component*, driven through the same interface the manager's mover uses
for a whole model. The components are the top-level modules of what the load function returned:

- a diffusers pipeline (or any object): the modules in its attributes, dicts and lists
  (``text_encoder``, ``unet`` or ``transformer``, ``vae``, …), named by their path;
- a dict or list of modules: its values (``encoder``, ``0``, …);
- a single ``nn.Module``: its direct children; the tensors it holds itself (a Wan
  transformer's ``scale_shift_table``), and any child tied to them, form a part, ``(own)``,
  that stays on the device for the whole lease.

Components that share a tensor (tied embeddings across components) become one component,
named ``a+b``: a tensor has one master copy, so the two can only move together.

How a component is entered
--------------------------
At attach, each component module gets three reversible hooks: a forward pre-hook, a forward
hook (``always_call``) that counts the calls under way, and an accelerate-style ``_hf_hook``
whose ``pre_forward(module)`` is what diffusers' ``apply_forward_hook`` calls from
``encode()``/``decode()``. A user's own ``_hf_hook`` (accelerate's, for instance) is chained:
ours calls it and answers for it, and it is put back on release. The hook's
``execution_device`` is the compute device, so a pipeline creates its latents there.

Entering a component restores it (one engine restore: few large copies) and offloads the
component entered before (a pointer swap), unless that one is still running (a component
called from inside another's forward): then both stay until it returns. The restore of the
lease (``to_device``) only arms the hooks and restores ``(own)``; the first component comes in
when it is first entered. In a pool (`ComponentWeights.room`), the components entered stay while
the device's budget has room for them, and leave least recently entered first when it has not, or
when another model waits for the room (`ComponentWeights.trim`). Outside a lease the hooks are
inert and the model runs on the host master copy, as a whole model does after an offload.
``release()`` removes every hook.

A module called directly while its component is not the current one (``pipe.vae.decoder(x)``
without going through ``vae``) runs on the host copy: on a real GPU that fails with a device
mismatch, as it does under diffusers' ``enable_model_cpu_offload()``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .errors import InvalidSetting, TransferError
from .model_tensors import _LEAVES, _MAX_DEPTH
from .residency_hooks import Enter, Hooks, _grouped, model_bytes
from .security import excerpt
from .weights import ModelWeights, Transfer

__all__ = [
    "RESIDENCIES",
    "ComponentWeights",
    "attach_as",
    "charge_bytes",
    "component_locations",
    "named_components",
    "residency_of",
    "validate_residency",
]

logger = logging.getLogger(__name__)

RESIDENCIES = ("model", "components")
"""``model``: the whole model on the device during a lease; ``components``: one component at a time."""

OWN = "(own)"
"""The part holding a single module's own tensors (those not in a child module)."""

_NAMES: weakref.WeakKeyDictionary[Any, tuple[str, ...]] = weakref.WeakKeyDictionary()


def validate_residency(value: Any) -> str:
    """Return ``value`` if it is one of `RESIDENCIES`.

    Raises:
        InvalidSetting: any other value.
    """
    if isinstance(value, str) and value in RESIDENCIES:
        return value
    raise InvalidSetting(f"residency must be 'model' or 'components', not {excerpt(value)}.")


# ---------------------------------------------------------------------------- finding components


class _OwnTensors(nn.Module):
    """The tensors a module holds itself, seen as a module of their own (the same dicts)."""

    holds_own_tensors = True  # never hooked: it stays on the device for the whole lease

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_parameters", owner._parameters)
        object.__setattr__(self, "_buffers", owner._buffers)


def named_components(obj: Any) -> list[tuple[str, nn.Module]]:
    """The top-level modules of what a load function returned, with a name each.

    Args:
        obj: a module (its direct children, and `OWN` when it holds tensors itself), or an
            object holding modules in attributes, dicts and lists (their paths).

    Returns:
        ``(name, module)`` pairs in the order first met; together they hold every tensor
        `find_modules` finds.
    """
    if isinstance(obj, nn.Module):
        found = list(obj.named_children())
        if any(t is not None for t in [*obj._parameters.values(), *obj._buffers.values()]):
            found.append((OWN, _OwnTensors(obj)))
        return found
    found = []
    seen: set[int] = set()
    stack: list[tuple[Any, int, str]] = [(obj, 0, "")]
    while stack:
        item, depth, path = stack.pop()
        if id(item) in seen or depth > _MAX_DEPTH or isinstance(item, _LEAVES):
            continue
        seen.add(id(item))
        if isinstance(item, nn.Module):
            found.append((path or type(item).__name__, item))
            continue
        if isinstance(item, Mapping):
            children = [(str(key), value) for key, value in item.items()]
        elif isinstance(item, (list, tuple, set, frozenset)):
            children = [(str(i), value) for i, value in enumerate(item)]
        else:
            try:
                children = list(vars(item).items())
            except TypeError:  # no instance __dict__
                continue
        prefix = f"{path}." if path else ""
        stack.extend((child, depth + 1, prefix + key) for key, child in reversed(children))
    return found


# ---------------------------------------------------------------------------- the engine


class ComponentWeights:
    """A model attached one component at a time; the manager drives it like `ModelWeights`.

    Args:
        model: what the load function returned.
        device: the compute device.
        engine: builds one component's `ModelWeights` (``weights.attach`` or the manager's).
        mutable: passed to the engine.

    Attributes:
        model: the object the load function returned.
        parts: one engine per component, by name.
        swaps: component restores during leases; ``swap_bytes``: bytes they copied.
        room, give_back: set by a pool (None outside it: one component at a time). ``room(n)``:
            may it hold ``n`` bytes beyond `charge_bytes`; ``give_back(n)``: they are free again.
        extra: the bytes ``room`` granted and not given back yet.
    """

    residency = "components"

    def __init__(
        self, model: Any, device: torch.device, *, engine: Callable[..., ModelWeights], mutable: bool = False
    ) -> None:
        self.model = model
        self._device = torch.device(device)
        self._lock = threading.RLock()
        self._active = False
        self._released = False
        self._on: frozenset[str] = frozenset()  # replaced, never changed in place: status reads it unlocked
        self._calls: collections.Counter[str] = collections.Counter()
        self._order: list[str] = []  # the components entered, least recently first
        self.room: Callable[[int], bool] | None = None  # set by a pool: may I hold n more bytes?
        self.give_back: Callable[[int], None] | None = None  # set by a pool: I hold n bytes fewer
        self.extra = 0  # bytes the pool granted beyond `charge_bytes`
        self.swaps = 0
        self.swap_bytes = 0
        self.parts: dict[str, ModelWeights] = {}
        self._hooks: list[Hooks] = []
        try:
            for name, modules in _grouped(named_components(model)):
                if any(isinstance(module, _OwnTensors) for module in modules):
                    name = OWN  # a child tied to the module's own tensors stays with them
                target = modules[0] if len(modules) == 1 else modules
                self.parts[name] = engine(target, device, mutable=mutable)
                if name != OWN:
                    self._hooks.append(Hooks(Enter(self, name), modules))
        except BaseException:
            self.release()
            raise
        logger.info(
            "Component residency: %d component(s), largest %.2f GiB of %.2f GiB: %s",
            len(self.parts),
            self.charge_bytes / 2**30,
            self.size_bytes / 2**30,
            ", ".join(f"{name} {part.size_bytes / 2**20:.1f} MB" for name, part in self.parts.items()),
        )

    # ------------------------------------------------------------------ what the mover reads

    @property
    def device(self) -> torch.device:
        """The compute device (a pool may move the model to another card between leases)."""
        return self._device

    @device.setter
    def device(self, device: torch.device) -> None:
        self._device = device
        for part in self.parts.values():
            part.device = device

    @property
    def mutable(self) -> bool:
        """Copy every tensor back at each offload (see `ModelWeights`)."""
        return any(part.mutable for part in self.parts.values())

    @mutable.setter
    def mutable(self, value: bool) -> None:
        for part in self.parts.values():
            part.mutable = value

    @property
    def mode(self) -> str:
        """The engine's mode (``device``, ``emulated`` or ``zero_copy``)."""
        return next(iter(self.parts.values())).mode if self.parts else "zero_copy"

    @property
    def size_bytes(self) -> int:
        """Bytes of the whole model's weights."""
        return sum(part.size_bytes for part in self.parts.values())

    @property
    def charge_bytes(self) -> int:
        """The most this model holds on the device: its largest component, plus `OWN`."""
        own = self.parts[OWN].size_bytes if OWN in self.parts else 0
        sizes = [part.size_bytes for name, part in self.parts.items() if name != OWN]
        return own + max(sizes, default=0)

    @property
    def host_bytes(self) -> int:
        """Bytes of the master copies in host memory."""
        return sum(part.host_bytes for part in self.parts.values())

    @property
    def device_bytes(self) -> int:
        """Bytes of this model on the device now."""
        return sum(part.device_bytes for part in self.parts.values())

    def components(self) -> dict[str, str]:
        """Where each component is: ``gpu`` (on the device) or ``cpu`` (its master copy); never waits."""
        on = self._on
        return {name: "gpu" if name in on else "cpu" for name in self.parts}

    def where(self, tensor: torch.Tensor) -> str | None:
        """Which engine buffer ``tensor`` lies in (``device``, ``host``) or None."""
        for part in self.parts.values():
            side = part.where(tensor)
            if side is not None:
                return side
        return None

    def stats(self) -> dict[str, Any]:
        """A JSON-ready summary: the sizes, each component's engine stats, the swaps."""
        return {
            "residency": self.residency,
            "mode": self.mode,
            "size_bytes": self.size_bytes,
            "host_bytes": self.host_bytes,
            "device_bytes": self.device_bytes,
            "charge_bytes": self.charge_bytes,
            "extra_bytes": self.extra,
            "swaps": self.swaps,
            "swap_bytes": self.swap_bytes,
            "components": {name: part.stats() for name, part in self.parts.items()},
        }

    def leaked_bytes(self, *, collect: bool = True) -> int:
        """Device bytes still referenced outside the engine (see `ModelWeights.leaked_bytes`)."""
        return sum(part.leaked_bytes(collect=collect) for part in self.parts.values())

    def leaked_host_bytes(self) -> int:
        """After ``release()``: master-copy bytes still alive because something holds them."""
        return sum(part.leaked_host_bytes() for part in self.parts.values())

    # ------------------------------------------------------------------ moves

    def to_device(self) -> Transfer:
        """Start a lease: arm the hooks and restore `OWN`; each component comes in when entered.

        Raises:
            TransferError: the weights were released.
        """
        start = time.perf_counter()
        with self._lock:
            self._check_alive("restore")
            copied = copies = 0
            if OWN in self.parts:
                moved = self.parts[OWN].to_device()
                copied, copies = moved.bytes_copied, moved.copies
                self._on = self._on | {OWN}
            self._active = True
        return Transfer(copied, time.perf_counter() - start, copies)

    def to_host(self) -> Transfer:
        """End a lease: disarm the hooks and offload every component on the device.

        Raises:
            TransferError: the weights were released.
        """
        start = time.perf_counter()
        with self._lock:
            self._check_alive("offload")
            self._active = False
            copied = copies = 0
            for name in sorted(self._on):
                moved = self.parts[name].to_host()
                copied += moved.bytes_copied
                copies += moved.copies
                self._on = self._on - {name}
            self._give_back(self.extra)
        return Transfer(copied, time.perf_counter() - start, copies)

    def release(self) -> Transfer:
        """Remove every hook, then drop every copy of every component."""
        start = time.perf_counter()
        with self._lock:
            self._active = False
            for hooks in self._hooks:
                hooks.remove()
            self._hooks = []
            for part in self.parts.values():
                part.release()
            self._on = frozenset()
            self._give_back(self.extra)
            self.model = None
            self._released = True
        return Transfer(0, time.perf_counter() - start)

    def enter(self, name: str) -> None:
        """Make ``name`` the component on the device: restore it, offload the one before.

        A component still running (``name`` was called from inside its forward) stays. In a
        pool (``room`` set), the others stay too while the pool grants the room they need;
        otherwise they leave least recently entered first. Does nothing outside a lease.
        """
        with self._lock:
            if not self._active:
                return
            self._order = [n for n in self._order if n != name] + [name]
            if self.room is None:
                left = [n for n in self._on if n not in (name, OWN) and self._calls[n] == 0]
            else:
                left = self._to_leave(name)
            if name in self._on and not left:
                return
            start = time.perf_counter()
            for other in left:
                self.parts[other].to_host()
                self._on = self._on - {other}
            copied = 0
            if name not in self._on:
                copied = self.parts[name].to_device().bytes_copied
                self._on = self._on | {name}
                self.swaps += 1
                self.swap_bytes += copied
            self._settle()
        logger.debug(
            "Component %r on %s (%.1f MB in %.3f s); offloaded %s",
            name,
            self._device,
            copied / 2**20,
            time.perf_counter() - start,
            ", ".join(repr(n) for n in left) or "nothing",
        )

    def trim(self) -> int:
        """Offload the components held with extra room (least recently entered first), except
        the one entered last and those running, and give that room back; return its bytes."""
        with self._lock:
            if not self._active or not self.extra:
                return 0
            keep = {OWN, *self._order[-1:]}
            for other in [n for n in self._order if n in self._on and n not in keep and not self._calls[n]]:
                if self._sizes(self._on) <= self.charge_bytes:
                    break
                self.parts[other].to_host()
                self._on = self._on - {other}
            return self._settle()

    def _to_leave(self, name: str) -> list[str]:
        """In a pool: the components to offload so that ``name`` comes in, least recently entered
        first (never a running one), each only while the pool refuses the room for the others."""
        after = self._on | {name}
        stay = [n for n in self._order if n in after and n not in (name, OWN) and self._calls[n] == 0]
        left: list[str] = []
        while True:
            need = self._sizes(after) - self.charge_bytes - self.extra
            if need <= 0 or (self.room is not None and self.room(need)):
                self.extra += max(0, need)
                return left
            if not stay:
                return left
            left.append(stay.pop(0))
            after = after - {left[-1]}

    def _settle(self) -> int:
        """Give back the extra room the components on the device no longer need; return its bytes."""
        if self.room is None:
            return 0
        freed = self.extra - max(0, min(self.extra, self._sizes(self._on) - self.charge_bytes))
        self._give_back(freed)
        return freed

    def _sizes(self, names: frozenset[str]) -> int:
        return sum(self.parts[n].size_bytes for n in names)

    def _give_back(self, nbytes: int) -> None:
        """Under the lock: ``nbytes`` of extra room are free again (told to the pool, if any)."""
        self.extra -= max(0, nbytes)
        if nbytes > 0 and self.give_back is not None:
            self.give_back(nbytes)

    def _running(self, name: str, step: int) -> None:
        """Count a forward call of ``name`` starting (+1) or ending (-1)."""
        with self._lock:
            self._calls[name] = max(0, self._calls[name] + step)

    def _check_alive(self, action: str) -> None:
        if self._released:
            raise TransferError(f"Cannot {action}: the weights were released; load the model again.")

    def __repr__(self) -> str:
        return (
            f"ComponentWeights(mode={self.mode!r}, device={str(self._device)!r}, "
            f"components={self.components()!r}, size_bytes={self.size_bytes})"
        )


# ---------------------------------------------------------------------------- for the mover, status, pool


def attach_as(
    model: Any,
    device: torch.device,
    *,
    engine: Callable[..., ModelWeights],
    mutable: bool,
    residency: str,
    fits_whole: Callable[[int], bool] | None = None,
    name: str = "model",
) -> ModelWeights | ComponentWeights:
    """Attach a loaded model with the residency asked for, or with components when it must.

    Args:
        model: what the load function returned.
        device: the compute device.
        engine: builds a `ModelWeights` (for the model, or for each component).
        mutable: passed to the engine.
        residency: ``model`` or ``components``.
        fits_whole: a pool's answer to "may a model of this many bytes ever fit whole?";
            when it says no, the model runs with component residency (logged).
        name: the model's label in the log line.

    Returns:
        The weights the manager drives.
    """
    if residency == "model" and fits_whole is not None:
        nbytes = model_bytes(model)
        if not fits_whole(nbytes):
            logger.info(
                "%r (%.2f GiB) is larger than every device budget: it runs with component residency "
                "(its components move in and out as the budget allows)",
                name,
                nbytes / 2**30,
            )
            residency = "components"
    if residency == "components":
        return ComponentWeights(model, device, engine=engine, mutable=mutable)
    weights = engine(model, device, mutable=mutable)
    _NAMES[weights] = tuple(name for name, _ in named_components(model))
    return weights


def charge_bytes(weights: ModelWeights | ComponentWeights) -> int:
    """The most a model's weights hold on the device at once (a pool charges this)."""
    if isinstance(weights, ComponentWeights):
        return weights.charge_bytes
    return weights.size_bytes


def residency_of(weights: ModelWeights | ComponentWeights | None, asked: str) -> str:
    """Status's ``residency``: how the loaded model runs, or the one asked for before a load."""
    if weights is None:
        return asked
    return "components" if isinstance(weights, ComponentWeights) else "model"


def component_locations(weights: ModelWeights | ComponentWeights | None, on_device: bool) -> dict[str, str]:
    """Status's ``components``: each top-level module's place, ``gpu`` or ``cpu``.

    Args:
        weights: the model's engine, or None when it is not loaded ({}).
        on_device: a whole model's place (its location is ``gpu``).
    """
    if weights is None:
        return {}
    if isinstance(weights, ComponentWeights):
        return weights.components()
    names = _NAMES.get(weights)
    if names is None:
        names = _NAMES[weights] = tuple(name for name, _ in named_components(weights.model))
    return {name: "gpu" if on_device else "cpu" for name in names}
