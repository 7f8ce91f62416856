"""Settings of a manager, validated in one place, and read from the environment.

Environment variables:

=========================  =======  ===================================================
``GPU_IDLE_TIMEOUT``       60       seconds a model may sit idle on the GPU before it is
                                    offloaded to the host cache (0: as soon as idle,
                                    ``never``/``inf``: never; at most 30 days)
``GPU_RELEASE_TIMEOUT``    0        seconds a model may sit in the host cache before it is
                                    released entirely (0: never; at most 30 days)
``GPU_OFFLOAD_AFTER_USE``  true     offload as soon as the last user is done
``GPU_DEVICE``             (auto)   ``cuda``, ``cuda:1`` or ``cpu``; auto picks ``cuda``
                                    when available
``NVIDIA_VISIBLE_DEVICES`` (unset)  outside a container, copied to ``CUDA_VISIBLE_DEVICES``
                                    when that is unset (inside one, the runtime applies it)
``GPU_PIN_LIMIT_GB``       (RAM/2)  GiB of host memory the transfer engine may page-lock in
                                    this process (0: never pin; a finite number)
=========================  =======  ===================================================
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .errors import InvalidSetting
from .security import excerpt

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_RELEASE_TIMEOUT",
    "DEFAULT_OFFLOAD_AFTER_USE",
    "MAX_TIMEOUT_S",
    "Settings",
    "validate_timeout",
    "validate_release_timeout",
    "validate_device",
    "apply_visible_devices",
]

logger = logging.getLogger(__name__)

DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_RELEASE_TIMEOUT = 0.0
DEFAULT_OFFLOAD_AFTER_USE = True
MAX_TIMEOUT_S = 30 * 24 * 3600  # the longest finite timeout: 30 days, in seconds

_NEVER_WORDS = frozenset({"inf", "infinity", "never"})
_SECONDS_PER_UNIT = {"seconds": 1.0, "minutes": 60.0, "hours": 3600.0}  # units a message shows in days

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def validate_timeout(
    name: str,
    value: Any,
    *,
    allow_inf: bool = True,
    unit: str = "seconds",
    maximum: float = MAX_TIMEOUT_S,
) -> float:
    """Return ``value`` as a number of ``unit``, or raise InvalidSetting naming ``name``.

    Finite values from 0 to ``maximum`` are accepted; infinity ("never") only when
    ``allow_inf`` and only when asked for: ``math.inf`` or the text ``inf``, ``infinity``
    or ``never`` (any case). A number too large for a float (``"1e309"``) is refused, not
    taken as infinity.

    Args:
        name: what the value is called where the user set it (a parameter or variable).
        value: a number, or a string holding one.
        allow_inf: whether infinity ("never") is accepted.
        unit: what the number counts, for the message (``seconds``, ``hours``, ``GiB``).
        maximum: the largest finite value, in ``unit`` (default: 30 days in seconds;
            ``MAX_TIMEOUT_S / 3600`` for hours, ``math.inf`` for no bound).

    Returns:
        The value as a float >= 0: at most ``maximum``, or ``math.inf``.

    Raises:
        InvalidSetting: the value is missing (None), not a number, NaN, negative, over
            ``maximum``, or infinite when infinity is not allowed; the message is one
            sentence naming ``name`` and quoting at most an excerpt of the value.
    """
    expected = _expected(unit, maximum, allow_inf)
    if value is None:
        raise InvalidSetting(f"{name} needs a value: {expected}.")
    if isinstance(value, bool):
        raise InvalidSetting(f"{name} must be {expected}, not {str(value).lower()}.")
    if isinstance(value, str):
        text = value.strip()
        never = text.lower() in _NEVER_WORDS
        try:
            number = math.inf if never else float(text)
        except ValueError:
            raise InvalidSetting(f"{name} must be {expected}, not {excerpt(value)}.") from None
    else:
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise InvalidSetting(f"{name} must be {expected}, not {excerpt(value)}.") from None
        never = number == math.inf and value == math.inf
    if math.isnan(number):
        raise InvalidSetting(f"{name} must be {expected}, not NaN.")
    if number < 0:
        raise InvalidSetting(f"{name} must be 0 or more {unit}, not {excerpt(value)}.")
    if not never and (number > maximum or math.isinf(number)):
        raise InvalidSetting(f"{name} must be {expected}, not {excerpt(value)}.")
    if math.isinf(number) and not allow_inf:
        raise InvalidSetting(f"{name} must be a finite number of {unit}, not {excerpt(value)}.")
    return number + 0.0  # -0.0 becomes 0.0


def validate_release_timeout(name: str, value: Any) -> float:
    """Return a release timeout in seconds: `validate_timeout` without infinity, where ``never`` is 0.

    A cached model is never released when its release timeout is 0, so the word ``never``
    (any case) means 0 here; ``inf`` and ``infinity`` are still refused.

    Raises:
        InvalidSetting: as `validate_timeout` with ``allow_inf=False``.
    """
    if isinstance(value, str) and value.strip().lower() == "never":
        return 0.0
    return validate_timeout(name, value, allow_inf=False)


def _expected(unit: str, maximum: float, allow_inf: bool) -> str:
    """What a valid value looks like, for messages: the unit, the range and 'never'."""
    if math.isinf(maximum):
        text = f"a number of {unit}, 0 or more" if allow_inf else f"a finite number of {unit}, 0 or more"
    else:
        text = f"a number of {unit} from 0 to {_plain(maximum)}"
        days = maximum * _SECONDS_PER_UNIT.get(unit, 0.0) / 86400
        if days >= 1 and days.is_integer():
            text += f" ({_plain(days)} days)"
    return f"{text} or 'never'" if allow_inf else text


def _plain(number: float) -> str:
    """A number as people write it: ``720``, ``2592000``, ``0.5``."""
    return str(int(number)) if float(number).is_integer() else str(number)


def validate_bool(name: str, value: Any) -> bool:
    """Return ``value`` as a bool, accepting true/false/1/0/yes/no/on/off strings.

    Raises:
        InvalidSetting: anything else; the message quotes at most an excerpt of the value.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidSetting(f"{name} must be true or false, not {excerpt(value)}.")


