"""The transfer engine on a real CUDA device (skipped without one)."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from gpu_control import GPUResourceManager, OutOfMemory, attach

pytestmark = pytest.mark.gpu


class Net(nn.Module):
    """Mixed dtypes, a tied weight, integer buffer; runs in fp32 so every path is exercised."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(64, 128).to(torch.bfloat16)
        self.mlp = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128)).half()
        self.norm = nn.LayerNorm(128)
        self.head = nn.Linear(128, 64, bias=False).to(torch.bfloat16)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.arange(1, 129, dtype=torch.float32) / 128)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens).float() * self.scale
        x = x + self.mlp(x.half()).float()
        x = self.norm(x)
        return x @ self.head.weight.float().t()


@pytest.fixture()
def device() -> torch.device:
    gc.collect()
    torch.cuda.empty_cache()
    return torch.device("cuda", torch.cuda.current_device())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}


def assert_same(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor.cpu(), expected[name]), name


def test_round_trips_preserve_values_and_give_back_every_device_byte(device: torch.device) -> None:
    model = Net()
    expected = snapshot(model)
    before = torch.cuda.memory_allocated(device)
    weights = attach(model, device)
    for _ in range(3):
        transfer = weights.to_device()
        assert transfer.bytes_copied == weights.host_bytes
        assert all(t.device == device for t in model.state_dict().values())
        assert torch.cuda.memory_allocated(device) - before >= weights.device_bytes
        assert model.head.weight is model.emb.weight
        assert_same(model, expected)
        assert weights.to_host().bytes_copied == 0
        assert all(t.device.type == "cpu" for t in model.state_dict().values())
        assert torch.cuda.memory_allocated(device) == before
        assert_same(model, expected)
    assert weights.leaked_bytes() == 0


def test_the_master_copy_is_pinned_at_exact_size(device: torch.device) -> None:
    model = Net()
    weights = attach(model, device)
    stats = weights.stats()
    assert stats["pin_note"] is None
    assert stats["pinned_bytes"] == stats["host_bytes"] == sum(b["nbytes"] for b in stats["buffers"])
    assert all(b["pinned"] for b in stats["buffers"])
    assert all(t.is_pinned() for t in model.state_dict().values())
    weights.to_device()
    weights.to_host()
    assert model.mlp[0].weight.is_pinned()


def test_an_in_place_change_survives_offload_and_nothing_else_is_copied(device: torch.device) -> None:
    model = Net()
    weights = attach(model, device)
    weights.to_device()
    with torch.no_grad():
        model.norm.bias.add_(0.5)
    expected = snapshot(model)

    transfer = weights.to_host()

    assert (transfer.bytes_copied, transfer.copies) == (model.norm.bias.nbytes, 1)
    assert_same(model, expected)
    weights.to_device()
    assert_same(model, expected)


def test_outputs_are_identical_after_ten_offload_restore_cycles(device: torch.device) -> None:
    model = Net().eval()
    weights = attach(model, device)
    tokens = torch.arange(64, device=device).reshape(4, 16) % 64
    weights.to_device()
    with torch.no_grad():
        first = model(tokens).cpu()
    weights.to_host()
    torch.cuda.empty_cache()
    settled = torch.cuda.memory_allocated(device)  # after the first run's one-time workspaces

    for _ in range(10):
        weights.to_device()
        weights.to_host()
    weights.to_device()
    with torch.no_grad():
        again = model(tokens).cpu()
    weights.to_host()

    assert torch.equal(first, again)
    assert torch.cuda.memory_allocated(device) == settled


def test_a_device_alias_held_outside_is_reported_until_dropped(device: torch.device) -> None:
    model = Net()
    before = torch.cuda.memory_allocated(device)
    weights = attach(model, device)
    weights.to_device()
    alias = model.mlp[0].weight.data

    weights.to_host()

    assert weights.leaked_bytes() > 0
    assert torch.cuda.memory_allocated(device) > before
    del alias
    assert weights.leaked_bytes() == 0
    assert torch.cuda.memory_allocated(device) == before


def test_running_out_of_device_memory_leaves_the_model_on_the_host(device: torch.device) -> None:
    model = nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(16)))  # 64 MiB in 16 MiB buffers
    expected = snapshot(model)
    weights = attach(model, device, bucket_bytes=16 * 2**20)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    total = torch.cuda.get_device_properties(device).total_memory
    room = torch.cuda.memory_reserved(device) + 24 * 2**20  # room for one buffer, not two
    torch.cuda.set_per_process_memory_fraction(room / total, device)
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            weights.to_device()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)

    assert weights.device_bytes == 0
    assert all(t.device.type == "cpu" and weights.where(t) == "host" for t in model.state_dict().values())
    assert torch.cuda.memory_allocated(device) == before
    assert_same(model, expected)
    weights.to_device()
    assert_same(model, expected)


def test_a_model_that_arrives_on_the_device_is_cached_and_its_tensors_freed(device: torch.device) -> None:
    before = torch.cuda.memory_allocated(device)
    model = Net().to(device)
    expected = snapshot(model)
    old = StorageWeakRef(model.mlp[0].weight.untyped_storage())

    weights = attach(model, device)

    assert old.expired()
    assert torch.cuda.memory_allocated(device) == before
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    weights.to_device()
    assert_same(model, expected)


def test_a_zero_pin_budget_keeps_the_master_pageable(
    device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPU_PIN_LIMIT_GB", "0")
    model = Net()
    expected = snapshot(model)
    weights = attach(model, device)
    assert weights.stats()["pinned_bytes"] == 0
    assert weights.stats()["pin_note"] == "GPU_PIN_LIMIT_GB=0"
    assert not model.mlp[0].weight.is_pinned()
    weights.to_device()
    assert_same(model, expected)


class Tagged(torch.Tensor):
    pass


def test_an_unusual_tensor_moves_with_to_on_cuda(device: torch.device) -> None:
    model = nn.Linear(8, 8)
    model.register_buffer("tagged", torch.arange(4.0).as_subclass(Tagged))
    weights = attach(model, device)
    weights.to_device()
    assert type(model.tagged) is Tagged and model.tagged.device == device
    model.tagged.add_(1)
    weights.to_host()
    assert model.tagged.device.type == "cpu" and torch.equal(model.tagged, torch.arange(4.0) + 1)


def test_the_manager_frees_the_device_after_use(device: torch.device) -> None:
    before = torch.cuda.memory_allocated(device)
    manager = GPUResourceManager(device=str(device), auto_monitor=False)
    with manager.use(Net) as model:
        assert next(model.parameters()).device == device
    status = manager.get_status()
    assert status["model_location"] == "cpu"
    assert status["leak"] is None
    assert status["last_transition"]["bytes_copied"] == 0
    assert torch.cuda.memory_allocated(device) == before
    assert status["cpu_cache_gb"] > 0
    del model
    manager.force_release()
    assert manager.get_status()["cpu_cache_gb"] == 0


def test_the_manager_maps_a_restore_out_of_memory(device: torch.device) -> None:
    manager = GPUResourceManager(device=str(device), auto_monitor=False)
    with manager.use(lambda: nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(16)))):
        pass
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(
        (torch.cuda.memory_reserved(device) + 8 * 2**20) / total, device
    )
    try:
        with pytest.raises(OutOfMemory), manager.use():
            pass
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    assert manager.get_status()["model_location"] == "cpu"
    with manager.use() as model:
        assert next(model.parameters()).device == device
