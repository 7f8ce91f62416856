"""Doubles and helpers for the app tests: a small real pipeline, inputs, a live server."""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import soundfile
import torch
import uvicorn
from PIL import Image, ImageDraw
from torch import nn

from gpu_control import GPUResourceManager
from pipelines.media import OUTPUT_AUDIO_RATE, VideoWriter, read_audio, read_image

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")


class GatedPipeline:
    """A small, real pipeline: the portrait, brightened with the speech's loudness, as an MP4.

    ``gate`` (when set) holds generation after the first frame until the test opens it, so a
    test can act while a job runs; ``generating`` is set once a job holds the model.
    """

    name = "test-portrait"

    def __init__(self) -> None:
        self.gate: threading.Event | None = None
        self.generating = threading.Event()
        self.loads = 0
        self.calls = 0
        self.model_devices: list[str] = []

    def load(self) -> nn.Module:
        self.loads += 1
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    def generate(self, model: nn.Module, image: Any, audio: Any, options: Any, progress: Any) -> str:
        self.calls += 1
        self.model_devices.append(str(next(model.parameters()).device))
        portrait = read_image(image)
        sound = read_audio(audio, sample_rate=OUTPUT_AUDIO_RATE)
        scale = options.size / max(portrait.size)
        width = max(2, int(portrait.width * scale) // 2 * 2)
        height = max(2, int(portrait.height * scale) // 2 * 2)
        base = np.asarray(portrait.resize((width, height)), dtype=np.float32)
        frames = max(1, math.ceil(sound.duration * options.fps))
        per_frame = len(sound.samples) / frames
        self.generating.set()
        with VideoWriter(options.output_path, width=width, height=height, fps=options.fps) as writer:
            for index in range(frames):
                chunk = sound.samples[int(index * per_frame) : int((index + 1) * per_frame)]
                loudness = float(np.sqrt(np.mean(chunk**2))) if len(chunk) else 0.0
                with torch.no_grad():
                    gain = 1.0 + 0.5 * float(model(torch.full((1, 8), loudness)).mean())
                writer.write_frame(np.clip(base * gain, 0, 255).astype(np.uint8))
                if progress is not None:
                    progress((index + 1) / frames, "Rendering frames")
                if index == 0 and self.gate is not None:
                    assert self.gate.wait(30), "the test never opened the gate"
            writer.write_audio(sound.samples)
        return str(options.output_path)


def make_portrait(path: Path, size: int = 160) -> Path:
    """A drawn face (skin oval, eyes, mouth) on a plain background."""
    image = Image.new("RGB", (size, size), (70, 110, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size * 0.2, size * 0.1, size * 0.8, size * 0.9), fill=(230, 190, 160))
    for x in (0.38, 0.62):
        draw.ellipse((size * (x - 0.05), size * 0.38, size * (x + 0.05), size * 0.45), fill=(40, 30, 30))
    draw.rectangle((size * 0.4, size * 0.66, size * 0.6, size * 0.7), fill=(150, 50, 60))
    image.save(path)
    return path


def make_speech(path: Path, seconds: float = 0.8, rate: int = 16000) -> Path:
    """A voiced, syllable-like tone burst train as a WAV file."""
    t = np.arange(int(seconds * rate)) / rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    wave = 0.4 * envelope * (np.sin(2 * np.pi * 180 * t) + 0.5 * np.sin(2 * np.pi * 360 * t))
    soundfile.write(path, wave.astype(np.float32), rate)
    return path


def video_facts(path: str | Path) -> dict[str, Any]:
    """Decode an MP4 completely and report what it holds."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        codec = video.codec_context.name
        width, height = video.codec_context.width, video.codec_context.height
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(path)) as container:
        audio = [s.codec_context.name for s in container.streams.audio]
    return {"codec": codec, "width": width, "height": height, "frames": frames, "audio": audio}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free loopback port in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped while starting"
        assert time.monotonic() < deadline, "uvicorn did not start in 30 s"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "uvicorn did not stop"


def wait_for(predicate: Any, timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(interval)


@contextlib.contextmanager
def chromium_page(url: str) -> Iterator[tuple[Any, list[str]]]:
    """A page of the system Chromium (Playwright) opened at ``url``, and the page errors it reports."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            yield page, errors
        finally:
            browser.close()


def wait_for_message(page: Any, text: str) -> str:
    """Wait until the panel's message line includes ``text``; return the line."""
    page.wait_for_function(
        "text => (document.querySelector('#gpu-message')?.innerText || '').includes(text)",
        arg=text,
        timeout=15_000,
    )
    return page.inner_text("#gpu-message")


def get_status(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/gpu/status", timeout=10).json()


class EndlessPipeline:
    """A job that renders small frames until it is stopped, for the shutdown tests.

    It stops when its progress callback raises (the app cancelling it) or after
    ``max_seconds``, when it returns the video. Its partial file (``.*.part.mp4``) exists
    from the first frame on, so a test can wait for it to know that the job runs.
    """

    name = "test-endless"
    max_seconds = 60.0
    ignore_cancel = False

    def load(self) -> nn.Module:
        return nn.Linear(1, 1)

    def generate(self, model: nn.Module, image: Any, audio: Any, options: Any, progress: Any) -> str:
        frame = np.zeros((64, 64, 3), dtype=np.uint8)
        pace = threading.Event()  # never set: spaces the frames out without a busy loop
        deadline = time.monotonic() + self.max_seconds
        video = VideoWriter(options.output_path, width=64, height=64, fps=options.fps, audio_rate=None)
        with video as writer:
            while time.monotonic() < deadline:
                writer.write_frame(frame)
                try:
                    progress(0.5, "Rendering frames")
                except Exception:
                    if not self.ignore_cancel:
                        raise
                pace.wait(0.02)
        return str(options.output_path)


class ShortPipeline(EndlessPipeline):
    """`EndlessPipeline` that finishes its video after two seconds."""

    name = "test-short"
    max_seconds = 2.0


class StubbornPipeline(EndlessPipeline):
    """`EndlessPipeline` that carries on when cancelled, as a pipeline that never checks would."""

    name = "test-stubborn"
    ignore_cancel = True


def app_env(**extra: str) -> dict[str, str]:
    """This process's environment without the app's own settings, plus ``extra``."""
    own = ("GPU_", "GRADIO_SERVER", "ALLOW_URL_INPUTS", "SHUTDOWN_GRACE_S", "VIDEO_RETENTION", "PIPELINE_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(own)}
    env.update(GRADIO_ANALYTICS_ENABLED="False", **extra)
    return env


class AppProcess:
    """``python app.py ARGS`` in a subprocess, its output read line by line as it comes.

    The app listens on ``port`` (given as ``GRADIO_SERVER_PORT``); tests reach it on
    127.0.0.1 only, whatever address it listens on.
    """

    def __init__(self, args: Sequence[str], *, port: int, env: dict[str, str]) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, "app.py", *args],
            cwd=ROOT,
            env={**env, "GRADIO_SERVER_PORT": str(port)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._lines: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"app-{port}-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    @property
    def output(self) -> str:
        """Everything the app has written so far (stdout and stderr)."""
        with self._changed:
            return "".join(self._lines)

    def wait_for_line(self, needle: str, timeout: float = 60.0) -> str:
        """The first output line holding ``needle``; fails when the app ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self._lines:
                    if needle in line:
                        return line
                assert not self._ended, f"the app ended without writing {needle!r}:\n{''.join(self._lines)}"
                left = deadline - time.monotonic()
                assert left > 0, f"the app did not write {needle!r} in {timeout} s:\n{''.join(self._lines)}"
                self._changed.wait(left)

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Wait until ``GET /health`` answers 200."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"the app exited while starting:\n{self.output}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"the app did not answer in {timeout} s:\n{self.output}"
            time.sleep(0.1)

    def stop(self, sig: int, timeout: float) -> float:
        """Send ``sig`` and wait for the process to end; returns the seconds it took."""
        started = time.monotonic()
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            message = f"the app did not exit within {timeout} s of signal {sig}:\n{self.output}"
            raise AssertionError(message) from None
        took = time.monotonic() - started
        self._reader.join(10)
        return took

    def close(self) -> None:
        """Kill the process if it still runs, and collect its output."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self._reader.join(10)
        assert not self._reader.is_alive(), "the app's output was not closed"


@contextlib.contextmanager
def app_process(*args: str, **env: str) -> Iterator[AppProcess]:
    """``python app.py ARGS`` on a free loopback port with ``env`` added; killed at the end if need be."""
    process = AppProcess(args, port=free_port(), env=app_env(**env))
    try:
        yield process
    finally:
        process.close()


def listening_addresses(port: int) -> set[str]:
    """The addresses on which some process listens on TCP ``port`` (from ``/proc/net/tcp*``)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table, encoding="ascii") as rows:
            next(rows)
            for row in rows:
                local, state = row.split()[1], row.split()[3]
                address, _, hex_port = local.partition(":")
                if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(address)
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
                found.add(str(ipaddress.ip_address(raw)))
    return found


def upload(url: str, *paths: Path) -> list[dict[str, Any]]:
    """Upload files to the app's Gradio server; returns their ``FileData`` for API calls."""
    files = [("files", (path.name, path.read_bytes())) for path in paths]
    answer = httpx.post(f"{url}/gradio_api/upload", files=files, timeout=30)
    answer.raise_for_status()
    return [{"path": path, "meta": {"_type": "gradio.FileData"}} for path in answer.json()]


class Job:
    """A job holding a model's lease until `end()`; its thread's errors reach the test."""

    def __init__(self, manager: GPUResourceManager) -> None:
        self.manager = manager
        self.inside, self.leave = threading.Event(), threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            with self.manager.use():
                self.inside.set()
                if not self.leave.wait(10):
                    raise TimeoutError("the test never ended the job")
        except BaseException as error:  # handed to the test thread by end()
            self.errors.append(error)
            self.inside.set()

    def __enter__(self) -> Job:
        self.thread.start()
        assert self.inside.wait(10)
        return self

    def end(self) -> None:
        self.leave.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        if self.errors:
            raise self.errors[0]

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive() or not self.leave.is_set():
            self.end()
