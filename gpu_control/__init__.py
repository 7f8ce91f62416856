"""gpu_control: the GPU-memory lifecycle of heavy PyTorch models.

Lazy load -> device -> host cache -> released, with leases, immediate offload after use,
idle and release timeouts, and a status snapshot that never waits.

    from gpu_control import GPUResourceManager

    manager = GPUResourceManager(idle_timeout=60)
    with manager.use(load_model) as model:
        output = model(inputs)

Several models on one or more devices share budgets through a `GPUPool`.
"""

from .checkpoint import CheckpointLoad, load_safetensors
from .config import Settings
from .default import get_gpu_manager, reset_gpu_manager
from .errors import (
    ControlLocked,
    ForeignOrigin,
    GpuControlError,
    InvalidSetting,
    LoadError,
    ModelInUse,
    OutOfMemory,
    TransferError,
    WaitTimeout,
)
from .manager import ActionResult, GPUResourceManager, Location, Outcome, Transition
from .pool import GPUPool
from .security import ControlAccess, read_control_token
from .weights import ModelWeights, Transfer, attach

__all__ = [
    "ActionResult",
    "CheckpointLoad",
    "ControlAccess",
    "ControlLocked",
    "ForeignOrigin",
    "GPUPool",
    "GPUResourceManager",
    "GpuControlError",
    "InvalidSetting",
    "LoadError",
    "Location",
    "ModelInUse",
    "ModelWeights",
    "OutOfMemory",
    "Outcome",
    "Settings",
    "Transfer",
    "TransferError",
    "Transition",
    "WaitTimeout",
    "attach",
    "get_gpu_manager",
    "load_safetensors",
    "read_control_token",
    "reset_gpu_manager",
]
