"""The demo's Gradio UI: the talking-portrait Blocks app (layout and wiring only).

The GPU panel, the GPU tools and the safe mount it uses are the library's, as in any app:
`gpu_control_gradio`.
"""

from .blocks import appearance, build_demo

__all__ = ["appearance", "build_demo"]
