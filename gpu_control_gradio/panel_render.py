"""The GPU panel's look: the status card's HTML, the pool's overview, number formats and the CSS.

Pure functions of a manager's ``get_status()`` snapshot (DESIGN.md's schema) or a pool's
(`GPUPool.get_status`); nothing here touches a manager or Gradio, so the HTML is tested
without a server.
"""

from __future__ import annotations

import html
import math
from typing import Any

__all__ = [
    "PANEL_CSS",
    "format_countdown",
    "format_gb",
    "format_seconds",
    "format_size",
    "render_pool",
    "render_status",
]

_YEAR = 365 * 86400


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
    """A countdown or timeout in whole units: ``47 s``, ``4 min 12 s``, ``2 h 05 min``, ``3 d 04 h``.

    None or infinity: ``never``; NaN: an en dash; negative: ``0 s``; beyond a year: ``over a
    year`` (never a many-digit count).
    """
    if seconds is None or math.isinf(seconds):
        return "never" if seconds is None or seconds > 0 else "0 s"
    if math.isnan(seconds):
        return "–"
    whole = math.ceil(seconds - 1e-9) if seconds < 60 else round(seconds)
    whole = max(0, whole)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        minutes, rest = divmod(whole, 60)
        return f"{minutes} min {rest:02d} s"
    if whole < 86400:
        hours, rest = divmod(whole, 3600)
        return f"{hours} h {rest // 60:02d} min"
    if whole <= _YEAR:
        days, rest = divmod(whole, 86400)
        return f"{days} d {rest // 3600:02d} h"
    return "over a year"


def _badge(status: dict[str, Any]) -> tuple[str, str]:
    """The location badge: (css class, label)."""
    device = str(status.get("device") or "")
    on_cuda = device.startswith(("cuda", "emulated"))  # an emulated card stands in for a GPU
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


def _countdown(label: str, remaining: float | None, timeout: float | None) -> str:
    """The line and bar counting down to an automatic move; empty when none is due."""
    if remaining is None:
        return ""
    fraction = remaining / timeout if timeout else 0.0
    return f"<div>{label} in <b>{format_countdown(remaining)}</b></div>" + _bar(fraction, "gpc-thin")


