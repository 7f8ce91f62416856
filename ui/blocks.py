"""The app's Blocks UI: portrait + speech in, talking video out, with the live GPU panel.

Layout and wiring only: the model's lifecycle belongs to `gpu_control`, generation to
`pipelines`. Every event that touches a model shares one queue slot
(``concurrency_id="gpu"``, limit 1); the GPU panel's controls are not queued and answer at
once. ``generate_video`` (`ui.generate`) is also an API endpoint and an MCP tool (its
docstring is the tool's description) and answers JSON text. With a pool of several
pipelines, the form has a model selector and each job runs through that model's manager.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from gpu_control import ControlAccess, GPUPool, GPUResourceManager
from gpu_control_gradio import PANEL_CSS, ToolError, format_seconds, gpu_panel, register_gpu_api
from pipelines import Pipeline
from pipelines.jobs import JobGate

from .generate import DEFAULT_KEEP_VIDEOS_S, make_generate_fn
from .generate import _public_url as _public_url  # importable here as before the move

__all__ = [
    "EXAMPLES_DIR",
    "GPU_QUEUE",
    "appearance",
    "build_demo",
    "cost_html",
    "example_rows",
    "make_generate_fn",
]

GPU_QUEUE = "gpu"
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
        f'<div class="tp-phase"><span>{html.escape(name)}</span>'
        f"<b>{_shown(seconds, format_seconds)}</b></div>"
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
        f'<div class="tp-phases">{cells}</div>{breakdown}'
        f'<div class="tp-facts">{facts}</div>{notes_html}</div>'
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
    pool: GPUPool | None = None,
    pipelines: dict[str, Pipeline] | None = None,
) -> gr.Blocks:
    """Build the Blocks app around one manager and one pipeline, or a pool of them.

    Args:
        manager: owns the model's GPU-memory lifecycle (with a pool: the default model's).
        pipeline: turns a portrait and a speech track into a video (``manager``'s).
        output_dir: where videos are written (default: ``outputs/`` in the working folder).
            Serve its videos by passing it as ``output_dir`` to `gpu_control_gradio.mount_demo`.
        examples: ``[[image, audio], ...]`` shown under the inputs (default: `example_rows()`).
        refresh_seconds: how often the GPU panel refreshes.
        keep_videos_s: how long generated videos (and Gradio's cached copies) are kept (0: always).
        access: who may change the GPU state (control token, same origin); None: no token.
        gate: admits jobs and cancels them at shutdown (default: a gate of its own).
        allow_url_inputs: whether the MCP tool description offers http(s) URLs for files; pass
            the same value to `gpu_control_gradio.mount_demo`, which enforces it.
        pool: the models sharing the devices: the GPU panel and tools then show and control
            each of them.
        pipelines: ``{model name: pipeline}`` of the pool's models; with more than one, the
            form has a model selector (``generate_video`` a ``model`` argument) and each job
            runs through ``pool[name]``.

    Returns:
        The Blocks; mount it with ``gpu_control_gradio.mount_demo(app, demo, path="/", mcp_server=True,
        output_dir=output_dir, output_pattern="talking-*.mp4", **appearance())``.

    Raises:
        ValueError: several pipelines without a pool.
        KeyError: a pipeline whose name is not a model of the pool.
    """
    out = Path(output_dir) if output_dir is not None else Path.cwd() / "outputs"
    out.mkdir(parents=True, exist_ok=True)
    rows = example_rows() if examples is None else examples
    gate = JobGate() if gate is None else gate
    models = None
    if pipelines is not None and len(pipelines) > 1:
        if pool is None:
            raise ValueError("Several pipelines need a pool: pass pool= with a model for each pipeline.")
        models = {name: (pool[name], each) for name, each in pipelines.items()}
    generate_video = make_generate_fn(
        manager, pipeline, out, keep_videos_s, gate=gate, allow_url_inputs=allow_url_inputs, models=models
    )
    show_result = _result_shower(out)
    cache_sweep = None
    if keep_videos_s > 0:
        cache_sweep = (int(min(3600, max(60, keep_videos_s))), int(max(60, keep_videos_s)))

    with gr.Blocks(title="Talking Portrait · gpu_control", delete_cache=cache_sweep) as demo:
        register_gpu_api(manager, access=access, pool=pool)
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
                        model_choice = None
                        if models is not None:
                            model_choice = gr.Dropdown(
                                choices=list(models),
                                value=manager.name if manager.name in models else next(iter(models)),
                                label="Model",
                                info="which model makes the video",
                                allow_custom_value=True,  # generate_video refuses an unknown name in words
                                elem_id="model-choice",
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
                gpu_panel(
                    manager,
                    load_func=pipeline.load,
                    refresh_seconds=refresh_seconds,
                    access=access,
                    pool=pool,
                    load_funcs=None if pipelines is None else {name: p.load for name, p in pipelines.items()},
                )

        inputs = [image, audio, fps, size, expressiveness, head_motion, blinks, seed, mouth]
        if model_choice is not None:
            inputs.append(model_choice)
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