def validate_device(name: str, value: Any) -> str | None:
    """Return a device string (``cpu``, ``cuda``, ``cuda:N``), None for auto, or raise.

    Raises:
        InvalidSetting: not a device name; the message quotes at most an excerpt of the value.
    """
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("", "auto"):
        return None
    if text == "cpu" or text == "cuda":
        return text
    if text.startswith("cuda:") and text[5:].isdigit():
        return text
    raise InvalidSetting(f"{name} must be 'cpu', 'cuda' or 'cuda:N', not {excerpt(value)}.")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The validated settings of one manager.

    Attributes:
        idle_timeout: seconds idle on the device before offloading to the host cache.
        release_timeout: seconds in the host cache before releasing (0 = never).
        offload_after_use: offload as soon as the last lease ends.
        device: ``cpu``, ``cuda``, ``cuda:N`` or None (auto).
    """

    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    release_timeout: float = DEFAULT_RELEASE_TIMEOUT
    offload_after_use: bool = DEFAULT_OFFLOAD_AFTER_USE
    device: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "idle_timeout", validate_timeout("idle_timeout", self.idle_timeout))
        object.__setattr__(
            self,
            "release_timeout",
            validate_timeout("release_timeout", self.release_timeout, allow_inf=False),
        )
        object.__setattr__(
            self, "offload_after_use", validate_bool("offload_after_use", self.offload_after_use)
        )
        object.__setattr__(self, "device", validate_device("device", self.device))

    def with_overrides(self, **overrides: Any) -> Settings:
        """Return a copy with the given non-None fields replaced (and validated)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``GPU_*`` environment variables.

        Raises:
            InvalidSetting: a variable holds a bad value; the message names the variable.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if env.get("GPU_IDLE_TIMEOUT", "").strip():
            values["idle_timeout"] = validate_timeout("GPU_IDLE_TIMEOUT", env["GPU_IDLE_TIMEOUT"])
        if env.get("GPU_RELEASE_TIMEOUT", "").strip():
            values["release_timeout"] = validate_timeout(
                "GPU_RELEASE_TIMEOUT", env["GPU_RELEASE_TIMEOUT"], allow_inf=False
            )
        if env.get("GPU_OFFLOAD_AFTER_USE", "").strip():
            values["offload_after_use"] = validate_bool(
                "GPU_OFFLOAD_AFTER_USE", env["GPU_OFFLOAD_AFTER_USE"]
            )
        if env.get("GPU_DEVICE", "").strip():
            values["device"] = validate_device("GPU_DEVICE", env["GPU_DEVICE"])
        if env.get("GPU_PIN_LIMIT_GB", "").strip():
            validate_timeout(
                "GPU_PIN_LIMIT_GB", env["GPU_PIN_LIMIT_GB"], allow_inf=False, unit="GiB", maximum=math.inf
            )
        return cls(**values)


def _in_container() -> bool:
    """Whether this process looks like it runs in a Docker/Podman container."""
    return os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")


def apply_visible_devices(environ: os._Environ[str] | dict[str, str] | None = None) -> str | None:
    """Honour ``NVIDIA_VISIBLE_DEVICES`` on bare metal by copying it to ``CUDA_VISIBLE_DEVICES``.

    Inside a container the NVIDIA runtime already exposes only those GPUs (renumbered from
    0), so copying would hide them; this does nothing there, nor when
    ``CUDA_VISIBLE_DEVICES`` is already set. Call it before CUDA is initialised.

    Returns:
        The value written to ``CUDA_VISIBLE_DEVICES``, or None when nothing was changed.
    """
    env = os.environ if environ is None else environ
    nvidia = env.get("NVIDIA_VISIBLE_DEVICES", "").strip()
    if not nvidia or "CUDA_VISIBLE_DEVICES" in env or _in_container():
        return None
    if nvidia.lower() in ("all", "void"):
        return None
    value = "" if nvidia.lower() == "none" else nvidia
    env["CUDA_VISIBLE_DEVICES"] = value
    logger.info("NVIDIA_VISIBLE_DEVICES=%s applied as CUDA_VISIBLE_DEVICES=%s", nvidia, value)
    return value
