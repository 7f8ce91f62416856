"""The live GPU panel and the GPU tools, reusable in any Gradio Blocks app.

    with gr.Blocks() as demo:
        register_gpu_api(manager, access=access)          # MCP/API tools first, before any timer
        ...
        gpu_panel(manager, load_func=load, access=access)  # status card, buttons, settings, gr.Timer

The panel shows one manager's `get_status()` (see `gpu_control_gradio.panel_render`). Its buttons and
settings are not queued behind a running job: they answer at once, and offload/release
requested during a job answer "deferred"; the message line then follows the request and says
what happened when it was carried out (or cancelled). Messages older than a minute are
cleared.

With a `GPUPool` (``gpu_panel(pool["a"], pool=pool)``) the panel also shows each device's
used/budget bar and a row per model, and a model selector chooses which model the buttons and
timeouts act on (the default model first). The selected name comes from the browser: it is
looked up in the pool, and an unknown one is refused with a sentence naming the known models.

Controls go through `ControlAccess` (`gpu_control_gradio.panel_controls`): when the app has a control token,
the panel shows a password field whose value is sent with each control event, and the handlers
check it (with the request's own headers) before touching a manager, because the UI's event
routes can be called over HTTP like any other. Reads (page load, the timer's refresh, the
model selector) stay open.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from gpu_control import ControlAccess, GPUPool, GPUResourceManager

from .gpu_tools import ToolError, register_gpu_api
from .panel_controls import MESSAGE_TTL_S, PanelControls, follow, message_line, parse_timeout, seconds_text
from .panel_render import (
    PANEL_CSS,
    format_countdown,
    format_gb,
    format_seconds,
    format_size,
    render_pool,
    render_status,
)

__all__ = [
    "MESSAGE_TTL_S",
    "PANEL_CSS",
    "GPUPanel",
    "ToolError",
    "format_countdown",
    "format_gb",
    "format_seconds",
    "format_size",
    "gpu_panel",
    "parse_timeout",
    "register_gpu_api",
    "render_pool",
    "render_status",
]

DEFAULT_REFRESH_SECONDS = 1.5

LOCK_NOTE = (
    '<div class="gpc-lock gpc-lock-waiting"><b>Control is locked.</b> This server has a control '
    "token: enter it in the Control token field to offload, release, preheat or change the "
    "timeouts. Status stays visible to everyone.</div>"
    '<div class="gpc-lock gpc-lock-typed"><b>Control token entered.</b> Each control checks it; '
    "a wrong one is answered with Locked and changes nothing.</div>"
)
"""The lock note; CSS shows its second half once something is typed in the token field."""

_QUICK = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
"""Panel events answer at once, beside a running job, and are not part of the app's API."""


@dataclass
class GPUPanel:
    """The components of a GPU panel, for apps that want to wire more events to them.

    ``pool`` and ``model`` (the pool's overview and the model selector) are None without a pool.
    """

    status: gr.HTML
    message: gr.HTML
    token: gr.Textbox
    offload: gr.Button
    release: gr.Button
    preheat: gr.Button
    idle_timeout: gr.Textbox
    release_timeout: gr.Textbox
    offload_after_use: gr.Checkbox
    apply: gr.Button
    timer: gr.Timer
    pool: gr.HTML | None = None
    model: gr.Dropdown | None = None


def gpu_panel(
    manager: GPUResourceManager,
    *,
    load_func: Callable[[], Any] | None = None,
    refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
    access: ControlAccess | None = None,
    pool: GPUPool | None = None,
    load_funcs: dict[str, Callable[[], Any]] | None = None,
) -> GPUPanel:
    """Lay out the live GPU panel in the current Blocks context and wire its events.

    Args:
        manager: the manager the panel shows and controls; with a pool, its default model
            (selected first; the pool's first model when ``manager`` is not one of its own).
        load_func: what Preheat loads for ``manager`` (default: the manager's own load function).
        refresh_seconds: how often the panel refreshes (a ``gr.Timer``).
        access: who may change state (control token, same origin); None: ``ControlAccess()``
            (no token, same origin only).
        pool: the models sharing the devices; the panel then shows every device and model,
            and a selector picks the model the controls act on.
        load_funcs: what Preheat loads, by model name (default: each model's own load function).

    Returns:
        The panel's components.

    Raises:
        ValueError: the pool has no model.
    """
    controls = PanelControls(ControlAccess() if access is None else access)
    if pool is None:
        panel = _layout(controls.access.locked, refresh_seconds, None, None)
        _wire_manager(panel, controls, manager, load_func)
        return panel
    names = pool.names()
    if not names:
        raise ValueError("The pool has no model: add one before building its panel.")
    own = manager.name in names and pool[manager.name] is manager
    default = manager.name if own else names[0]
    funcs = dict(load_funcs or {})
    if own and load_func is not None:
        funcs.setdefault(default, load_func)
    panel = _layout(controls.access.locked, refresh_seconds, pool, default)
    _wire_pool(panel, controls, pool, default, funcs)
    return panel


