"""Fixtures for the pipelines tests: example files, synthetic speech, a CPU manager, a user pipeline."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
RATE = 16_000


def speech_like(pattern: list[tuple[str, float]], rate: int = RATE) -> np.ndarray:
    """Float samples: ``("speech", s)`` is a voiced buzz with 4 Hz syllables, ``("pause", s)`` is silence."""
    pieces = []
    for kind, seconds in pattern:
        t = np.arange(int(seconds * rate)) / rate
        if kind == "pause":
            pieces.append(np.zeros_like(t))
            continue
        f0 = 140.0 + 20.0 * np.sin(2 * np.pi * 0.7 * t)
        phase = 2 * np.pi * np.cumsum(f0) / rate
        voice = sum(np.sin(k * phase) / k for k in range(1, 25))
        syllables = 0.5 - 0.5 * np.cos(2 * np.pi * 4.0 * t)
        pieces.append(0.3 * voice * syllables / 3.0)
    return np.concatenate(pieces).astype(np.float32)


def as_int16(samples: np.ndarray) -> np.ndarray:
    """Float samples to int16, as Gradio's numpy audio gives them."""
    return np.round(np.clip(samples, -1, 1) * 32767).astype(np.int16)


@pytest.fixture
def example_image() -> Path:
    return EXAMPLES / "portrait.jpg"


@pytest.fixture
def example_audio() -> Path:
    return EXAMPLES / "speech.wav"


@pytest.fixture
def short_speech(tmp_path: Path) -> Path:
    """0.4 s pause, 0.8 s speech, 0.6 s pause, as a 16 kHz WAV."""
    path = tmp_path / "short.wav"
    soundfile.write(path, speech_like([("pause", 0.4), ("speech", 0.8), ("pause", 0.6)]), RATE)
    return path


@pytest.fixture
def manager() -> Iterator[object]:
    """A CPU manager with immediate offload, released after the test."""
    from gpu_control import GPUResourceManager

    manager = GPUResourceManager(idle_timeout=60, release_timeout=0, offload_after_use=True, device="cpu")
    yield manager
    manager.force_release()
    manager.stop_monitor()


USER_PIPELINE = '''
"""A user's pipeline for the tests: a Linear "model" and a 64x64 grey video."""
import numpy as np
import torch
from pipelines import GenerateOptions
from pipelines.media import VideoWriter, read_audio

CALLS = []


class GreyPipeline:
    name = "grey"

    def __init__(self, fail=False):
        self.fail = fail
        self.loads = 0

    def load(self):
        self.loads += 1
        return torch.nn.Linear(8, 8)

    def generate(self, model, image, audio, options, progress):
        device = next(model.parameters()).device
        CALLS.append({"device": str(device), "image": image, "audio": audio, "options": options})
        if self.fail:
            raise RuntimeError("the model ran out of luck")
        track = read_audio(audio, sample_rate=48000)
        frames = max(1, round(track.duration * options.fps))
        path = options.output_path
        with VideoWriter(path, width=64, height=64, fps=options.fps) as writer:
            for index in range(frames):
                writer.write_frame(np.full((64, 64, 3), 128, np.uint8))
                if progress:
                    progress((index + 1) / frames, "grey")
            writer.write_audio(track.samples)
        return str(path)


instance = GreyPipeline()


def factory():
    return GreyPipeline()


def failing():
    return GreyPipeline(fail=True)


class NotAPipeline:
    name = "broken"

    def load(self):
        return None


def returns_number():
    pipeline = GreyPipeline()
    pipeline.generate = lambda *args: 42
    return pipeline


def returns_missing_file():
    pipeline = GreyPipeline()
    pipeline.generate = lambda *args: "/nonexistent/video.mp4"
    return pipeline
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Write ``user_pipes.py`` (a user's own pipeline module) on sys.path; returns its name."""
    folder = tmp_path / "userpkg"
    folder.mkdir()
    (folder / "user_pipes.py").write_text(textwrap.dedent(USER_PIPELINE))
    (folder / "raises_on_import.py").write_text("raise RuntimeError('no GPU driver here')\n")
    monkeypatch.syspath_prepend(str(folder))
    yield "user_pipes"
    for name in ("user_pipes", "raises_on_import"):
        sys.modules.pop(name, None)


def _decode_gray(path: str | Path) -> np.ndarray:
    """All frames of a video as float32 luma, shape (frames, height, width)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="gray").astype(np.float32) for f in container.decode(video=0)])


@pytest.fixture
def decode() -> Callable[[str | Path], np.ndarray]:
    """Decode a video's frames to float32 luma ``(frames, height, width)``."""
    return _decode_gray


@pytest.fixture
def make_speech() -> Callable[..., np.ndarray]:
    """`speech_like`: build a test signal from ("speech" | "pause", seconds) pieces."""
    return speech_like


@pytest.fixture
def to_int16() -> Callable[[np.ndarray], np.ndarray]:
    """`as_int16`: float samples to int16."""
    return as_int16
