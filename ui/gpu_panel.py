"""The live GPU panel and the GPU tools, reusable in any Gradio Blocks app.

    with gr.Blocks() as demo:
        register_gpu_api(manager, access=access)          # MCP/API tools first, before any timer
        ...
        gpu_panel(manager, load_func=load, access=access)  # status card, buttons, settings, gr.Timer

The panel shows one manager's `get_status()` (see `ui.panel_render`). Its buttons and
settings are not queued behind a running job: they answer at once, and offload/release
requested during a job answer "deferred"; the message line then follows the request and says
what happened when it was carried out (or cancelled). Messages older than a minute are
cleared.

Controls go through `ControlAccess`: when the app has a control token, the panel shows a
password field whose value is sent with each control event, and the handlers check it (with
the request's own headers) before touching the manager, because the UI's event routes can
be called over HTTP like any other. Reads (page load, the timer's refresh) stay open.
"""

from __future__ import annotations

import hashlib
import html
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from gpu_control import (
    ControlAccess,
    ControlLocked,
    GpuControlError,
    GPUResourceManager,
    InvalidSetting,
    Outcome,
)
from gpu_control.config import validate_timeout
from gpu_control.rest import apply_settings

from .gpu_tools import ToolError, register_gpu_api
from .panel_render import (
    PANEL_CSS,
    format_countdown,
    format_gb,
    format_seconds,
    format_size,
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
    "render_status",
]

DEFAULT_REFRESH_SECONDS = 1.5
MESSAGE_TTL_S = 60.0
"""Seconds a settled message stays on the panel's message line before the refresh clears it."""

_MAX_MESSAGE_CHARS = 4096

LOCK_NOTE = (
    '<div class="gpc-lock gpc-lock-waiting"><b>Control is locked.</b> This server has a control '
    "token: enter it in the Control token field to offload, release, preheat or change the "
    "timeouts. Status stays visible to everyone.</div>"
    '<div class="gpc-lock gpc-lock-typed"><b>Control token entered.</b> Each control checks it; '
    "a wrong one is answered with Locked and changes nothing.</div>"
)
"""The lock note; CSS shows its second half once something is typed in the token field."""

_DONE_WHERE = {"offload": "in the host cache", "release": "released"}


def parse_timeout(name: str, text: Any, *, never: float) -> float:
    """A timeout typed in the panel: a number of seconds, or ``never``.

    Args:
        name: the field's label, for messages.
        text: what the user typed (any value an HTTP caller may send).
        never: the value that means never for this setting (``inf`` for the idle timeout,
            0 for the release timeout).

    Returns:
        Seconds (``never`` when the user typed never).

    Raises:
        InvalidSetting: the field is empty, not a number, or out of range (the message says
            what to type instead).
    """
    value = "" if text is None else str(text).strip()
    if not value:
        raise InvalidSetting(f"{name} is empty: type a number of seconds, or never.")
    if value.lower() == "never":
        return never
    return validate_timeout(name, value, allow_inf=math.isinf(never))


def _seconds_text(value: float, *, never: float) -> str:
    """A setting as the panel's text fields show it: ``300``, ``2.5`` or ``never``."""
    if value == never or math.isinf(value):
        return "never"
    return f"{value:.10g}"


def _error_tag(status: dict[str, Any]) -> str:
    """A short fingerprint of the status's last error (empty when there is none)."""
    error = status.get("last_error")
    return hashlib.sha256(str(error).encode()).hexdigest()[:12] if error else ""


def _message(text: str, kind: str = "", *, watch: str = "", before: dict[str, Any] | None = None) -> str:
    """The message line: the sentence (escaped) after the UTC time it was answered.

    The line also carries its own state, so that the refresh needs no session state: when it
    was shown (``data-at``) and, for a deferred offload/release, the action and the counts and
    error before it (to tell later what became of it).
    """
    body = html.escape(text)
    if kind:
        body = f'<span class="gpc-{kind}">{body}</span>'
    attributes = f'data-at="{time.time():.3f}"'
    if watch and before is not None:
        counts = before.get("counts") or {}
        attributes += (
            f' data-watch="{watch}" data-counts="{int(counts.get("offloads", 0))},'
            f'{int(counts.get("releases", 0))}" data-error="{_error_tag(before)}"'
        )
    stamp = time.strftime("%H:%M:%S", time.gmtime())
    return f'<div class="gpc-note" {attributes}><span class="gpc-muted">{stamp} UTC</span> · {body}</div>'


_NOTE = re.compile(
    r'<div class="gpc-note" data-at="(?P<at>\d+(?:\.\d+)?)"'
    r'(?: data-watch="(?P<action>offload|release)" data-counts="(?P<offloads>\d+),(?P<releases>\d+)"'
    r' data-error="(?P<error>[0-9a-f]*)")?>'
)


def _read_note(message: Any) -> re.Match[str] | None:
    """The state a message line carries (see `_message`); None for an empty or foreign value."""
    if not isinstance(message, str) or len(message) > _MAX_MESSAGE_CHARS:
        return None
    return _NOTE.match(message)


def _settled(note: re.Match[str], status: dict[str, Any]) -> tuple[str, str] | None:
    """(sentence, kind) once a deferred request has ended; None while it is still waiting."""
    action = note["action"]
    if action in (status.get("pending") or []):
        return None
    counts = status.get("counts") or {}
    last = status.get("last_transition") or {}
    took = f" ({format_seconds(last['seconds'])})" if last.get("kind") == action and "seconds" in last else ""
    if counts.get(f"{action}s", 0) > int(note[f"{action}s"]):
        return f"The deferred {action} is done: the model is {_DONE_WHERE[action]}{took}.", ""
    if action == "offload" and counts.get("releases", 0) > int(note["releases"]):
        return "The deferred offload was overtaken by a release: the model is released.", ""
    if status.get("last_error") and _error_tag(status) != note["error"]:
        return f"The deferred {action} did not happen: an error came first (see Last error above).", "failed"
    where = {"gpu": "on the device", "cpu": "in the host cache"}.get(status.get("model_location"), "released")
    return f"The deferred {action} did not happen (cancelled, e.g. by Preheat); the model is {where}.", ""


