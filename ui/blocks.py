"""The app's Blocks UI: portrait + speech in, talking video out, with the live GPU panel.

Layout and wiring only: the model's lifecycle belongs to `gpu_control`, generation to
`pipelines`. Every event that touches the model shares one queue slot
(``concurrency_id="gpu"``, limit 1); the GPU panel's controls are not queued and answer at
once. ``generate_video`` is also an API endpoint and an MCP tool (its docstring is the tool's
description) and answers JSON text.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import gradio as gr
from PIL import Image

from gpu_control import ControlAccess, GpuControlError, GPUResourceManager, LoadError
from pipelines import GenerateOptions, MediaError, Pipeline, PipelineError, run_pipeline
from pipelines.jobs import JobCancelled, JobGate, ShuttingDown
from pipelines.media import prune_videos

from .gpu_panel import PANEL_CSS, ToolError, format_seconds, gpu_panel, register_gpu_api

__all__ = [
    "EXAMPLES_DIR",
    "GPU_QUEUE",
    "appearance",
    "build_demo",
    "cost_html",
    "example_rows",
    "make_generate_fn",
]

logger = logging.getLogger(__name__)

GPU_QUEUE = "gpu"
DEFAULT_KEEP_VIDEOS_S = 24 * 3600.0  # generated videos older than this are deleted
"""The concurrency id every model-touching event shares (with a limit of 1)."""

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".m4a")

_HEADER = """
<div class="tp-header">
  <div>
    <div class="tp-title">Talking Portrait</div>
    <div class="tp-tagline">A portrait and a speech track in, a talking video out. The model is loaded on the
    first request, moved to host RAM after each job and released when idle: watch it on the right.</div>
  </div>
  <div class="tp-links">
    <a href="docs" target="_blank">REST API</a>
    <a href="gradio_api/mcp/" target="_blank">MCP</a>
    <a href="?view=api" target="_blank">Gradio API</a>
  </div>
</div>
"""

_CSS = (
    """
.gradio-container { max-width: 1480px !important; }
.tp-header { display: flex; justify-content: space-between; align-items: flex-end; gap: 16px; flex-wrap: wrap;
  padding: 6px 4px 2px; }
.tp-title { font-size: 1.75rem; font-weight: 700; letter-spacing: -0.01em; }
.tp-tagline { color: var(--body-text-color-subdued); max-width: 760px; margin-top: 2px; }
.tp-links { display: flex; gap: 8px; }
.tp-links a { padding: 4px 12px; border-radius: 999px; border: 1px solid var(--border-color-primary);
  text-decoration: none; font-size: 0.85rem; color: var(--body-text-color); }
.tp-links a:hover { background: var(--background-fill-secondary); }
.tp-cost { display: flex; flex-direction: column; gap: 8px; padding: 2px; }
.tp-cost-title { font-weight: 600; }
.tp-phases { display: grid; grid-template-columns: repeat(4, minmax(0, 1fr)); gap: 6px; }
.tp-phase { display: flex; flex-direction: column; gap: 2px; padding: 8px 10px; border-radius: 8px;
  background: var(--background-fill-secondary); border: 1px solid var(--border-color-primary); }
.tp-phase span { font-size: 0.75rem; color: var(--body-text-color-subdued); }
.tp-phase b { font-size: 1.05rem; }
.tp-total { border-color: var(--color-accent); }
.tp-facts { font-size: 0.9rem; }
.tp-muted { font-size: 0.8rem; color: var(--body-text-color-subdued); }
.tp-note { padding: 6px 10px; border-radius: 8px; font-size: 0.85rem; background: rgba(217, 119, 6, 0.1);
  border: 1px solid rgba(217, 119, 6, 0.35); }
