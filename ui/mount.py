"""Mount a Gradio Blocks app on a FastAPI app with Gradio's file checks on.

    app.include_router(make_router(manager, access=access))   # REST first
    app = mount_demo(app, demo, path="/", mcp_server=True, allowed_paths=[output_dir])

``gr.mount_gradio_app()`` never marks the Blocks as launched, and Gradio (6.31) skips its
"only files the user uploaded" check for Blocks that have not launched: an API caller could
then name any server file (``/etc/passwd``) as a file input and download the copy. This
module turns that check back on for mounted apps.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
from fastapi import FastAPI

__all__ = ["mount_demo"]


def mount_demo(app: FastAPI, demo: gr.Blocks, *, path: str = "/", **kwargs: Any) -> FastAPI:
    """``gr.mount_gradio_app(app, demo, path, **kwargs)`` with Gradio's file checks on.

    Args:
        app: the FastAPI app (register your own routes before mounting at ``/``).
        demo: the Blocks to mount.
        path: where to mount it.
        **kwargs: passed to ``gr.mount_gradio_app`` (``mcp_server``, ``allowed_paths``, …).

    Returns:
        The FastAPI app, ready for uvicorn.
    """
    mounted = gr.mount_gradio_app(app, demo, path=path, **kwargs)
    demo.has_launched = True  # Gradio checks file inputs only for launched Blocks
    return mounted