def _timer_section(status: dict[str, Any]) -> str:
    location = status.get("model_location")
    idle_timeout = status.get("idle_timeout")
    release_timeout = status.get("release_timeout") or 0
    lines = []
    if status.get("in_use"):
        jobs = status["in_use"]
        plural, them = ("s", "them") if jobs != 1 else ("", "it")
        lines.append(f"<div>Running {jobs} job{plural}: timers wait for {them}.</div>")
    elif status.get("transition"):
        lines.append("<div>Moving: timers start when the move ends.</div>")
    elif location == "gpu":
        lines.append(
            _countdown("Auto-offload", status.get("auto_offload_in"), idle_timeout)
            or "<div>Auto-offload: <b>never</b> (idle timeout off)</div>"
        )
    elif location == "cpu":
        lines.append(
            _countdown("Auto-release", status.get("auto_release_in"), release_timeout)
            or "<div>Kept in host RAM until released (release timeout: never)</div>"
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
    reason = reasons.get(last.get("reason"), str(last.get("reason")))
    parts = [
        f"<b>{html.escape(str(last.get('kind', '')))}</b> ({html.escape(reason)})",
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


def render_status(status: dict[str, Any], *, memory: bool = True) -> str:
    """Render a manager's status (DESIGN.md's schema) as the panel's HTML card.

    Args:
        status: what ``GPUResourceManager.get_status()`` returned.
        memory: show the device's memory (a pool's panel shows each device's budget instead).

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
        _memory_section(status) if memory else "",
        f'<div class="gpc-section"><div class="gpc-label">Model</div>{sizes}</div>',
        _timer_section(status),
        f'<div class="gpc-counts">{count_cells}</div>',
        _last_transition(status),
    ]
    if status.get("last_error"):
        error = html.escape(str(status["last_error"]))
        parts.append(f'<div class="gpc-alert gpc-error"><b>Last error</b> {error}</div>')
    if status.get("leak"):
        leaked = status.get("leaked_gb")
        amount = f" ({format_gb(leaked)})" if leaked else ""
        parts.append(
            f'<div class="gpc-alert gpc-warn"><b>Memory not freed{amount}</b> '
            f'{html.escape(str(status["leak"]))}. Drop other references to the model, then Release.</div>'
        )
    parts.append("</div>")
    return "".join(parts)


_WHERE = {"gpu": ("gpu", "GPU"), "cpu": ("cpu", "host RAM"), "unloaded": ("unloaded", "not loaded")}


def _next_move(status: dict[str, Any]) -> str:
    """A model's next automatic move: ``offload in 47 s``, ``release in 2 min 00 s`` or ``no timer``."""
    if status.get("in_use"):
        return "timers wait for its jobs"
    location = status.get("model_location")
    if location == "gpu" and status.get("auto_offload_in") is not None:
        return f"offload in {format_countdown(status['auto_offload_in'])}"
    if location == "cpu" and status.get("auto_release_in") is not None:
        return f"release in {format_countdown(status['auto_release_in'])}"
    return "no timer running"


def _model_row(name: str, status: dict[str, Any], selected: bool) -> str:
    """One model of a pool: name, where it is, size, device; next move, priority, jobs."""
    transition = status.get("transition")
    location = str(status.get("model_location"))
    kind, where = ("moving", f"{transition}…") if transition else _WHERE.get(location, ("unloaded", location))
    size = status.get("model_size_gb")
    jobs = int(status.get("in_use") or 0)
    in_use = f'<span class="gpc-chip gpc-busy">in use · {jobs}</span>' if jobs else "idle"
    device = html.escape(str(status.get("device") or "–"))
    return (
        f'<div class="gpc-model{" gpc-selected" if selected else ""}" data-model="{html.escape(name)}" '
        f'data-location="{html.escape(location)}" data-transition="{html.escape(str(transition or ""))}">'
        f'<div class="gpc-row"><span><b>{html.escape(name)}</b> '
        f'<span class="gpc-where gpc-{kind}">{html.escape(where)}</span></span>'
        f"<span>{format_size(size) if size else '–'} · {device}</span></div>"
        f'<div class="gpc-row gpc-muted"><span>{html.escape(_next_move(status))}</span>'
        f"<span>priority {int(status.get('priority') or 0)} · {in_use}</span></div>"
        "</div>"
    )


def _device_bar(device: dict[str, Any]) -> str:
    name = html.escape(str(device.get("device")))
    budget = device.get("budget_gb") or 0.0
    used = device.get("used_gb") or 0.0
    models = ", ".join(html.escape(str(model)) for model in device.get("models") or []) or "no model"
    others = "".join(_other(held) for held in device.get("others") or [])
    return (
        f'<div class="gpc-device" data-device="{name}">'
        f'<div class="gpc-row"><span><b>{name}</b> · {models}</span>'
        f"<span>used <b>{format_size(used)}</b> of {format_size(budget)}</span></div>"
        + _bar(used / budget if budget else 0.0)
        + others
        + "</div>"
    )


def _other(held: dict[str, Any]) -> str:
    """A line under a device bar: a model another process (sharing the directory) holds there."""
    in_use = int(held.get("in_use") or 0)
    idle = held.get("idle_s")
    doing = f"in use ({in_use})" if in_use else html.escape(str(held.get("state") or ""))
    if not in_use and idle is not None:
        doing += f", idle {format_countdown(math.floor(idle))}"
    return (
        f'<div class="gpc-row gpc-muted gpc-other" data-pid="{int(held.get("pid") or 0)}">'
        f"<span>process {int(held.get('pid') or 0)}: {html.escape(str(held.get('model')))}</span>"
        f"<span>{format_size(held.get('gb') or 0.0)} · {doing} · priority {int(held.get('priority') or 0)}</span>"
        "</div>"
    )


def _waiting(wait: dict[str, Any]) -> str:
    """A line of the queue: who waits, for how much room, where, since when."""
    waited = format_countdown(math.floor(wait.get("waited_s") or 0))
    return (
        f'<div class="gpc-waiting">{html.escape(str(wait.get("model")))} waits for '
        f"{format_size(wait.get('needed_gb'))} on {html.escape(str(wait.get('device') or 'any device'))} "
        f"(priority {int(wait.get('priority') or 0)}, for {waited})</div>"
    )


def render_pool(status: dict[str, Any], selected: str | None = None) -> str:
    """Render a pool's status as the panel's overview: a bar per device, a row per model, the queue.

    Args:
        status: what ``GPUPool.get_status()`` returned.
        selected: the model the panel's controls act on (its row is marked).

    Returns:
        HTML; each device's element carries ``data-device``, each model's (``.gpc-model``)
        ``data-model``, ``data-location`` and ``data-transition``.
    """
    host = status.get("host") or {}
    bars = "".join(_device_bar(device) for device in status.get("devices") or [])
    host_used, host_budget = format_size(host.get("used_gb") or 0.0), format_size(host.get("budget_gb"))
    host_line = (
        '<div class="gpc-row gpc-muted"><span>host RAM (cached models)</span>'
        f"<span>used {host_used} of {host_budget}</span></div>"
    )
    models = status.get("models") or {}
    rows = "".join(_model_row(str(name), model, name == selected) for name, model in models.items())
    waits = "".join(_waiting(wait) for wait in status.get("waiting") or [])
    return (
        '<div class="gpc-pool">'
        + _section("Devices", bars + host_line)
        + _section("Models", rows)
        + (_section("Waiting for room", waits) if waits else "")
        + "</div>"
    )


def _section(label: str, body: str) -> str:
    return f'<div class="gpc-section"><div class="gpc-label">{label}</div>{body}</div>'


PANEL_CSS = """
.gpc-card { gap: 10px; background: var(--block-background-fill);
  border: 1px solid var(--border-color-primary); border-radius: var(--radius-xl); padding: 14px !important;
  box-shadow: var(--block-shadow); }
.gpc-title { font-weight: 600; font-size: 1.05rem; padding: 2px 2px 0; }
.gpc-panel { display: flex; flex-direction: column; gap: 10px; font-size: 0.92rem; line-height: 1.35; }
.gpc-head { display: flex; flex-wrap: wrap; align-items: center; gap: 6px; }
.gpc-badge { display: inline-flex; align-items: center; gap: 7px; padding: 5px 12px; border-radius: 999px;
  font-weight: 600; font-size: 0.95rem; border: 1px solid transparent; }
.gpc-dot { width: 9px; height: 9px; border-radius: 50%; background: currentColor; }
.gpc-gpu { background: rgba(22, 163, 74, 0.14); color: #15803d; border-color: rgba(22, 163, 74, 0.35); }
.gpc-cpu { background: rgba(37, 99, 235, 0.12); color: #1d4ed8; border-color: rgba(37, 99, 235, 0.35); }
.gpc-unloaded { background: rgba(100, 116, 139, 0.12); color: #475569;
  border-color: rgba(100, 116, 139, 0.35); }
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
.gpc-count b { font-size: 1.05rem; }
.gpc-count span { font-size: 0.72rem; color: var(--body-text-color-subdued); }
.gpc-alert { padding: 8px 10px; border-radius: 8px; font-size: 0.85rem; word-break: break-word; }
.gpc-error { background: rgba(220, 38, 38, 0.1); border: 1px solid rgba(220, 38, 38, 0.35); }
.gpc-warn { background: rgba(217, 119, 6, 0.1); border: 1px solid rgba(217, 119, 6, 0.35); }
.gpc-message { min-height: 1.4em; font-size: 0.9rem; }
.gpc-message .gpc-refused, .gpc-message .gpc-failed { color: #b91c1c; font-weight: 600; }
.dark .gpc-message .gpc-refused, .dark .gpc-message .gpc-failed { color: #f87171; }
.gpc-lock { padding: 8px 10px; border-radius: 8px; font-size: 0.85rem; background: rgba(217, 119, 6, 0.1);
  border: 1px solid rgba(217, 119, 6, 0.35); }
.gpc-lock-typed { display: none; background: rgba(22, 163, 74, 0.1); border-color: rgba(22, 163, 74, 0.35); }
.gpc-card:has(#gpu-token input:not(:placeholder-shown)) .gpc-lock-waiting { display: none; }
.gpc-card:has(#gpu-token input:not(:placeholder-shown)) .gpc-lock-typed { display: block; }
.gpc-pool { display: flex; flex-direction: column; gap: 10px; font-size: 0.9rem; }
.gpc-device { display: flex; flex-direction: column; gap: 3px; }
.gpc-model { display: flex; flex-direction: column; gap: 2px; padding: 6px 8px; border-radius: 8px;
  border: 1px solid var(--border-color-primary); }
.gpc-model.gpc-selected { background: var(--background-fill-secondary); border-color: var(--color-accent); }
.gpc-where { padding: 1px 8px; border-radius: 999px; font-size: 0.75rem; font-weight: 600; margin-left: 4px;
  border: 1px solid transparent; }
.gpc-waiting { padding: 4px 8px; border-radius: 8px; font-size: 0.84rem; background: rgba(217, 119, 6, 0.1); }
"""