"""
    + PANEL_CSS
)


def appearance() -> dict[str, Any]:
    """The theme and CSS to pass to ``gr.mount_gradio_app`` or ``demo.launch``."""
    theme = gr.themes.Soft(primary_hue="indigo", secondary_hue="violet", neutral_hue="slate")
    return {"theme": theme, "css": _CSS}


def example_rows(folder: Path = EXAMPLES_DIR) -> list[list[str]]:
    """Pair each example portrait with a speech clip from ``folder`` (sorted by name).

    Returns:
        ``[[image_path, audio_path], ...]``; empty when the folder has no image or no audio.
    """
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in _IMAGE_SUFFIXES]
    audios = [p for p in files if p.suffix.lower() in _AUDIO_SUFFIXES]
    if not images or not audios:
        return []
    count = max(len(images), len(audios))
    return [[str(images[i % len(images)]), str(audios[i % len(audios)])] for i in range(count)]


def _public_url(request: gr.Request | None, path: str) -> str | None:
    """The URL at which Gradio serves ``path`` to the caller of ``request``."""
    if request is None:
        return None
    headers = {str(k).lower(): str(v) for k, v in dict(getattr(request, "headers", {}) or {}).items()}
    host = headers.get("x-forwarded-host", headers.get("host", "")).split(",")[0].strip()
    if not host:
        return None
    proto = headers.get("x-forwarded-proto", "").split(",")[0].strip()
    if not proto:
        url = str(getattr(request, "url", "") or "")
        proto = "https" if url.startswith("https:") else "http"
    return f"{proto}://{host}/gradio_api/file={quote(path)}"


def _counts(manager: GPUResourceManager) -> dict[str, int]:
    return dict(manager.get_status()["counts"])


def make_generate_fn(
    manager: GPUResourceManager,
    pipeline: Pipeline,
    output_dir: Path,
    keep_videos_s: float = DEFAULT_KEEP_VIDEOS_S,
    *,
    gate: JobGate | None = None,
    allow_url_inputs: bool = True,
) -> Any:
    """Build ``generate_video``, the function behind the Generate button, the API and MCP.

    Args:
        manager: owns the model's GPU-memory lifecycle.
        pipeline: turns a portrait and a speech track into a video.
        output_dir: where videos are written.
        keep_videos_s: videos in ``output_dir`` older than this are deleted before each job (0: never).
        gate: admits jobs; once closed it refuses them, and a cancelled job stops at its next
            progress report (default: a gate of its own).
        allow_url_inputs: whether the tool description offers http(s) URLs for files.

    Returns:
        ``generate_video(image, audio, fps, size, ...)``; it answers JSON text and raises
        `ToolError` with a sentence for anything it cannot do.
    """
    gate = JobGate() if gate is None else gate

    def generate_video(
        image: str | None,
        audio: str | None,
        fps: float = 25,
        size: float = 512,
        expressiveness: float = 1.0,
        head_motion: float = 1.0,
        blinks: float = 1.0,
        seed: float = 0,
        mouth: str | None = None,
        request: gr.Request = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way to ask for a progress bar
    ) -> str:
        """Animate a portrait so that it speaks the given speech track, and return the talking video.

        The video model is loaded on the GPU for the job (from disk on the first job, from host RAM afterwards) and moved off the GPU when the job ends. Jobs run one at a time.

        Args:
            image: the portrait: one face, roughly frontal (png, jpeg or webp; at least 64 px a side, at most 4 times as wide as tall or the reverse). Over MCP: a data: URI (data:image/png;base64,...) or an http(s) URL of a public file.
            audio: the speech track (wav, mp3, flac, ogg or m4a; at least 0.5 s); the video is as long as the audio. Over MCP: a data: URI (data:audio/wav;base64,...) or an http(s) URL of a public file.
            fps: frames per second of the video (1-60).
            size: long side of the video in pixels (64-2048); the short side follows the portrait.
            expressiveness: how wide the mouth opens (0-2; 0 keeps it closed).
            head_motion: how much the head sways and nods (0-2; 0 keeps it still).
            blinks: blink rate relative to a natural one (0-3; 0 disables blinking).
            seed: makes head motion and blinks repeatable (whole number).
            mouth: optional mouth position "x,y" as fractions of the image width and height (e.g. "0.5,0.7"); empty detects it automatically.

        Returns:
            JSON text: video_url (where to download the MP4), video_path (on the server), duration_s, frames, fps, width, height, notes (remarks such as no face found), timings in seconds (acquire = load or restore the model, generate, release = offload after the job) and acquired_by ("load", "restore" or "resident").
        """
        if not image:
            raise ToolError(
                "Add a portrait image first: upload one, paste one, or click an example below.",
                print_exception=False,
            )
        if not audio:
            raise ToolError(
                "Add a speech track first: upload an audio file or record one with the microphone.",
                print_exception=False,
            )
        if keep_videos_s > 0:
            prune_videos(output_dir, max_age_s=keep_videos_s, pattern="talking-*.mp4")
        output_path = output_dir / f"talking-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.mp4"
        try:
            options = GenerateOptions.from_mapping(
                {
                    "fps": fps,
                    "size": size,
                    "expressiveness": expressiveness,
                    "head_motion": head_motion,
                    "blinks": blinks,
                    "seed": seed,
                    "mouth": mouth,
                    "output_path": str(output_path),
                }
            )
        except ValueError as error:
            raise ToolError(f"{error}", print_exception=False) from error

        def report(fraction: float, message: str) -> None:
            gate.check()  # a job cancelled at shutdown stops here, at its next progress report
            progress(fraction, desc=message)

        progress(0.0, desc="Waiting for the model")
        try:
            with gate.job():
                before = _counts(manager)
                video = run_pipeline(manager, pipeline, image, audio, options, report)
        except (ShuttingDown, JobCancelled, MediaError) as error:
            raise ToolError(str(error), print_exception=False) from error
        except LoadError as error:
            raise ToolError(
                f"{error} Check the server log; the next request tries to load it again."
            ) from error
        except (GpuControlError, PipelineError) as error:
            raise ToolError(str(error)) from error
        except Exception as error:
            logger.exception("generate_video failed")
            raise ToolError(
                "The video could not be made because of an error on the server; its log has the details.",
                print_exception=False,
            ) from error
        after = _counts(manager)
        if after["loads"] > before["loads"]:
            acquired_by = "load"
        elif after["restores"] > before["restores"]:
            acquired_by = "restore"
        else:
            acquired_by = "resident"
        result = {
            "video_url": _public_url(request, video.path),
            "video_path": video.path,
            **{k: v for k, v in video.to_dict().items() if k != "path"},
            "acquired_by": acquired_by,
            "offloaded": after["offloads"] > before["offloads"],
        }
        return json.dumps(result)

    if not allow_url_inputs:
        generate_video.__doc__ = (generate_video.__doc__ or "").replace(
            " or an http(s) URL of a public file.", "; this server does not fetch URLs."
        )
    return generate_video


_PHASES = ("validate", "acquire", "generate", "release")


def cost_html(result: dict[str, Any]) -> str:
    """What a job cost (model acquire, generate, offload seconds) and the video's facts, as HTML.

    The result comes back from the browser, so any of it may be missing or of another kind: a
    value that is not a finite number of the right kind is shown as an en dash.

    Args:
        result: what ``generate_video`` returned, parsed.

    Returns:
        The card's HTML (every text in it escaped).
    """
    result = result if isinstance(result, dict) else {}
    timings = result.get("timings")
    timings = timings if isinstance(timings, dict) else {}
    acquire = {"load": "Load model", "restore": "Restore from RAM", "resident": "Model was ready"}
    acquired_by = result.get("acquired_by")
    release = "Offload to RAM" if result.get("offloaded") is True else "End of job"
    phases = [
        (
            acquire.get(acquired_by, "Acquire model") if isinstance(acquired_by, str) else "Acquire model",
            _number(timings.get("acquire")),
        ),
        ("Generate", _number(timings.get("generate"))),
        (release, _number(timings.get("release"))),
    ]
    known = [seconds for _, seconds in phases if seconds is not None]
    total = sum(known) if known else None
    cells = "".join(
        f'<div class="tp-phase"><span>{html.escape(name)}</span><b>{_shown(seconds, format_seconds)}</b></div>'
        for name, seconds in phases
    )
    cells += f'<div class="tp-phase tp-total"><span>Total</span><b>{_shown(total, format_seconds)}</b></div>'
    inside = [
        f"{html.escape(name)} {format_seconds(seconds)}"
        for name, seconds in ((name, _number(value)) for name, value in timings.items())
        if isinstance(name, str) and name not in _PHASES and seconds is not None
    ]
    breakdown = f'<div class="tp-muted">generate = {" · ".join(inside)}</div>' if inside else ""
    facts = (
        f"{_shown(_number(result.get('duration_s')), '{:.2f}'.format)} s of video · "
        f"{_shown(_number(result.get('frames')), '{:.0f}'.format)} frames at "
        f"{_shown(_number(result.get('fps')), '{:g}'.format)} fps · "
        f"{_shown(_number(result.get('width')), '{:.0f}'.format)}×"
        f"{_shown(_number(result.get('height')), '{:.0f}'.format)} px"
    )
    notes = result.get("notes")
    notes_html = "".join(
        f'<div class="tp-note">{html.escape(note)}</div>'
        for note in (notes if isinstance(notes, list) else [])
        if isinstance(note, str)
    )
    return (
        '<div class="tp-cost"><div class="tp-cost-title">What this job cost</div>'
        f'<div class="tp-phases">{cells}</div>{breakdown}<div class="tp-facts">{facts}</div>{notes_html}</div>'
    )


def _number(value: Any) -> float | None:
    """A finite number of 0 or more from a result (not a flag, not text); None otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _shown(value: float | None, form: Any) -> str:
    """``value`` written by ``form`` (from a billion on in 3 digits), or an en dash when there is none."""
    if value is None or not math.isfinite(value):
        return "–"
    return str(form(value)) if value < 1e9 else f"{value:.3g}"