@dataclass
class GPUPanel:
    """The components of a GPU panel, for apps that want to wire more events to them."""

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


def gpu_panel(
    manager: GPUResourceManager,
    *,
    load_func: Callable[[], Any] | None = None,
    refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
    access: ControlAccess | None = None,
) -> GPUPanel:
    """Lay out the live GPU panel in the current Blocks context and wire its events.

    Args:
        manager: the manager the panel shows and controls.
        load_func: what Preheat loads (default: the manager's own load function).
        refresh_seconds: how often the panel refreshes (a ``gr.Timer``).
        access: who may change state (control token, same origin); None: ``ControlAccess()``
            (no token, same origin only).

    Returns:
        The panel's components.
    """
    control = ControlAccess() if access is None else access

    def current() -> str:
        return render_status(manager.get_status())

    def refused(request: gr.Request | None, token: Any, verb: str) -> str | None:
        """The panel's answer when this request may not change state; None when it may."""
        try:
            control.authorize(getattr(request, "headers", None), token=None if token is None else str(token))
        except ControlLocked:
            if token:
                return (
                    "Locked: the control token is not right, so nothing was done; "
                    f"check it and {verb} again."
                )
            return f"Locked: enter the control token in the field above to {verb}."
        except GpuControlError as error:
            return str(error)
        return None

    def move(action: str, token: Any, request: gr.Request | None) -> tuple[str, str]:
        refusal = refused(request, token, action)
        if refusal:
            return current(), _message(refusal, "refused")
        before = manager.get_status()
        request_move = manager.force_offload if action == "offload" else manager.force_release
        try:
            result = request_move()
        except GpuControlError as error:
            return current(), _message(str(error), "failed")
        if result.outcome is Outcome.DEFERRED:
            return current(), _message(result.message, watch=action, before=before)
        return current(), _message(result.message)

    def offload(token: str | None, request: gr.Request) -> tuple[str, str]:
        return move("offload", token, request)

    def release(token: str | None, request: gr.Request) -> tuple[str, str]:
        return move("release", token, request)

    def preheat(token: str | None, request: gr.Request) -> tuple[str, str]:
        refusal = refused(request, token, "preheat")
        if refusal:
            return current(), _message(refusal, "refused")
        status = manager.get_status()
        if status["transition"] in ("loading", "restoring") and not status["pending"]:
            text = f"Already {status['transition']}: the model will be on the device in a moment."
            return current(), _message(text)
        try:
            text, kind = manager.preheat(load_func).message, ""
        except GpuControlError as error:
            text, kind = str(error), "failed"
        return current(), _message(text, kind)

    def apply(
        idle: str | None, release_after: str | None, after_use: bool, token: str | None, request: gr.Request
    ) -> tuple[str, str]:
        refusal = refused(request, token, "change the timeouts")
        if refusal:
            return current(), _message(refusal, "refused")
        try:
            result = apply_settings(
                manager,
                timeout=parse_timeout("Idle timeout", idle, never=math.inf),
                release_timeout=parse_timeout("Release timeout", release_after, never=0.0),
                offload_after_use=after_use,
                names=("Idle timeout", "Release timeout", "Offload after use"),
            )
        except InvalidSetting as error:
            return current(), _message(f"{error} Nothing was changed.", "failed")
        return current(), _message(result.message)

    def refresh(message: str | None) -> tuple[str, Any]:
        status = manager.get_status()
        page = render_status(status)
        note = _read_note(message)
        if note is None:
            return page, ("" if message else gr.skip())
        if note["action"]:
            settled = _settled(note, status)
            return page, (gr.skip() if settled is None else _message(*settled))
        if time.time() - float(note["at"]) > MESSAGE_TTL_S:
            return page, ""
        return page, gr.skip()

    def on_page_load() -> tuple[str, str, str, bool]:
        idle = _seconds_text(manager.idle_timeout, never=math.inf)
        release_after = _seconds_text(manager.release_timeout, never=0.0)
        return current(), idle, release_after, manager.offload_after_use

    with gr.Column(elem_classes="gpc-card"):
        gr.HTML('<div class="gpc-title">GPU memory manager</div>', padding=False)
        status_html = gr.HTML(elem_id="gpu-status", padding=False)
        gr.HTML(LOCK_NOTE, visible=control.locked, padding=False, elem_id="gpu-lock-note")
        token_input = gr.Textbox(
            label="Control token",
            type="password",
            placeholder="needed for the buttons and timeouts",
            max_lines=1,
            visible=control.locked,
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
    timer = gr.Timer(refresh_seconds)

    quick = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
    answer = [status_html, message]
    gr.on(None, on_page_load, outputs=[status_html, idle_input, release_input, after_use_input], **quick)
    timer.tick(refresh, inputs=message, outputs=answer, **quick)
    offload_button.click(offload, inputs=token_input, outputs=answer, **quick)
    release_button.click(release, inputs=token_input, outputs=answer, **quick)
    preheat_button.click(preheat, inputs=token_input, outputs=answer, queue=False, api_visibility="private")
    apply_button.click(
        apply,
        inputs=[idle_input, release_input, after_use_input, token_input],
        outputs=answer,
        **quick,
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
        timer=timer,
    )
