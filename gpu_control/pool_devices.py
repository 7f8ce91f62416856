"""A pool's devices and their budgets: which cards, how much each may hold, emulated cards.

``GPUPool(devices=..., budget_gb=..., reserve_gb=...)`` names its devices and budgets in a
few forms; this module turns them into `PoolDevice` records, validated, with a sentence for
every refusal. It also reads the pool's settings from the environment (`PoolSettings`).

Environment variables (the app's pool):

=========================  =========  =================================================
``GPU_DEVICES``            (all)      comma-separated: ``cuda:0,cuda:1``, ``cpu``, or
                                      ``emulated:0,emulated:1`` (a demo without a GPU)
``GPU_BUDGET_GB``          (total-R)  GiB the pool may use on each device; one number,
                                      or ``cuda:0=20,cuda:1=10``
``GPU_RESERVE_GB``         1          GiB left free on each device when no budget is set
``GPU_HOST_BUDGET_GB``     (pin lim)  GiB of host RAM for cached models
``GPU_WAIT_TIMEOUT``       300        seconds a request waits for room before it fails
``GPU_SHARE_DIR``          (unset)    a directory shared by every process (and container)
                                      using these devices: they share each budget
=========================  =========  =================================================
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from .config import MAX_TIMEOUT_S, validate_timeout
from .errors import InvalidSetting
from .memory import GIB, read_memory, resolve_device
from .security import excerpt
from .weights import pin_limit_bytes

__all__ = [
    "DEFAULT_WAIT_TIMEOUT",
    "EMULATED_TOTAL_GB",
    "PoolDevice",
    "PoolSettings",
    "device_budgets",
    "host_budget_bytes",
    "parse_devices",
    "validate_gb",
    "validate_wait_timeout",
]

EMULATED_TOTAL_GB = 24.0
"""The size of an emulated card (``emulated:N``) when no budget is given."""

DEFAULT_WAIT_TIMEOUT = 300.0

_EMULATED = re.compile(r"emulated:(\d{1,3})")
_MAX_GB = 1 << 20  # a budget past a pebibyte is a typo, not a card


@dataclass(eq=False)
class PoolDevice:
    """One device of a pool.

    Attributes:
        name: ``cuda:0``, ``cpu`` or ``emulated:1`` (what status and messages show).
        torch_device: where the tensors go (the CPU for an emulated card).
        emulated: the CPU stands in for a card, with real copies.
        total: the device's memory in bytes, or None when unknown.
        budget: bytes the pool may use there (weights and working memory).
    """

    name: str
    torch_device: torch.device
    emulated: bool
    total: int | None
    budget: int = 0


def parse_devices(devices: str | Sequence[Any] | None) -> list[PoolDevice]:
    """Turn ``devices`` into the pool's device records (budgets not set yet).

    Args:
        devices: None (every visible CUDA device, else the CPU), a list of names, or one
            comma-separated string (``GPU_DEVICES``).

    Raises:
        InvalidSetting: an unknown or missing device, a repeated one, or emulated and real
            devices mixed.
    """
    if devices is None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        names: list[Any] = [f"cuda:{i}" for i in range(count)] or ["cpu"]
    elif isinstance(devices, str):
        names = [part for part in devices.split(",") if part.strip()]
    elif isinstance(devices, Sequence):
        names = list(devices)
    else:
        raise InvalidSetting(f"devices must be a list of device names, not {excerpt(devices)}.")
    if not names:
        raise InvalidSetting("devices is empty: name at least one (cuda:0, cpu or emulated:0).")
    records = [_device(name) for name in names]
    seen: set[str] = set()
    for record in records:
        if record.name in seen:
            raise InvalidSetting(f"Device {record.name} is named twice in devices.")
        seen.add(record.name)
    if len({record.emulated for record in records}) > 1:
        raise InvalidSetting("devices mixes emulated and real devices: use one kind in a pool.")
    return records


def _device(name: Any) -> PoolDevice:
    text = str(name).strip().lower() if isinstance(name, (str, torch.device)) else None
    if text is None:
        raise InvalidSetting(f"A device name must be text such as 'cuda:0', not {excerpt(name)}.")
    match = _EMULATED.fullmatch(text)
    if match:
        return PoolDevice(
            f"emulated:{int(match.group(1))}", torch.device("cpu"), True, int(EMULATED_TOTAL_GB * GIB)
        )
    if text == "cpu":
        return PoolDevice("cpu", torch.device("cpu"), False, int(psutil.virtual_memory().total))
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        device = resolve_device(text)
        return PoolDevice(str(device), device, False, _cuda_total(device))
    raise InvalidSetting(f"Unknown device {excerpt(name)}: use cuda, cuda:N, cpu or emulated:N.")


def _cuda_total(device: torch.device) -> int | None:
    total = read_memory(device).total
    if total is None:
        total = torch.cuda.get_device_properties(device).total_memory
    return int(total)


def device_budgets(
    devices: list[PoolDevice],
    budget_gb: float | Mapping[str, Any] | str | None,
    reserve_gb: Any,
    *,
    names: tuple[str, str] = ("budget_gb", "reserve_gb"),
) -> None:
    """Set each device's budget in bytes.

    Args:
        devices: from `parse_devices`.
        budget_gb: None (the device's total minus ``reserve_gb``), one number for every
            device, or a mapping by device name (devices left out get the default); a string
            ``"20"`` or ``"cuda:0=20,cuda:1=10"`` as in ``GPU_BUDGET_GB``.
        reserve_gb: GiB kept free on each device whose budget is not given.
        names: what the budget and the reserve are called where the user set them.

    Raises:
        InvalidSetting: a budget that is not a positive number, a device the pool does not
            have, or a reserve that leaves nothing.
    """
    budget_name, reserve_name = names
    reserve = validate_timeout(reserve_name, reserve_gb, allow_inf=False, unit="GiB", maximum=_MAX_GB)
    by_name = _budget_map(budget_gb, devices, budget_name)
    for device in devices:
        gib = by_name.get(device.name)
        if gib is None:
            if device.total is None:
                raise InvalidSetting(f"The memory of {device.name} is unknown: set {budget_name}.")
            budget = device.total - int(reserve * GIB)
            if budget <= 0:
                raise InvalidSetting(
                    f"{reserve_name}={reserve:g} leaves no room on {device.name} "
                    f"({device.total / GIB:.1f} GiB): lower it or give {budget_name}."
                )
            device.budget = budget
        else:
            device.budget = int(gib * GIB)


def _budget_map(budget_gb: Any, devices: list[PoolDevice], label: str = "budget_gb") -> dict[str, float]:
    if budget_gb is None or (isinstance(budget_gb, str) and not budget_gb.strip()):
        return {}
    if isinstance(budget_gb, str) and "=" in budget_gb:
        pairs: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in budget_gb.split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                raise InvalidSetting(
                    f"{label} must be a number or 'device=GiB,...', not {excerpt(budget_gb)}."
                )
            pairs[key.strip()] = value
        budget_gb = pairs
    if isinstance(budget_gb, Mapping):
        known = {device.name for device in devices}
        result: dict[str, float] = {}
        for key, value in budget_gb.items():
            name = _device(key).name if isinstance(key, str) else str(key)
            if name not in known:
                raise InvalidSetting(
                    f"{label} names {excerpt(key)}, which is not one of the pool's devices "
                    f"({', '.join(sorted(known))})."
                )
            result[name] = _positive_gb(f"{label}[{name}]", value)
        return result
    gib = _positive_gb(label, budget_gb)
    return {device.name: gib for device in devices}


def _positive_gb(name: str, value: Any) -> float:
    gib = validate_timeout(name, value, allow_inf=False, unit="GiB", maximum=_MAX_GB)
    if int(gib * GIB) < 1:  # 1e-30 GiB is not 0, but it is 0 bytes
        raise InvalidSetting(f"{name} must be more than 0 GiB (at least one byte), not {excerpt(value)}.")
    return gib


@dataclass(frozen=True, kw_only=True)
class PoolSettings:
    """The pool's settings, as ``GPUPool`` takes them; `from_env` reads the variables above."""

    devices: str | None = None
    budget_gb: str | None = None
    reserve_gb: float = 1.0
    host_budget_gb: float | None = None
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT
    share_dir: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> PoolSettings:
        """Read and validate ``GPU_DEVICES`` … ``GPU_SHARE_DIR``.

        Raises:
            InvalidSetting: a value that cannot be used, naming the variable.
        """

        def get(name: str) -> str | None:
            value = environ.get(name, "").strip()
            return value or None

        devices = get("GPU_DEVICES")
        budget = get("GPU_BUDGET_GB")
        reserve = get("GPU_RESERVE_GB")
        host = get("GPU_HOST_BUDGET_GB")
        wait = get("GPU_WAIT_TIMEOUT")
        try:
            records = parse_devices(devices)
        except InvalidSetting as error:
            raise InvalidSetting(f"GPU_DEVICES: {error}") from None
        reserve_gb = 1.0 if reserve is None else validate_gb("GPU_RESERVE_GB", reserve, positive=False)
        device_budgets(records, budget, reserve_gb, names=("GPU_BUDGET_GB", "GPU_RESERVE_GB"))
        return cls(
            devices=devices,
            budget_gb=budget,
            reserve_gb=reserve_gb,
            host_budget_gb=None if host is None else validate_gb("GPU_HOST_BUDGET_GB", host, positive=True),
            wait_timeout=DEFAULT_WAIT_TIMEOUT
            if wait is None
            else validate_wait_timeout("GPU_WAIT_TIMEOUT", wait),
            share_dir=get("GPU_SHARE_DIR"),
        )

    def pool_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``GPUPool``."""
        return {
            "devices": self.devices,
            "budget_gb": self.budget_gb,
            "reserve_gb": self.reserve_gb,
            "host_budget_gb": self.host_budget_gb,
            "wait_timeout": self.wait_timeout,
            "share_dir": self.share_dir,
        }


def validate_gb(name: str, value: Any, *, positive: bool) -> float:
    """GiB for ``name``: finite, from 0 (or, when ``positive``, at least one byte) to a pebibyte."""
    if positive:
        return _positive_gb(name, value)
    return validate_timeout(name, value, allow_inf=False, unit="GiB", maximum=_MAX_GB)


def validate_wait_timeout(name: str, value: Any) -> float:
    """Seconds a request may wait for room: finite, 0 to 30 days."""
    return validate_timeout(name, value, allow_inf=False, maximum=MAX_TIMEOUT_S)


def host_budget_bytes(host_budget_gb: Any) -> int:
    """The host budget in bytes: None means the pin limit (``GPU_PIN_LIMIT_GB``)."""
    if host_budget_gb is None:
        return pin_limit_bytes()
    gib = _positive_gb("host_budget_gb", host_budget_gb)
    return int(min(gib * GIB, 2**62)) if math.isfinite(gib) else 2**62