def _result_shower(output_dir: Path) -> Any:
    """Build the step after a job: generate_video's JSON to the video player's file and the cost card.

    The JSON comes back from the browser, so only the file's name is taken from it: the video
    shown is always one of the app's own in ``output_dir``.
    """
    folder = output_dir.resolve()

    def show_result(result_json: str) -> tuple[str, str]:
        try:
            result = json.loads(result_json)
        except (TypeError, ValueError, RecursionError):
            result = None
        if not isinstance(result, dict) or not isinstance(result.get("video_path"), str):
            raise ToolError(
                "That is not a result of generate_video; generate a video first.", print_exception=False
            )
        name = Path(result["video_path"]).name
        video = folder / name
        if not (name.startswith("talking-") and name.endswith(".mp4") and _is_file(video)):
            raise ToolError(
                "That video is not on the server (old videos are deleted); generate it again.",
                print_exception=False,
            )
        return str(video), cost_html(result)

    return show_result


def _is_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (False for a name the system cannot take)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _mouth_from_click(image_path: str | None, event: gr.SelectData) -> str:
    """A click on the portrait sets the mouth override (fractions of width and height)."""
    index = getattr(event, "index", None)
    if not image_path or not isinstance(index, (list, tuple)) or len(index) != 2:
        return ""
    x, y = index
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (x, y)):
        return ""
    try:
        with Image.open(image_path) as picture:
            width, height = picture.size
    except (OSError, ValueError):
        return ""  # not an image the click could be placed on; detection finds the mouth
    return f"{min(max(x / width, 0.0), 1.0):.3f},{min(max(y / height, 0.0), 1.0):.3f}"


