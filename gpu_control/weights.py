"""Moving a model's tensors between the host master copy and the compute device.

The manager decides *when* weights move; this module knows *how*. It sees a model through
one small interface, `ModelWeights`, made by `attach()`:

- ``to_device()`` / ``to_host()`` move the weights and return a `Transfer`;
- ``release()`` drops every copy the engine holds;
- ``size_bytes``, ``host_bytes``, ``device_bytes`` and ``leaked_bytes()`` report sizes.

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
import concurrent.futures
import contextlib
import gc
import logging
import math
import mmap
import os
import threading
import time
import types
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from .config import validate_timeout
from .errors import InvalidSetting, TransferError

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

DEFAULT_BUCKET_BYTES = 1 << 30  # largest master buffer; a bigger tensor gets a buffer of its own
PIN_LIMIT_ENV = "GPU_PIN_LIMIT_GB"  # GiB of host memory the engine may page-lock, per process
ALIGN = 256  # byte alignment of every block in a buffer (vectorised kernels want >= 16)

_GIB = 2**30
_MAX_DEPTH = 8  # how deep find_modules looks into plain objects, dicts and lists
_WHOLE_BUCKET = 0.5  # copy a whole buffer back when this share of it changed


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


# ---------------------------------------------------------------------------- finding tensors

_LEAVES = (
    str,
    bytes,
    bytearray,
    int,
    float,
    complex,
    bool,
    type(None),
    type,
    torch.Tensor,
    torch.device,
    torch.dtype,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
)


def find_modules(obj: Any) -> list[nn.Module]:
    """Return the top-level nn.Modules in ``obj``: itself, or those in its attributes, dicts,
    lists, tuples and sets (diffusers-style pipelines), each once, cycles ignored.

    Args:
        obj: what a load function returned.

    Returns:
        The modules in the order first met.
    """
    # A loop over a stack, not a recursive closure: a closure that calls itself is a reference
    # cycle, and it would keep ``found`` (the model) alive until a garbage collection.
    found: list[nn.Module] = []
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if id(item) in seen or depth > _MAX_DEPTH or isinstance(item, _LEAVES):
            continue
        seen.add(id(item))
        if isinstance(item, nn.Module):
            found.append(item)
            continue
        if isinstance(item, Mapping):
            children: list[Any] = list(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            children = list(item)
        else:
            try:
                children = list(vars(item).values())
            except TypeError:  # no instance __dict__
                continue
        stack.extend((child, depth + 1) for child in reversed(children))
    return found


class _Entry:
    """One distinct tensor object of the model and the module slots that hold it."""

    __slots__ = ("owners", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.owners: list[tuple[nn.Module, str, str]] = []


def _entries(modules: list[nn.Module]) -> list[_Entry]:
    """Every distinct parameter and buffer object of ``modules``, in module order."""
    entries: dict[int, _Entry] = {}
    seen_modules: set[int] = set()
    for top in modules:
        for module in top.modules():
            if id(module) in seen_modules:
                continue
            seen_modules.add(id(module))
            for kind in ("_parameters", "_buffers"):
                for name, tensor in getattr(module, kind).items():
                    if tensor is None:
                        continue
                    entry = entries.get(id(tensor))
                    if entry is None:
                        entry = entries[id(tensor)] = _Entry(tensor)
                    entry.owners.append((module, kind, name))
    return list(entries.values())


def _unusual(tensor: torch.Tensor) -> str | None:
    """Why ``tensor`` cannot live in a byte bucket, or None when it can."""
    if type(tensor) not in (torch.Tensor, nn.Parameter):
        return f"tensor subclass {type(tensor).__name__}"
    if tensor.is_quantized:
        return "quantized"
    if tensor.layout != torch.strided:
        return str(tensor.layout).replace("torch.", "")
    if tensor.is_nested:
        return "nested"
    if tensor.is_conj() or tensor.is_neg():
        return "lazy conjugate/negative view"
    return None


def _nbytes(tensor: torch.Tensor) -> int:
    """Bytes of memory behind a tensor of any kind (best effort for unusual ones)."""
    try:
        return tensor.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    if tensor.layout == torch.sparse_coo:
        return _nbytes(tensor._values()) + _nbytes(tensor._indices())
    return tensor.numel() * tensor.element_size()


# ---------------------------------------------------------------------------- host memory


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

    ``GPU_PIN_LIMIT_GB`` (GiB, 0 = never pin) sets it; unset, it is half the machine's RAM (or of the container's memory limit).

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


def _byte_view(storage: torch.UntypedStorage, offset: int, nbytes: int) -> torch.Tensor:
    """A uint8 tensor over ``nbytes`` of ``storage`` from byte ``offset``."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, offset, (nbytes,), (1,))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        torch.accelerator.synchronize(device)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# ---------------------------------------------------------------------------- layout


