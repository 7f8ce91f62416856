"""The recommended first load: a safetensors checkpoint read straight into the host master copy.

A model built on the ``meta`` device costs nothing to construct (no random initialisation of
weights that are about to be overwritten). `load_safetensors` then reads the file with large
parallel ``preadv`` calls directly into engine host buffers (anonymous memory, laid out the
way the transfer engine wants: 256-byte aligned, a few large buffers) and points the model's
parameters and buffers at them. When the manager attaches the model, the engine finds the
tensors already in its own buffers and keeps them as the master copy: the bytes are read
from disk once and never copied on the host again. (Copying straight from a memory-mapped
file to the GPU can be many times slower than from anonymous memory, and ``torch.load``
reads everything through a zip reader and copies it at least once more.)

    def load_model():
        with torch.device("meta"):
            model = MyModel()
        load_safetensors(model, "weights.safetensors")
        return model

    manager = GPUResourceManager(load_func=load_model)

Tied weights (one parameter object under several names) stay tied. A tensor whose dtype in
the file differs from the model's is converted to the model's dtype (counted in the result).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import LoadError
from .weights import ALIGN, DEFAULT_BUCKET_BYTES, _entries, new_host_buffer

__all__ = ["CheckpointLoad", "load_safetensors", "read_safetensors_header"]

_DTYPES = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U8": "uint8",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
        "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "C64": "complex64",
    }.items()
    if hasattr(torch, attr)
}
_MAX_HEADER = 100 * 2**20  # the format's own limit
_CHUNK = 64 * 2**20  # bytes per read call; big enough for full disk speed, small enough to spread
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)  # buffers per preadv


@dataclass(frozen=True)
class CheckpointLoad:
    """What `load_safetensors` did.

    Attributes:
        path: the file read.
        tensors: model tensors filled from it (a tied tensor once).
        bytes_read: bytes of tensor data read.
        seconds: wall time.
        converted: tensors whose dtype in the file differed from the model's.
        missing: state-dict names the file lacks (their tensors were left as they were).
        unexpected: names in the file the model has no tensor for.
    """

    path: str
    tensors: int
    bytes_read: int
    seconds: float
    converted: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]


@dataclass(frozen=True)
class _Stored:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, _Stored]:
    """Read and check the header of a safetensors file.

    Returns:
        Each tensor's dtype, shape and absolute byte range in the file.

    Raises:
        LoadError: the file is not a valid safetensors file.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) != 8:
            raise LoadError(f"{path} is not a safetensors file: it is shorter than 8 bytes.")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER or 8 + length > size:
            raise LoadError(f"{path} is not a safetensors file: its header length ({length}) is impossible.")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LoadError(f"{path} is not a safetensors file: its header is not JSON ({error}).") from None
    if not isinstance(header, dict):
        raise LoadError(f"{path} is not a safetensors file: its header is not a JSON object.")
    start = 8 + length
    stored: dict[str, _Stored] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise LoadError(
                f"{path}: the header entry for {name!r} is malformed or has an unknown dtype."
            ) from None
        numel = 1
        for n in shape:
            numel *= n
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if begin < 0 or end - begin != numel * itemsize or start + end > size:
            raise LoadError(
                f"{path}: the byte range of {name!r} does not match its shape or lies past the end."
            )
        stored[name] = _Stored(dtype, shape, start + begin, start + end)
    return stored


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride = []
    step = 1
    for n in reversed(shape):
        stride.append(step)
        step *= max(n, 1)
    return tuple(reversed(stride))


def _read_into(fd: int, views: list[memoryview], offset: int) -> None:
    """Fill ``views`` from the file, in order, starting at ``offset`` (one scatter read)."""
    while views:
        count = os.preadv(fd, views, offset)
        if count == 0:
            raise LoadError("The checkpoint file ended early (truncated or still being written).")
        offset += count
        while views and count >= len(views[0]):
            count -= len(views[0])
            views = views[1:]
        if views and count:
            views = [views[0][count:], *views[1:]]


def _read_jobs(pieces: list[tuple[int, memoryview]]) -> list[tuple[list[memoryview], int]]:
    """Group (file offset, destination) pieces into scatter reads of up to _CHUNK bytes.

    Neighbouring tensors in the file become one ``preadv`` into their separate destinations,
    so small tensors do not cost a system call each and the disk sees large sequential reads.
    """
    split = [
        (at + step, view[step : step + _CHUNK]) for at, view in pieces for step in range(0, len(view), _CHUNK)
    ]
    jobs: list[tuple[list[memoryview], int]] = []
    end = -1
    size = 0
    for at, view in sorted(split, key=lambda piece: piece[0]):
        if jobs and at == end and size + len(view) <= _CHUNK and len(jobs[-1][0]) < _IOV_MAX:
            jobs[-1][0].append(view)
            size += len(view)
        else:
            jobs.append(([view], at))
            size = len(view)
        end = at + len(view)
    return jobs


