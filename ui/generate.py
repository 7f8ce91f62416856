"""``generate_video``: the function behind the Generate button, the Gradio API and the MCP tool.

    generate_video = make_generate_fn(manager, pipeline, output_dir, gate=gate)
    generate_video = make_generate_fn(manager, pipeline, output_dir, models={"a": (pool["a"], a), ...})

It checks the inputs, runs the pipeline through its model's manager (one lease per job),
and answers JSON text; anything it cannot do is a `ToolError` with a sentence. With several
models it takes a ``model`` argument as well (empty: the default model); the name comes from
the caller and is looked up among the models, never used otherwise.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import gradio as gr

from gpu_control import GpuControlError, GPUResourceManager, LoadError
from gpu_control_gradio import ToolError
from gpu_control.security import excerpt
from pipelines import GenerateOptions, MediaError, Pipeline, PipelineError, run_pipeline
from pipelines.jobs import JobCancelled, JobGate, ShuttingDown
from pipelines.media import prune_videos

__all__ = ["DEFAULT_KEEP_VIDEOS_S", "make_generate_fn"]

logger = logging.getLogger(__name__)

DEFAULT_KEEP_VIDEOS_S = 24 * 3600.0
"""Generated videos older than this are deleted."""

Models = Mapping[str, tuple[GPUResourceManager, Pipeline]]
"""A pool's models for the jobs: ``{name: (its manager, its pipeline)}``."""

_MOUTH_LINE = re.compile(r"^(?P<indent>[ \t]*)mouth: .*$", re.MULTILINE)
"""The ``mouth`` argument's line in the docstring; the ``model`` argument's goes after it."""


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
    models: Models | None = None,
) -> Any:
    """Build ``generate_video``, the function behind the Generate button, the API and MCP.

    Args:
        manager: owns the model's GPU-memory lifecycle (the default model's, with ``models``).
        pipeline: turns a portrait and a speech track into a video.
        output_dir: where videos are written.
        keep_videos_s: videos in ``output_dir`` older than this are deleted before each job (0: never).
        gate: admits jobs; once closed it refuses them, and a cancelled job stops at its next
            progress report (default: a gate of its own).
        allow_url_inputs: whether the tool description offers http(s) URLs for files.
        models: ``{name: (manager, pipeline)}`` of a pool's models; with more than one,
            ``generate_video`` takes a ``model`` argument (empty: ``manager``'s model) and its
            result names the model.

    Returns:
        ``generate_video(image, audio, fps, size, ...)``; it answers JSON text and raises
        `ToolError` with a sentence for anything it cannot do.
    """
    gate = JobGate() if gate is None else gate

    def run(
        job_manager: GPUResourceManager,
        job_pipeline: Pipeline,
        image: str | None,
        audio: str | None,
        values: dict[str, Any],
        request: gr.Request | None,
        progress: Any,
    ) -> dict[str, Any]:
        """One job: check the inputs, run the pipeline through its manager, describe the video."""
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
            options = GenerateOptions.from_mapping({**values, "output_path": str(output_path)})
        except ValueError as error:
            raise ToolError(f"{error}", print_exception=False) from error

        def report(fraction: float, message: str) -> None:
            gate.check()  # a job cancelled at shutdown stops here, at its next progress report
            progress(fraction, desc=message)

        progress(0.0, desc="Waiting for the model")
        try:
            with gate.job():
                before = _counts(job_manager)
                video = run_pipeline(job_manager, job_pipeline, image, audio, options, report)
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
        after = _counts(job_manager)
        if after["loads"] > before["loads"]:
            acquired_by = "load"
        elif after["restores"] > before["restores"]:
            acquired_by = "restore"
        else:
            acquired_by = "resident"
        return {
            "video_url": _public_url(request, video.path),
            "video_path": video.path,
            **{k: v for k, v in video.to_dict().items() if k != "path"},
            "acquired_by": acquired_by,
            "offloaded": after["offloads"] > before["offloads"],
        }

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
        """  # noqa: E501 - Gradio and MCP clients show each argument's description as one line
        values = {
            "fps": fps,
            "size": size,
            "expressiveness": expressiveness,
            "head_motion": head_motion,
            "blinks": blinks,
            "seed": seed,
            "mouth": mouth,
        }
        return json.dumps(run(manager, pipeline, image, audio, values, request, progress))

    chosen: Any = generate_video
    if models is not None and len(models) > 1:
        chosen = _with_model(generate_video, run, manager, models)
    if not allow_url_inputs:
        chosen.__doc__ = (chosen.__doc__ or "").replace(
            " or an http(s) URL of a public file.", "; this server does not fetch URLs."
        )
    return chosen


def _with_model(single: Any, run: Any, manager: GPUResourceManager, models: Models) -> Any:
    """``generate_video`` with a ``model`` argument after ``mouth`` (several models)."""
    default = next((name for name, (each, _) in models.items() if each is manager), next(iter(models)))
    known = ", ".join(repr(name) for name in models)

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
        model: str | None = "",
        request: gr.Request = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way to ask for a progress bar
    ) -> str:
        name = default if model is None or model == "" else model
        found = models.get(name) if isinstance(name, str) else None
        if found is None:
            raise ToolError(f"No model named {excerpt(model)}; pick one of {known}.", print_exception=False)
        values = {
            "fps": fps,
            "size": size,
            "expressiveness": expressiveness,
            "head_motion": head_motion,
            "blinks": blinks,
            "seed": seed,
            "mouth": mouth,
        }
        return json.dumps({**run(*found, image, audio, values, request, progress), "model": name})

    line = f"model: which model makes the video: one of {known} (empty: {default!r})."
    doc = _MOUTH_LINE.sub(lambda found: f"{found[0]}\n{found['indent']}{line}", single.__doc__ or "", count=1)
    result = "), model (the one that made the video) and acquired_by ("
    generate_video.__doc__ = doc.replace(") and acquired_by (", result)
    return generate_video
