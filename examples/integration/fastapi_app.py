"""gpu_control in a FastAPI service: your endpoint, plus the GPU routes, offline /docs and /metrics.

Run it with ``python fastapi_app.py`` (or ``uvicorn fastapi_app:app``); needs ``gpu-control[rest]``.
"""

import torch
from fastapi import FastAPI
from torch import nn

from gpu_control import ControlAccess, GPUResourceManager, read_control_token
from gpu_control.metrics import install_metrics
from gpu_control.rest import install_method_guard, install_offline_docs, make_router


def load_my_model() -> nn.Module:
    """Build the model on the CPU (a checkpoint load in real life); the manager moves it."""
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1))


manager = GPUResourceManager(idle_timeout=300, load_func=load_my_model)
access = ControlAccess(read_control_token())  # GPU_CONTROL_TOKEN; None leaves control open
app = FastAPI(docs_url=None)
app.include_router(make_router(manager, access=access))  # /gpu/status, /gpu/offload, ... , /health
install_offline_docs(app)  # /docs without a CDN
install_method_guard(app)  # 405 + Allow for a wrong method on those routes
install_metrics(app, manager)  # Prometheus /metrics


@app.post("/predict")
def predict(features: list[float]) -> dict[str, float]:
    """Your endpoint: the model is on the device only while the job runs."""
    with manager.use() as model, torch.no_grad():
        x = torch.tensor(features, dtype=torch.float32, device=manager.device).reshape(1, 16)
        return {"score": float(model(x))}


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