def build_demo(
    manager: GPUResourceManager,
    pipeline: Pipeline,
    *,
    output_dir: str | Path | None = None,
    examples: list[list[str]] | None = None,
    refresh_seconds: float = 1.5,
    keep_videos_s: float = DEFAULT_KEEP_VIDEOS_S,
    access: ControlAccess | None = None,
    gate: JobGate | None = None,
    allow_url_inputs: bool = True,
) -> gr.Blocks:
    """Build the Blocks app around one manager and one pipeline.

    Args:
        manager: owns the model's GPU-memory lifecycle.
        pipeline: turns a portrait and a speech track into a video.
        output_dir: where videos are written (default: ``outputs/`` in the working folder).
            Serve its videos by passing it as ``output_dir`` to `ui.mount_demo`.
        examples: ``[[image, audio], ...]`` shown under the inputs (default: `example_rows()`).
        refresh_seconds: how often the GPU panel refreshes.
        keep_videos_s: how long generated videos (and Gradio's cached copies) are kept (0: always).
        access: who may change the GPU state (control token, same origin); None: no token.
        gate: admits jobs and cancels them at shutdown (default: a gate of its own).
        allow_url_inputs: whether the MCP tool description offers http(s) URLs for files; pass
            the same value to `ui.mount_demo`, which enforces it.

    Returns:
        The Blocks; mount it with ``ui.mount_demo(app, demo, path="/", mcp_server=True,
        output_dir=output_dir, output_pattern="talking-*.mp4", **appearance())``.
    """
    out = Path(output_dir) if output_dir is not None else Path.cwd() / "outputs"
    out.mkdir(parents=True, exist_ok=True)
    rows = example_rows() if examples is None else examples
    gate = JobGate() if gate is None else gate
    generate_video = make_generate_fn(
        manager, pipeline, out, keep_videos_s, gate=gate, allow_url_inputs=allow_url_inputs
    )
    show_result = _result_shower(out)
    cache_sweep = None
    if keep_videos_s > 0:
        cache_sweep = (int(min(3600, max(60, keep_videos_s))), int(max(60, keep_videos_s)))

    with gr.Blocks(title="Talking Portrait · gpu_control", delete_cache=cache_sweep) as demo:
        register_gpu_api(manager, access=access)
        gr.HTML(_HEADER, padding=False)
        with gr.Row(equal_height=False):
            with gr.Column(scale=7):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=300):
                        image = gr.Image(
                            label="Portrait",
                            type="filepath",
                            sources=["upload", "clipboard", "webcam"],
                            height=300,
                            elem_id="portrait",
                        )
                        audio = gr.Audio(
                            label="Speech",
                            type="filepath",
                            sources=["upload", "microphone"],
                            elem_id="speech",
                        )
                        generate = gr.Button(
                            "Generate video", variant="primary", size="lg", elem_id="generate"
                        )
                    with gr.Column(scale=1, min_width=300):
                        video = gr.Video(
                            label="Talking video", height=380, autoplay=False, elem_id="result-video"
                        )
                        cost = gr.HTML("", elem_id="job-cost", padding=False)
                        result_json = gr.Textbox(visible=False, elem_id="result-json")
                with gr.Accordion("Options", open=False, elem_id="options"):
                    with gr.Row():
                        fps = gr.Slider(1, 60, value=25, step=1, label="Frames per second")
                        size = gr.Slider(64, 2048, value=512, step=16, label="Size (long side, px)")
                        seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                    with gr.Row():
                        expressiveness = gr.Slider(0, 2, value=1.0, step=0.05, label="Expressiveness")
                        head_motion = gr.Slider(0, 2, value=1.0, step=0.05, label="Head motion")
                        blinks = gr.Slider(0, 3, value=1.0, step=0.1, label="Blinks")
                    mouth = gr.Textbox(
                        label="Mouth position (x,y)",
                        placeholder="automatic; or click the portrait where the mouth is",
                        info="fractions of the image width and height, e.g. 0.5,0.7; empty = detect",
                    )
                example_set = None
                if rows:
                    example_set = gr.Examples(
                        rows,
                        inputs=[image, audio],
                        label="Examples: click one to generate",
                        cache_examples=False,
                        elem_id="examples",
                    )
            with gr.Column(scale=4, min_width=320):
                gpu_panel(manager, load_func=pipeline.load, refresh_seconds=refresh_seconds, access=access)

        inputs = [image, audio, fps, size, expressiveness, head_motion, blinks, seed, mouth]
        job = {"concurrency_id": GPU_QUEUE, "concurrency_limit": 1, "show_progress_on": [video]}
        shown = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
        generate.click(
            generate_video, inputs=inputs, outputs=result_json, api_name="generate_video", **job
        ).success(show_result, inputs=result_json, outputs=[video, cost], **shown)
        if example_set is not None:
            example_set.load_input_event.then(
                generate_video, inputs=inputs, outputs=result_json, api_visibility="private", **job
            ).success(show_result, inputs=result_json, outputs=[video, cost], **shown)
        image.select(_mouth_from_click, inputs=image, outputs=mouth, **shown)
        image.change(lambda: "", outputs=mouth, **shown)
    return demo
