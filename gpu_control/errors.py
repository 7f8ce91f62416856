"""Exceptions raised by gpu_control.

The tree::

    GpuControlError                 base of everything raised on purpose here
    ├── InvalidSetting (ValueError) a timeout, flag or device that is not valid
    ├── LoadError                   the user's load_func raised; the manager stays unloaded
    ├── TransferError               moving weights between host and device failed
    │   ├── OutOfMemory             the device has no room for the model
    │   └── WaitTimeout             a pool found no room for the model within its wait timeout
    ├── ModelInUse                  an operation that needs the model idle found a lease
    ├── ControlLocked               a control request without the control token (401)
    └── ForeignOrigin               a control request from another site's page (403)

`http_status()` maps each of them to the HTTP status a REST layer should answer with.
"""

from __future__ import annotations

__all__ = [
    "GpuControlError",
    "InvalidSetting",
    "LoadError",
    "TransferError",
    "OutOfMemory",
    "WaitTimeout",
    "ModelInUse",
    "ControlLocked",
    "ForeignOrigin",
    "http_status",
]


class GpuControlError(Exception):
    """Base class of every error gpu_control raises on purpose."""


class InvalidSetting(GpuControlError, ValueError):
    """A setting (timeout, flag, device) has a value that cannot be used."""


class LoadError(GpuControlError):
    """The load function raised; the manager is left unloaded and the next use retries."""


class TransferError(GpuControlError):
    """Weights could not be moved; the model stays where it was."""


class OutOfMemory(TransferError):
    """The device has too little free memory to hold the model."""

    def __init__(self, device: str, needed: int, free: int | None, message: str | None = None) -> None:
        self.device = device
        self.needed = needed
        self.free = free
        free_text = "unknown" if free is None else f"{free / 2**30:.2f} GiB"
        super().__init__(
            message
            or f"Not enough memory on {device}: the model needs {needed / 2**30:.2f} GiB, "
            f"{free_text} is free. Free memory on that device (offload or release other "
            f"models) or choose another device."
        )


class WaitTimeout(TransferError):
    """A pool found no room for the model within its wait timeout; the message names what holds the device."""


class ModelInUse(GpuControlError):
    """The model is leased and the operation cannot wait for the lease to end."""


class ControlLocked(GpuControlError):
    """A state-changing control was asked for without the control token."""


class ForeignOrigin(GpuControlError):
    """A state-changing control was asked for from another site's page (a foreign ``Origin``)."""


def http_status(error: BaseException) -> int:
    """Return the HTTP status code that a REST layer should answer for ``error``."""
    if isinstance(error, InvalidSetting):
        return 422
    if isinstance(error, ControlLocked):
        return 401
    if isinstance(error, ForeignOrigin):
        return 403
    if isinstance(error, ModelInUse):
        return 409
    if isinstance(error, OutOfMemory):
        return 507
    if isinstance(error, (LoadError, TransferError)):  # WaitTimeout too: try again later
        return 503
    return 500
