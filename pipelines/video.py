"""Writing the MP4 and reading back what it holds.

- `VideoWriter` streams frames and audio into an MP4 (H.264 yuv420p + AAC, BT.709 tagged,
  ``faststart`` so browsers play it while it downloads); nothing is buffered beyond what the
  encoders hold, so memory does not grow with the length of the video.
- `probe_video` reads back what an MP4 holds.
- `temp_video_path` and `prune_videos` make room for a video and clear out old ones.

Every name here is importable from `pipelines.media` too.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import av
import numpy as np

from .errors import MediaError
from .media_files import decoder_reason, existing_file, shown_name

if TYPE_CHECKING:
    from typing import Self

__all__ = [
    "AAC_SAMPLE_RATES",
    "OUTPUT_AUDIO_RATE",
    "VideoInfo",
    "VideoWriter",
    "probe_video",
    "prune_videos",
    "temp_video_path",
]

logger = logging.getLogger(__name__)

AAC_SAMPLE_RATES = (44100, 48000)
OUTPUT_AUDIO_RATE = 48000


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
    file = existing_file(path, "Video")
    try:
        with av.open(str(file)) as container:
            if not container.streams.video:
                raise MediaError(f"'{shown_name(file)}' has no video stream.")
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
            f"'{shown_name(file)}' is not a readable video ({decoder_reason(error, file)})."
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
