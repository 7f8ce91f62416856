"""The GPU tools: Gradio API endpoints, and so MCP tools, for one manager.

``get_gpu_status`` is open to everyone; ``offload_gpu``, ``release_gpu`` and
``update_gpu_timeout`` change state and go through `ControlAccess` first: the HTTP request
that carried the call (the ``/gradio_api/call``/``run`` request, or the MCP HTTP request)
must come from the app's own origin, and carry ``Authorization: Bearer <token>`` when the
app has a control token. Gradio hands that request to a function through its
``gr.Request`` parameter, which it keeps out of the API and MCP schemas.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import gradio as gr

from gpu_control import ActionResult, ControlAccess, GpuControlError, GPUResourceManager, InvalidSetting
from gpu_control.rest import apply_settings

__all__ = ["ToolError", "register_gpu_api"]

_TIMEOUT_NAMES = ("timeout_seconds", "release_timeout_seconds", "offload_after_use")


class ToolError(gr.Error):
    """A gr.Error whose text is the bare message (gr.Error's own quotes it), as MCP clients show it."""

    def __str__(self) -> str:
        return str(self.message)


def _answer(manager: GPUResourceManager, result: Any) -> str:
    """JSON text of a control action's result and the status after it."""
    return json.dumps({**result.to_dict(), "status": manager.get_status()})


def _tool_error(error: GpuControlError) -> ToolError:
    """The error as a sentence for API and MCP clients, without a server-side traceback."""
    return ToolError(str(error), print_exception=False)


def register_gpu_api(manager: GPUResourceManager, *, access: ControlAccess | None = None) -> None:
    """Register the GPU tools as Gradio API endpoints, and so as MCP tools.

    The tools are ``get_gpu_status``, ``offload_gpu``, ``release_gpu`` and
    ``update_gpu_timeout``; each answers JSON text and is not queued (it answers at once,
    also while a job runs). The three that change state ask ``access`` first, with the
    headers of the HTTP request that carried the call. Call this inside a ``gr.Blocks``
    context before any ``gr.Timer`` that calls the same functions.

    Args:
        manager: the manager the tools show and control.
        access: who may change state (control token, same origin); None: ``ControlAccess()``
            (no token, same origin only).
    """
    control = ControlAccess() if access is None else access

    def authorize(request: gr.Request | None) -> None:
        try:
            control.authorize(getattr(request, "headers", None))
        except GpuControlError as error:
            raise _tool_error(error) from None

    def move(request: gr.Request | None, action: Callable[[], ActionResult]) -> str:
        authorize(request)
        try:
            return _answer(manager, action())
        except GpuControlError as error:
            raise _tool_error(error) from error

    def get_gpu_status() -> str:
        """Report where the video model is and how much GPU memory it holds. Loads nothing.

        Returns:
            JSON text of the status: model_location ("unloaded"; "cpu" = cached in host RAM; "gpu" = on the compute device, ready), transition (a move under way or null), in_use (running jobs), idle_time and idle_timeout in seconds, auto_offload_in and auto_release_in (seconds until the automatic move, or null), device, gpu_memory_allocated_gb / reserved / free / total (GiB), model_size_gb, cpu_cache_gb, last_transition, last_error and counts of loads, restores, offloads, releases and uses.
        """
        return json.dumps(manager.get_status())

    def offload_gpu(request: gr.Request) -> str:
        """Move the video model from GPU memory to host RAM now, freeing the GPU; the next job restores it in seconds.

        If a job is running, the offload is deferred and happens as soon as the job ends. When the server has a control token, send it as the HTTP header Authorization: Bearer <token>.

        Returns:
            JSON text: action, outcome ("done", "deferred" or "nothing_to_do"), a one-sentence message, and the status after the request.
        """
        return move(request, manager.force_offload)

    def release_gpu(request: gr.Request) -> str:
        """Drop the video model from GPU memory and host RAM entirely; the next job loads it from disk again.

        If a job is running, the release is deferred and happens as soon as the job ends. When the server has a control token, send it as the HTTP header Authorization: Bearer <token>.

        Returns:
            JSON text: action, outcome ("done", "deferred" or "nothing_to_do"), a one-sentence message, and the status after the request.
        """
        return move(request, manager.force_release)

    def update_gpu_timeout(
        request: gr.Request,
        timeout_seconds: float | str,
        release_timeout_seconds: float | str | None = None,
        offload_after_use: bool | None = None,
    ) -> str:
        """Change how long an idle model stays on the GPU before it is moved to host RAM.

        When the server has a control token, send it as the HTTP header Authorization: Bearer <token>.

        Args:
            timeout_seconds: idle seconds on the GPU before the automatic offload: a number from 0 to 2592000 (30 days; 0 = as soon as idle), or the text "never".
            release_timeout_seconds: optional; seconds cached in host RAM before the model is released entirely: 0 to 2592000, or "never" (same as 0).
            offload_after_use: optional; true to offload right after every job, false to keep the model on the GPU until the idle timeout.

        Returns:
            JSON text: action, outcome, a message saying what changed, and the status after the change.
        """
        authorize(request)
        if timeout_seconds is None:
            raise ToolError(
                "timeout_seconds is required: a number of seconds from 0 to 2592000 (30 days), or never.",
                print_exception=False,
            )
        try:
            result = apply_settings(
                manager,
                timeout=timeout_seconds,
                release_timeout=release_timeout_seconds,
                offload_after_use=offload_after_use,
                names=_TIMEOUT_NAMES,
            )
        except InvalidSetting as error:
            raise _tool_error(error) from error
        return _answer(manager, result)

    for tool in (get_gpu_status, offload_gpu, release_gpu, update_gpu_timeout):
        gr.api(tool, api_name=tool.__name__, queue=False)
