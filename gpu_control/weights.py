"""Moving a model's tensors between the host master copy and the compute device.

The manager decides *when* weights move; this module knows *how*. It sees a model through
one small interface, `ModelWeights`, made by `attach()`:

- ``to_device()`` / ``to_host()`` move the weights and return a `Transfer`;
- ``release()`` drops every copy the engine holds;
- ``size_bytes``, ``host_bytes``, ``device_bytes`` and ``leaked_bytes()`` report sizes.

This module holds the pinning policy and the moves, and is the one to import from. The rest
of the engine sits beside it: ``model_tensors`` finds a model's tensors, ``host_buffers`` owns
the master buffers and the pinned budget, ``weight_layout`` plans blocks and buckets, and
``master_copy`` builds the master copy (`_MasterCopy`, the base of `ModelWeights`).

How a move works
----------------
``attach()`` finds every parameter and buffer (tied weights once) and copies them, once, into
a *host master copy*: a few large byte buffers, one run of buffers per dtype, each tensor a
view at a 256-byte aligned offset. Tensors that share memory keep sharing it (overlapping byte
ranges become one block). On a CUDA device the master buffers are page-locked in place with
``cudaHostRegister`` (exact size; ``torch.empty(..., pin_memory=True)`` goes through PyTorch's
caching host allocator, which rounds each request up to a power of two). Pinning is skipped,
with the reason logged, when ``GPU_PIN_LIMIT_GB`` (default: half the machine's RAM, shared by
every model of the process) would be exceeded or the driver refuses; the master copy is then
ordinary pageable memory and everything still works, only slower. Registration runs on a
short-lived helper thread, so a failed call leaves no sticky CUDA error behind on the
caller's thread. A buffer unpins itself when the last tensor over it is freed.

Two cases skip work at attach: tensors that already sit in an engine host buffer (put there by
``gpu_control.checkpoint.load_safetensors``, or by an earlier attach of the same model) keep
that buffer as their master copy, with no copy at all; and a model that arrives already on
the device is copied into the master once and its device tensors are dropped, so the first
``to_device()`` lays it out in buffers like any other restore.

- **Restore** (``to_device``): one device buffer per master buffer, one
  ``copy_(non_blocking=True)`` each, parameters re-pointed (``param.data = view``) at views
  into the device buffers, one synchronisation at the end. Parameter objects keep their
  identity, so tied weights stay tied and references held by the user stay valid. If
  anything fails (``torch.cuda.OutOfMemoryError`` included, which propagates as is) the
  partial device buffers are dropped and every tensor stays on the host.
- **Offload** (``to_host``): a pointer swap. Tensors point back at their master views and the
  device buffers are dropped; only blocks that changed on the device are copied back first.
- **Release**: the same swap without copying back, then the engine drops the master copy.

What change detection trusts
----------------------------
A tensor counts as changed when its version counter (``tensor._version``) moved since the
restore, or when its storage was replaced (``param.data = other``; found by its data pointer,
and copied back from the new storage). Version counters see every in-place operation,
including those made inside ``torch.inference_mode()`` on ordinary tensors. They do **not**
see writes made through ``tensor.data`` (``param.data.add_(1)``) or through a ``.detach()``
alias, and tensors *created* under ``inference_mode`` have no counter at all: the engine copies
those back at every offload (logged once at attach). A model that writes to its weights in
ways the counter cannot see must be attached with ``mutable=True`` (or have
``weights.mutable = True`` set); every offload then copies everything back.

Devices
-------
- ``cuda`` (or another accelerator): the mode described above.
- ``cpu`` (laptops, CI): the model already lives in host memory, so by default nothing is
  copied and nothing is doubled: moves return ``bytes_copied == 0``.
- ``cpu`` with ``emulate_device=True``: the "device" side is a second set of CPU buffers, so
  the whole engine (buckets, change detection, copy-back, pointer swaps, leak checks) runs
  with real copies. Tests and ``bench/transfer.py`` use it on machines without a GPU.

Anything unusual (tensor subclasses, quantized, sparse or nested tensors) is moved with a
plain ``.to()`` and a kept host original instead; this is logged once at attach. Tensors on
the ``meta`` device hold no data and are left where they are.

Verified freeing
----------------
Each device buffer is watched through a weak reference to its storage. After an offload the
engine holds none of them, so ``leaked_bytes()`` counts the bytes of those still alive: memory
that something outside the manager still references (a ``param.data`` alias, a captured view).
A captured alias keeps its whole device buffer alive, and the whole buffer is reported.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from .config import validate_timeout
from .errors import TransferError
from .host_buffers import _PINNED, PIN_LIMIT_ENV, _HostMemory, new_host_buffer
from .host_buffers import _engine_memory as _engine_memory  # re-exported: bench/transfer.py, tests
from .master_copy import _MasterCopy
from .model_tensors import _copy_to, _install, _version_or_none, find_modules
from .model_tensors import _entries as _entries  # re-exported: gpu_control/checkpoint.py
from .weight_layout import ALIGN as ALIGN  # re-exported: gpu_control/checkpoint.py
from .weight_layout import DEFAULT_BUCKET_BYTES, _synchronize

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "PIN_LIMIT_ENV",
    "ModelWeights",
    "Transfer",
    "attach",
    "find_modules",
    "new_host_buffer",
    "pin_limit_bytes",
]

logger = logging.getLogger(__name__)

_GIB = 2**30


@dataclass(frozen=True)
class Transfer:
    """What one move cost.

    Attributes:
        bytes_copied: bytes copied between host and device.
        seconds: wall time of the move, synchronised.
        copies: copy calls issued (few large ones on a restore).
    """

    bytes_copied: int
    seconds: float
    copies: int = 0


# ---------------------------------------------------------------------------- pinning


def _usable_ram_bytes() -> int:
    """Physical RAM, or the container's memory limit (cgroup v2 or v1) when that is lower."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as file:
                text = file.read().strip()
        except OSError:
            continue
        if text.isdigit():
            ram = min(ram, int(text))
    return ram


