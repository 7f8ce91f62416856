"""The host side of `gpu_control.weights.ModelWeights`: the master copy and its bookkeeping.

`_MasterCopy` is the base class the mover builds on. It sorts a model's tensors at attach
(meta tensors skipped, unusual ones set aside as fallbacks, empty ones kept apart), lays the
rest out in buckets and fills the master copy with them, pinning each buffer through the
function it is given while the next one fills (the pinning policy lives in
``gpu_control.weights``). It reports sizes, where a tensor lies and a JSON-ready summary, and
holds the move internals the mover calls: the copy-back of what changed on the device (see
"What change detection trusts" in ``gpu_control.weights``), the pointer swap back to the
master and the retiring of device buffers behind weak references.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Callable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from .errors import InvalidSetting, TransferError
from .host_buffers import PIN_LIMIT_ENV, _engine_memory, _HostMemory, new_host_buffer
from .model_tensors import (
    _entries,
    _Entry,
    _Fallback,
    _install,
    _unusual,
    _version_or_none,
    find_modules,
)
from .weight_layout import DEFAULT_BUCKET_BYTES, _Block, _Bucket, _byte_view, _Layout, _synchronize

_WHOLE_BUCKET = 0.5  # copy a whole buffer back when this share of it changed


class _MasterCopy:
    """A model's tensors, their layout and the host master copy; the base of ModelWeights."""

    def __init__(
        self,
        model: Any,
        device: torch.device,
        *,
        mutable: bool = False,
        emulate_device: bool = False,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
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

    # ------------------------------------------------------------------ checks

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

    def _attach_master(
        self,
        pin: bool | None,
        limit: int,
        pin_buffer: Callable[[_HostMemory, torch.device, int], str | None],
    ) -> None:
        """Lay the tensors out in buckets, fill the master copy and point the model at it.

        ``limit`` is the pinned-memory budget; ``pin_buffer`` page-locks one buffer.
        """
        layout = _Layout(self._tensors, self._bucket_bytes)
        self._buckets, self._blocks = layout.buckets, layout.blocks
        self._slot_block, self._view_args = layout.slot_block, layout.view_args
        self._adopted_bytes = layout.adopted_bytes
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
                        pinning.append(executor.submit(pin_buffer, memory, self.device, limit))
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

    # ------------------------------------------------------------------ moves, internals

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
