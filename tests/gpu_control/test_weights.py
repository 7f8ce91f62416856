"""The transfer engine on the CPU: real copies through the emulated device.

``attach(..., emulate_device=True)`` keeps a second set of CPU buffers as the "device" side,
so buckets, change detection, copy-back, pointer swaps and leak checks all run for real.
"""

from __future__ import annotations

import functools
import gc
import logging

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from gpu_control import GPUResourceManager, InvalidSetting, OutOfMemory, TransferError, attach
from gpu_control import weights as engine
from gpu_control.weights import find_modules, pin_limit_bytes

CPU = torch.device("cpu")
emulated = functools.partial(attach, emulate_device=True)


class Mixed(nn.Module):
    """fp32, fp16 and bf16 weights, integer and bool buffers, a tied weight and an alias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 32).to(torch.bfloat16)
        self.lin = nn.Linear(32, 32).half()
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 50, bias=False).to(torch.bfloat16)
        self.head.weight = self.emb.weight  # tied: one Parameter under two names
        self.register_buffer("steps", torch.arange(7))
        self.register_buffer("mask", torch.rand(9) > 0.5)
        self.register_buffer("gain_tail", self.norm.weight.data[8:16])  # aliases norm.weight's memory


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name].cpu(), tensor), name


def buffer_of(weights: engine.ModelWeights, dtype: str) -> int:
    """Bytes of the one master buffer holding ``dtype``."""
    (nbytes,) = [b["nbytes"] for b in weights.stats()["buffers"] if b["dtypes"] == [dtype]]
    return nbytes


# ---------------------------------------------------------------------------- round trips


def test_round_trips_preserve_every_value_and_dtype() -> None:
    model = Mixed()
    expected = snapshot(model)
    weights = emulated(model, CPU)
    for _ in range(3):
        weights.to_device()
        assert all(weights.where(t) == "device" for t in model.state_dict().values())
        assert_same(model, expected)
        weights.to_host()
        assert all(weights.where(t) == "host" for t in model.state_dict().values())
        assert_same(model, expected)


def test_restore_is_one_copy_per_master_buffer_grouped_by_dtype() -> None:
    model = Mixed()
    weights = emulated(model, CPU)
    buffers = weights.stats()["buffers"]
    assert sorted(d for b in buffers for d in b["dtypes"]) == [
        "bfloat16",
        "bool",
        "float16",
        "float32",
        "int64",
    ]
    assert all(len(b["dtypes"]) == 1 for b in buffers)

    transfer = weights.to_device()

    assert transfer.copies == len(buffers)
    assert (
        transfer.bytes_copied
        == weights.host_bytes
        == weights.device_bytes
        == sum(b["nbytes"] for b in buffers)
    )


def test_size_counts_tied_and_aliased_memory_once() -> None:
    model = Mixed()
    weights = emulated(model, CPU)
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    gain_tail = model.gain_tail
    expected = sum(t.nbytes for t in unique.values()) - gain_tail.nbytes  # gain_tail lies inside norm.weight
    assert weights.size_bytes == expected
    assert weights.stats()["tensors"] == len(unique)


def test_tied_and_aliased_weights_stay_tied_through_round_trips() -> None:
    model = Mixed()
    weights = emulated(model, CPU)
    for _ in range(2):
        weights.to_device()
        assert model.head.weight is model.emb.weight
        assert model.gain_tail.data_ptr() == model.norm.weight.data_ptr() + 8 * 4
        with torch.no_grad():
            model.norm.weight[8] = 5.0
        assert model.gain_tail[0].item() == 5.0
        weights.to_host()
        assert model.gain_tail.data_ptr() == model.norm.weight.data_ptr() + 8 * 4
        assert model.gain_tail[0].item() == 5.0


def test_buffer_cap_splits_the_master_and_a_big_tensor_gets_its_own_buffer() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 12), nn.Linear(12, 12))
    expected = snapshot(model)
    weights = emulated(model, CPU, bucket_bytes=4096)

    sizes = [b["nbytes"] for b in weights.stats()["buffers"]]
    transfer = weights.to_device()

    # 16 KiB weight alone (over the cap); bias 256 B + weight 3 KiB + bias 48 B at 256-byte
    # aligned offsets (3376 B); the last weight would cross 4 KiB, so it opens a third buffer.
    assert sizes == [16384, 256 + 3072 + 48, 768 + 48]
    assert transfer.copies == 3
    weights.to_host()
    assert_same(model, expected)


# ---------------------------------------------------------------------------- change detection


def test_unchanged_offload_copies_nothing_and_frees_the_device_side() -> None:
    model = Mixed()
    weights = emulated(model, CPU)
    weights.to_device()
    device_ref = StorageWeakRef(model.lin.weight.untyped_storage())

    transfer = weights.to_host()

    assert (transfer.bytes_copied, transfer.copies) == (0, 0)
    assert weights.device_bytes == 0
    assert device_ref.expired()
    assert weights.leaked_bytes() == 0


def test_an_in_place_change_on_the_device_survives_offload_and_only_its_block_is_copied() -> None:
    model = Mixed()
    weights = emulated(model, CPU)
    weights.to_device()
    with torch.no_grad():
        model.lin.bias.add_(1)
    expected = snapshot(model)

    transfer = weights.to_host()

    assert (transfer.bytes_copied, transfer.copies) == (model.lin.bias.nbytes, 1)
    assert_same(model, expected)
    weights.to_device()
    assert_same(model, expected)
    assert weights.to_host().bytes_copied == 0


def test_a_mostly_changed_buffer_is_copied_back_whole() -> None:
    model = Mixed()
    weights = emulated(model, CPU)
    weights.to_device()
    with torch.no_grad():
        model.lin.weight.mul_(2)  # 2 KiB of the 2.3 KiB fp16 buffer
    expected = snapshot(model)

    transfer = weights.to_host()

    assert (transfer.bytes_copied, transfer.copies) == (buffer_of(weights, "float16"), 1)
    assert_same(model, expected)


def test_changes_made_in_inference_mode_are_seen() -> None:
    model = Mixed()
    weights = emulated(model, CPU)
    weights.to_device()
    with torch.inference_mode():
        model.norm.bias.fill_(3.0)

    transfer = weights.to_host()

    assert transfer.bytes_copied > 0
    assert torch.equal(model.norm.bias, torch.full((32,), 3.0))


def test_writes_through_data_escape_tracking_unless_declared_mutable() -> None:
    model = Mixed()
    weights = emulated(model, CPU)
    original = model.norm.bias.detach().clone()
    weights.to_device()
    model.norm.bias.data.add_(1)  # .data does not bump the version counter
    assert weights.to_host().bytes_copied == 0
    assert torch.equal(model.norm.bias, original)  # the documented trust boundary

    weights.mutable = True
    weights.to_device()
    model.norm.bias.data.add_(1)
    transfer = weights.to_host()
    assert transfer.bytes_copied == weights.host_bytes
    assert torch.equal(model.norm.bias, original + 1)


def test_mutable_attach_copies_everything_back_at_every_offload() -> None:
    model = Mixed()
    weights = emulated(model, CPU, mutable=True)
    for _ in range(2):
        weights.to_device()
        transfer = weights.to_host()
        assert transfer.bytes_copied == weights.host_bytes
        assert transfer.copies == len(weights.stats()["buffers"])


def test_a_weight_replaced_on_the_device_is_copied_back() -> None:
    model = Mixed()
    weights = emulated(model, CPU)
    weights.to_device()
    model.lin.bias.data = torch.full((32,), 7.0, dtype=torch.float16)

    transfer = weights.to_host()

    assert transfer.bytes_copied == 64
    assert weights.where(model.lin.bias) == "host"
    assert torch.equal(model.lin.bias, torch.full((32,), 7.0, dtype=torch.float16))


def test_a_weight_replaced_while_cached_is_restored_with_its_new_value() -> None:
    model = Mixed()
    weights = emulated(model, CPU)
    model.lin.bias.data = torch.full((32,), 4.0, dtype=torch.float16)

    weights.to_device()

    assert weights.where(model.lin.bias) == "device"
    assert torch.equal(model.lin.bias, torch.full((32,), 4.0, dtype=torch.float16))
    weights.to_host()
    assert torch.equal(model.lin.bias, torch.full((32,), 4.0, dtype=torch.float16))


def test_a_weight_replaced_by_another_shape_fails_the_offload_and_stays_on_the_device() -> None:
    model = Mixed()
    weights = emulated(model, CPU)
    weights.to_device()
    model.lin.bias.data = torch.zeros(3, dtype=torch.float16)

    with pytest.raises(TransferError, match="attach the model again"):
        weights.to_host()
    assert weights.device_bytes > 0
    assert weights.where(model.lin.weight) == "device"


def test_tensors_made_under_inference_mode_are_copied_back_every_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with torch.inference_mode():
        model = nn.Linear(16, 16)
    caplog.set_level(logging.WARNING, logger="gpu_control.weights")
    weights = emulated(model, CPU)
    assert weights.stats()["untracked_tensors"] == 2
    assert any("inference_mode" in r.getMessage() for r in caplog.records)

    weights.to_device()
    assert weights.to_host().bytes_copied == weights.host_bytes


# ---------------------------------------------------------------------------- finding tensors


class Pipeline:
    """A diffusers-style object: components in attributes, a dict and a list, one shared."""

    def __init__(self) -> None:
        self.text_encoder = nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 16))
        self.unet = nn.Sequential(nn.Conv2d(4, 8, 3), nn.GroupNorm(2, 8)).half()
        self.components = {"vae": nn.Conv2d(8, 4, 1), "text_encoder": self.text_encoder}
        self.adapters = [nn.Linear(16, 4, bias=False), (self.unet,)]
        self.scheduler = {"sigmas": torch.linspace(1, 0, 10), "name": "euler"}
        self.tokenizer = {"vocab": {f"w{i}": i for i in range(100)}}
        self.itself = self  # a cycle


def test_a_pipeline_object_is_found_through_attributes_dicts_and_lists() -> None:
    pipe = Pipeline()
    modules = find_modules(pipe)
    assert modules == [pipe.text_encoder, pipe.unet, pipe.components["vae"], pipe.adapters[0]]

    weights = emulated(pipe, CPU)
    params = {id(p): p for m in modules for p in m.parameters()}
    assert weights.stats()["tensors"] == len(params) == 10
    expected = {k: p.detach().clone() for k, p in params.items()}

    weights.to_device()
    assert all(weights.where(p) == "device" for p in params.values())
    assert pipe.components["text_encoder"][1].weight is pipe.text_encoder[1].weight
    assert weights.where(pipe.scheduler["sigmas"]) is None  # loose tensors are not the model's
    weights.to_host()
    assert all(torch.equal(p, expected[k]) for k, p in params.items())


def test_find_modules_yields_a_module_itself_and_nothing_for_plain_data() -> None:
    model = nn.Linear(2, 2)
    assert find_modules(model) == [model]
    assert find_modules({"a": [1, "b", None], "t": torch.ones(2)}) == []


# ---------------------------------------------------------------------------- unusual tensors


class Tagged(torch.Tensor):
    """A tensor subclass the engine cannot put in a byte buffer."""


class WithUnusual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("tagged", torch.arange(6.0).as_subclass(Tagged))
        self.register_buffer("sparse", torch.eye(4).to_sparse())


def test_unusual_tensors_fall_back_to_a_plain_move_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gpu_control.weights")
    model = WithUnusual()
    host_tagged = model.tagged.data_ptr()
    weights = emulated(model, CPU)
    stats = weights.stats()
    assert (stats["fallback_tensors"], stats["tensors"]) == (2, 4)

    for _ in range(2):
        transfer = weights.to_device()
        assert transfer.copies == len(stats["buffers"]) + 2
        assert type(model.tagged) is Tagged and model.tagged.data_ptr() != host_tagged  # a real copy
        weights.to_host()
        assert model.tagged.data_ptr() == host_tagged  # unchanged: the host original again
    logged = [r for r in caplog.records if "plain .to()" in r.getMessage()]
    assert len(logged) == 1 and "tensor subclass Tagged (1)" in logged[0].getMessage()
    assert "sparse_coo (1)" in logged[0].getMessage()
    assert torch.equal(model.tagged, torch.arange(6.0))
    assert torch.equal(model.sparse.to_dense(), torch.eye(4))


def test_an_unusual_tensor_changed_on_the_device_is_copied_back() -> None:
    model = WithUnusual()
    weights = emulated(model, CPU)
    weights.to_device()
    model.tagged.add_(1)

    transfer = weights.to_host()

    assert transfer.bytes_copied == model.tagged.nbytes
    assert type(model.tagged) is Tagged
    assert torch.equal(model.tagged, torch.arange(6.0) + 1)


def test_meta_tensors_are_left_where_they_are() -> None:
    model = nn.Linear(4, 4)
    model.register_buffer("placeholder", torch.empty(3, device="meta"))
    weights = emulated(model, CPU)
    assert weights.stats()["meta_tensors"] == 1
    weights.to_device()
    weights.to_host()
    assert model.placeholder.is_meta


# ---------------------------------------------------------------------------- freeing


def test_a_device_alias_held_outside_is_reported_as_leaked_until_dropped() -> None:
    model = Mixed()
    weights = emulated(model, CPU)
    weights.to_device()
    alias = model.lin.weight.data  # shares the device buffer, unlike the Parameter itself

    weights.to_host()

    assert weights.leaked_bytes() == buffer_of(weights, "float16")
    del alias
    assert weights.leaked_bytes() == 0


def test_release_frees_the_master_copy() -> None:
    model = Mixed()
    weights = emulated(model, CPU)
    weights.to_device()
    weights.to_host()
    master = StorageWeakRef(model.lin.weight.untyped_storage())
    held = weights.host_bytes

    weights.release()
    assert weights.host_bytes == 0
    assert weights.leaked_host_bytes() == held  # the test still holds the model, which points at it
    del model
    gc.collect()

    assert master.expired()
    assert weights.leaked_host_bytes() == 0


def test_release_from_the_device_drops_device_memory_even_while_the_model_is_held() -> None:
    model = Mixed()
    expected = snapshot(model)
    weights = emulated(model, CPU)
    weights.to_device()
    device_ref = StorageWeakRef(model.lin.weight.untyped_storage())

    transfer = weights.release()

    assert transfer.bytes_copied == 0
    assert device_ref.expired() and weights.leaked_bytes() == 0
    assert_same(model, expected)  # the held model points at the (now unmanaged) master copy
    with pytest.raises(TransferError, match="released"):
        weights.to_device()


def test_a_failed_restore_frees_partial_copies_and_leaves_everything_on_the_host() -> None:
    model = Mixed()
    expected = snapshot(model)
    weights = emulated(model, CPU)
    allocated: list[StorageWeakRef] = []
    real_allocate = weights._allocate

    def allocate_then_run_out(nbytes: int) -> torch.Tensor:
        if len(allocated) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        buffer = real_allocate(nbytes)
        allocated.append(StorageWeakRef(buffer.untyped_storage()))
        return buffer

    weights._allocate = allocate_then_run_out
    with pytest.raises(torch.cuda.OutOfMemoryError):
        weights.to_device()

    assert all(ref.expired() for ref in allocated)
    assert weights.device_bytes == 0
    assert all(weights.where(t) == "host" for t in model.state_dict().values())
    assert_same(model, expected)
    del weights._allocate
    weights.to_device()
    assert_same(model, expected)


def test_a_failure_after_the_tensors_were_pointed_at_the_device_puts_them_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = Mixed()
    model.register_buffer("tagged", torch.arange(3.0).as_subclass(Tagged))
    expected = snapshot(model)
    weights = emulated(model, CPU)

    def failed_copy(device: torch.device) -> None:
        raise RuntimeError("an asynchronous copy failed (simulated)")

    monkeypatch.setattr(engine, "_synchronize", failed_copy)
    with pytest.raises(RuntimeError, match="simulated"):
        weights.to_device()

    assert weights.device_bytes == 0
    assert weights.where(model.lin.weight) == "host"
    assert type(model.tagged) is Tagged
    assert_same(model, expected)
    monkeypatch.undo()
    weights.to_device()
    assert weights.where(model.lin.weight) == "device"


# ---------------------------------------------------------------------------- devices and pinning


def test_a_cpu_device_without_emulation_copies_nothing() -> None:
    model = Mixed()
    pointers = [t.data_ptr() for t in model.state_dict().values()]
    weights = attach(model, CPU)

    restore = weights.to_device()
    offload = weights.to_host()

    assert (restore.bytes_copied, offload.bytes_copied) == (0, 0)
    assert [t.data_ptr() for t in model.state_dict().values()] == pointers
    assert weights.stats()["mode"] == "zero_copy"
    assert weights.host_bytes == weights.size_bytes > 0 and weights.device_bytes == 0


def test_emulation_needs_a_cpu_device() -> None:
    with pytest.raises(InvalidSetting, match="emulate_device needs a CPU device"):
        attach(nn.Linear(2, 2), torch.device("cuda", 0), emulate_device=True)


def test_asking_to_pin_without_cuda_stays_pageable_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gpu_control.weights")
    weights = emulated(Mixed(), CPU, pin=True)
    assert weights.stats()["pinned_bytes"] == 0
    assert weights.stats()["pin_note"] == "the device is cpu, not CUDA"
    assert any("pageable: the device is cpu, not CUDA" in r.getMessage() for r in caplog.records)


def test_pinning_respects_the_budget_and_returns_it_when_the_buffer_dies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registered: list[tuple[int, int]] = []
    monkeypatch.setattr(engine, "_register", lambda ptr, n, device: registered.append((ptr, n)))
    before = engine._PINNED.used
    first = engine.new_host_buffer(3000)
    second = engine.new_host_buffer(3000)
    memory = engine._engine_memory(first.untyped_storage())
    other = engine._engine_memory(second.untyped_storage())
    assert memory is not None and other is not None

    assert engine._pin(memory, CPU, limit=before + 4096) is None
    assert "budget is used up" in (engine._pin(other, CPU, limit=before + 4096) or "")
    assert registered == [(first.data_ptr(), 3000)]
    assert engine._PINNED.used == before + 3000

    del first, memory
    gc.collect()
    assert engine._PINNED.used == before  # unpinned (the unregister call fails quietly without CUDA)


def test_a_failed_registration_is_reported_and_gives_the_budget_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "_register", lambda ptr, n, device: "out of memory (2)")
    before = engine._PINNED.used
    buffer = engine.new_host_buffer(4096)
    memory = engine._engine_memory(buffer.untyped_storage())
    assert memory is not None

    assert engine._pin(memory, CPU, limit=2**40) == "cudaHostRegister failed: out of memory (2)"
    assert engine._PINNED.used == before and memory.pinned == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0), ("1.5", int(1.5 * 2**30)), ("", None)],
)
def test_the_pin_limit_comes_from_the_environment(value: str, expected: int | None) -> None:
    limit = pin_limit_bytes({"GPU_PIN_LIMIT_GB": value})
    if expected is None:
        assert 0 < limit < 2**50
    else:
        assert limit == expected


@pytest.mark.parametrize("value", ["lots", "-1", "nan"])
def test_a_bad_pin_limit_is_refused_with_a_sentence(value: str) -> None:
    with pytest.raises(InvalidSetting, match="GPU_PIN_LIMIT_GB"):
        pin_limit_bytes({"GPU_PIN_LIMIT_GB": value})


# ---------------------------------------------------------------------------- through the manager


def make_manager(**kwargs: object) -> GPUResourceManager:
    return GPUResourceManager(device="cpu", engine=emulated, auto_monitor=False, **kwargs)


def test_the_manager_moves_real_copies_and_reports_what_they_cost() -> None:
    manager = make_manager()
    with manager.use(Mixed) as model:
        weights = manager._weights
        assert weights is not None and weights.where(model.lin.weight) == "device"
        with torch.no_grad():
            model.lin.bias.add_(2)
        expected = snapshot(model)
    status = manager.get_status()
    assert status["model_location"] == "cpu"
    assert status["last_transition"]["kind"] == "offload"
    assert status["last_transition"]["bytes_copied"] == 64
    assert status["model_size_gb"] == weights.size_bytes / 2**30
    assert status["cpu_cache_gb"] == weights.host_bytes / 2**30
    assert status["leak"] is None

    manager.set_offload_after_use(False)
    with manager.use() as model:
        assert_same(model, expected)
    restore = manager.get_status()["last_transition"]
    assert (restore["kind"], restore["bytes_copied"]) == ("restore", weights.host_bytes)
    manager.force_offload()
    assert manager.get_status()["last_transition"]["bytes_copied"] == 0


def test_the_manager_reports_a_device_alias_held_outside() -> None:
    manager = make_manager()
    with manager.use(Mixed) as model:
        alias = model.lin.weight.data
    status = manager.get_status()
    assert status["leaked_gb"] > 0
    assert "still referenced outside the manager" in status["leak"]

    del alias, model
    with manager.use():
        pass
    assert manager.get_status()["leak"] is None


def test_release_through_the_manager_frees_the_master_copy() -> None:
    manager = make_manager()
    with manager.use(Mixed) as model:
        pass
    master = StorageWeakRef(model.lin.weight.untyped_storage())
    del model

    manager.force_release()

    assert manager.get_status()["model_location"] == "unloaded"
    assert manager.get_status()["cpu_cache_gb"] == 0
    assert master.expired()


def test_a_restore_out_of_memory_keeps_the_model_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    manager = make_manager()
    with manager.use(Mixed) as model:
        expected = snapshot(model)
    weights = manager._weights
    assert weights is not None

    def no_room(nbytes: int) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(weights, "_allocate", no_room)
    with pytest.raises(OutOfMemory), manager.use():
        pass
    assert manager.get_status()["model_location"] == "cpu"
    assert all(weights.where(t) == "host" for t in model.state_dict().values())

    monkeypatch.undo()
    with manager.use() as again:
        assert_same(again, expected)
