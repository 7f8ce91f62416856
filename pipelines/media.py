"""Reading and checking inputs (a portrait, a speech track) and writing the MP4.

- `read_image` opens a path or a PIL image, applies the EXIF orientation, converts to RGB
  and enforces the size limits and the aspect ratio (a strip of a picture gives a useless video).
- `read_audio` opens a path (soundfile: wav, flac, ogg, mp3; anything else through PyAV, e.g.
  m4a or webm) or Gradio's ``(sample_rate, samples)`` tuple, mixes to mono, checks the length
  and rejects empty, too short (under half a second) or silent tracks, and resamples on request.
- `VideoWriter` streams frames and audio into an MP4 (H.264 yuv420p + AAC, BT.709 tagged,
  ``faststart`` so browsers play it while it downloads); nothing is buffered beyond what the
  encoders hold, so memory does not grow with the length of the video.
- `probe_video` reads back what an MP4 holds.

Every input problem raises `MediaError` with a sentence that says what is wrong and what to do.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Union

import av
import numpy as np
import soundfile
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import MediaError

if TYPE_CHECKING:
    from typing import Self

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
    "read_audio",
    "read_image",
    "resample",
    "temp_video_path",
]

logger = logging.getLogger(__name__)

ImageInput = Union[str, "os.PathLike[str]", Image.Image]
AudioInput = Union[str, "os.PathLike[str]", tuple[int, np.ndarray]]

MIN_IMAGE_SIDE = 64
MAX_IMAGE_PIXELS = 40_000_000
MAX_ASPECT_RATIO = 4.0  # long side / short side; beyond it the video is a thin strip
MIN_AUDIO_SECONDS = 0.5  # shorter clips give a video of a few frames
SILENCE_DBFS = -60.0
AAC_SAMPLE_RATES = (44100, 48000)
OUTPUT_AUDIO_RATE = 48000

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

    path = _existing_file(image, "Image")
    label = f"The image '{_shown_name(path)}'"
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
            f"{label} could not be decoded ({_reason(error, path)}); the file may be damaged or truncated, "
            "export it again as JPEG or PNG."
        ) from error
    return _to_rgb(oriented)


def _check_image_size(size: tuple[int, int], label: str) -> None:
    """Enforce the minimum side, the maximum pixel count and the aspect ratio."""
    width, height = size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise MediaError(
            f"{label} is {width}x{height} px; it must be at least {MIN_IMAGE_SIDE} px on each side. Use a larger portrait."
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        shape = "wide" if width > height else "tall"
        raise MediaError(
            f"{label} is {width}x{height} px, {max(width, height) / min(width, height):.1f} times as {shape} as it is "
            f"{'tall' if shape == 'wide' else 'wide'}; a portrait may be at most {MAX_ASPECT_RATIO:g} times. "
            "Crop it around the face."
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
        path = _existing_file(audio, "Audio")
        label = f"The audio '{_shown_name(path)}'"
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
            f"{label} could not be decoded ({_reason(error, path)}); the file may be damaged, export it again as WAV."
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
            f"{label} is silent (its loudest sample is below {SILENCE_DBFS:.0f} dBFS); upload or record speech, "
            "and check that the microphone was not muted."
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


def _existing_file(source: Any, kind: str) -> Path:
    """Turn a path-like into a Path that exists and is a file."""
    try:
        path = Path(os.fspath(source))
    except TypeError as error:
        raise MediaError(
            f"{kind} input of type {type(source).__name__} is not supported; pass a file path."
        ) from error
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "was not found"
        raise MediaError(f"{kind} file '{_shown_name(path)}' {what}; check the path.")
    return path


def _shown_name(path: Path) -> str:
    """A file's name as messages show it: never its folder (a server path), cut to 60 characters."""
    name = path.name
    return name if len(name) <= 60 else f"{name[:57]}..."