def pin_limit_bytes(environ: Mapping[str, str] | None = None) -> int:
    """How many bytes of host memory the engine may page-lock in this process.

    ``GPU_PIN_LIMIT_GB`` (GiB, 0 = never pin) sets it; unset, it is half the machine's RAM (or of
    the container's memory limit).

    Raises:
        InvalidSetting: the variable is not a number of GiB >= 0.
    """
    env = os.environ if environ is None else environ
    raw = env.get(PIN_LIMIT_ENV, "").strip()
    if not raw:
        return _usable_ram_bytes() // 2
    gib = validate_timeout(PIN_LIMIT_ENV, raw, allow_inf=False, unit="GiB", maximum=math.inf)
    return int(min(gib * _GIB, 2**62))  # any figure past the RAM means "no limit"


def _register(ptr: int, nbytes: int, device: torch.device) -> str | None:
    """cudaHostRegister on the calling (helper) thread; None on success, else the error."""
    torch.cuda.set_device(device)
    cudart = torch.cuda.cudart()
    code = int(cudart.cudaHostRegister(ptr, nbytes, 1))  # 1: cudaHostRegisterPortable
    if code != 0:
        return str(torch.cuda.CudaError(code))
    return None


def _pin(memory: _HostMemory, device: torch.device, limit: int) -> str | None:
    """Page-lock one buffer; None on success (or already pinned), else why it stays pageable."""
    if memory.pinned:
        return None
    nbytes = len(memory)
    if not _PINNED.reserve(nbytes, limit):
        return f"the pinned-memory budget is used up ({PIN_LIMIT_ENV}={limit / _GIB:.1f} GiB)"
    try:
        error = _register(memory.ptr, nbytes, device)
    except Exception as exc:  # noqa: BLE001 - no driver, no CUDA build: stay pageable
        error = f"{type(exc).__name__}: {exc}"
    if error is not None:
        _PINNED.release(nbytes)
        return f"cudaHostRegister failed: {error}"
    memory.pinned = nbytes
    memory.pid = os.getpid()
    return None


# ---------------------------------------------------------------------------- the engine