def _layout(locked: bool, refresh_seconds: float, pool: GPUPool | None, default: str | None) -> GPUPanel:
    """The panel's components, in the current Blocks context (no events yet)."""
    overview = selector = None
    with gr.Column(elem_classes="gpc-card"):
        gr.HTML('<div class="gpc-title">GPU memory manager</div>', padding=False)
        if pool is not None:
            overview = gr.HTML(elem_id="gpu-pool", padding=False)
            selector = gr.Dropdown(
                choices=pool.names(),
                value=default,
                label="Model",
                info="the buttons and timeouts below act on this model",
                allow_custom_value=True,  # an unknown name reaches the handlers, which refuse it in words
                elem_id="gpu-model",
            )
        status_html = gr.HTML(elem_id="gpu-status", padding=False)
        gr.HTML(LOCK_NOTE, visible=locked, padding=False, elem_id="gpu-lock-note")
        token_input = gr.Textbox(
            label="Control token",
            type="password",
            placeholder="needed for the buttons and timeouts",
            max_lines=1,
            visible=locked,
            elem_id="gpu-token",
        )
        with gr.Row(equal_height=True):
            offload_button = gr.Button("Offload to RAM", size="sm", min_width=60, elem_id="gpu-offload")
            release_button = gr.Button(
                "Release", size="sm", variant="stop", min_width=60, elem_id="gpu-release"
            )
            preheat_button = gr.Button("Preheat", size="sm", min_width=60, elem_id="gpu-preheat")
        message = gr.HTML("", padding=False, elem_id="gpu-message", elem_classes="gpc-message")
        with gr.Accordion("Timeouts", open=True, elem_id="gpu-settings"):
            with gr.Row():
                idle_input = gr.Textbox(
                    label="Idle timeout (s)",
                    info="on the GPU before offload; seconds, or never",
                    max_lines=1,
                    elem_id="gpu-idle-timeout",
                )
                release_input = gr.Textbox(
                    label="Release timeout (s)",
                    info="in host RAM before release; seconds, or never",
                    max_lines=1,
                    elem_id="gpu-release-timeout",
                )
            with gr.Row(equal_height=False):
                after_use_input = gr.Checkbox(
                    label="Offload right after each job",
                    elem_id="gpu-offload-after-use",
                )
                apply_button = gr.Button(
                    "Apply", size="sm", variant="primary", elem_id="gpu-apply", scale=0, min_width=90
                )
    return GPUPanel(
        status=status_html,
        message=message,
        token=token_input,
        offload=offload_button,
        release=release_button,
        preheat=preheat_button,
        idle_timeout=idle_input,
        release_timeout=release_input,
        offload_after_use=after_use_input,
        apply=apply_button,
        timer=gr.Timer(refresh_seconds),
        pool=overview,
        model=selector,
    )


def _settings(manager: GPUResourceManager) -> tuple[str, str, bool]:
    """The timeouts' fields for ``manager``: idle, release, offload after use."""
    idle = seconds_text(manager.idle_timeout, never=math.inf)
    return idle, seconds_text(manager.release_timeout, never=0.0), manager.offload_after_use


def _wire_manager(
    panel: GPUPanel, controls: PanelControls, manager: GPUResourceManager, load_func: Callable[[], Any] | None
) -> None:
    """Wire the panel of one manager."""

    def current() -> str:
        return render_status(manager.get_status())

    def act(verb: str, token: Any, request: gr.Request | None, do: Callable[[], str]) -> tuple[str, str]:
        refusal = controls.refused(request, token, verb)
        message = message_line(refusal, "refused") if refusal else do()
        return current(), message

    def offload(token: str | None, request: gr.Request) -> tuple[str, str]:
        return act("offload", token, request, lambda: controls.move(manager, "offload"))

    def release(token: str | None, request: gr.Request) -> tuple[str, str]:
        return act("release", token, request, lambda: controls.move(manager, "release"))

    def preheat(token: str | None, request: gr.Request) -> tuple[str, str]:
        return act("preheat", token, request, lambda: controls.preheat(manager, load_func))

    def apply(
        idle: str | None, release_after: str | None, after_use: bool, token: str | None, request: gr.Request
    ) -> tuple[str, str]:
        return act(
            "change the timeouts",
            token,
            request,
            lambda: controls.apply(manager, idle, release_after, after_use),
        )

    def refresh(message: str | None) -> tuple[str, Any]:
        status = manager.get_status()
        return render_status(status), follow(message, lambda model: status if model is None else None)

    def on_page_load() -> tuple[str, str, str, bool]:
        return (current(), *_settings(manager))

    settings = [panel.idle_timeout, panel.release_timeout, panel.offload_after_use]
    answer = [panel.status, panel.message]
    gr.on(None, on_page_load, outputs=[panel.status, *settings], **_QUICK)
    panel.timer.tick(refresh, inputs=panel.message, outputs=answer, **_QUICK)
    panel.offload.click(offload, inputs=panel.token, outputs=answer, **_QUICK)
    panel.release.click(release, inputs=panel.token, outputs=answer, **_QUICK)
    panel.preheat.click(preheat, inputs=panel.token, outputs=answer, queue=False, api_visibility="private")
    panel.apply.click(apply, inputs=[*settings, panel.token], outputs=answer, **_QUICK)


