"""The process-wide default manager (the seed's ``get_gpu_manager``)."""

from __future__ import annotations

import threading
from typing import Any

from .config import Settings, apply_visible_devices
from .manager import GPUResourceManager

__all__ = ["get_gpu_manager", "reset_gpu_manager"]

_lock = threading.Lock()
_default: GPUResourceManager | None = None


def get_gpu_manager(idle_timeout: float | None = None, **kwargs: Any) -> GPUResourceManager:
    """Return the process-wide manager, creating it on the first call.

    The first call reads ``GPU_IDLE_TIMEOUT``, ``GPU_RELEASE_TIMEOUT``,
    ``GPU_OFFLOAD_AFTER_USE`` and ``GPU_DEVICE`` and applies ``NVIDIA_VISIBLE_DEVICES``;
    arguments given here override the environment. Later calls return the same manager
    and ignore their arguments (use ``update_timeout()`` to change it).

    Args:
        idle_timeout: seconds idle on the device before offloading.
        **kwargs: ``release_timeout``, ``offload_after_use``, ``device`` or any other
            GPUResourceManager keyword argument.

    Raises:
        InvalidSetting: an environment variable or argument holds a bad value.
    """
    global _default
    with _lock:
        if _default is None:
            apply_visible_devices()
            setting_names = ("release_timeout", "offload_after_use", "device")
            overrides = {k: kwargs.pop(k) for k in setting_names if k in kwargs}
            settings = Settings.from_env().with_overrides(idle_timeout=idle_timeout, **overrides)
            _default = GPUResourceManager.from_settings(settings, **kwargs)
        return _default


def reset_gpu_manager() -> None:
    """Forget the process-wide manager (releasing its model), e.g. between tests."""
    global _default
    with _lock:
        manager, _default = _default, None
    if manager is not None:
        manager.stop_monitor()
        manager.force_release()