class ModelWeights(_MasterCopy):
    """A model's weights as the manager sees them; made by `attach()`.

    Attributes:
        model: the object the load function returned.
        device: the compute device.
        mode: ``device`` (a real accelerator), ``emulated`` (CPU standing in for a device,
            real copies) or ``zero_copy`` (CPU; nothing moves).
        mutable: copy every tensor back at each offload (see the module docstring).
    """

    def __init__(
        self,
        model: Any,
        device: torch.device,
        *,
        mutable: bool = False,
        emulate_device: bool = False,
        pin: bool | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
        start = time.perf_counter()
        super().__init__(
            model, device, mutable=mutable, emulate_device=emulate_device, bucket_bytes=bucket_bytes
        )
        if self.mode == "zero_copy":
            self._attach_zero_copy()
        else:
            self._attach_master(pin, pin_limit_bytes(), _pin)
        self._log_attach(time.perf_counter() - start)

    # ------------------------------------------------------------------ moves

    def to_device(self) -> Transfer:
        """Copy the master to the device in few large copies and point the model at it.

        Atomic: on any failure the partial device copies are freed, every tensor stays on the
        host and the exception propagates unchanged (``torch.cuda.OutOfMemoryError`` too).

        Returns:
            Bytes copied, seconds, copy calls.

        Raises:
            TransferError: the weights were released.
        """
        self._check_alive("restore")
        start = time.perf_counter()
        if self.mode == "zero_copy" or self._resident:
            return Transfer(0, time.perf_counter() - start)
        device = self.device
        copied = self._sync_host_replacements()
        dev_buckets: list[torch.Tensor] = []
        moved: list[torch.Tensor] = []
        pointed = False
        copies = 0
        try:
            with torch.inference_mode(False), torch.no_grad():
                for bucket in self._buckets:
                    dev = self._allocate(bucket.nbytes)
                    dev.copy_(bucket.host, non_blocking=True)
                    dev_buckets.append(dev)
                    copies += 1
                    copied += bucket.nbytes
                for fallback in self._fallbacks:
                    moved.append(_copy_to(fallback.tensor, device))
                    copies += 1
                    copied += fallback.nbytes
                pointed = True
                storages = [dev.untyped_storage() for dev in dev_buckets]
                for tensor, (index, dtype, offset, size, stride) in zip(self._tensors, self._view_args):
                    tensor.data = torch.empty(0, dtype=dtype, device=device).set_(
                        storages[index], offset, size, stride
                    )
                for tensor, _ in self._empties:
                    tensor.data = torch.empty_strided(
                        tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device
                    )
                for fallback, value in zip(self._fallbacks, moved):
                    fallback.host = fallback.tensor.detach()
                    _install(fallback, value)
                    fallback.version = _version_or_none(fallback.tensor)
                _synchronize(device)
        except BaseException:
            if pointed:
                self._point_to_host()
            # Copies already queued still read the master and write these buffers: let them end
            # before anything is freed (a freed master is unpinned and unmapped). A sticky CUDA
            # error would raise here again; the original error is the one to report.
            with contextlib.suppress(Exception):
                _synchronize(device)
            # The traceback keeps this frame's locals alive as long as the exception lives (the
            # manager reads free memory while handling it): drop every device reference here.
            dev = storages = value = None
            dev_buckets.clear()
            moved.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            raise
        for bucket, dev in zip(self._buckets, dev_buckets):
            bucket.device = dev
        tensors = self._tensors
        self._versions = [tensors[i]._version for i in self._tracked]
        self._device_ptrs = [tensor.data_ptr() for tensor in tensors]
        self._resident = True
        return Transfer(copied, time.perf_counter() - start, copies)

    def to_host(self) -> Transfer:
        """Point the model back at the master, copying back only what changed on the device.

        Returns:
            Bytes copied back (0 when nothing changed), seconds, copy calls.

        Raises:
            TransferError: the weights were released.
        """
        self._check_alive("offload")
        start = time.perf_counter()
        if not self._resident:
            return Transfer(0, time.perf_counter() - start)
        copied = copies = 0
        # Kernels the model queued on other streams may still write or read these buffers:
        # the copy-back runs on the current stream and freed blocks are reused at once.
        _synchronize(self.device)
        with torch.inference_mode(False), torch.no_grad():
            copied, copies = self._copy_back()
            for fallback in self._fallbacks:
                version = _version_or_none(fallback.tensor)
                if self.mutable or version is None or version != fallback.version:
                    fallback.host = _copy_to(fallback.tensor, self.host)
                    copied += fallback.nbytes
                    copies += 1
            _synchronize(self.device)
            self._point_to_host()
        self._drop_device()
        return Transfer(copied, time.perf_counter() - start, copies)

    def release(self) -> Transfer:
        """Drop every copy: device buffers (without copying back), then the master copy.

        Afterwards the model object, if something still holds it, points at the old master
        buffers, which are freed when it is; ``leaked_host_bytes()`` tells how much that is.

        Returns:
            Nothing copied; the seconds it took.
        """
        start = time.perf_counter()
        if self._released:
            return Transfer(0, 0.0)
        if self._resident:
            _synchronize(self.device)  # work queued on other streams may still read the buffers
            with torch.inference_mode(False), torch.no_grad():
                self._point_to_host()
            self._drop_device()
        for bucket in self._buckets:
            if bucket.host is not None:
                self._retired_host.append((StorageWeakRef(bucket.host.untyped_storage()), bucket.nbytes))
            bucket.host = None
        self._tensors = []
        self._host_views = []
        self._empties = []
        self._fallbacks = []
        self._skipped = []
        self.model = None
        self._released = True
        return Transfer(0, time.perf_counter() - start)

    # ------------------------------------------------------------------ checks

    def leaked_bytes(self, *, collect: bool = True) -> int:
        """Device bytes of this model still referenced outside the engine.

        Counts the device buffers that earlier offloads and releases dropped but that are
        still alive. 0 in zero-copy mode.

        Args:
            collect: when any is alive, collect the young garbage generations first (about a
                millisecond; what a job leaves behind is young). Never a full collection,
                which holds the GIL for 100+ ms and stalls every thread; garbage that has
                reached the oldest generation is counted until Python collects it.
        """
        if not self._alive(self._retired):
            return 0
        if collect:
            gc.collect(1)
        return self._alive(self._retired)

    def leaked_host_bytes(self) -> int:
        """After ``release()``: master-copy bytes still alive because something holds them.

        Like ``leaked_bytes()``, collects only the young garbage generations, and only when
        any is alive.
        """
        if not self._alive(self._retired_host):
            return 0
        gc.collect(1)
        return self._alive(self._retired_host)

    def _log_attach(self, seconds: float) -> None:
        stats = self.stats()
        if self.mode == "zero_copy":
            where = "kept in place (CPU device: zero-copy)"
        else:
            pinned = stats["pinned_bytes"]
            where = f"master copy {stats['host_bytes'] / _GIB:.2f} GiB in {stats['buckets']} buffer(s), "
            where += f"{pinned / _GIB:.2f} GiB pinned"
            if stats["adopted_bytes"]:
                where += f", {stats['adopted_bytes'] / _GIB:.2f} GiB reused without copying"
            if self._pin_note:
                where += f" (pageable: {self._pin_note})"
        logger.info(
            "Attached %d tensors (%.2f GiB) for %s [%s]: %s, in %.2f s",
            stats["tensors"],
            stats["size_bytes"] / _GIB,
            self.device,
            self.mode,
            where,
            seconds,
        )
        if self._fallbacks:
            kinds = collections.Counter(f.reason for f in self._fallbacks)
            logger.info(
                "%d tensor(s) (%.1f MB) move with a plain .to(), outside the buckets: %s",
                len(self._fallbacks),
                stats["fallback_bytes"] / 2**20,
                ", ".join(f"{reason} ({n})" for reason, n in kinds.items()),
            )
        if self._untracked:
            nbytes = sum(self._blocks[self._slot_block[i]].nbytes for i in self._untracked)
            logger.warning(
                "%d tensor(s) were created under torch.inference_mode() and have no version counter: "
                "they are copied back at every offload (%.1f MB). Load the model outside inference_mode "
                "to avoid it.",
                len(self._untracked),
                nbytes / 2**20,
            )
        if self._skipped:
            logger.warning(
                "%d tensor(s) on the meta device hold no data and are not moved.", len(self._skipped)
            )

    # ------------------------------------------------------------------ moves, internals

    def _allocate(self, nbytes: int) -> torch.Tensor:
        """One device buffer (tests replace this to simulate running out of memory)."""
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def _check_alive(self, action: str) -> None:
        if self._released:
            raise TransferError(f"Cannot {action}: the weights were released; load the model again.")


def attach(
    model: Any,
    device: torch.device,
    *,
    mutable: bool = False,
    emulate_device: bool = False,
    pin: bool | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> ModelWeights:
    """Wrap what a load function returned so the manager can move it.

    Builds the host master copy (on a CUDA device: page-locked, within ``GPU_PIN_LIMIT_GB``)
    and points the model at it; the next ``to_device()`` moves it. On a CPU device nothing is
    copied unless ``emulate_device`` asks for a stand-in device.

    Args:
        model: an nn.Module, or an object holding modules in attributes, dicts or lists.
        device: the compute device.
        mutable: the model changes its weights in ways version counters miss; copy every
            tensor back at each offload.
        emulate_device: on a CPU device, keep a second CPU copy as the "device" side, so
            that moves really copy (tests, benchmarks).
        pin: page-lock the master copy; None: when the device is CUDA.
        bucket_bytes: the largest master buffer.

    Returns:
        The ModelWeights handle the manager drives.

    Raises:
        InvalidSetting: ``emulate_device`` with a non-CPU device, a bad ``bucket_bytes`` or
            ``GPU_PIN_LIMIT_GB``.
    """
    return ModelWeights(
        model,
        torch.device(device),
        mutable=mutable,
        emulate_device=emulate_device,
        pin=pin,
        bucket_bytes=bucket_bytes,
    )
