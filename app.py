"""Talking Portrait: a portrait and a speech track in, a talking video out, on port 7860.

    python app.py [--host 0.0.0.0] [--port 7860] [--idle-timeout 60] [--release-timeout 0]
                  [--keep-on-gpu] [--device cuda:0] [--pipeline mypkg.module:factory] [--share]

One FastAPI app serves everything: the REST endpoints (``/gpu/*``, ``/health``, offline
``/docs``) are registered first, then the Gradio UI is mounted at ``/`` with its MCP server
(``/gradio_api/mcp/``). Nothing is loaded at start-up: the model is loaded by the first job.

Settings come from the environment (``GPU_IDLE_TIMEOUT``, ``GPU_RELEASE_TIMEOUT``,
``GPU_OFFLOAD_AFTER_USE``, ``GPU_DEVICE``, ``NVIDIA_VISIBLE_DEVICES``,
``GRADIO_SERVER_NAME``, ``GRADIO_SERVER_PORT``); flags override them. A bad value stops the
app with one sentence and exit status 2.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse
import logging
import secrets
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gpu_control import ControlAccess, GPUResourceManager, InvalidSetting, Settings
from gpu_control.config import apply_visible_devices, validate_device, validate_timeout

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from pipelines import Pipeline
    from pipelines.jobs import JobGate

# Gradio, the pipelines and uvicorn are imported where they are used, so that --help and a
# bad setting answer in a second instead of after the web stack has loaded.

logger = logging.getLogger("app")

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 7860
TITLE = "Talking Portrait"
DEFAULT_KEEP_VIDEOS_HOURS = 24.0


class ConfigError(ValueError):
    """A flag or environment variable that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class AppConfig:
    """Everything ``python app.py`` needs, validated."""

    settings: Settings
    host: str
    port: int
    pipeline: str | None
    share: bool
    output_dir: Path
    keep_videos_s: float


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="Talking Portrait: portrait + speech -> talking video, with GPU memory managed by gpu_control.",
    )
    parser.add_argument(
        "--host", help=f"address to listen on (default: GRADIO_SERVER_NAME or {DEFAULT_HOST})"
    )
    parser.add_argument("--port", help=f"port to listen on (default: GRADIO_SERVER_PORT or {DEFAULT_PORT})")
    parser.add_argument(
        "--idle-timeout",
        help="seconds an idle model stays on the GPU before it is offloaded (GPU_IDLE_TIMEOUT; 60)",
    )
    parser.add_argument(
        "--release-timeout",
        help="seconds a model stays in host RAM before it is released, 0 = never (GPU_RELEASE_TIMEOUT)",
    )
    parser.add_argument(
        "--keep-on-gpu",
        action="store_true",
        help="keep the model on the GPU after a job until the idle timeout (GPU_OFFLOAD_AFTER_USE=false)",
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (GPU_DEVICE; default: cuda when available)")
    parser.add_argument(
        "--pipeline",
        help="your own pipeline as package.module:attribute (default: the built-in talking portrait)",
    )
    parser.add_argument(
        "--output-dir", default="outputs", help="where videos are written (default: ./outputs)"
    )
    parser.add_argument(
        "--keep-videos-hours",
        help="generated videos older than this are deleted, 0 = never (VIDEO_RETENTION_HOURS; 24)",
    )
    parser.add_argument(
        "--share", action="store_true", help="also serve through a temporary public gradio.live link"
    )
    return parser


def _port(text: str, name: str) -> int:
    try:
        port = int(str(text).strip())
    except ValueError:
        raise ConfigError(f"{name} must be a port number from 1 to 65535, not {text!r}.") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{name} must be a port number from 1 to 65535, not {text!r}.")
    return port


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> AppConfig:
    """Read flags and environment into a validated `AppConfig`.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).
        environ: the environment (default: ``os.environ``).

    Raises:
        ConfigError: a value cannot be used; the message names the flag or variable.
        SystemExit: argparse's exit for ``--help`` or an unknown flag (status 2).
    """
    env = os.environ if environ is None else environ
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env(env)
        if args.idle_timeout is not None:
            settings = settings.with_overrides(
                idle_timeout=validate_timeout("--idle-timeout", args.idle_timeout)
            )
        if args.release_timeout is not None:
            settings = settings.with_overrides(
                release_timeout=validate_timeout("--release-timeout", args.release_timeout, allow_inf=False)
            )
        if args.keep_on_gpu:
            settings = settings.with_overrides(offload_after_use=False)
        if args.device is not None:
            settings = settings.with_overrides(device=validate_device("--device", args.device))
        if args.keep_videos_hours is not None:
            keep_hours = validate_timeout("--keep-videos-hours", args.keep_videos_hours, allow_inf=False, unit="hours")
        elif env.get("VIDEO_RETENTION_HOURS", "").strip():
            keep_hours = validate_timeout(
                "VIDEO_RETENTION_HOURS", env["VIDEO_RETENTION_HOURS"], allow_inf=False, unit="hours"
            )
        else:
            keep_hours = DEFAULT_KEEP_VIDEOS_HOURS
    except InvalidSetting as error:
        raise ConfigError(str(error)) from None
    output_dir = Path(args.output_dir).resolve()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--output-dir {args.output_dir!r} cannot be created: {error.strerror}.") from None
    if not os.access(output_dir, os.W_OK):
        raise ConfigError(f"--output-dir {args.output_dir!r} is not writable.")
    host = args.host or env.get("GRADIO_SERVER_NAME", "").strip() or DEFAULT_HOST
    if args.port is not None:
        port = _port(args.port, "--port")
    elif env.get("GRADIO_SERVER_PORT", "").strip():
        port = _port(env["GRADIO_SERVER_PORT"], "GRADIO_SERVER_PORT")
    else:
        port = DEFAULT_PORT
    return AppConfig(
        settings=settings,
        host=host,
        port=port,
        pipeline=args.pipeline,
        share=args.share,
        output_dir=output_dir,
        keep_videos_s=keep_hours * 3600.0,
    )


def create_app(
    manager: GPUResourceManager,
    pipeline: Pipeline,
    *,
    output_dir: str | Path = "outputs",
    examples: list[list[str]] | None = None,
    refresh_seconds: float = 1.5,
    keep_videos_s: float = DEFAULT_KEEP_VIDEOS_HOURS * 3600.0,
    access: ControlAccess | None = None,
    gate: JobGate | None = None,
) -> FastAPI:
    """Wire the REST endpoints, the offline docs and the Gradio UI with MCP into one app.

    Args:
        manager: owns the model's GPU-memory lifecycle (nothing is loaded here).
        pipeline: turns a portrait and a speech track into a video.
        output_dir: where videos are written; Gradio serves files from it.
        examples: example rows for the UI (default: the files in ``examples/``).
        refresh_seconds: how often the GPU panel refreshes.
        keep_videos_s: generated videos older than this are deleted (0: never).
        access: who may change the GPU state (control token, same origin); None: no token.
        gate: admits jobs and cancels them at shutdown (default: a gate of its own).

    Returns:
        The FastAPI app, ready for uvicorn.
    """
    from fastapi import FastAPI

    from gpu_control.rest import install_offline_docs, make_router
    from ui import appearance, build_demo, mount_demo

    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    app = FastAPI(
        title=TITLE,
        description="GPU memory control for the talking-portrait model (gpu_control). "
        "The web UI is at `/`; MCP at `/gradio_api/mcp/`.",
        docs_url=None,
        redoc_url=None,
    )
    access = ControlAccess() if access is None else access
    app.include_router(make_router(manager, access=access))
    install_offline_docs(app)
    demo = build_demo(
        manager,
        pipeline,
        output_dir=out,
        examples=examples,
        refresh_seconds=refresh_seconds,
        keep_videos_s=keep_videos_s,
        access=access,
        gate=gate,
    )
    return mount_demo(
        app, demo, path="/", mcp_server=True, allowed_paths=[str(out)], ssr_mode=False, **appearance()
    )


def _open_share_link(server: uvicorn.Server, port: int) -> None:
    """Wait for the server, then open a gradio.live tunnel to it; a failure only warns."""
    from gradio import networking

    while not server.started and not server.should_exit:
        time.sleep(0.1)
    if server.should_exit:
        return
    try:
        url = networking.setup_tunnel("127.0.0.1", port, secrets.token_urlsafe(32), None, None)
    except Exception as error:  # noqa: BLE001 - any failure leaves the local app serving
        logger.warning("Could not open a share link (%s); the app is served locally only.", error)
        return
    logger.info("Public share link (temporary): %s", url.replace("http://", "https://", 1))


def main(argv: Sequence[str] | None = None) -> int:
    """Start the app; returns the process exit status (2 for a bad configuration)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from pipelines import GenerateOptions, PipelineError, default_pipeline, load_pipeline

    try:
        GenerateOptions()  # checks PIPELINE_MAX_AUDIO_SECONDS now rather than at the first job
        apply_visible_devices()
        pipeline = load_pipeline(config.pipeline) if config.pipeline else default_pipeline()
        manager = GPUResourceManager.from_settings(
            config.settings, load_func=pipeline.load, name=pipeline.name
        )
    except (ValueError, PipelineError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    manager.start_monitor()
    app = create_app(manager, pipeline, output_dir=config.output_dir, keep_videos_s=config.keep_videos_s)
    shown_host = "localhost" if config.host in ("0.0.0.0", "::") else config.host
    logger.info(
        "%s on http://%s:%d  (REST docs: /docs, MCP: /gradio_api/mcp/); pipeline %r on %s, nothing loaded yet",
        TITLE,
        shown_host,
        config.port,
        pipeline.name,
        manager.device,
    )
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning"))
    if config.share and os.environ.get("SPACE_ID"):
        logger.warning("--share is ignored on Hugging Face Spaces: the Space is already public.")
    elif config.share:
        threading.Thread(target=_open_share_link, args=(server, config.port), daemon=True).start()
    try:
        server.run()
    finally:
        manager.stop_monitor()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
