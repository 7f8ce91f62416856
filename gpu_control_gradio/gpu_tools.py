"""The GPU tools: Gradio API endpoints, and so MCP tools, for one manager or a pool of models.

``get_gpu_status`` (and, with a pool, ``list_models``) is open to everyone; ``offload_gpu``,
``release_gpu`` and ``update_gpu_timeout`` change state and go through `ControlAccess` first:
the HTTP request that carried the call (the ``/gradio_api/call``/``run`` request, or the MCP
HTTP request) must come from the app's own origin, and carry ``Authorization: Bearer <token>``
when the app has a control token. Gradio hands that request to a function through its
``gr.Request`` parameter, which it keeps out of the API and MCP schemas.

With a `GPUPool` the four tools take an optional ``model`` argument (a name that
``list_models`` reports; empty: the default model) and ``list_models`` is added. Without one
they have exactly the single-model signatures, so an app with one model offers no argument
that could only ever take one value.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import gradio as gr

from gpu_control import (
    ActionResult,
    ControlAccess,
    GpuControlError,
    GPUPool,
    GPUResourceManager,
    InvalidSetting,
)
from gpu_control.rest import apply_settings

__all__ = ["ToolError", "register_gpu_api"]

_TIMEOUT_NAMES = ("timeout_seconds", "release_timeout_seconds", "offload_after_use")
_SUMMARY_FIELDS = (
    "model_location",
    "transition",
    "in_use",
    "device",
    "priority",
    "model_size_gb",
    "working_gb",
    "idle_timeout",
    "auto_offload_in",
    "auto_release_in",
    "last_error",
)
"""The per-model fields of ``list_models``: enough to choose a model and see what holds a device."""


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


class _Tools:
    """What the tools do, for the default manager and, given a pool, for any of its models."""

    def __init__(self, manager: GPUResourceManager, access: ControlAccess, pool: GPUPool | None) -> None:
        self.manager = manager
        self.access = access
        self.pool = pool

    def authorize(self, request: gr.Request | None) -> None:
        try:
            self.access.authorize(getattr(request, "headers", None))
        except GpuControlError as error:
            raise _tool_error(error) from None

    def pick(self, model: Any) -> GPUResourceManager:
        """The manager of ``model`` ("" or None: the default one), or a ToolError naming the known models."""
        if model is None or model == "" or self.pool is None:
            return self.manager
        try:
            return self.pool[model]
        except KeyError as error:
            raise ToolError(error.args[0], print_exception=False) from None

    def status(self, model: Any) -> str:
        return json.dumps(self.pick(model).get_status())

    def move(
        self, request: gr.Request | None, action: Callable[[GPUResourceManager], ActionResult], model: Any
    ) -> str:
        self.authorize(request)
        manager = self.pick(model)
        try:
            return _answer(manager, action(manager))
        except GpuControlError as error:
            raise _tool_error(error) from error

    def timeouts(
        self, request: gr.Request | None, timeout: Any, release: Any, after_use: Any, model: Any
    ) -> str:
        self.authorize(request)
        manager = self.pick(model)
        if timeout is None:
            raise ToolError(
                "timeout_seconds is required: a number of seconds from 0 to 2592000 (30 days), or never.",
                print_exception=False,
            )
        try:
            result = apply_settings(
                manager,
                timeout=timeout,
                release_timeout=release,
                offload_after_use=after_use,
                names=_TIMEOUT_NAMES,
            )
        except InvalidSetting as error:
            raise _tool_error(error) from error
        return _answer(manager, result)

    def summary(self) -> str:
        assert self.pool is not None
        status = self.pool.get_status()
        models = [
            {"name": name, **{field: model.get(field) for field in _SUMMARY_FIELDS}}
            for name, model in status["models"].items()
        ]
        return json.dumps(
            {
                "default_model": self.manager.name,
                "models": models,
                "devices": status["devices"],
                "host": status["host"],
                "waiting": status["waiting"],
            }
        )


def register_gpu_api(
    manager: GPUResourceManager, *, access: ControlAccess | None = None, pool: GPUPool | None = None
) -> None:
    """Register the GPU tools as Gradio API endpoints, and so as MCP tools.

    The tools are ``get_gpu_status``, ``offload_gpu``, ``release_gpu`` and
    ``update_gpu_timeout``, and with a pool ``list_models``; each answers JSON text and is not
    queued (it answers at once, also while a job runs). The three that change state ask
    ``access`` first, with the headers of the HTTP request that carried the call. Call this
    inside a ``gr.Blocks`` context before any ``gr.Timer`` that calls the same functions.

    Args:
        manager: the manager the tools show and control (with a pool: the default model).
        access: who may change state (control token, same origin); None: ``ControlAccess()``
            (no token, same origin only).
        pool: the pool ``manager`` belongs to; the tools then take an optional ``model``
            argument naming one of its models, and ``list_models`` lists them.
    """
    tools = _Tools(manager, ControlAccess() if access is None else access, pool)
    for tool in _single_tools(tools) if pool is None else _pool_tools(tools):
        gr.api(tool, api_name=tool.__name__, queue=False)


def _single_tools(tools: _Tools) -> list[Callable[..., str]]:
    """The four tools of an app with one model."""

    def get_gpu_status() -> str:
        """Report where the video model is and how much GPU memory it holds. Loads nothing.

        Returns:
            JSON text of the status: model_location ("unloaded"; "cpu" = cached in host RAM; "gpu" = on the compute device, ready), transition (a move under way or null), in_use (running jobs), idle_time and idle_timeout in seconds, auto_offload_in and auto_release_in (seconds until the automatic move, or null), device, gpu_memory_allocated_gb / reserved / free / total (GiB), model_size_gb, cpu_cache_gb, last_transition, last_error and counts of loads, restores, offloads, releases and uses.
        """
        return tools.status("")

    def offload_gpu(request: gr.Request) -> str:
        """Move the video model from GPU memory to host RAM now, freeing the GPU; the next job restores it in seconds.

        If a job is running, the offload is deferred and happens as soon as the job ends. When the server has a control token, send it as the HTTP header Authorization: Bearer <token>.

        Returns:
            JSON text: action, outcome ("done", "deferred" or "nothing_to_do"), a one-sentence message, and the status after the request.
        """
        return tools.move(request, GPUResourceManager.force_offload, "")

    def release_gpu(request: gr.Request) -> str:
        """Drop the video model from GPU memory and host RAM entirely; the next job loads it from disk again.

        If a job is running, the release is deferred and happens as soon as the job ends. When the server has a control token, send it as the HTTP header Authorization: Bearer <token>.

        Returns:
            JSON text: action, outcome ("done", "deferred" or "nothing_to_do"), a one-sentence message, and the status after the request.
        """
        return tools.move(request, GPUResourceManager.force_release, "")

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
        return tools.timeouts(request, timeout_seconds, release_timeout_seconds, offload_after_use, "")

    return [get_gpu_status, offload_gpu, release_gpu, update_gpu_timeout]


def _pool_tools(tools: _Tools) -> list[Callable[..., str]]:
    """The five tools of an app with a pool: ``list_models``, and the four with a ``model`` argument."""

    def list_models() -> str:
        """List the models this server holds, where each one is, and how full each GPU is.

        Loads nothing. Call this first to learn the model names that the other GPU tools take as
        their model argument.

        Returns:
            JSON text: default_model (the model used when a tool's model argument is empty); models, a list with per model: name, model_location ("unloaded"; "cpu" = cached in host RAM; "gpu" = on the compute device, ready), transition (a move under way or null), in_use (running jobs), device, priority (higher keeps its place on the GPU longer), model_size_gb, working_gb, idle_timeout, auto_offload_in and auto_release_in (seconds, or null), last_error; devices, per GPU: device, budget_gb, used_gb, free_gb and the models on it; host: budget_gb and used_gb of host RAM for cached models; waiting: models waiting for room (model, priority, device, needed_gb, waited_s).
        """
        return tools.summary()

    def get_gpu_status(model: str = "") -> str:
        """Report where one model is and how much GPU memory it holds, in detail. Loads nothing.

        Args:
            model: optional; the model's name as list_models reports it; empty for the default model.

        Returns:
            JSON text of the status: model_location ("unloaded"; "cpu" = cached in host RAM; "gpu" = on the compute device, ready), transition (a move under way or null), in_use (running jobs), idle_time and idle_timeout in seconds, auto_offload_in and auto_release_in (seconds until the automatic move, or null), device, gpu_memory_allocated_gb / reserved / free / total (GiB), model_size_gb, cpu_cache_gb, last_transition, last_error and counts of loads, restores, offloads, releases and uses.
        """
        return tools.status(model)

    def offload_gpu(request: gr.Request, model: str = "") -> str:
        """Move one model from GPU memory to host RAM now, freeing its GPU memory; its next job
        restores it in seconds.

        If a job of that model is running, the offload is deferred and happens as soon as the job
        ends. When the server has a control token, send it as the HTTP header
        Authorization: Bearer <token>.

        Args:
            model: optional; the model's name as list_models reports it; empty for the default model.

        Returns:
            JSON text: action, outcome ("done", "deferred" or "nothing_to_do"), a one-sentence message, and the model's status after the request.
        """
        return tools.move(request, GPUResourceManager.force_offload, model)

    def release_gpu(request: gr.Request, model: str = "") -> str:
        """Drop one model from GPU memory and host RAM entirely; its next job loads it from disk again.

        If a job of that model is running, the release is deferred and happens as soon as the job
        ends. When the server has a control token, send it as the HTTP header
        Authorization: Bearer <token>.

        Args:
            model: optional; the model's name as list_models reports it; empty for the default model.

        Returns:
            JSON text: action, outcome ("done", "deferred" or "nothing_to_do"), a one-sentence message, and the model's status after the request.
        """
        return tools.move(request, GPUResourceManager.force_release, model)

    def update_gpu_timeout(
        request: gr.Request,
        timeout_seconds: float | str,
        release_timeout_seconds: float | str | None = None,
        offload_after_use: bool | None = None,
        model: str = "",
    ) -> str:
        """Change how long one idle model stays on the GPU before it is moved to host RAM.

        When the server has a control token, send it as the HTTP header Authorization: Bearer <token>.

        Args:
            timeout_seconds: idle seconds on the GPU before the automatic offload: a number from 0 to 2592000 (30 days; 0 = as soon as idle), or the text "never".
            release_timeout_seconds: optional; seconds cached in host RAM before the model is released entirely: 0 to 2592000, or "never" (same as 0).
            offload_after_use: optional; true to offload right after every job, false to keep the model on the GPU until the idle timeout.
            model: optional; the model's name as list_models reports it; empty for the default model.

        Returns:
            JSON text: action, outcome, a message saying what changed, and the model's status after it.
        """
        return tools.timeouts(request, timeout_seconds, release_timeout_seconds, offload_after_use, model)

    return [list_models, get_gpu_status, offload_gpu, release_gpu, update_gpu_timeout]
