"""The layout of the host master copy: blocks of bytes, grouped into buckets.

A *block* is a run of bytes that one or more tensors of the model view (tensors that share
memory share a block); a *bucket* is one master buffer on the host and, while the weights are
resident, its twin on the device. `_Layout` groups the tensors' byte ranges into blocks, puts
the blocks into buckets (one run per dtype, in model order, each block at a 256-byte aligned
offset, no bucket past ``bucket_bytes`` unless one tensor is bigger) and records where each
tensor's view starts. A storage that already is a whole engine host buffer is adopted as a
bucket as it is, without copying.
"""

from __future__ import annotations

import collections

import torch

from .host_buffers import _engine_memory

DEFAULT_BUCKET_BYTES = 1 << 30  # largest master buffer; a bigger tensor gets a buffer of its own
ALIGN = 256  # byte alignment of every block in a buffer (vectorised kernels want >= 16)


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


class _Layout:
    """Where a model's tensors go in the master copy; built once, at attach.

    Attributes:
        buckets: the master buffers, adopted ones with their host buffer already set.
        blocks: every block, in bucket order.
        slot_block: for each tensor, the index of its block in ``blocks``.
        view_args: for each tensor, (bucket index, dtype, element offset, shape, stride).
        adopted_bytes: bytes of engine host buffers reused without copying.
    """

    def __init__(self, tensors: list[torch.Tensor], bucket_bytes: int) -> None:
        self.buckets: list[_Bucket] = []
        self.adopted_bytes = 0
        self._bucket_bytes = bucket_bytes
        ranges: dict[tuple[torch.device, int], list[tuple[int, int, int]]] = collections.defaultdict(list)
        storages: dict[tuple[torch.device, int], torch.UntypedStorage] = {}
        for i, tensor in enumerate(tensors):
            storage = tensor.untyped_storage()
            key = (storage.device, storage.data_ptr())
            storages[key] = storage
            size = tensor.element_size()
            begin = tensor.storage_offset() * size
            extent = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))
            ranges[key].append((begin, begin + extent * size, i))
        slot_begin = [0] * len(tensors)
        fresh: list[_Block] = []
        for key, items in ranges.items():
            storage = storages[key]
            blocks: list[_Block] = []
            end = -1
            for begin, stop, i in sorted(items):
                if begin >= end:
                    # Starting at a multiple of 16 keeps every member's offset a multiple of its itemsize.
                    blocks.append(_Block(storage, begin - begin % 16, tensors[i].dtype, i))
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
        self.blocks = [block for bucket in self.buckets for block in bucket.blocks]
        self.slot_block = [0] * len(tensors)
        self.view_args = [None] * len(tensors)  # type: ignore[list-item]
        for number, block in enumerate(self.blocks):
            for i in block.members:
                tensor = tensors[i]
                byte = block.offset + slot_begin[i] - block.src_offset
                size = tensor.element_size()
                assert byte % size == 0, (i, byte, size)
                self.slot_block[i] = number
                self.view_args[i] = (block.bucket, tensor.dtype, byte // size, tensor.shape, tensor.stride())

    def _adopt(self, storage: torch.UntypedStorage, blocks: list[_Block]) -> None:
        """Use an engine buffer the tensors already sit in as their master, without copying."""
        bucket = _Bucket(storage.nbytes(), adopted=_byte_view(storage, 0, storage.nbytes()))
        for block in blocks:
            block.bucket = len(self.buckets)
            block.offset = block.src_offset
            block.source = None
            bucket.blocks.append(block)
        self.buckets.append(bucket)
        self.adopted_bytes += storage.nbytes()

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
                    self.buckets.append(bucket)
                block.bucket = len(self.buckets) - 1
                block.offset = _align(bucket.nbytes)
                bucket.nbytes = block.offset + block.nbytes
                bucket.blocks.append(block)
