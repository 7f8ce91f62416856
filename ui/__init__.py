"""The Gradio UI: the talking-portrait Blocks app and the reusable GPU panel (layout and wiring only)."""

from .blocks import appearance, build_demo
from .gpu_panel import GPUPanel, gpu_panel, register_gpu_api, render_status
from .mount import mount_demo

__all__ = ["GPUPanel", "appearance", "build_demo", "gpu_panel", "mount_demo", "register_gpu_api", "render_status"]