class _Block:
    """A run of bytes that tensors of the model view: one place in one bucket."""

    __slots__ = ("bucket", "dtype", "first", "members", "nbytes", "offset", "source", "src_offset")

    def __init__(self, source: torch.UntypedStorage, src_offset: int, dtype: torch.dtype, first: int) -> None:
        self.source: torch.UntypedStorage | None = source
        self.src_offset = src_offset
        self.nbytes = 0
        self.dtype = dtype
        self.first = first
        self.members: list[int] = []
        self.bucket = -1
        self.offset = -1


class _Bucket:
    """One master buffer on the host and, while resident, its twin on the device."""

    __slots__ = ("adopted", "blocks", "device", "host", "nbytes")

    def __init__(self, nbytes: int, adopted: torch.Tensor | None = None) -> None:
        self.host: torch.Tensor | None = adopted
        self.nbytes = nbytes
        self.adopted = adopted is not None
        self.blocks: list[_Block] = []
        self.device: torch.Tensor | None = None


class _Fallback:
    """A tensor moved with ``.to()``: its module slots, the host original and its version."""

    __slots__ = ("host", "nbytes", "owners", "reason", "tensor", "version")

    def __init__(self, entry: _Entry, reason: str) -> None:
        self.tensor = entry.tensor
        self.owners = entry.owners
        self.host: torch.Tensor | None = None
        self.version: int | None = None
        self.reason = reason
        self.nbytes = _nbytes(entry.tensor)


def _install(fallback: _Fallback, value: torch.Tensor) -> None:
    """Make the model's tensor hold ``value``: in place when possible, else in every owner slot."""
    current = fallback.tensor
    if type(current) is type(value) or torch._has_compatible_shallow_copy_type(current, value):
        try:
            current.data = value
            return
        except RuntimeError:
            pass
    replacement: torch.Tensor = value
    if isinstance(current, nn.Parameter) and not isinstance(value, nn.Parameter):
        replacement = nn.Parameter(value, requires_grad=current.requires_grad)
    for module, kind, name in fallback.owners:
        getattr(module, kind)[name] = replacement
    fallback.tensor = replacement


