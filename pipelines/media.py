"""Reading and checking inputs: a portrait and a speech track.

- `read_image` opens a path or a PIL image, applies the EXIF orientation, converts to RGB
  and enforces the size limits and the aspect ratio (a strip of a picture gives a useless video).
- `read_audio` opens a path (soundfile: wav, flac, ogg, mp3; anything else through PyAV, e.g.
  m4a or webm) or Gradio's ``(sample_rate, samples)`` tuple, mixes to mono, checks the length
  and rejects empty, too short (under half a second) or silent tracks, and resamples on request.

Every input problem raises `MediaError` with a sentence that says what is wrong and what to do.
Writing and probing the MP4 (`VideoWriter`, `probe_video`, `temp_video_path`, `prune_videos`)
live in `pipelines.video` and are importable from here too.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import av
import numpy as np
import soundfile
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import MediaError
from .media_files import decoder_reason, existing_file, shown_name
from .video import (
    AAC_SAMPLE_RATES,
    OUTPUT_AUDIO_RATE,
    VideoInfo,
    VideoWriter,
    probe_video,
    prune_videos,
    temp_video_path,
)

__all__ = [
    "AAC_SAMPLE_RATES",
    "MAX_ASPECT_RATIO",
    "MAX_IMAGE_PIXELS",
    "MIN_AUDIO_SECONDS",
    "MIN_IMAGE_SIDE",
    "OUTPUT_AUDIO_RATE",
    "SILENCE_DBFS",
    "Audio",
    "AudioInput",
    "ImageInput",
    "VideoInfo",
    "VideoWriter",
    "probe_video",
    "prune_videos",
    "read_audio",
    "read_image",
    "resample",
    "temp_video_path",
]

ImageInput = Union[str, "os.PathLike[str]", Image.Image]
AudioInput = Union[str, "os.PathLike[str]", tuple[int, np.ndarray]]

MIN_IMAGE_SIDE = 64
MAX_IMAGE_PIXELS = 40_000_000
MAX_ASPECT_RATIO = 4.0  # long side / short side; beyond it the video is a thin strip
MIN_AUDIO_SECONDS = 0.5  # shorter clips give a video of a few frames
SILENCE_DBFS = -60.0

_SILENCE_PEAK = 10.0 ** (SILENCE_DBFS / 20.0)
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


# ---------------------------------------------------------------------------------------- image


def read_image(image: ImageInput) -> Image.Image:
    """Open and check a portrait.

    Args:
        image: a path to an image file, or a PIL image.

    Returns:
        An RGB image with its EXIF orientation applied (transparent areas become white).

    Raises:
        MediaError: the file is missing, not an image, damaged, too small or too large, or
            more than `MAX_ASPECT_RATIO` times as wide as it is tall (or the reverse).
    """
    if isinstance(image, Image.Image):
        _check_image_size(image.size, "The image")
        try:
            image.load()
        except (OSError, ValueError) as error:
            raise MediaError(
                f"The image could not be decoded ({error}); export it again as JPEG or PNG."
            ) from error
        return _to_rgb(ImageOps.exif_transpose(image))

    path = existing_file(image, "Image")
    label = f"The image '{shown_name(path)}'"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                _check_image_size(opened.size, label)
                opened.load()
                oriented = ImageOps.exif_transpose(opened)
    except UnidentifiedImageError as error:
        raise MediaError(
            f"{label} is not an image file that can be read; use a JPEG, PNG or WebP portrait."
        ) from error
    except Image.DecompressionBombError as error:
        raise MediaError(
            f"{label} is far too large to open safely; downscale it below 40 megapixels."
        ) from error
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, MediaError):
            raise
        raise MediaError(
            f"{label} could not be decoded ({decoder_reason(error, path)}); the file may be damaged or "
            "truncated, export it again as JPEG or PNG."
        ) from error
    return _to_rgb(oriented)


def _check_image_size(size: tuple[int, int], label: str) -> None:
    """Enforce the minimum side, the maximum pixel count and the aspect ratio."""
    width, height = size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise MediaError(
            f"{label} is {width}x{height} px; it must be at least {MIN_IMAGE_SIDE} px on each side. "
            "Use a larger portrait."
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        shape, other = ("wide", "tall") if width > height else ("tall", "wide")
        ratio = max(width, height) / min(width, height)
        raise MediaError(
            f"{label} is {width}x{height} px, {ratio:.1f} times as {shape} as it is {other}; "
            f"a portrait may be at most {MAX_ASPECT_RATIO:g} times. Crop it around the face."
        )
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaError(
            f"{label} is {width}x{height} px ({width * height / 1e6:.0f} megapixels); the limit is "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels. Downscale it first."
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is flattened onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        return image.convert("I").point(lambda value: value * (1 / 256)).convert("L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------- audio


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples in [-1, 1] and their sample rate."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self.samples) / self.sample_rate


def read_audio(
    audio: AudioInput, *, max_seconds: float | None = None, sample_rate: int | None = None
) -> Audio:
    """Open and check a speech track.

    Args:
        audio: a path to an audio file, or a ``(sample_rate, samples)`` tuple as Gradio
            gives it (int16, int32, uint8 or float samples; shape ``(n,)`` or ``(n, channels)``).
        max_seconds: reject tracks longer than this.
        sample_rate: resample to this rate (None keeps the track's own rate).

    Returns:
        The track mixed to mono.

    Raises:
        MediaError: the audio is missing, unreadable, empty, too short, too long or silent.
    """
    if isinstance(audio, (tuple, list)):
        rate, samples = _from_tuple(audio, max_seconds)
        label = "The audio"
    else:
        path = existing_file(audio, "Audio")
        label = f"The audio '{shown_name(path)}'"
        rate, samples = _read_audio_file(path, label, max_seconds)
    mono = _check_samples(samples, rate, label, max_seconds)
    if sample_rate is not None and sample_rate != rate:
        mono = resample(mono, rate, sample_rate)
        rate = sample_rate
    return Audio(samples=mono, sample_rate=rate)


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample mono float samples with a polyphase filter (scipy).

    Args:
        samples: mono samples.
        from_rate: their sample rate.
        to_rate: the rate wanted.

    Returns:
        float32 samples at ``to_rate``.
    """
    if from_rate == to_rate:
        return samples.astype(np.float32, copy=False)
    divisor = math.gcd(from_rate, to_rate)
    from scipy.signal import resample_poly  # imported here: it adds ~0.5 s to the app's start-up

    out = resample_poly(samples, to_rate // divisor, from_rate // divisor)
    return np.asarray(out, dtype=np.float32)


def _from_tuple(audio: tuple[Any, ...] | list[Any], max_seconds: float | None) -> tuple[int, np.ndarray]:
    """Unpack Gradio's ``(sample_rate, samples)`` and scale integers to [-1, 1]."""
    if len(audio) != 2:
        raise MediaError("Audio given as a tuple must be (sample_rate, samples).")
    rate, samples = audio
    if isinstance(rate, np.ndarray) and not isinstance(samples, np.ndarray):
        raise MediaError("Audio given as a tuple must be (sample_rate, samples), in that order.")
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not 1000 <= int(rate) <= 384_000:
        raise MediaError(
            f"The audio sample rate {rate!r} is not valid; it must be a whole number of Hz (1000 to 384000)."
        )
    rate = int(rate)
    samples = np.asarray(samples)
    if samples.ndim == 2 and samples.shape[0] <= 16 < samples.shape[1]:
        samples = samples.T
    if samples.ndim not in (1, 2):
        raise MediaError(
            f"The audio samples have shape {samples.shape}; expected (samples,) or (samples, channels)."
        )
    if max_seconds is not None and samples.shape[0] / rate > max_seconds:
        raise _too_long("The audio", samples.shape[0] / rate, max_seconds)
    if samples.dtype == np.uint8:
        scaled = (samples.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(samples.dtype, np.integer):
        scaled = samples.astype(np.float32) / float(2 ** (8 * samples.dtype.itemsize - 1))
    elif np.issubdtype(samples.dtype, np.floating):
        scaled = samples.astype(np.float32, copy=False)
    else:
        raise MediaError(f"The audio samples have type {samples.dtype}; use integer or float samples.")
    return rate, scaled


def _read_audio_file(path: Path, label: str, max_seconds: float | None) -> tuple[int, np.ndarray]:
    """Decode a file with soundfile, falling back to PyAV for other formats."""
    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError, TypeError):
        return _decode_with_av(path, label, max_seconds)
    if max_seconds is not None and info.frames / info.samplerate > max_seconds:
        raise _too_long(label, info.frames / info.samplerate, max_seconds)
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as error:
        raise MediaError(
            f"{label} could not be decoded ({decoder_reason(error, path)}); the file may be damaged, "
            "export it again as WAV."
        ) from error
    return int(rate), samples


def _decode_with_av(path: Path, label: str, max_seconds: float | None) -> tuple[int, np.ndarray]:
    """Decode the first audio stream of any container FFmpeg knows, mixed to mono."""
    unreadable = f"{label} could not be read as audio; use WAV, FLAC, OGG, MP3 or M4A."
    chunks: list[np.ndarray] = []
    total = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"{label} has no audio track; use WAV, FLAC, OGG, MP3 or M4A.")
            stream = container.streams.audio[0]
            rate = stream.rate or OUTPUT_AUDIO_RATE
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(stream):
                for mono in resampler.resample(frame):
                    chunks.append(mono.to_ndarray().reshape(-1))
                    total += mono.samples
                if max_seconds is not None and total / rate > max_seconds:
                    raise _too_long(label, total / rate, max_seconds, at_least=True)
            for mono in resampler.resample(None):
                chunks.append(mono.to_ndarray().reshape(-1))
    except av.FFmpegError as error:
        raise MediaError(unreadable) from error
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return int(rate), samples.astype(np.float32, copy=False)


def _check_samples(samples: np.ndarray, rate: int, label: str, max_seconds: float | None) -> np.ndarray:
    """Mix to mono and reject empty, short, long, non-finite or silent audio."""
    mono = samples if samples.ndim == 1 else samples.mean(axis=1, dtype=np.float32)
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    duration = len(mono) / rate
    if len(mono) == 0:
        raise MediaError(f"{label} is empty (it holds no samples); upload or record some speech.")
    if duration < MIN_AUDIO_SECONDS:
        raise MediaError(
            f"{label} is only {duration:.3f} s long; it must last at least {MIN_AUDIO_SECONDS:g} s. "
            "Record or upload a longer clip."
        )
    if max_seconds is not None and duration > max_seconds:
        raise _too_long(label, duration, max_seconds)
    if not np.isfinite(mono).all():
        raise MediaError(f"{label} contains invalid (NaN or infinite) samples; export it again.")
    peak = float(np.abs(mono).max())
    if peak < _SILENCE_PEAK:
        raise MediaError(
            f"{label} is silent (its loudest sample is below {SILENCE_DBFS:.0f} dBFS); upload or record "
            "speech, and check that the microphone was not muted."
        )
    if peak > 1.0:
        mono = mono / peak
    return mono


def _too_long(label: str, seconds: float, max_seconds: float, *, at_least: bool = False) -> MediaError:
    """The error for a track over the length limit."""
    length = f"more than {max_seconds:g} s" if at_least else f"{seconds:.1f} s"
    return MediaError(
        f"{label} is {length} long; the limit is {max_seconds:g} s. Trim it, or raise the limit "
        "(max_audio_seconds, or the PIPELINE_MAX_AUDIO_SECONDS environment variable)."
    )