def _reason(error: BaseException, path: Path) -> str:
    """A decoder's error text for a message, with the file's folder (a server path) taken out."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return error.strerror
    text = str(error)
    for form in {str(path), os.fspath(path.resolve()) if path.exists() else str(path)}:
        text = text.replace(form, _shown_name(path))
    return text[:200]


# ---------------------------------------------------------------------------------------- video


@dataclass(frozen=True)
class VideoInfo:
    """What an MP4 holds, as read back by `probe_video`."""

    path: str
    duration_s: float
    frames: int
    fps: float
    width: int
    height: int
    video_codec: str
    pix_fmt: str
    audio_codec: str | None
    audio_duration_s: float | None


class VideoWriter:
    """Stream frames and audio into an MP4: H.264 (yuv420p, BT.709) + AAC mono.

    The file is written under a temporary name next to ``path`` and renamed when `close`
    succeeds, so ``path`` never holds a half-written video. Use it as a context manager: an
    exception inside the block deletes the partial file.

    Args:
        path: the MP4 to write (its folder is created).
        width: frame width in px (even).
        height: frame height in px (even).
        fps: frames per second.
        audio_rate: sample rate of the audio track (one of `AAC_SAMPLE_RATES`), or None for
            a silent video.
        crf: x264 quality (lower is better, 18-28 is sensible).
        preset: x264 speed preset (``ultrafast`` ... ``veryslow``).

    Raises:
        ValueError: odd dimensions, or an audio rate AAC is not given here.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        width: int,
        height: int,
        fps: int,
        audio_rate: int | None = OUTPUT_AUDIO_RATE,
        crf: int = 20,
        preset: str = "veryfast",
    ) -> None:
        if width % 2 or height % 2 or width <= 0 or height <= 0:
            raise ValueError(f"Video dimensions must be positive and even for yuv420p, got {width}x{height}.")
        if audio_rate is not None and audio_rate not in AAC_SAMPLE_RATES:
            raise ValueError(f"Audio rate {audio_rate} is not one of {AAC_SAMPLE_RATES}; resample first.")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.width, self.height, self.fps = width, height, fps
        self.frames = 0
        self.audio_samples = 0
        self.encode_seconds = 0.0
        self._part = self.path.with_name(f".{self.path.stem}.{uuid.uuid4().hex[:8]}.part.mp4")
        self._container = av.open(str(self._part), "w", format="mp4", options={"movflags": "+faststart"})
        self._video = self._container.add_stream("libx264", rate=fps)
        self._video.width, self._video.height, self._video.pix_fmt = width, height, "yuv420p"
        self._video.options = {"crf": str(crf), "preset": preset}
        context = self._video.codec_context
        context.colorspace, context.color_primaries, context.color_trc = 1, 1, 1  # BT.709
        context.color_range = 1  # limited ("tv") range
        self._audio = None
        if audio_rate is not None:
            self._audio = self._container.add_stream("aac", rate=audio_rate)
            self._audio.layout = "mono"
            self._audio.bit_rate = 96_000
        self._closed = False

    def write_frame(self, frame: np.ndarray) -> None:
        """Encode one frame: uint8 RGB ``(height, width, 3)`` or yuv420p ``(height * 3 // 2, width)``."""
        if frame.shape == (self.height * 3 // 2, self.width):
            video_frame = av.VideoFrame.from_ndarray(frame, format="yuv420p")
        elif frame.shape == (self.height, self.width, 3):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(
                format="yuv420p", dst_colorspace="ITU709", dst_color_range=1
            )
        else:
            raise ValueError(
                f"Frame shape {frame.shape} does not match the video ({self.height}, {self.width}, 3) "
                f"or ({self.height * 3 // 2}, {self.width})."
            )
        video_frame.pts = self.frames
        video_frame.time_base = Fraction(1, self.fps)
        self._encode(self._video, video_frame)
        self.frames += 1

    def write_audio(self, samples: np.ndarray) -> None:
        """Encode the next stretch of mono float samples in [-1, 1]."""
        if self._audio is None:
            raise ValueError("This video was opened without an audio track (audio_rate=None).")
        if len(samples) == 0:
            return
        chunk = np.ascontiguousarray(np.clip(samples, -1.0, 1.0), dtype=np.float32).reshape(1, -1)
        audio_frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
        audio_frame.sample_rate = self._audio.rate
        audio_frame.pts = self.audio_samples
        audio_frame.time_base = Fraction(1, self._audio.rate)
        self._encode(self._audio, audio_frame)
        self.audio_samples += chunk.shape[1]

    def close(self) -> Path:
        """Flush the encoders, finish the file and move it to ``path``; returns ``path``."""
        if self._closed:
            return self.path
        if self.frames == 0:
            self.abort()
            raise ValueError("No frames were written; an MP4 needs at least one.")
        self._encode(self._video, None)
        if self._audio is not None:
            self._encode(self._audio, None)
        self._container.close()
        self._closed = True
        os.replace(self._part, self.path)
        return self.path

    def abort(self) -> None:
        """Stop writing and delete the partial file."""
        if self._closed:
            return
        self._closed = True
        try:
            self._container.close()
        except av.FFmpegError:
            logger.debug("Ignoring an error while closing an aborted video", exc_info=True)
        self._part.unlink(missing_ok=True)

    def _encode(self, stream: Any, frame: Any) -> None:
        """Encode a frame (None flushes) and mux the packets, timing it."""
        started = time.perf_counter()
        for packet in stream.encode(frame):
            self._container.mux(packet)
        self.encode_seconds += time.perf_counter() - started

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Read the streams of a video file.

    Args:
        path: the file.

    Returns:
        Its duration, frame count, frame rate, size and codecs.

    Raises:
        MediaError: the file is missing, not a video, or has no video stream.
    """
    file = _existing_file(path, "Video")
    try:
        with av.open(str(file)) as container:
            if not container.streams.video:
                raise MediaError(f"'{_shown_name(file)}' has no video stream.")
            video = container.streams.video[0]
            frames = video.frames or sum(1 for packet in container.demux(video) if packet.size)
            rate = float(video.average_rate or video.base_rate or 0)
            if video.duration is not None:
                duration = float(video.duration * video.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = frames / rate if rate else 0.0
            audio_codec, audio_duration = None, None
            if container.streams.audio:
                audio = container.streams.audio[0]
                audio_codec = audio.codec_context.name
                if audio.duration is not None:
                    audio_duration = float(audio.duration * audio.time_base)
            return VideoInfo(
                path=str(file),
                duration_s=duration,
                frames=int(frames),
                fps=rate,
                width=video.codec_context.width,
                height=video.codec_context.height,
                video_codec=video.codec_context.name,
                pix_fmt=video.codec_context.pix_fmt or "",
                audio_codec=audio_codec,
                audio_duration_s=audio_duration,
            )
    except av.FFmpegError as error:
        raise MediaError(
            f"'{_shown_name(file)}' is not a readable video ({_reason(error, file)})."
        ) from error


def temp_video_path(prefix: str) -> str:
    """Create a fresh, empty ``.mp4`` file in the system temp folder and return its path."""
    handle, path = tempfile.mkstemp(prefix=f"{prefix}-", suffix=".mp4")
    os.close(handle)
    return path


def prune_videos(folder: str | os.PathLike[str], *, max_age_s: float, pattern: str = "*.mp4") -> int:
    """Delete videos in ``folder`` older than ``max_age_s`` seconds; returns how many.

    A server that writes a video per request would otherwise fill its disk. Files that
    vanish or cannot be removed meanwhile are skipped.
    """
    cutoff = time.time() - max_age_s
    removed = 0
    for path in Path(folder).glob(pattern):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except OSError:
            continue
    if removed:
        logger.info("Deleted %d video(s) older than %.0f s from %s", removed, max_age_s, folder)
    return removed
