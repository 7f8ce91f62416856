"""gpu_control in plain Python: one model behind a manager, then two models sharing a device's budget."""

import torch
from torch import nn

from gpu_control import GPUPool, GPUResourceManager


def load_my_model() -> nn.Module:
    """Build the model on the CPU (a checkpoint load in real life); the manager moves it."""
    return nn.Sequential(nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 1024))


def run(manager: GPUResourceManager, x: torch.Tensor) -> torch.Tensor:
    """One job: the model is on the device for the length of the `with` block."""
    with manager.use() as model:  # loads on the first use, restores from host RAM after that
        return model(x.to(manager.device)).cpu()


manager = GPUResourceManager(idle_timeout=300, load_func=load_my_model)  # nothing is loaded yet
print("output", tuple(run(manager, torch.randn(8, 1024)).shape), "computed on", manager.device)
print("after the job:", manager.get_status()["model_location"])  # "cpu": offloaded to host RAM
run(manager, torch.randn(8, 1024))
print("counts:", manager.get_status()["counts"])  # 1 load, 1 restore, 2 offloads, 2 uses
manager.force_release()  # drop it from the device and from host RAM
print("released:", manager.get_status()["model_location"])

# Two models, one device budget ("emulated:0" stands in for "cuda:0" on a machine without a GPU).
device = "cuda:0" if torch.cuda.is_available() else "emulated:0"
pool = GPUPool(devices=[device], budget_gb=0.01)  # 10 MiB: room for one of these 8 MiB models
first = pool.add("first", load_my_model, offload_after_use=False)
second = pool.add("second", load_my_model, offload_after_use=False)
run(first, torch.randn(1, 1024))
run(second, torch.randn(1, 1024))  # "first" is idle (same priority): moved to host RAM for room
print({name: model["model_location"] for name, model in pool.get_status()["models"].items()})
pool.close()
