"""Doubles and helpers for the app tests: a small real pipeline, inputs, a live server."""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections.abc import Iterator
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

from pipelines.media import OUTPUT_AUDIO_RATE, VideoWriter, read_audio, read_image


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


def get_status(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/gpu/status", timeout=10).json()