def _copy_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` as a new copy (a clone when it is already there)."""
    data = tensor.detach()
    if data.device == device:
        return data.clone()
    return data.to(device)


def _version_or_none(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter, or None when it has none (made under inference_mode)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


# ---------------------------------------------------------------------------- the engine


class ModelWeights:
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
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        if emulate_device and device.type != "cpu":
            raise InvalidSetting(
                f"emulate_device needs a CPU device, not {device}: a real device needs no stand-in."
            )
        if bucket_bytes <= 0:
            raise InvalidSetting(f"bucket_bytes must be more than 0, not {bucket_bytes!r}.")
        self.model = model
        self.device = device
        self.host = torch.device("cpu")
        self.mutable = mutable
        if device.type != "cpu":
            self.mode = "device"
        else:
            self.mode = "emulated" if emulate_device else "zero_copy"
        self._bucket_bytes = bucket_bytes
        self._resident = False
        self._released = False
        self._buckets: list[_Bucket] = []
        self._blocks: list[_Block] = []
        self._tensors: list[torch.Tensor] = []
        self._host_views: list[torch.Tensor] = []
        self._host_ptrs: list[int] = []
        self._view_args: list[tuple[int, torch.dtype, int, torch.Size, tuple[int, ...]]] = []
        self._slot_block: list[int] = []
        self._tracked: list[int] = []
        self._untracked: list[int] = []
        self._versions: list[int] = []
        self._device_ptrs: list[int] = []
        self._empties: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._fallbacks: list[_Fallback] = []
        self._skipped: list[torch.Tensor] = []
        self._retired: list[tuple[StorageWeakRef, int]] = []
        self._retired_host: list[tuple[StorageWeakRef, int]] = []
        self._pin_note: str | None = None
        self._adopted_bytes = 0
        self._zero_copy_bytes = 0

        entries = _entries(find_modules(model))
        tracked: list[_Entry] = []
        for entry in entries:
            tensor = entry.tensor
            if tensor.is_meta:
                self._skipped.append(tensor)
                continue
            reason = _unusual(tensor)
            if reason is not None:
                self._fallbacks.append(_Fallback(entry, reason))
            elif tensor.numel() == 0:
                self._empties.append((tensor, tensor.detach()))
            else:
                tracked.append(entry)
        self._tensors = [entry.tensor for entry in tracked]
        if self.mode == "zero_copy":
            self._attach_zero_copy()
        else:
            self._attach_master(pin)
        self._log_attach(time.perf_counter() - start)

    # ------------------------------------------------------------------ sizes

    @property
    def size_bytes(self) -> int:
        """Bytes of the model's weights (shared memory counted once)."""
        if self.mode == "zero_copy":
            return self._zero_copy_bytes
        return sum(block.nbytes for block in self._blocks) + sum(f.nbytes for f in self._fallbacks)

    @property
    def host_bytes(self) -> int:
        """Bytes the engine holds in host memory (the master copy)."""
        if self._released:
            return 0
        if self.mode == "zero_copy":
            return self._zero_copy_bytes
        return sum(bucket.nbytes for bucket in self._buckets) + sum(f.nbytes for f in self._fallbacks)

    @property
    def device_bytes(self) -> int:
        """Bytes the engine holds on the device (0 in zero-copy mode: there is no device side)."""
        if not self._resident:
            return 0
        return sum(bucket.nbytes for bucket in self._buckets) + sum(f.nbytes for f in self._fallbacks)

    @property
    def on_device(self) -> bool:
        """Whether the weights are on the compute device (always, in zero-copy mode)."""
        return not self._released and (self._resident or self.mode == "zero_copy")

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

    def where(self, tensor: torch.Tensor) -> str | None:
        """Which engine buffer ``tensor``'s memory lies in: ``device``, ``host`` or None.

        None also for tensors the engine does not place (zero-copy mode, fallback tensors).
        """
        if tensor.numel() == 0 or _unusual(tensor) is not None or tensor.is_meta:
            return None
        ptr = tensor.data_ptr()
        for bucket in self._buckets:
            for side, buffer in (("device", bucket.device), ("host", bucket.host)):
                if buffer is None or buffer.device != tensor.device:
                    continue
                base = buffer.data_ptr()
                if base <= ptr < base + bucket.nbytes:
                    return side
        return None

    def stats(self) -> dict[str, Any]:
        """A JSON-ready summary of the layout, pinning and where the weights are."""
        buffers = []
        for bucket in self._buckets:
            memory = None if bucket.host is None else _engine_memory(bucket.host.untyped_storage())
            buffers.append(
                {
                    "nbytes": bucket.nbytes,
                    "dtypes": sorted({str(block.dtype).replace("torch.", "") for block in bucket.blocks}),
                    "pinned": bool(memory is not None and memory.pinned),
                    "adopted": bucket.adopted,
                }
            )
        pinned = sum(buffer["nbytes"] for buffer in buffers if buffer["pinned"])
        if self._released:
            location = "released"
        else:
            location = "device" if self.on_device and self.mode != "zero_copy" else "host"
        return {
            "mode": self.mode,
            "device": str(self.device),
            "location": location,
            "size_bytes": self.size_bytes,
            "host_bytes": self.host_bytes,
            "device_bytes": self.device_bytes,
            "tensors": len(self._tensors) + len(self._empties) + len(self._fallbacks),
            "blocks": len(self._blocks),
            "buckets": len(self._buckets),
            "buffers": buffers,
            "pinned_bytes": pinned,
            "pin_note": self._pin_note,
            "adopted_bytes": self._adopted_bytes,
            "fallback_tensors": len(self._fallbacks),
            "fallback_bytes": sum(f.nbytes for f in self._fallbacks),
            "untracked_tensors": len(self._untracked),
            "meta_tensors": len(self._skipped),
            "mutable": self.mutable,
        }

    def __repr__(self) -> str:
        stats = self.stats()
        return (
            f"ModelWeights(mode={self.mode!r}, device={str(self.device)!r}, location={stats['location']!r}, "
            f"size_bytes={stats['size_bytes']}, buckets={stats['buckets']})"
        )

    # ------------------------------------------------------------------ attach

    def _attach_zero_copy(self) -> None:
        """CPU without emulation: keep the tensors where they are; bring stray ones to the CPU."""
        seen: set[int] = set()
        total = 0
        with torch.inference_mode(False), torch.no_grad():
            for tensor in self._tensors:
                if tensor.device.type != "cpu":
                    tensor.data = tensor.detach().to("cpu")
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
            for fallback in self._fallbacks:
                if fallback.tensor.device.type != "cpu":
                    _install(fallback, fallback.tensor.detach().to("cpu"))
        self._zero_copy_bytes = total + sum(f.nbytes for f in self._fallbacks)

    def _attach_master(self, pin: bool | None) -> None:
        """Lay the tensors out in buckets, fill the master copy and point the model at it."""
        self._plan()
        limit = pin_limit_bytes()
        want_pin = self.device.type == "cuda" if pin is None else pin
        notes: list[str] = []
        if want_pin and self.device.type != "cuda":
            notes.append(f"the device is {self.device}, not CUDA")
            want_pin = False
        elif want_pin and not torch.cuda.is_available():
            notes.append("CUDA is not available")
            want_pin = False
        elif want_pin and limit == 0:
            notes.append(f"{PIN_LIMIT_ENV}=0")
            want_pin = False
        self._host_views = [torch.empty(0)] * len(self._tensors)
        pinning: list[concurrent.futures.Future[str | None]] = []
        # One helper thread pins buffer k+1 while this thread fills buffer k; a failed
        # cudaHostRegister leaves its error state on that thread, which ends with the executor.
        executor = concurrent.futures.ThreadPoolExecutor(1, "gpu-control-pin") if want_pin else None
        try:
            with torch.inference_mode(False), torch.no_grad():
                for bucket in self._buckets:
                    if bucket.host is None:
                        bucket.host = new_host_buffer(bucket.nbytes)
                    memory = _engine_memory(bucket.host.untyped_storage())
                    if executor is not None and memory is not None:
                        pinning.append(executor.submit(_pin, memory, self.device, limit))
                        if any(b.source is not None and b.source.device.type != "cpu" for b in bucket.blocks):
                            pinning[-1].result()  # copies from the device land in pinned memory
                    self._fill(bucket)
                for fallback in self._fallbacks:
                    if fallback.tensor.device.type != "cpu":
                        _install(fallback, fallback.tensor.detach().to("cpu"))
                for k, (tensor, _) in enumerate(self._empties):
                    if tensor.device.type != "cpu":
                        tensor.data = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype)
                    self._empties[k] = (tensor, tensor.detach())
        finally:
            if executor is not None:
                notes.extend(note for note in (future.result() for future in pinning) if note)
                executor.shutdown()
        self._host_ptrs = [view.data_ptr() for view in self._host_views]
        self._tracked = [i for i, tensor in enumerate(self._tensors) if _version_or_none(tensor) is not None]
        tracked = set(self._tracked)
        self._untracked = [i for i in range(len(self._tensors)) if i not in tracked]
        self._pin_note = "; ".join(dict.fromkeys(notes)) or None

    def _plan(self) -> None:
        """Group the tensors' byte ranges into blocks and the blocks into buckets."""
        ranges: dict[tuple[torch.device, int], list[tuple[int, int, int]]] = collections.defaultdict(list)
        storages: dict[tuple[torch.device, int], torch.UntypedStorage] = {}
        for i, tensor in enumerate(self._tensors):
            storage = tensor.untyped_storage()
            key = (storage.device, storage.data_ptr())
            storages[key] = storage
            size = tensor.element_size()
            begin = tensor.storage_offset() * size
            extent = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))
            ranges[key].append((begin, begin + extent * size, i))
        slot_begin = [0] * len(self._tensors)
        fresh: list[_Block] = []
        for key, items in ranges.items():
            storage = storages[key]
            blocks: list[_Block] = []
            end = -1
            for begin, stop, i in sorted(items):
                if begin >= end:
                    # Starting at a multiple of 16 keeps every member's offset a multiple of its itemsize.
                    blocks.append(_Block(storage, begin - begin % 16, self._tensors[i].dtype, i))
                block = blocks[-1]
                end = max(end, stop)
                block.nbytes = end - block.src_offset
                block.first = min(block.first, i)
                block.members.append(i)
                slot_begin[i] = begin
            unused = storage.nbytes() - sum(block.nbytes for block in blocks)
            if _engine_memory(storage) is not None and unused < ALIGN * len(blocks):
                self._adopt(storage, blocks)
            else:
                fresh.extend(blocks)
        self._place(fresh)
        self._blocks = [block for bucket in self._buckets for block in bucket.blocks]
        self._slot_block = [0] * len(self._tensors)
        self._view_args = [None] * len(self._tensors)  # type: ignore[list-item]
        for number, block in enumerate(self._blocks):
            for i in block.members:
                tensor = self._tensors[i]
                byte = block.offset + slot_begin[i] - block.src_offset
                size = tensor.element_size()
                assert byte % size == 0, (i, byte, size)
                self._slot_block[i] = number
                self._view_args[i] = (block.bucket, tensor.dtype, byte // size, tensor.shape, tensor.stride())

    def _adopt(self, storage: torch.UntypedStorage, blocks: list[_Block]) -> None:
        """Use an engine buffer the tensors already sit in as their master, without copying."""
        bucket = _Bucket(storage.nbytes(), adopted=_byte_view(storage, 0, storage.nbytes()))
        for block in blocks:
            block.bucket = len(self._buckets)
            block.offset = block.src_offset
            block.source = None
            bucket.blocks.append(block)
        self._buckets.append(bucket)
        self._adopted_bytes += storage.nbytes()

    def _place(self, blocks: list[_Block]) -> None:
        """Put blocks into new buckets: grouped by dtype, in model order, capped in size."""
        by_dtype: dict[torch.dtype, list[_Block]] = collections.defaultdict(list)
        for block in sorted(blocks, key=lambda b: b.first):
            by_dtype[block.dtype].append(block)
        for group in by_dtype.values():
            bucket: _Bucket | None = None
            for block in group:
                if bucket is None or (
                    bucket.nbytes and _align(bucket.nbytes) + block.nbytes > self._bucket_bytes
                ):
                    bucket = _Bucket(0)
                    self._buckets.append(bucket)
                block.bucket = len(self._buckets) - 1
                block.offset = _align(bucket.nbytes)
                bucket.nbytes = block.offset + block.nbytes
                bucket.blocks.append(block)

    def _fill(self, bucket: _Bucket) -> None:
        """Copy a bucket's blocks into its host buffer and point their tensors at it."""
        assert bucket.host is not None
        devices: set[torch.device] = set()
        for block in bucket.blocks:
            if block.source is None:
                continue
            source = _byte_view(block.source, block.src_offset, block.nbytes)
            if source.device.type != "cpu":
                devices.add(source.device)
            bucket.host[block.offset : block.offset + block.nbytes].copy_(source, non_blocking=True)
            block.source = None
        for device in devices:
            _synchronize(device)
        storage = bucket.host.untyped_storage()
        for block in bucket.blocks:
            for i in block.members:
                _, dtype, offset, size, stride = self._view_args[i]
                view = torch.empty(0, dtype=dtype).set_(storage, offset, size, stride)
                self._tensors[i].data = view
                self._host_views[i] = view

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

    def _copy_back(self) -> tuple[int, int]:
        """Copy blocks that changed on the device into the master; returns (bytes, copies)."""
        tensors = self._tensors
        if self.mutable:
            changed = set(range(len(self._blocks)))
        else:
            changed = {self._slot_block[i] for i in self._untracked}
            slot_block = self._slot_block
            for i, version in zip(self._tracked, self._versions):
                if tensors[i]._version != version:
                    changed.add(slot_block[i])
        replaced = [i for i, ptr in enumerate(self._device_ptrs) if tensors[i].data_ptr() != ptr]
        copied = copies = 0
        if changed:
            per_bucket: dict[int, list[_Block]] = collections.defaultdict(list)
            for b in changed:
                per_bucket[self._blocks[b].bucket].append(self._blocks[b])
            for index, blocks in per_bucket.items():
                bucket = self._buckets[index]
                assert bucket.host is not None and bucket.device is not None
                nbytes = sum(block.nbytes for block in blocks)
                if nbytes >= _WHOLE_BUCKET * bucket.nbytes:
                    bucket.host.copy_(bucket.device, non_blocking=True)
                    copied += bucket.nbytes
                    copies += 1
                    continue
                for block in blocks:
                    span = slice(block.offset, block.offset + block.nbytes)
                    bucket.host[span].copy_(bucket.device[span], non_blocking=True)
                    copied += block.nbytes
                    copies += 1
        for i in replaced:
            copied += self._copy_replaced(i, self._host_views[i])
            copies += 1
        return copied, copies

    def _copy_replaced(self, i: int, target: torch.Tensor) -> int:
        """Copy tensor ``i``, whose storage was swapped by the user, into ``target``."""
        tensor = self._tensors[i]
        if tensor.shape != target.shape or tensor.dtype != target.dtype:
            raise TransferError(
                f"A weight of shape {tuple(target.shape)} ({target.dtype}) was replaced by one of shape "
                f"{tuple(tensor.shape)} ({tensor.dtype}) after attach; attach the model again."
            )
        target.copy_(tensor.detach(), non_blocking=True)
        return target.numel() * target.element_size()

    def _sync_host_replacements(self) -> int:
        """Before a restore: copy into the master any tensor the user re-pointed while cached."""
        copied = 0
        with torch.inference_mode(False), torch.no_grad():
            for i, (tensor, ptr) in enumerate(zip(self._tensors, self._host_ptrs)):
                if tensor.data_ptr() != ptr:
                    copied += self._copy_replaced(i, self._host_views[i])
                    tensor.data = self._host_views[i]
        return copied

    def _point_to_host(self) -> None:
        """Pointer swap: every tensor back to its master view (no copy)."""
        for tensor, view in zip(self._tensors, self._host_views):
            tensor.data = view
        for tensor, host in self._empties:
            tensor.data = host
        for fallback in self._fallbacks:
            if fallback.host is not None:
                _install(fallback, fallback.host)
                fallback.host = None

    def _drop_device(self) -> None:
        """Forget the device buffers, keeping weak references to check they are freed."""
        for bucket in self._buckets:
            if bucket.device is not None:
                self._retired.append((StorageWeakRef(bucket.device.untyped_storage()), bucket.nbytes))
                bucket.device = None
        self._versions = []
        self._device_ptrs = []
        self._resident = False

    @staticmethod
    def _alive(refs: list[tuple[StorageWeakRef, int]]) -> int:
        refs[:] = [(ref, nbytes) for ref, nbytes in refs if not ref.expired()]
        return sum(nbytes for _, nbytes in refs)

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
