"""gpu_control in an existing Gradio Blocks app: the live GPU panel, the GPU tools over the API and
MCP, and the REST routes, mounted on FastAPI with Gradio's file checks on.

Run it with ``python gradio_app.py``; needs ``gpu-control[gradio]``.
"""

import gradio as gr
import torch
from fastapi import FastAPI
from torch import nn

from gpu_control import ControlAccess, GPUResourceManager, read_control_token
from gpu_control_gradio import gpu_panel, mount_demo, register_gpu_api
from gpu_control.rest import install_method_guard, install_offline_docs, make_router


def load_my_model() -> nn.Module:
    """Build the model on the CPU (a checkpoint load in real life); the manager moves it."""
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1))


manager = GPUResourceManager(idle_timeout=300, load_func=load_my_model)
access = ControlAccess(read_control_token())  # GPU_CONTROL_TOKEN; None leaves control open


def score(seed: float) -> float:
    """Your app's function: the model is on the device only while it runs."""
    generator = torch.Generator().manual_seed(int(seed))
    with manager.use() as model, torch.no_grad():
        x = torch.randn(1, 16, generator=generator).to(manager.device)
        return float(model(x))


with gr.Blocks(title="My app") as demo:
    register_gpu_api(manager, access=access)  # MCP / API tools first, before any gr.Timer
    with gr.Row():
        with gr.Column():
            seed = gr.Number(value=0, label="Seed")
            result = gr.Number(label="Score")
            gr.Button("Run").click(score, seed, result, concurrency_id="gpu", concurrency_limit=1)
        with gr.Column():
            gpu_panel(manager, access=access)  # the live panel, its buttons and timeouts

app = FastAPI(docs_url=None)
app.include_router(make_router(manager, access=access))  # REST first: the "/" mount shadows later routes
install_offline_docs(app)
install_method_guard(app)
app = mount_demo(app, demo, path="/", mcp_server=True)  # output_dir=..., output_pattern=... serve files

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=7860)
