"""gpu_control: the GPU-memory lifecycle of heavy PyTorch models.

Lazy load -> device -> host cache -> released, with leases, immediate offload after use,
idle and release timeouts, and a status snapshot that never waits.

    from gpu_control import GPUResourceManager

    manager = GPUResourceManager(idle_timeout=60)
    with manager.use(load_model) as model:
        output = model(inputs)

Several models on one or more devices share budgets through a `GPUPool`.

The integrations need an extra and are imported only when used:
`gpu_control.rest` and `gpu_control.metrics` (``pip install "gpu-control[rest]"``: FastAPI
router, offline docs, Prometheus), and the sibling package `gpu_control_gradio` (``pip install "gpu-control[gradio]"``:
the GPU panel, the MCP/API tools, a safe mount). ``import gpu_control`` itself needs only torch,
numpy and psutil, and never imports gradio, fastapi, diffusers or transformers.
"""

from ._version import __version__ as __version__
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
from .residency import ComponentWeights
from .security import ControlAccess, read_control_token
from .weights import ModelWeights, Transfer, attach

__all__ = [
    "ActionResult",
    "CheckpointLoad",
    "ComponentWeights",
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
