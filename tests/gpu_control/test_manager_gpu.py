"""The lifecycle on a real CUDA device (run on the accelerator machine; skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from gpu_control import GPUResourceManager

pytestmark = pytest.mark.gpu


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(16)])


def test_status_before_the_first_load_does_not_need_a_model_on_the_gpu():
    manager = GPUResourceManager(device="cuda", auto_monitor=False)
    status = manager.get_status()
    assert (status["model_location"], status["gpu_available"], status["device"]) == ("unloaded", True, "cuda:0")


def test_a_use_cycle_on_cuda_frees_the_models_memory():
    # The first matmul on a stream allocates cuBLAS/cuBLASLt workspaces through the caching
    # allocator and keeps them (32 MiB on Hopper): make them before measuring the baseline.
    warm = torch.ones(2, 1024, device="cuda")
    torch.nn.functional.linear(warm, torch.ones(1024, 1024, device="cuda"), torch.ones(1024, device="cuda"))
    del warm
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    manager = GPUResourceManager(device="cuda", auto_monitor=False)
    size = sum(p.numel() * p.element_size() for p in _model().parameters())
    with manager.use(_model) as model:
        assert next(model.parameters()).is_cuda
        assert torch.cuda.memory_allocated() - before >= size
        x = torch.ones(2, 1024, device="cuda")
        expected = model(x).cpu()
    status = manager.get_status()
    assert status["model_location"] == "cpu"
    assert torch.cuda.memory_allocated() - before < 1024**2
    with manager.use() as model:
        assert torch.equal(model(x).cpu(), expected)
    manager.force_release()
    assert manager.get_status()["model_location"] == "unloaded"
