"""The live GPU panel and the GPU tools, reusable in any Gradio Blocks app.

    with gr.Blocks() as demo:
        register_gpu_api(manager)          # MCP/API tools first, before any timer
        ...
        gpu_panel(manager, load_func=load)  # status card, buttons, settings, gr.Timer

The panel shows one manager's `get_status()`: where the model is (a badge), device memory,
the countdown to the automatic offload or release, counters, the last transition, the last
error and a leak warning. Its buttons and settings are not queued behind a running job: they
answer at once, and offload/release requested during a job answer "deferred".
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from gpu_control import ControlAccess, GpuControlError, GPUResourceManager, InvalidSetting
from gpu_control.rest import apply_settings

__all__ = [
    "PANEL_CSS",
    "GPUPanel",
    "ToolError",
    "format_countdown",
    "format_gb",
    "format_seconds",
    "format_size",
    "gpu_panel",
    "register_gpu_api",
    "render_status",
]

DEFAULT_REFRESH_SECONDS = 1.5


class ToolError(gr.Error):
    """A gr.Error whose text is the bare message (gr.Error's own quotes it), as MCP clients show it."""

    def __str__(self) -> str:
        return str(self.message)


def format_gb(value: float | None) -> str:
    """GiB with two decimals (``14.20 GB``); None becomes an en dash."""
    return "–" if value is None else f"{value:.2f} GB"


def format_size(value: float | None) -> str:
    """A model size given in GiB: ``14.20 GB``, and MB or KB below 0.01 GB so small models show."""
    if value is None:
        return "–"
    if value == 0 or value >= 0.01:
        return format_gb(value)
    n_bytes = value * 2**30
    return f"{n_bytes / 2**20:.1f} MB" if n_bytes >= 2**20 else f"{n_bytes / 2**10:.1f} KB"


def format_seconds(seconds: float | None) -> str:
    """A measured duration: ``0.31 s``, ``47 s``, ``4 min 12 s``, ``2 h 05 min``; None: never."""
    if seconds is None or math.isinf(seconds):
        return "never"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return format_countdown(seconds)


def format_countdown(seconds: float | None) -> str:
    """A countdown or timeout in whole seconds: ``47 s``, ``4 min 12 s``, ``2 h 05 min``; None: never."""
    if seconds is None or math.isinf(seconds):
        return "never"
    if seconds < 60:
        return f"{math.ceil(seconds - 1e-9):.0f} s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest:02d} s"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min"


def _badge(status: dict[str, Any]) -> tuple[str, str]:
    """The location badge: (css class, label)."""
    device = str(status.get("device") or "")
    on_cuda = device.startswith("cuda")
    transition = status.get("transition")
    if transition:
        labels = {
            "loading": f"Loading to {device}…",
            "restoring": f"Restoring to {device}…",
            "offloading": "Offloading to host RAM…",
            "releasing": "Releasing…",
        }
        return "moving", labels.get(transition, f"{transition.capitalize()}…")
    location = status.get("model_location")
    if location == "gpu":
        if status.get("in_use"):
            return "gpu", (f"Working on GPU · {device}" if on_cuda else "Working on CPU")
        return "gpu", (f"On GPU · {device}" if on_cuda else "Ready on CPU")
    if location == "cpu":
        return "cpu", "In host RAM (cached)"
    return "unloaded", "Not loaded"


def _bar(fraction: float, kind: str = "") -> str:
    width = max(0.0, min(1.0, fraction)) * 100
    return f'<div class="gpc-bar {kind}"><div class="gpc-fill" style="width:{width:.1f}%"></div></div>'


def _memory_section(status: dict[str, Any]) -> str:
    total = status.get("gpu_memory_total_gb")
    allocated = status.get("gpu_memory_allocated_gb") or 0.0
    reserved = status.get("gpu_memory_reserved_gb") or 0.0
    free = status.get("gpu_memory_free_gb")
    if not status.get("gpu_available") or not total:
        body = (
            '<div class="gpc-muted">No CUDA device here: the model runs on the CPU; GPU memory 0.00 GB.</div>'
        )
        return f'<div class="gpc-section"><div class="gpc-label">GPU memory</div>{body}</div>'
    used = total - free if free is not None else reserved
    return (
        '<div class="gpc-section"><div class="gpc-label">GPU memory</div>'
        + _bar(used / total)
        + '<div class="gpc-row">'
        f"<span>used <b>{format_gb(used)}</b> of {format_gb(total)}</span>"
        f"<span>free <b>{format_gb(free)}</b></span></div>"
        f'<div class="gpc-row gpc-muted"><span>this process: allocated {format_gb(allocated)}</span>'
        f"<span>reserved {format_gb(reserved)}</span></div></div>"
    )


def _timer_section(status: dict[str, Any]) -> str:
    location = status.get("model_location")
    idle_timeout = status.get("idle_timeout")
    release_timeout = status.get("release_timeout") or 0
    lines = []
    if status.get("in_use"):
        jobs = status["in_use"]
        lines.append(
            f"<div>Running {jobs} job{'s' if jobs != 1 else ''}: timers wait for {'them' if jobs != 1 else 'it'}.</div>"
        )
    elif status.get("transition"):
        lines.append("<div>Moving: timers start when the move ends.</div>")
    elif location == "gpu":
        offload_in = status.get("auto_offload_in")
        if offload_in is None:
            lines.append("<div>Auto-offload: <b>never</b> (idle timeout off)</div>")
        else:
            fraction = offload_in / idle_timeout if idle_timeout else 0.0
            lines.append(
                f"<div>Auto-offload in <b>{format_countdown(offload_in)}</b></div>"
                + _bar(fraction, "gpc-thin")
            )
    elif location == "cpu":
        release_in = status.get("auto_release_in")
        if release_in is None:
            lines.append("<div>Kept in host RAM until released (release timeout: never)</div>")
        else:
            fraction = release_in / release_timeout if release_timeout else 0.0
            lines.append(
                f"<div>Auto-release in <b>{format_countdown(release_in)}</b></div>"
                + _bar(fraction, "gpc-thin")
            )
    else:
        lines.append("<div>Loads on the first request (nothing is loaded until then).</div>")
    if status.get("idle_time") and not status.get("in_use") and location != "unloaded":
        lines.append(
            f'<div class="gpc-muted">Idle for {format_countdown(math.floor(status["idle_time"]))}</div>'
        )
    after_use = (
        "offload after each job" if status.get("offload_after_use") else "stay on the device after jobs"
    )
    policy = (
        f"Policy: {after_use} · idle timeout {format_countdown(idle_timeout)} · "
        f"release timeout {'never' if not release_timeout else format_countdown(release_timeout)}"
    )
    lines.append(f'<div class="gpc-muted">{policy}</div>')
    return '<div class="gpc-section"><div class="gpc-label">Timers</div>' + "".join(lines) + "</div>"


def _last_transition(status: dict[str, Any]) -> str:
    last = status.get("last_transition")
    if not last:
        return ""
    reasons = {
        "request": "for a job",
        "after_use": "after a job",
        "idle_timeout": "idle timeout",
        "release_timeout": "release timeout",
        "manual": "button / API",
        "preheat": "preheat",
    }
    copied = last.get("bytes_copied") or 0
    parts = [
        f"<b>{html.escape(str(last.get('kind', '')))}</b> ({html.escape(reasons.get(last.get('reason'), str(last.get('reason'))))})",
        f"in <b>{format_seconds(last.get('seconds'))}</b>",
    ]
    if copied:
        parts.append(f"{format_size(copied / 2**30)} copied")
    at = str(last.get("at") or "")
    if "T" in at:
        parts.append(html.escape(at.split("T", 1)[1].rstrip("Z")) + " UTC")
    return (
        '<div class="gpc-section"><div class="gpc-label">Last transition</div><div>'
        + " · ".join(parts)
        + "</div></div>"
    )


def render_status(status: dict[str, Any]) -> str:
    """Render a manager's status (DESIGN.md's schema) as the panel's HTML card.

    Args:
        status: what ``GPUResourceManager.get_status()`` returned.

    Returns:
        HTML; the outer element carries ``data-location`` and ``data-transition`` attributes.
    """
    kind, label = _badge(status)
    location = html.escape(str(status.get("model_location")))
    transition = html.escape(str(status.get("transition") or ""))
    chips = []
    if status.get("in_use"):
        chips.append(f'<span class="gpc-chip gpc-busy">in use · {int(status["in_use"])}</span>')
    for pending in status.get("pending") or []:
        name = "offload" if pending.startswith("offload") else pending
        chips.append(f'<span class="gpc-chip gpc-pending">{html.escape(name)} pending</span>')
    device_line = html.escape(
        status.get("gpu_name")
        or ("CPU · no CUDA device" if str(status.get("device")) == "cpu" else str(status.get("device")))
    )
    model_name = html.escape(str(status.get("name") or "model"))
    counts = status.get("counts") or {}
    count_cells = "".join(
        f'<div class="gpc-count"><b>{int(counts.get(key, 0))}</b><span>{key}</span></div>'
        for key in ("loads", "restores", "offloads", "releases", "uses")
    )
    model_size = status.get("model_size_gb")
    sizes = (
        '<div class="gpc-row">'
        f"<span>size <b>{format_size(model_size)}</b></span>"
        f"<span>in host cache <b>{format_size(status.get('cpu_cache_gb'))}</b></span></div>"
    )
    parts = [
        f'<div class="gpc-panel" data-location="{location}" data-transition="{transition}">',
        '<div class="gpc-head">',
        f'<span class="gpc-badge gpc-{kind}"><span class="gpc-dot"></span>{html.escape(label)}</span>',
        "".join(chips),
        "</div>",
        f'<div class="gpc-sub">{model_name} · {device_line}</div>',
        _memory_section(status),
        f'<div class="gpc-section"><div class="gpc-label">Model</div>{sizes}</div>',
        _timer_section(status),
        f'<div class="gpc-counts">{count_cells}</div>',
        _last_transition(status),
    ]
    if status.get("last_error"):
        parts.append(
            f'<div class="gpc-alert gpc-error"><b>Last error</b> {html.escape(str(status["last_error"]))}</div>'
        )
    if status.get("leak"):
        leaked = status.get("leaked_gb")
        amount = f" ({format_gb(leaked)})" if leaked else ""
        parts.append(
            f'<div class="gpc-alert gpc-warn"><b>Memory not freed{amount}</b> {html.escape(str(status["leak"]))}. '
            "Drop other references to the model, then Release.</div>"
        )
    parts.append("</div>")
    return "".join(parts)


def _answer(manager: GPUResourceManager, result: Any) -> str:
    """JSON text of a control action's result and the status after it."""
    return json.dumps({**result.to_dict(), "status": manager.get_status()})


def register_gpu_api(manager: GPUResourceManager, *, access: ControlAccess | None = None) -> None:
    """Register the GPU tools as Gradio API endpoints, and so as MCP tools.

    The tools are ``get_gpu_status``, ``offload_gpu``, ``release_gpu`` and
    ``update_gpu_timeout``; each answers JSON text and is not queued (it answers at once,
    also while a job runs). Call this inside a ``gr.Blocks`` context before any ``gr.Timer``
    that calls the same functions.

    Args:
        manager: the manager the tools show and control.
        access: who may change state (control token, same origin); None: no token.
    """

    def get_gpu_status() -> str:
        """Report where the video model is and how much GPU memory it holds. Loads nothing.

        Returns:
            JSON text of the status: model_location ("unloaded"; "cpu" = cached in host RAM; "gpu" = on the compute device, ready), transition (a move under way or null), in_use (running jobs), idle_time and idle_timeout in seconds, auto_offload_in and auto_release_in (seconds until the automatic move, or null), device, gpu_memory_allocated_gb / reserved / free / total (GiB), model_size_gb, cpu_cache_gb, last_transition, last_error and counts of loads, restores, offloads, releases and uses.
        """
        return json.dumps(manager.get_status())

    def offload_gpu() -> str:
        """Move the video model from GPU memory to host RAM now, freeing the GPU; the next job restores it in seconds.

        If a job is running, the offload is deferred and happens as soon as the job ends.

        Returns:
            JSON text: action, outcome ("done", "deferred" or "nothing_to_do"), a one-sentence message, and the status after the request.
        """
        try:
            return _answer(manager, manager.force_offload())
        except GpuControlError as error:
            raise ToolError(str(error), print_exception=False) from error

    def release_gpu() -> str:
        """Drop the video model from GPU memory and host RAM entirely; the next job loads it from disk again.

        If a job is running, the release is deferred and happens as soon as the job ends.

        Returns:
            JSON text: action, outcome ("done", "deferred" or "nothing_to_do"), a one-sentence message, and the status after the request.
        """
        try:
            return _answer(manager, manager.force_release())
        except GpuControlError as error:
            raise ToolError(str(error), print_exception=False) from error

    def update_gpu_timeout(
        timeout_seconds: float,
        release_timeout_seconds: float | None = None,
        offload_after_use: bool | None = None,
    ) -> str:
        """Change how long an idle model stays on the GPU before it is moved to host RAM.

        Args:
            timeout_seconds: idle seconds on the GPU before the automatic offload (0 or more; 0 = as soon as idle).
            release_timeout_seconds: optional; seconds cached in host RAM before the model is released entirely (0 = never).
            offload_after_use: optional; true to offload right after every job, false to keep the model on the GPU until the idle timeout.

        Returns:
            JSON text: action, outcome, a message saying what changed, and the status after the change.
        """
        try:
            result = apply_settings(
                manager,
                timeout=timeout_seconds,
                release_timeout=release_timeout_seconds,
                offload_after_use=offload_after_use,
                names=("timeout_seconds", "release_timeout_seconds", "offload_after_use"),
            )
        except InvalidSetting as error:
            raise ToolError(str(error), print_exception=False) from error
        return _answer(manager, result)

    for tool in (get_gpu_status, offload_gpu, release_gpu, update_gpu_timeout):
        gr.api(tool, api_name=tool.__name__, queue=False)


@dataclass
class GPUPanel:
    """The components of a GPU panel, for apps that want to wire more events to them."""

    status: gr.HTML
    message: gr.Markdown
    offload: gr.Button
    release: gr.Button
    preheat: gr.Button
    idle_timeout: gr.Number
    release_timeout: gr.Number
    offload_after_use: gr.Checkbox
    apply: gr.Button
    timer: gr.Timer


def _stamped(text: str) -> str:
    """A panel message with the UTC time it was answered, so an old answer reads as old."""
    return f"<span class='gpc-muted'>{time.strftime('%H:%M:%S', time.gmtime())} UTC</span> · {text}"


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
        access: who may change state (control token, same origin); None: no token.

    Returns:
        The panel's components.
    """

    def current() -> str:
        return render_status(manager.get_status())

    def offload() -> tuple[str, str]:
        try:
            text = manager.force_offload().message
        except GpuControlError as error:
            text = f"**Error:** {error}"
        return current(), _stamped(text)

    def release() -> tuple[str, str]:
        try:
            text = manager.force_release().message
        except GpuControlError as error:
            text = f"**Error:** {error}"
        return current(), _stamped(text)

    def preheat() -> tuple[str, str]:
        status = manager.get_status()
        if status["in_use"]:
            return current(), _stamped("Nothing to do: a job is using the model on the device.")
        if status["transition"] in ("loading", "restoring"):
            return current(), _stamped(f"Nothing to do: the model is already {status['transition']}.")
        try:
            text = manager.preheat(load_func).message
        except GpuControlError as error:
            text = f"**Error:** {error}"
        return current(), _stamped(text)

    def apply(idle: float | None, release_after: float | None, after_use: bool) -> tuple[str, str]:
        try:
            result = apply_settings(
                manager,
                timeout=math.inf if idle is None else idle,
                release_timeout=0 if release_after is None else release_after,
                offload_after_use=after_use,
                names=("Idle timeout", "Release timeout", "Offload after use"),
            )
        except InvalidSetting as error:
            raise gr.Error(f"{error} Nothing was changed.", print_exception=False) from error
        return current(), _stamped(result.message)

    def on_page_load() -> tuple[str, float | None, float, bool]:
        idle = None if math.isinf(manager.idle_timeout) else manager.idle_timeout
        return current(), idle, manager.release_timeout, manager.offload_after_use

    with gr.Column(elem_classes="gpc-card"):
        gr.HTML('<div class="gpc-title">GPU memory manager</div>', padding=False)
        status_html = gr.HTML(elem_id="gpu-status", padding=False)
        with gr.Row(equal_height=True):
            offload_button = gr.Button("Offload to RAM", size="sm", min_width=60, elem_id="gpu-offload")
            release_button = gr.Button(
                "Release", size="sm", variant="stop", min_width=60, elem_id="gpu-release"
            )
            preheat_button = gr.Button("Preheat", size="sm", min_width=60, elem_id="gpu-preheat")
        message = gr.Markdown("", elem_id="gpu-message", elem_classes="gpc-message")
        with gr.Accordion("Timeouts", open=True, elem_id="gpu-settings"):
            with gr.Row():
                idle_input = gr.Number(
                    label="Idle timeout (s)",
                    info="on the GPU before offload; blank = never",
                    minimum=0,
                    precision=None,
                    elem_id="gpu-idle-timeout",
                )
                release_input = gr.Number(
                    label="Release timeout (s)",
                    info="in host RAM before release; 0 = never",
                    minimum=0,
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
    gr.on(None, on_page_load, outputs=[status_html, idle_input, release_input, after_use_input], **quick)
    timer.tick(current, outputs=status_html, **quick)
    offload_button.click(offload, outputs=[status_html, message], **quick)
    release_button.click(release, outputs=[status_html, message], **quick)
    preheat_button.click(preheat, outputs=[status_html, message], queue=False, api_visibility="private")
    apply_button.click(
        apply, inputs=[idle_input, release_input, after_use_input], outputs=[status_html, message], **quick
    )
    return GPUPanel(
        status=status_html,
        message=message,
        offload=offload_button,
        release=release_button,
        preheat=preheat_button,
        idle_timeout=idle_input,
        release_timeout=release_input,
        offload_after_use=after_use_input,
        apply=apply_button,
        timer=timer,
    )


PANEL_CSS = """
.gpc-card { gap: 10px; background: var(--block-background-fill); border: 1px solid var(--border-color-primary);
  border-radius: var(--radius-xl); padding: 14px !important; box-shadow: var(--block-shadow); }
.gpc-title { font-weight: 600; font-size: 1.05rem; padding: 2px 2px 0; }
.gpc-panel { display: flex; flex-direction: column; gap: 10px; font-size: 0.92rem; line-height: 1.35; }
.gpc-head { display: flex; flex-wrap: wrap; align-items: center; gap: 6px; }
.gpc-badge { display: inline-flex; align-items: center; gap: 7px; padding: 5px 12px; border-radius: 999px;
  font-weight: 600; font-size: 0.95rem; border: 1px solid transparent; }
.gpc-dot { width: 9px; height: 9px; border-radius: 50%; background: currentColor; }
.gpc-gpu { background: rgba(22, 163, 74, 0.14); color: #15803d; border-color: rgba(22, 163, 74, 0.35); }
.gpc-cpu { background: rgba(37, 99, 235, 0.12); color: #1d4ed8; border-color: rgba(37, 99, 235, 0.35); }
.gpc-unloaded { background: rgba(100, 116, 139, 0.12); color: #475569; border-color: rgba(100, 116, 139, 0.35); }
.gpc-moving { background: rgba(217, 119, 6, 0.14); color: #b45309; border-color: rgba(217, 119, 6, 0.4); }
.gpc-moving .gpc-dot { animation: gpc-pulse 1s ease-in-out infinite; }
@keyframes gpc-pulse { 50% { opacity: 0.25; } }
.dark .gpc-gpu { color: #4ade80; } .dark .gpc-cpu { color: #93c5fd; }
.dark .gpc-unloaded { color: #cbd5e1; } .dark .gpc-moving { color: #fbbf24; }
.gpc-chip { padding: 2px 9px; border-radius: 999px; font-size: 0.8rem; font-weight: 600; }
.gpc-busy { background: rgba(124, 58, 237, 0.14); color: #6d28d9; }
.gpc-pending { background: rgba(217, 119, 6, 0.14); color: #b45309; }
.gpc-sub, .gpc-muted { color: var(--body-text-color-subdued); font-size: 0.85rem; }
.gpc-section { display: flex; flex-direction: column; gap: 4px; }
.gpc-label { font-size: 0.72rem; text-transform: uppercase; letter-spacing: 0.06em; font-weight: 600;
  color: var(--body-text-color-subdued); }
.gpc-row { display: flex; justify-content: space-between; gap: 8px; flex-wrap: wrap; }
.gpc-bar { height: 10px; border-radius: 6px; background: var(--neutral-200); overflow: hidden; }
.dark .gpc-bar { background: var(--neutral-700); }
.gpc-bar.gpc-thin { height: 5px; }
.gpc-fill { height: 100%; border-radius: 6px; background: linear-gradient(90deg, #6366f1, #8b5cf6);
  transition: width 0.6s ease; }
.gpc-counts { display: grid; grid-template-columns: repeat(5, 1fr); gap: 6px; }
.gpc-count { display: flex; flex-direction: column; align-items: center; padding: 6px 2px; border-radius: 8px;
  background: var(--background-fill-secondary); border: 1px solid var(--border-color-primary); }
.gpc-count b { font-size: 1.05rem; } .gpc-count span { font-size: 0.72rem; color: var(--body-text-color-subdued); }
.gpc-alert { padding: 8px 10px; border-radius: 8px; font-size: 0.85rem; word-break: break-word; }
.gpc-error { background: rgba(220, 38, 38, 0.1); border: 1px solid rgba(220, 38, 38, 0.35); }
.gpc-warn { background: rgba(217, 119, 6, 0.1); border: 1px solid rgba(217, 119, 6, 0.35); }
.gpc-message { min-height: 1.4em; font-size: 0.9rem; }
.gpc-message p { margin: 0; }
"""
