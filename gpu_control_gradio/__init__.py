"""The reusable Gradio pieces: the live GPU panel, the GPU tools (API and MCP) and a safe mount.

Needs the ``gradio`` extra (``pip install "gpu-control[gradio]"``); ``import gpu_control``
alone never imports Gradio.

    import gradio as gr
    from fastapi import FastAPI
    from gpu_control_gradio import gpu_panel, mount_demo, register_gpu_api

    with gr.Blocks() as demo:
        register_gpu_api(manager, access=access)   # MCP / API tools first, before any gr.Timer
        gpu_panel(manager, access=access)          # status card, buttons, timeouts, gr.Timer
    app = mount_demo(FastAPI(), demo, path="/", mcp_server=True)

- `gpu_panel` (`gpu_control_gradio.gpu_panel`): the panel, for one manager or a `GPUPool`.
- `register_gpu_api` (`gpu_control_gradio.gpu_tools`): ``get_gpu_status``, ``offload_gpu``,
  ``release_gpu``, ``update_gpu_timeout`` (and ``list_models`` with a pool).
- `mount_demo` (`gpu_control_gradio.mount`): ``gr.mount_gradio_app`` with Gradio's "only
  uploaded files" check on and every file and URL input checked (`gpu_control_gradio.input_guard`,
  `gpu_control_gradio.mcp_guard`).
"""

from gpu_control._extras import missing_extra

try:
    import gradio  # noqa: F401  (it brings FastAPI)
except ModuleNotFoundError as error:
    raise missing_extra("gradio", "gpu_control_gradio", error) from error

from .gpu_panel import GPUPanel, gpu_panel
from .gpu_tools import ToolError, register_gpu_api
from .mount import mount_demo
from .panel_render import PANEL_CSS, format_seconds, render_pool, render_status

__all__ = [
    "PANEL_CSS",
    "GPUPanel",
    "ToolError",
    "format_seconds",
    "gpu_panel",
    "mount_demo",
    "register_gpu_api",
    "render_pool",
    "render_status",
]
