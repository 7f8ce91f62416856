"""Engine host buffers: the memory the host master copy lives in, and the pinned budget.

A master buffer is an anonymous private mapping (`new_host_buffer()`), exact in size, page
aligned, with transparent huge pages requested; it goes back to the OS as soon as the last
tensor over it is freed. `_engine_memory()` recognises such a buffer behind a storage, so an
attach can adopt it without copying. A buffer that ``gpu_control.weights`` page-locked with
``cudaHostRegister`` unregisters itself when freed and hands its bytes back to `_PINNED`, the
process-wide count held against ``GPU_PIN_LIMIT_GB``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import weakref

import torch

PIN_LIMIT_ENV = "GPU_PIN_LIMIT_GB"  # GiB of host memory the engine may page-lock, per process


class _HostMemory(mmap.mmap):
    """Anonymous private pages under one master buffer; unpins itself when freed."""

    def __del__(self) -> None:
        pinned = getattr(self, "pinned", 0)
        if pinned and getattr(self, "pid", None) == os.getpid():
            with contextlib.suppress(Exception):  # interpreter shutdown or a dead driver
                torch.cuda.cudart().cudaHostUnregister(self.ptr)
            _PINNED.release(pinned)


_BUFFERS: weakref.WeakValueDictionary[int, _HostMemory] = weakref.WeakValueDictionary()


def new_host_buffer(nbytes: int) -> torch.Tensor:
    """Allocate an engine host buffer: exact size, page aligned, pageable until attached.

    The memory is an anonymous private mapping (returned to the OS as soon as the last tensor
    over it is freed) with transparent huge pages requested. `attach()` recognises tensors
    that already sit in such a buffer and uses the buffer as their master copy without
    copying (see ``gpu_control.checkpoint.load_safetensors``).

    Args:
        nbytes: size in bytes, more than 0.

    Returns:
        A 1-D uint8 CPU tensor over the buffer.
    """
    memory = _HostMemory(-1, nbytes, flags=mmap.MAP_PRIVATE)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # EINVAL: a kernel built without transparent huge pages
            memory.madvise(mmap.MADV_HUGEPAGE)
    buffer = torch.frombuffer(memory, dtype=torch.uint8)
    memory.ptr = buffer.data_ptr()
    memory.pinned = 0
    memory.pid = None
    _BUFFERS[memory.ptr] = memory
    return buffer


def _engine_memory(storage: torch.UntypedStorage) -> _HostMemory | None:
    """The engine buffer that ``storage`` is, if it is one."""
    if storage.device.type != "cpu":
        return None
    memory = _BUFFERS.get(storage.data_ptr())
    if memory is None or len(memory) != storage.nbytes():
        return None
    return memory


class _PinnedBudget:
    """Bytes page-locked by the engine in this process, against the limit."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # a buffer's __del__ may run while this thread holds it
        self.used = 0

    def reserve(self, nbytes: int, limit: int) -> bool:
        with self._lock:
            if self.used + nbytes > limit:
                return False
            self.used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


_PINNED = _PinnedBudget()
