"""Talking Portrait: a portrait and a speech track in, a talking video out, on port 7860.

    python app.py [--host 127.0.0.1] [--port 7860] [--idle-timeout 60] [--release-timeout 0]
                  [--keep-on-gpu] [--device cuda:0] [--pipeline [NAME=]mypkg.module:factory ...]
                  [--control-token-file PATH] [--share]

One FastAPI app serves everything: the REST endpoints (``/gpu/*``, ``/health``, offline
``/docs``) are registered first, then the Gradio UI is mounted at ``/`` with its MCP server
(``/gradio_api/mcp/``). Nothing is loaded at start-up: each model is loaded by its first job.

Every pipeline (``--pipeline``, repeatable; the built-in one by default) is a model of one
`GPUPool`, which shares the devices' budgets among them (see app_pool.py).

Settings come from the environment (``GPU_IDLE_TIMEOUT``, ``GPU_RELEASE_TIMEOUT``,
``GPU_OFFLOAD_AFTER_USE``, ``GPU_DEVICE``, ``NVIDIA_VISIBLE_DEVICES``, the pool's
``GPU_DEVICES``, ``GPU_BUDGET_GB``, ``GPU_RESERVE_GB``, ``GPU_HOST_BUDGET_GB``, ``GPU_WAIT_TIMEOUT``,
``GPU_SHARE_DIR``, ``GRADIO_SERVER_NAME``, ``GRADIO_SERVER_PORT``, ``GPU_CONTROL_TOKEN``, ``ALLOW_URL_INPUTS``,
``SHUTDOWN_GRACE_S``); flags override them. A bad value stops the app with one sentence and
exit status 2.

The app listens on 127.0.0.1 unless told otherwise. At SIGTERM or Ctrl+C it takes no new
jobs, gives the running one ``SHUTDOWN_GRACE_S`` seconds to finish, cancels it after that,
cuts open event streams (a browser tab's) and exits; partial videos are never left behind.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse
import atexit
import gc
import logging
import secrets
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import uvicorn

from app_pool import (
    PipelineSpec,
    build_pool,
    describe_pool,
    load_pipelines,
    parse_pipeline_specs,
    read_pool_settings,
)
from gpu_control import ControlAccess, GPUPool, GPUResourceManager, InvalidSetting, Settings
from gpu_control.config import (
    MAX_TIMEOUT_S,
    apply_visible_devices,
    validate_bool,
    validate_device,
    validate_timeout,
)
from gpu_control.pool_devices import PoolSettings
from gpu_control.security import TOKEN_ENV, is_loopback_host, read_control_token
from serving import GracefulServer, delete_partial_videos

if TYPE_CHECKING:
    from fastapi import FastAPI

    from pipelines import Pipeline
    from pipelines.jobs import JobGate

# Gradio and the pipelines are imported where they are used, so that --help and a bad
# setting answer in a second instead of after the web stack has loaded.

logger = logging.getLogger("app")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
TITLE = "Talking Portrait"
DEFAULT_KEEP_VIDEOS_HOURS = 24.0
DEFAULT_SHUTDOWN_GRACE_S = 8.0  # under Docker's 10 s between SIGTERM and SIGKILL
MAX_SHUTDOWN_GRACE_S = 300.0


class ConfigError(ValueError):
    """A flag or environment variable that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class AppConfig:
    """Everything ``python app.py`` needs, validated."""

    settings: Settings
    host: str
    port: int
    pipelines: tuple[PipelineSpec, ...]
    share: bool
    output_dir: Path
    keep_videos_s: float
    control_token: str | None = field(default=None, repr=False)
    allow_url_inputs: bool = True
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    pool: PoolSettings = field(default_factory=PoolSettings)

    @property
    def pipeline(self) -> str | None:
        """The first ``--pipeline``'s ``module:attr`` (None: the built-in pipeline)."""
        return self.pipelines[0].target if self.pipelines else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="Talking Portrait: portrait + speech -> talking video, with GPU memory managed by "
        "gpu_control.",
        epilog="The models share one GPU pool, set by the environment: GPU_DEVICES (cuda:0,cuda:1, cpu or "
        "emulated:0,emulated:1), GPU_BUDGET_GB (per device: 20 or cuda:0=20,cuda:1=10), GPU_RESERVE_GB (1), "
        "GPU_HOST_BUDGET_GB, GPU_WAIT_TIMEOUT (300 s) and GPU_SHARE_DIR (share the budgets with other "
        "processes and containers). See the README's Configuration.",
    )
    parser.add_argument(
        "--host",
        help=f"address to listen on, 0.0.0.0 = all (default: GRADIO_SERVER_NAME or {DEFAULT_HOST})",
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
    parser.add_argument(
        "--device",
        help="the one device: cpu, cuda or cuda:N (GPU_DEVICE; wins over GPU_DEVICES; "
        "default: GPU_DEVICES, else every visible CUDA device, else cpu)",
    )
    parser.add_argument(
        "--pipeline",
        action="append",
        metavar="[NAME=]MODULE:ATTR",
        help="a pipeline as package.module:attribute, added to the pool as the model NAME (default: the "
        "pipeline's own name); repeat it for several models (default: the built-in talking portrait)",
    )
    parser.add_argument(
        "--output-dir", default="outputs", help="where videos are written (default: ./outputs)"
    )
    parser.add_argument(
        "--keep-videos-hours",
        help="generated videos older than this are deleted, 0 = never (VIDEO_RETENTION_HOURS; 24)",
    )
    parser.add_argument(
        "--control-token-file",
        metavar="PATH",
        help=f"file holding the token that unlocks GPU control (a mounted secret; wins over {TOKEN_ENV})",
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

    Returns:
        The configuration; its ``repr`` never shows the control token.

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
        specs = parse_pipeline_specs(args.pipeline)
        pool_env = env if args.device is None else {k: v for k, v in env.items() if k != "GPU_DEVICES"}
        pool_settings = read_pool_settings(pool_env, device=settings.device)
        hours = {"allow_inf": False, "unit": "hours", "maximum": MAX_TIMEOUT_S / 3600}
        if args.keep_videos_hours is not None:
            keep_hours = validate_timeout("--keep-videos-hours", args.keep_videos_hours, **hours)
        elif env.get("VIDEO_RETENTION_HOURS", "").strip():
            keep_hours = validate_timeout("VIDEO_RETENTION_HOURS", env["VIDEO_RETENTION_HOURS"], **hours)
        else:
            keep_hours = DEFAULT_KEEP_VIDEOS_HOURS
        control_token = read_control_token(env, token_file=args.control_token_file)
        allow_url_inputs = True
        if env.get("ALLOW_URL_INPUTS", "").strip():
            allow_url_inputs = validate_bool("ALLOW_URL_INPUTS", env["ALLOW_URL_INPUTS"])
        grace_s = DEFAULT_SHUTDOWN_GRACE_S
        if env.get("SHUTDOWN_GRACE_S", "").strip():
            grace_s = validate_timeout(
                "SHUTDOWN_GRACE_S", env["SHUTDOWN_GRACE_S"], allow_inf=False, maximum=MAX_SHUTDOWN_GRACE_S
            )
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
        pipelines=specs,
        share=args.share,
        output_dir=output_dir,
        keep_videos_s=keep_hours * 3600.0,
        control_token=control_token,
        allow_url_inputs=allow_url_inputs,
        shutdown_grace_s=grace_s,
        pool=pool_settings,
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
    allow_url_inputs: bool = True,
    pool: GPUPool | None = None,
    pipelines: dict[str, Pipeline] | None = None,
) -> FastAPI:
    """Wire the REST endpoints, the offline docs and the Gradio UI with MCP into one app.

    Args:
        manager: owns the model's GPU-memory lifecycle (nothing is loaded here); with a pool,
            its default model (the first), which the seed's ``/gpu/*`` routes act on.
        pipeline: turns a portrait and a speech track into a video (``manager``'s).
        output_dir: where videos are written; Gradio serves files from it.
        examples: example rows for the UI (default: the files in ``examples/``).
        refresh_seconds: how often the GPU panel refreshes.
        keep_videos_s: generated videos older than this are deleted (0: never).
        access: who may change the GPU state (control token, same origin); None: no token.
        gate: admits jobs and cancels them at shutdown (default: a gate of its own).
        allow_url_inputs: whether file inputs may be http(s) URLs (never loopback, private
            or link-local addresses); False refuses them before any lookup or connection.
        pool: the models sharing the devices; the REST routes, tools, metrics and panel then
            show and control each of them (``/gpu/models``).
        pipelines: ``{model name: pipeline}`` of the pool's models; with more than one, the
            form offers a model selector.

    Returns:
        The FastAPI app, ready for uvicorn.
    """
    from fastapi import FastAPI

    from gpu_control_gradio import mount_demo
    from gpu_control.metrics import install_metrics
    from gpu_control.rest import install_method_guard, install_offline_docs, make_router
    from pipelines.jobs import JobGate
    from ui import appearance, build_demo

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
    gate = JobGate() if gate is None else gate  # one gate for the jobs and the metrics
    app.include_router(make_router(manager, access=access, pool=pool))
    install_offline_docs(app)
    install_method_guard(app)  # 405 + Allow on the REST paths, though Gradio is mounted at "/"
    managers = manager if pool is None else [pool[name] for name in pool.names()]
    install_metrics(app, managers, queue_depth=lambda: gate.running + _waiting_jobs(demo))
    demo = build_demo(
        manager,
        pipeline,
        output_dir=out,
        examples=examples,
        refresh_seconds=refresh_seconds,
        keep_videos_s=keep_videos_s,
        access=access,
        gate=gate,
        allow_url_inputs=allow_url_inputs,
        pool=pool,
        pipelines=pipelines,
    )
    return mount_demo(
        app,
        demo,
        path="/",
        allow_url_inputs=allow_url_inputs,
        mcp_server=True,
        output_dir=out,
        output_pattern="talking-*.mp4",
        ssr_mode=False,
        **appearance(),
    )


def _waiting_jobs(demo: Any) -> int:
    """Jobs waiting in Gradio's queue for the GPU slot (``concurrency_id="gpu"``), for /metrics."""
    from ui.blocks import GPU_QUEUE

    queue = getattr(demo, "_queue", None)
    waiting = None if queue is None else queue.event_queue_per_concurrency_id.get(GPU_QUEUE)
    return 0 if waiting is None else len(waiting.queue)


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


def listens_on_loopback(host: str) -> bool:
    """Whether listening on ``host`` reaches this machine only: a loopback address or a name for one.

    A name (``--host vm``) is looked up once, as uvicorn will to listen on it; a name that cannot
    be looked up counts as reaching the network.
    """
    if is_loopback_host(host):
        return True
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return bool(found) and all(is_loopback_host(info[4][0]) for info in found)


def _url_host(host: str) -> str:
    """``host`` as written in a URL a person can open (every interface: ``localhost``)."""
    if host in ("0.0.0.0", "::"):
        return "localhost"
    return f"[{host}]" if ":" in host else host


def main(argv: Sequence[str] | None = None) -> int:
    """Start the app; returns the process exit status (2 for a bad configuration)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    apply_visible_devices()  # before anything reads the devices, load_config included
    try:
        config = load_config(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from pipelines import GenerateOptions, PipelineError

    try:
        GenerateOptions()  # checks PIPELINE_MAX_AUDIO_SECONDS now rather than at the first job
        pipelines = load_pipelines(config.pipelines)  # before the pool, which logs its devices
        pool = build_pool(config.pool, config.settings, pipelines)
    except (ValueError, PipelineError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    default = next(iter(pipelines))
    manager, pipeline = pool[default], pipelines[default]
    from pipelines.jobs import JobGate

    delete_partial_videos(config.output_dir)
    gate = JobGate()
    locked = config.control_token is not None
    loopback = listens_on_loopback(config.host)  # no token: controls only at a loopback name (DNS rebinding)
    for name in pool.names():
        pool[name].start_monitor()
    app = create_app(
        manager,
        pipeline,
        output_dir=config.output_dir,
        keep_videos_s=config.keep_videos_s,
        access=ControlAccess(config.control_token, local_only=loopback),
        gate=gate,
        allow_url_inputs=config.allow_url_inputs,
        pool=pool,
        pipelines=pipelines,
    )
    logger.info(
        "%s on http://%s:%d (listening on %s, %s; REST docs: /docs, MCP: /gradio_api/mcp/); GPU control %s; "
        "%s, nothing loaded yet",
        TITLE,
        _url_host(config.host),
        config.port,
        config.host,
        "this machine only" if loopback else "reachable from the network",
        "locked by the control token" if locked else f"open (no {TOKEN_ENV})",
        describe_pool(pool),
    )
    if not loopback and not locked:
        logger.warning(
            "Anyone who can reach %s:%d can offload, release and re-time the GPU: set %s or "
            "--control-token-file to lock GPU control (status and generation stay open).",
            config.host,
            config.port,
            TOKEN_ENV,
        )
    # What start-up built (Gradio, PyTorch, the UI) lives as long as the process: keep it out of
    # Python's automatic full collections, which would otherwise pause every request, status
    # reads included, for hundreds of milliseconds while they walk it.
    gc.freeze()
    server = GracefulServer(
        uvicorn.Config(app, host=config.host, port=config.port, log_level="warning"),
        gate=gate,
        grace_s=config.shutdown_grace_s,
    )
    if config.share and os.environ.get("SPACE_ID"):
        logger.warning("--share is ignored on Hugging Face Spaces: the Space is already public.")
    elif config.share:
        threading.Thread(target=_open_share_link, args=(server, config.port), daemon=True).start()
    try:
        server.run()
    finally:
        for name in pool.names():
            pool[name].stop_monitor()  # the last one stops the pool's watcher thread
        delete_partial_videos(config.output_dir)
    if gate.running:
        left = gate.running
        logger.warning("Exiting with %d job(s) that ignored cancellation; nothing they wrote was kept", left)
    return 0 if server.started else 1


def _exit_at_once(status: int) -> NoReturn:
    """Run the exit handlers, then end the process without the interpreter's teardown.

    Everything the app opened is closed by then. Tearing down PyTorch's and Gradio's modules
    takes seconds on a busy machine, which would push a stop past Docker's 10 s, and a job
    that ignored cancellation holds a worker thread that the interpreter would wait for.
    """
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    _exit_at_once(main())