def _wire_pool(
    panel: GPUPanel,
    controls: PanelControls,
    pool: GPUPool,
    default: str,
    load_funcs: dict[str, Callable[[], Any]],
) -> None:
    """Wire the panel of a pool: every control acts on the model the selector names."""

    def pick(model: Any) -> tuple[Any, Any]:
        """(name, manager) of the model the browser named ("" or None: the default); else (None, why)."""
        name = default if model is None or model == "" else model
        try:
            return name, pool[name]
        except KeyError as error:  # the pool's sentence: the name (an excerpt) and the known models
            return None, str(error.args[0])

    def views(name: str | None, problem: str = "", status: dict[str, Any] | None = None) -> tuple[str, str]:
        """The overview and the card of the model ``name`` (or the problem, when there is none)."""
        status = pool.get_status() if status is None else status
        model = status["models"].get(name) if name else None
        if model is None:
            problem = html.escape(problem or "That model left the pool.")
            card = f'<div class="gpc-alert gpc-error">{problem}</div>'
        else:
            card = render_status(model, memory=False)
        return render_pool(status, name), card

    def act(
        model: Any, verb: str, token: Any, request: gr.Request | None, do: Callable[[str, Any], str]
    ) -> tuple[str, ...]:
        refusal = controls.refused(request, token, verb)
        name, found = pick(model)
        if refusal:
            message = message_line(refusal, "refused")
        elif name is None:
            message = message_line(f"{found} Nothing was done.", "refused")
        else:
            message = do(name, found)
        return (*views(name or default), message)

    def offload(model: str | None, token: str | None, request: gr.Request) -> tuple[str, ...]:
        return act(model, "offload", token, request, lambda name, m: controls.move(m, "offload", name))

    def release(model: str | None, token: str | None, request: gr.Request) -> tuple[str, ...]:
        return act(model, "release", token, request, lambda name, m: controls.move(m, "release", name))

    def preheat(model: str | None, token: str | None, request: gr.Request) -> tuple[str, ...]:
        return act(
            model, "preheat", token, request, lambda name, m: controls.preheat(m, load_funcs.get(name), name)
        )

    def apply(
        model: str | None,
        idle: str | None,
        release_after: str | None,
        after_use: bool,
        token: str | None,
        request: gr.Request,
    ) -> tuple[str, ...]:
        return act(
            model,
            "change the timeouts",
            token,
            request,
            lambda name, m: controls.apply(m, idle, release_after, after_use, name),
        )

    def refresh(model: str | None, message: str | None) -> tuple[str, str, Any]:
        status = pool.get_status()
        name, found = pick(model)
        overview, card = views(name, "" if name else found, status)
        return overview, card, follow(message, lambda note_model: status["models"].get(note_model or ""))

    def chosen(name: str | None, found: Any) -> tuple[Any, ...]:
        """The overview, the card and the timeouts' fields of `pick`'s answer (left as they are: none)."""
        if name is None:
            return (*views(None, found), gr.skip(), gr.skip(), gr.skip())
        return (*views(name), *_settings(found))

    def on_page_load() -> tuple[Any, ...]:
        return chosen(*pick(None))

    def on_select(model: str | None) -> tuple[Any, ...]:
        name, found = pick(model)
        return (*chosen(name, found), gr.skip() if name is not None else message_line(found, "refused"))

    settings = [panel.idle_timeout, panel.release_timeout, panel.offload_after_use]
    shown = [panel.pool, panel.status]
    answer = [*shown, panel.message]
    gr.on(None, on_page_load, outputs=[*shown, *settings], **_QUICK)
    panel.timer.tick(refresh, inputs=[panel.model, panel.message], outputs=answer, **_QUICK)
    panel.model.change(on_select, inputs=panel.model, outputs=[*shown, *settings, panel.message], **_QUICK)
    model_token = [panel.model, panel.token]
    panel.offload.click(offload, inputs=model_token, outputs=answer, **_QUICK)
    panel.release.click(release, inputs=model_token, outputs=answer, **_QUICK)
    panel.preheat.click(preheat, inputs=model_token, outputs=answer, queue=False, api_visibility="private")
    panel.apply.click(apply, inputs=[panel.model, *settings, panel.token], outputs=answer, **_QUICK)
