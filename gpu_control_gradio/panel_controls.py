"""What the GPU panel's controls do, and the message line that answers them (no layout here).

`PanelControls` carries out a button or the timeouts on one manager after checking the
request with `ControlAccess`, and answers with a message line (`message_line`). The line
carries its own state (when it was shown; for a deferred offload/release, the model, action,
counts and error before it), so that the refresh (`follow`) can say later what became of the
request without any session state. `gpu_control_gradio.gpu_panel` lays out the panel and wires these to it.
"""

from __future__ import annotations

import hashlib
import html
import math
import re
import time
from collections.abc import Callable
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

from .panel_render import format_seconds

__all__ = [
    "MESSAGE_TTL_S",
    "PanelControls",
    "follow",
    "message_line",
    "parse_timeout",
    "seconds_text",
]

MESSAGE_TTL_S = 60.0
"""Seconds a settled message stays on the panel's message line before the refresh clears it."""

_MAX_MESSAGE_CHARS = 4096

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


def seconds_text(value: float, *, never: float) -> str:
    """A setting as the panel's text fields show it: ``300``, ``2.5`` or ``never``."""
    if value == never or math.isinf(value):
        return "never"
    return f"{value:.10g}"


def _error_tag(status: dict[str, Any]) -> str:
    """A short fingerprint of the status's last error (empty when there is none)."""
    error = status.get("last_error")
    return hashlib.sha256(str(error).encode()).hexdigest()[:12] if error else ""


def message_line(
    text: str,
    kind: str = "",
    *,
    watch: str = "",
    before: dict[str, Any] | None = None,
    model: str | None = None,
) -> str:
    """The message line: the sentence (escaped) after the UTC time it was answered.

    Args:
        text: the sentence.
        kind: ``refused`` or ``failed`` (shown in red), or empty.
        watch: ``offload`` or ``release`` for a deferred request the refresh follows.
        before: the manager's status before that request (its counts and error).
        model: the pool model the line is about (named before the sentence); None alone.
    """
    body = html.escape(text)
    if kind:
        body = f'<span class="gpc-{kind}">{body}</span>'
    attributes = f'data-at="{time.time():.3f}"'
    if model:
        body = f"<b>{html.escape(model)}</b>: {body}"
        attributes += f' data-model="{html.escape(model)}"'
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
    r'(?: data-model="(?P<model>[A-Za-z0-9][A-Za-z0-9._-]{0,63})")?'
    r'(?: data-watch="(?P<action>offload|release)" data-counts="(?P<offloads>\d+),(?P<releases>\d+)"'
    r' data-error="(?P<error>[0-9a-f]*)")?>'
)


def _read_note(message: Any) -> re.Match[str] | None:
    """The state a message line carries (see `message_line`); None for an empty or foreign value."""
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


def follow(message: Any, status_of: Callable[[str | None], dict[str, Any] | None]) -> Any:
    """The message line's next value at a refresh: what became of a deferred request, or cleared.

    Args:
        message: the line as the browser sent it back (any value).
        status_of: the status of the model a line names (None: no model named), or None when
            there is no such model here (the line is then cleared).

    Returns:
        A new line, ``""`` to clear it, or ``gr.skip()`` to leave it.
    """
    note = _read_note(message)
    if note is None:
        return "" if message else gr.skip()
    if note["action"]:
        status = status_of(note["model"])
        if status is None:
            return ""
        settled = _settled(note, status)
        return gr.skip() if settled is None else message_line(*settled, model=note["model"])
    if time.time() - float(note["at"]) > MESSAGE_TTL_S:
        return ""
    return gr.skip()


class PanelControls:
    """The panel's controls on one manager at a time, each answered with a message line.

    Args:
        access: who may change state; every control asks it first, with the request's headers
            and the token typed in the panel, because the UI's event routes can be called over
            HTTP like any other.
    """

    def __init__(self, access: ControlAccess) -> None:
        self.access = access

    def refused(self, request: gr.Request | None, token: Any, verb: str) -> str | None:
        """The panel's answer when this request may not change state; None when it may."""
        headers = getattr(request, "headers", None)
        try:
            self.access.authorize(headers, token=None if token is None else str(token))
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

    def move(self, manager: GPUResourceManager, action: str, model: str | None = None) -> str:
        """Offload or release now, or defer it while the model is in use (the line then follows it)."""
        before = manager.get_status()
        request_move = manager.force_offload if action == "offload" else manager.force_release
        try:
            result = request_move()
        except GpuControlError as error:
            return message_line(str(error), "failed", model=model)
        if result.outcome is Outcome.DEFERRED:
            return message_line(result.message, watch=action, before=before, model=model)
        return message_line(result.message, model=model)

    def preheat(
        self, manager: GPUResourceManager, load_func: Callable[[], Any] | None, model: str | None = None
    ) -> str:
        """Load or restore the model now (answers at once when it is already on its way)."""
        status = manager.get_status()
        if status["transition"] in ("loading", "restoring") and not status["pending"]:
            text = f"Already {status['transition']}: the model will be on the device in a moment."
            return message_line(text, model=model)
        try:
            text, kind = manager.preheat(load_func).message, ""
        except GpuControlError as error:
            text, kind = str(error), "failed"
        return message_line(text, kind, model=model)

    def apply(
        self,
        manager: GPUResourceManager,
        idle: Any,
        release_after: Any,
        after_use: Any,
        model: str | None = None,
    ) -> str:
        """Set the three timeouts, all or nothing."""
        try:
            result = apply_settings(
                manager,
                timeout=parse_timeout("Idle timeout", idle, never=math.inf),
                release_timeout=parse_timeout("Release timeout", release_after, never=0.0),
                offload_after_use=after_use,
                names=("Idle timeout", "Release timeout", "Offload after use"),
            )
        except InvalidSetting as error:
            return message_line(f"{error} Nothing was changed.", "failed", model=model)
        return message_line(result.message, model=model)