def load_safetensors(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    workers: int | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> CheckpointLoad:
    """Fill ``model``'s parameters and buffers from a safetensors file, in engine host buffers.

    The model may be built on the ``meta`` device (recommended) or on the CPU. Parameters keep
    their identity where possible (a meta parameter is replaced by a new ``nn.Parameter`` in
    every module that holds it, so ties are kept).

    Args:
        model: the module to fill.
        path: the ``.safetensors`` file.
        strict: fail when the file lacks a state-dict name or holds one the model lacks.
        workers: parallel readers (default: up to 8, one per CPU).
        bucket_bytes: the largest host buffer.

    Returns:
        What was read, how long it took, what was converted, missing or unexpected.

    Raises:
        LoadError: the file is invalid, a shape differs, names differ (``strict``), or a
            tensor is left on the meta device with no data.
    """
    start = time.perf_counter()
    stored = read_safetensors_header(path)
    state = model.state_dict(keep_vars=True)
    owners = {id(entry.tensor): entry.owners for entry in _entries([model])}
    targets: dict[int, tuple[torch.Tensor, str]] = {}
    for name, tensor in state.items():
        if name in stored and id(tensor) not in targets:
            targets[id(tensor)] = (tensor, name)
    missing = tuple(name for name, tensor in state.items() if id(tensor) not in targets)
    unexpected = tuple(name for name in stored if name not in state)
    if strict and (missing or unexpected):
        raise LoadError(
            f"{path} does not match the model: missing {list(missing) or 'nothing'}, "
            f"unexpected {list(unexpected) or 'nothing'} (pass strict=False to load what matches)."
        )
    plan = sorted(targets.values(), key=lambda item: stored[item[1]].begin)
    for tensor, name in plan:
        if tuple(tensor.shape) != stored[name].shape:
            raise LoadError(
                f"{path}: {name!r} has shape {list(stored[name].shape)} in the file but "
                f"{list(tensor.shape)} in the model."
            )

    placed: list[tuple[torch.Tensor, str, int, int]] = []  # tensor, name, buffer, byte offset
    sizes: list[int] = []
    for tensor, name in plan:
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            placed.append((tensor, name, -1, 0))
            continue
        offset = (sizes[-1] + ALIGN - 1) // ALIGN * ALIGN if sizes else 0
        if not sizes or (sizes[-1] and offset + nbytes > bucket_bytes):
            sizes.append(0)
            offset = 0
        sizes[-1] = offset + nbytes
        placed.append((tensor, name, len(sizes) - 1, offset))
    buffers = [new_host_buffer(n) for n in sizes]
    memory = [memoryview(buffer.numpy()) for buffer in buffers]

    pieces: list[tuple[int, memoryview]] = []
    staged: list[tuple[int, torch.Tensor]] = []  # index into placed, raw file bytes to convert
    for k, (tensor, name, index, offset) in enumerate(placed):
        info = stored[name]
        if index < 0:
            continue
        if info.dtype == tensor.dtype:
            pieces.append((info.begin, memory[index][offset : offset + info.end - info.begin]))
        else:
            raw = torch.empty(info.end - info.begin, dtype=torch.uint8)
            staged.append((k, raw))
            pieces.append((info.begin, memoryview(raw.numpy())))
    jobs = _read_jobs(pieces)
    count = workers or min(8, os.cpu_count() or 1)
    fd = os.open(path, os.O_RDONLY)
    try:
        if count == 1:
            for views, at in jobs:
                _read_into(fd, views, at)
        else:
            with concurrent.futures.ThreadPoolExecutor(count, "gpu-control-read") as pool:
                for future in [pool.submit(_read_into, fd, views, at) for views, at in jobs]:
                    future.result()
    finally:
        os.close(fd)
    del memory, pieces, jobs

    raws = dict(staged)
    with torch.inference_mode(False), torch.no_grad():
        for k, (tensor, name, index, offset) in enumerate(placed):
            info = stored[name]
            if index < 0:
                value = torch.empty(info.shape, dtype=tensor.dtype)
            else:
                size = tensor.element_size()
                value = torch.empty(0, dtype=tensor.dtype).set_(
                    buffers[index].untyped_storage(),
                    offset // size,
                    info.shape,
                    _contiguous_stride(info.shape),
                )
                if k in raws:
                    value.copy_(raws[k].view(info.dtype).view(info.shape))
            _put(tensor, value, owners.get(id(tensor), []))
    still_meta = _meta_names(model)
    if still_meta:
        raise LoadError(
            f"{path} leaves {len(still_meta)} tensor(s) on the meta device with no data: {still_meta[:8]}. "
            "Create tensors that are not in the checkpoint (non-persistent buffers) on the CPU."
        )
    return CheckpointLoad(
        path=str(path),
        tensors=sum(1 for _, _, index, _ in placed if index >= 0),
        bytes_read=sum(stored[name].end - stored[name].begin for _, name, _, _ in placed),
        seconds=time.perf_counter() - start,
        converted=len(staged),
        missing=missing,
        unexpected=unexpected,
    )


def _meta_names(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers still on the meta device."""
    names = [name for name, tensor in model.named_parameters() if tensor.is_meta]
    return names + [name for name, tensor in model.named_buffers() if tensor.is_meta]


def _put(tensor: torch.Tensor, value: torch.Tensor, owners: list[tuple[nn.Module, str, str]]) -> None:
    """Make ``tensor`` hold ``value``: in place when allowed, else in every module slot holding it."""
    if not tensor.is_meta and torch._has_compatible_shallow_copy_type(tensor, value):
        tensor.data = value
        return
    replacement: torch.Tensor = value
    if isinstance(tensor, nn.Parameter):
        replacement = nn.Parameter(value, requires_grad=tensor.requires_grad)
    for module, kind, name in owners:
        getattr(module, kind)[name] = replacement
