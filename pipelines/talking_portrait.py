"""The built-in talking-portrait pipeline: a portrait and a speech track in, an MP4 out.

How a video is made:

1. **Audio → features.** The speech is resampled to 16 kHz and cut into 10 ms STFT frames on
   the compute device; each video frame gets its loudness (dB) and the share of its energy in
   three bands (low 80-900 Hz, mid 900-2800 Hz, high 2800-8000 Hz).
2. **Features → motion.** Loudness is normalised between a gate and the track's own speech
   level (95th percentile; the gate is 25 dB below it, or 8 dB above the noise floor) and
   squared, so vowel peaks open the mouth most and consonants let it close; hissing sounds
   (high band) open it less and front vowels (mid band) widen it. A 30 ms attack / 40 ms
   release smoother shapes it, and anything below a small threshold is exactly closed, so
   pauses keep the mouth shut. Head sway (a seeded mix of slow sinusoids, larger while
   speaking) with nods on emphasis, and blinks (seeded, about every 4 s / ``blinks``), come
   from `numpy.random.Generator` streams of ``seed``; the mouth follows the audio alone.
3. **Portrait → layout.** scikit-image's LBP frontal-face cascade (its model ships inside
   the package) finds the face; the darkest spots in the upper face refine the eyes, and the
   mouth sits below their midpoint. ``mouth=(x, y)`` overrides the mouth; with
   no face the lower centre is animated and a note says so.
4. **Render.** Each frame is one ``grid_sample`` of the portrait (converted once to BT.709
   YUV) on the device: a head transform blended by a smooth weight (so the background stays
   put), a jaw/lip displacement that opens a gap at the lip line, eyelids pulled down over
   the eyes, and a mouth interior (dark, with a hint of teeth) composited into the gap.
   Frames are rendered in chunks over the region that moves, chroma is subsampled on the
   device, and each frame goes straight into the H.264 encoder, interleaved with the AAC
   audio, so memory stays flat however long the audio is.

Everything the device runs lives in `PortraitAnimator` (an ``nn.Module`` of buffers), which
is what the GPU manager loads, offloads and restores.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter
from skimage import data as skimage_data
from skimage.feature import Cascade
from torch import nn

from . import media
from .protocol import GeneratedVideo, GenerateOptions, ProgressCallback

__all__ = [
    "FaceLayout",
    "MotionTracks",
    "PortraitAnimator",
    "TalkingPortrait",
    "locate_face",
    "motion_tracks",
]

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
HOP = 160  # 10 ms
WINDOW = 400  # 25 ms
N_FFT = 512
BANDS_HZ = ((80.0, 900.0), (900.0, 2800.0), (2800.0, 8000.0))
STFT_BLOCK_FRAMES = 1500  # 15 s of STFT frames per block keeps memory flat
PIXELS_PER_CHUNK = 1_500_000  # region pixels rendered per grid_sample call
DETECT_LONG_SIDE = 384  # face detection runs on a copy this large

_UPPER_SHARE = 0.3  # of the lip gap: the upper lip rises this much ...
_LOWER_SHARE = 0.7  # ... and the lower lip and jaw drop this much
_MAX_OPENING = 0.12  # the widest lip gap, in face heights

NOTE_NO_FACE = "No face found; animated the lower centre of the image. Set the mouth position to correct it."
NOTE_NO_EYES = "Blinking is off because the eyes could not be located."
NOTE_MANUAL = "Mouth position set by hand."

_BT709_LIMITED = (
    (0.2126 * 219 / 255, 0.7152 * 219 / 255, 0.0722 * 219 / 255),
    (-0.1146 * 224 / 255, -0.3854 * 224 / 255, 0.5 * 224 / 255),
    (0.5 * 224 / 255, -0.4542 * 224 / 255, -0.0458 * 224 / 255),
)


# ---------------------------------------------------------------------------------- the model


class PortraitAnimator(nn.Module):
    """The animator's device-side state: STFT window, band filters and colour matrices.

    It is small; a user's heavy model would hold gigabytes here instead. ``generate`` runs
    wherever these buffers are.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(WINDOW))
        freqs = torch.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE)
        bands = torch.stack([((freqs >= lo) & (freqs < hi)).float() for lo, hi in BANDS_HZ], dim=1)
        self.register_buffer("band_weights", bands)
        self.register_buffer("rgb_to_yuv", torch.tensor(_BT709_LIMITED))
        self.register_buffer("yuv_offset", torch.tensor([16.0, 128.0, 128.0]))

    @property
    def device(self) -> torch.device:
        """Where the buffers are, i.e. where rendering runs."""
        return self.window.device

    def band_energies(self, wave: torch.Tensor) -> torch.Tensor:
        """Energy per 10 ms frame: total and the three bands, shape ``(frames, 4)``.

        Frame ``j`` is centred on sample ``j * HOP``; long audio is processed in blocks.
        """
        padded = F.pad(wave, (N_FFT // 2, N_FFT // 2))
        n_frames = wave.shape[0] // HOP + 1
        rows = []
        for first in range(0, n_frames, STFT_BLOCK_FRAMES):
            last = min(n_frames, first + STFT_BLOCK_FRAMES)
            piece = padded[first * HOP : (last - 1) * HOP + N_FFT]
            spectrum = torch.stft(
                piece,
                n_fft=N_FFT,
                hop_length=HOP,
                win_length=WINDOW,
                window=self.window,
                center=False,
                return_complex=True,
            )
            power = spectrum.real.square() + spectrum.imag.square()
            bands = power.T @ self.band_weights
            rows.append(torch.cat([power.sum(dim=0, keepdim=True).T, bands], dim=1))
        return torch.cat(rows)[:n_frames]

    def to_yuv(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB ``(3, H, W)`` in 0-255 to BT.709 limited-range YUV, same shape."""
        return torch.einsum("ij,jhw->ihw", self.rgb_to_yuv, rgb) + self.yuv_offset[:, None, None]


# ---------------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class FaceLayout:
    """Where the animator acts, in output pixels (x to the right, y down).

    Attributes:
        face: the face box ``(x, y, width, height)``, brows to just above the chin.
        mouth: the centre of the lip line.
        mouth_half_width: half the mouth's width.
        eyes: the two eye centres, or None when unknown (then nothing blinks).
        source: ``detected``, ``manual`` or ``fallback``.
    """

    face: tuple[float, float, float, float]
    mouth: tuple[float, float]
    mouth_half_width: float
    eyes: tuple[tuple[float, float], tuple[float, float]] | None
    source: str

    @property
    def face_width(self) -> float:
        """The face box width."""
        return self.face[2]

    @property
    def face_height(self) -> float:
        """The face box height."""
        return self.face[3]

    def scaled(self, factor: float) -> FaceLayout:
        """The same layout for an image ``factor`` times as large."""
        eyes = None
        if self.eyes is not None:
            eyes = tuple((x * factor, y * factor) for x, y in self.eyes)
        return FaceLayout(
            face=tuple(v * factor for v in self.face),  # type: ignore[arg-type]
            mouth=(self.mouth[0] * factor, self.mouth[1] * factor),
            mouth_half_width=self.mouth_half_width * factor,
            eyes=eyes,  # type: ignore[arg-type]
            source=self.source,
        )


_cascade: Cascade | None = None


def _detector() -> Cascade:
    """The LBP frontal-face cascade shipped with scikit-image (loaded once)."""
    global _cascade
    if _cascade is None:
        _cascade = Cascade(skimage_data.lbp_frontal_face_cascade_filename())
    return _cascade


def detect_faces(gray: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Frontal faces in a grayscale image (floats 0-1) as ``(x, y, w, h)``, largest first.

    Args:
        gray: the image, ideally a few hundred px on its long side.

    Returns:
        Face boxes, largest first (ties: nearest the centre first).
    """
    height, width = gray.shape
    smallest = max(24, int(0.08 * min(width, height)))
    found = _detector().detect_multi_scale(
        img=gray,
        scale_factor=1.15,
        step_ratio=1,
        min_size=(smallest, smallest),
        max_size=(min(width, height), min(width, height)),
        min_neighbor_number=4,
    )
    boxes = [(float(d["c"]), float(d["r"]), float(d["width"]), float(d["height"])) for d in found]

    def rank(box: tuple[float, float, float, float]) -> tuple[float, float]:
        x, y, w, h = box
        return (-w * h, math.hypot(x + w / 2 - width / 2, y + h / 2 - height / 2))

    return sorted(boxes, key=rank)


def locate_face(image: Image.Image, mouth: tuple[float, float] | None = None) -> tuple[FaceLayout, list[str]]:
    """Find the face, mouth and eyes in a portrait.

    Args:
        image: the RGB portrait (any size; coordinates are returned for this size).
        mouth: optional ``(x, y)`` mouth position as fractions of width and height.

    Returns:
        The layout and notes for the user (empty when a face was found automatically).
    """
    width, height = image.size
    factor = min(1.0, DETECT_LONG_SIDE / max(width, height))
    small = image.convert("RGB")
    if factor < 1.0:
        small = small.resize(
            (max(1, round(width * factor)), max(1, round(height * factor))), Image.Resampling.BILINEAR
        )
    rgb = np.asarray(small, dtype=np.float32) / 255.0
    shape = rgb.shape[:2]
    faces = detect_faces(rgb.mean(axis=2))
    notes: list[str] = []
    if mouth is not None:
        point = (mouth[0] * shape[1], mouth[1] * shape[0])
        around = [box for box in faces if _contains(box, point, margin=0.3)]
        notes.append(NOTE_MANUAL)
        if around:
            found = _layout_from_face(rgb, around[0], source="manual")
            layout = FaceLayout(found.face, point, found.mouth_half_width, found.eyes, "manual")
        else:
            layout = _layout_from_mouth(shape, point, source="manual")
    elif faces:
        layout = _layout_from_face(rgb, faces[0], source="detected")
    else:
        layout = _layout_from_mouth(shape, (0.5 * shape[1], 0.62 * shape[0]), source="fallback")
        notes.append(NOTE_NO_FACE)
    if layout.eyes is None:
        notes.append(NOTE_NO_EYES)
    return layout.scaled(1.0 / factor), notes


def _contains(box: tuple[float, float, float, float], point: tuple[float, float], margin: float) -> bool:
    """Whether ``point`` lies inside ``box`` grown by ``margin`` of its size on each side."""
    x, y, w, h = box
    return (
        x - margin * w <= point[0] <= x + (1 + margin) * w
        and y - margin * h <= point[1] <= y + (1 + margin) * h
    )


def _layout_from_face(rgb: np.ndarray, box: tuple[float, float, float, float], source: str) -> FaceLayout:
    """Place eyes and mouth inside a detected face box.

    The pupils are the darkest spots of the upper face; the mouth sits below their midpoint
    at 0.8 of the box height, where the LBP cascade's boxes put the lip line.
    """
    x, y, w, h = box
    blurred = gaussian_filter(rgb.mean(axis=2), sigma=max(1.0, 0.025 * w))
    eyes = (
        _darkest_spot(
            blurred,
            x + 0.15 * w,
            x + 0.47 * w,
            y + 0.27 * h,
            y + 0.50 * h,
            default=(x + 0.31 * w, y + 0.38 * h),
        ),
        _darkest_spot(
            blurred,
            x + 0.53 * w,
            x + 0.85 * w,
            y + 0.27 * h,
            y + 0.50 * h,
            default=(x + 0.69 * w, y + 0.38 * h),
        ),
    )
    mouth_x = 0.5 * (eyes[0][0] + eyes[1][0])
    if not 0.35 * w <= abs(eyes[1][0] - eyes[0][0]) <= 0.6 * w:
        eyes = ((x + 0.31 * w, y + 0.38 * h), (x + 0.69 * w, y + 0.38 * h))
        mouth_x = x + 0.5 * w
    return FaceLayout(
        face=box, mouth=(mouth_x, y + 0.8 * h), mouth_half_width=0.2 * w, eyes=eyes, source=source
    )


def _layout_from_mouth(shape: tuple[int, int], point: tuple[float, float], source: str) -> FaceLayout:
    """A face of typical portrait size around a known mouth; eyes unknown."""
    size = 0.4 * min(shape)
    box = (point[0] - 0.5 * size, point[1] - 0.8 * size, size, size)
    return FaceLayout(face=box, mouth=point, mouth_half_width=0.2 * size, eyes=None, source=source)


def _window(plane: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> tuple[np.ndarray, int, int]:
    """The clipped sub-array and its top-left corner."""
    height, width = plane.shape
    c0, c1 = max(0, int(x0)), min(width, math.ceil(x1))
    r0, r1 = max(0, int(y0)), min(height, math.ceil(y1))
    return plane[r0:r1, c0:c1], c0, r0


def _darkest_spot(
    gray: np.ndarray, x0: float, x1: float, y0: float, y1: float, default: tuple[float, float]
) -> tuple[float, float]:
    """The darkest pixel of a window (a pupil), or ``default`` if the window is empty."""
    patch, c0, r0 = _window(gray, x0, x1, y0, y1)
    if patch.size == 0:
        return default
    row, col = np.unravel_index(int(np.argmin(patch)), patch.shape)
    return (float(c0 + col), float(r0 + row))


# ---------------------------------------------------------------------------------- the motion


@dataclass(frozen=True)
class MotionTracks:
    """Per-frame animation parameters.

    Attributes:
        openness: mouth opening, 0 (closed) to 1 (wide), times expressiveness.
        width: mouth width factor around 1.
        angle: head roll in radians.
        shift_x: head shift in face widths.
        shift_y: head shift in face heights.
        scale: head scale factor around 1.
        blink: eyelid closure, 0 (open) to 1 (closed).
        loudness: the normalised loudness the mouth follows, 0 to 1.
    """

    openness: np.ndarray
    width: np.ndarray
    angle: np.ndarray
    shift_x: np.ndarray
    shift_y: np.ndarray
    scale: np.ndarray
    blink: np.ndarray
    loudness: np.ndarray

    def __len__(self) -> int:
        return len(self.openness)


def frame_features(energies: np.ndarray, n_frames: int, fps: int) -> np.ndarray:
    """Average 10 ms band energies over each video frame: ``(n_frames, 4)``.

    Args:
        energies: ``PortraitAnimator.band_energies`` output.
        n_frames: the number of video frames.
        fps: frames per second.

    Returns:
        Mean energy per frame: total, low, mid, high.
    """
    centres = np.arange(len(energies)) * (HOP / SAMPLE_RATE)
    index = np.minimum((centres * fps).astype(np.int64), n_frames - 1)
    sums = np.stack(
        [np.bincount(index, weights=energies[:, k], minlength=n_frames) for k in range(4)], axis=1
    )
    counts = np.bincount(index, minlength=n_frames).astype(np.float64)
    return sums / np.maximum(counts, 1.0)[:, None]


def motion_tracks(features: np.ndarray, fps: int, options: GenerateOptions) -> MotionTracks:
    """Turn per-frame audio features into mouth, head and blink tracks.

    Args:
        features: `frame_features` output.
        fps: frames per second.
        options: expressiveness, head motion, blinks and seed.

    Returns:
        The tracks, one value per frame.
    """
    n = len(features)
    total = features[:, 0]
    level = 10.0 * np.log10(total + 1e-10)
    reference = float(np.percentile(level, 95))
    floor = float(np.percentile(level, 10))
    gate = min(max(reference - 25.0, floor + 8.0), reference - 12.0)
    loudness = np.clip((level - gate) / (reference - gate), 0.0, 1.0)

    band_total = features[:, 1:].sum(axis=1) + 1e-12
    high_share = features[:, 3] / band_total
    front_share = features[:, 2] / (features[:, 1] + features[:, 2] + 1e-12)
    hiss = np.clip((high_share - 0.25) / 0.5, 0.0, 1.0)
    raw_open = loudness**2 * (1.0 - 0.6 * hiss)
    openness = _attack_release(raw_open, fps, attack_s=0.03, release_s=0.04)
    openness = np.clip((openness - 0.04) / 0.96, 0.0, None) * options.expressiveness
    width = 0.92 + 0.16 * _attack_release(
        np.clip((front_share - 0.2) / 0.6, 0.0, 1.0) * (loudness > 0), fps, 0.05, 0.1
    )

    head_rng, blink_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(options.seed).spawn(2))
    t = np.arange(n) / fps
    emphasis = _attack_release(loudness, fps, 0.15, 0.15) - _attack_release(loudness, fps, 0.8, 0.8)
    motion = options.head_motion * (0.4 + 0.6 * _attack_release((loudness > 0).astype(float), fps, 0.3, 1.5))
    angle = motion * (math.radians(1.4) * _sway(head_rng, t) + math.radians(0.8) * emphasis)
    shift_x = motion * 0.012 * _sway(head_rng, t)
    shift_y = motion * (0.008 * _sway(head_rng, t) + 0.02 * emphasis)
    scale = 1.0 + motion * 0.006 * _sway(head_rng, t)
    blink = _blinks(blink_rng, t, options.blinks)
    return MotionTracks(openness, width, angle, shift_x, shift_y, scale, blink, loudness)


def _attack_release(values: np.ndarray, fps: int, attack_s: float, release_s: float) -> np.ndarray:
    """One-pole smoother that rises with ``attack_s`` and falls with ``release_s``."""
    rise = 1.0 - math.exp(-1.0 / (fps * attack_s))
    fall = 1.0 - math.exp(-1.0 / (fps * release_s))
    out = np.empty(len(values))
    state = 0.0
    for i, value in enumerate(values):
        state += (rise if value > state else fall) * (value - state)
        out[i] = state
    return out


def _sway(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """Slow, smooth motion in about [-1, 1]: three sinusoids of random frequency and phase."""
    amplitudes = np.array([1.0, 0.6, 0.35])
    freqs = rng.uniform(0.07, 0.45, size=3)
    phases = rng.uniform(0.0, 2 * math.pi, size=3)
    return (amplitudes[:, None] * np.sin(2 * math.pi * freqs[:, None] * t + phases[:, None])).sum(
        0
    ) / amplitudes.sum()


def _blinks(rng: np.random.Generator, t: np.ndarray, rate: float) -> np.ndarray:
    """Eyelid closure per frame: blinks every ~4 s / rate, each ~0.25 s long."""
    closure = np.zeros(len(t))
    if rate <= 0 or len(t) == 0:
        return closure
    mean_gap = 4.0 / rate
    start = rng.uniform(0.3, 1.0) * mean_gap
    duration = t[-1] + 1.0
    while start < duration:
        closure = np.maximum(closure, _blink_shape(t - start))
        start += max(0.8, rng.gamma(4.0, mean_gap / 4.0))
    return closure


def _blink_shape(dt: np.ndarray) -> np.ndarray:
    """One blink: closes in 70 ms, stays shut 50 ms, opens in 130 ms."""
    closing = np.clip(dt / 0.07, 0.0, 1.0)
    opening = np.clip(1.0 - (dt - 0.12) / 0.13, 0.0, 1.0)
    shape = np.minimum(closing, opening)
    return np.where((dt >= 0.0) & (dt <= 0.25), shape * shape * (3.0 - 2.0 * shape), 0.0)


# ---------------------------------------------------------------------------------- rendering


def _smoothstep(edge0: float, edge1: float, x: torch.Tensor) -> torch.Tensor:
    """0 below ``edge0``, 1 above ``edge1``, smooth in between (edges may be reversed)."""
    t = ((x - edge0) / (edge1 - edge0)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _even_box(
    x0: float, y0: float, x1: float, y1: float, width: int, height: int
) -> tuple[int, int, int, int]:
    """Clip a box to the image and snap it outwards to even coordinates."""
    left = max(0, math.floor(x0) // 2 * 2)
    top = max(0, math.floor(y0) // 2 * 2)
    right = min(width, (math.ceil(x1) + 1) // 2 * 2)
    bottom = min(height, (math.ceil(y1) + 1) // 2 * 2)
    return left, top, max(left + 2, right), max(top + 2, bottom)


class _Renderer:
    """Renders frames of one video on the model's device, chunk by chunk."""

    def __init__(
        self, model: PortraitAnimator, portrait: np.ndarray, layout: FaceLayout, tracks: MotionTracks
    ) -> None:
        self.device = model.device
        self.height, self.width = portrait.shape[:2]
        self.layout = layout
        self.tracks = tracks
        fw, fh = layout.face_width, layout.face_height
        fx, fy = layout.face[0], layout.face[1]
        self.pivot = np.array([fx + 0.5 * fw, fy + 1.2 * fh])
        self.max_open = _MAX_OPENING * fh
        most_open = float(tracks.openness.max(initial=0.0)) * self.max_open
        self.margin = 2.0 + self._largest_shift()

        rgb = torch.from_numpy(np.ascontiguousarray(portrait)).to(self.device).permute(2, 0, 1).float()
        self.source = model.to_yuv(rgb).unsqueeze(0)
        self.background = self._yuv420(self.source[0].unsqueeze(1))[0].cpu().numpy()

        head_x, head_y = fx + 0.5 * fw, fy + 0.4 * fh
        rx, ry = 0.75 * fw, 0.95 * fh
        self.roi = _even_box(
            head_x - 1.7 * rx,
            head_y - 1.7 * ry,
            head_x + 1.7 * rx,
            head_y + 1.7 * ry,
            self.width,
            self.height,
        )
        x0, y0, x1, y1 = self.roi
        xs = torch.arange(x0, x1, device=self.device, dtype=torch.float32)
        ys = torch.arange(y0, y1, device=self.device, dtype=torch.float32)
        py, px = torch.meshgrid(ys, xs, indexing="ij")
        radius = (((px - head_x) / rx).square() + ((py - head_y) / ry).square()).sqrt()
        weight = 1.0 - _smoothstep(1.0, 1.7, radius)
        self.basis = torch.stack(
            [px, py, weight * px, weight * py, weight, torch.ones_like(px)], dim=-1
        ).reshape(-1, 6)
        self.xs, self.ys = xs, ys

        mouth_x, mouth_y = layout.mouth
        mw = layout.mouth_half_width
        eye_top = min(e[1] for e in layout.eyes) - 0.12 * fh if layout.eyes else mouth_y - 0.25 * fh
        face_left = min(fx - 0.1 * fw, mouth_x - 0.6 * fw)
        face_right = max(fx + 1.1 * fw, mouth_x + 0.6 * fw)
        self.face_box = self._local_box(face_left, eye_top, face_right, mouth_y + 0.65 * fh)
        self.mouth_box = self._local_box(
            mouth_x - 1.2 * mw,
            mouth_y - 0.3 * most_open - 2.0,
            mouth_x + 1.2 * mw,
            mouth_y + 0.7 * most_open + 2.0,
        )
        top, left = max(0, int(mouth_y - 0.15 * fh)), max(0, int(mouth_x - mw))
        skin = self.source[
            0, :, top : max(top, int(mouth_y + 0.15 * fh)), left : max(left, int(mouth_x + mw))
        ]
        face_luma = float(skin.mean(dim=(1, 2))[0]) if skin.numel() else 120.0
        brightness = min(1.2, max(0.3, (face_luma - 16.0) / 140.0))
        self.dark = model.to_yuv(
            torch.tensor([70.0, 22.0, 28.0], device=self.device).mul(brightness)[:, None, None]
        )[:, 0, 0]
        self.teeth = model.to_yuv(
            torch.tensor([225.0, 220.0, 210.0], device=self.device).mul(brightness)[:, None, None]
        )[:, 0, 0]

    def _largest_shift(self) -> float:
        """The largest distance any face point moves with the head, in px."""
        t = self.tracks
        fw, fh = self.layout.face_width, self.layout.face_height
        reach = math.hypot(fw, 1.5 * fh)
        rotation = float(np.abs(t.angle).max(initial=0.0)) * reach
        shift = float(np.hypot(t.shift_x * fw, t.shift_y * fh).max(initial=0.0))
        zoom = float(np.abs(t.scale - 1.0).max(initial=0.0)) * reach
        return rotation + shift + zoom

    def _local_box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice]:
        """A box in image pixels, grown by the head margin, as slices into the region."""
        m = self.margin
        rx0, ry0, rx1, ry1 = self.roi
        c0, c1 = max(rx0, int(x0 - m)), min(rx1, math.ceil(x1 + m))
        r0, r1 = max(ry0, int(y0 - m)), min(ry1, math.ceil(y1 + m))
        return slice(r0 - ry0, max(r0, r1) - ry0), slice(c0 - rx0, max(c0, c1) - rx0)

    @staticmethod
    def _yuv420(yuv: torch.Tensor) -> torch.Tensor:
        """Quantise ``(3, T, H, W)`` YUV to uint8 ``(T, H*W + H*W/2)``: the Y, U and V planes of each frame."""
        count, height, width = yuv.shape[1:]
        luma = yuv[0].reshape(count, -1)
        chroma = F.avg_pool2d(yuv[1:3].reshape(2 * count, 1, height, width), 2)
        chroma = chroma.reshape(2, count, -1).transpose(0, 1).reshape(count, -1)
        return torch.cat([luma, chroma], dim=1).round_().clamp_(0, 255).to(torch.uint8)

    @property
    def chunk_frames(self) -> int:
        """Frames per chunk so that one chunk renders about `PIXELS_PER_CHUNK` pixels."""
        x0, y0, x1, y1 = self.roi
        return max(1, min(64, PIXELS_PER_CHUNK // ((x1 - x0) * (y1 - y0))))

    def render(self, first: int, last: int) -> np.ndarray:
        """Render frames ``first`` to ``last - 1`` of the region: uint8 ``(T, region Y + UV bytes)``."""
        x0, y0, x1, y1 = self.roi
        grid, moved = self._head_grid(first, last)
        mouth_x, mouth_y = moved(self.layout.mouth)
        gap = self._track("openness", first, last) * self.max_open
        mouth_half_width = self.layout.mouth_half_width * self._track("width", first, last)
        rows, cols = self.face_box
        grid[:, rows, cols, 1] += self._face_shift(first, last, moved, gap, mouth_half_width) * (
            2.0 / self.height
        )
        frames = F.grid_sample(
            self.source,
            grid.reshape(1, -1, x1 - x0, 2),
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        ).reshape(3, last - first, y1 - y0, x1 - x0)
        self._mouth_interior(frames, mouth_x, mouth_y, gap, mouth_half_width)
        return self._yuv420(frames).cpu().numpy()

    def _track(self, name: str, first: int, last: int) -> torch.Tensor:
        """A slice of a motion track as a ``(T, 1)`` tensor on the device."""
        values = getattr(self.tracks, name)[first:last]
        return torch.from_numpy(values).float().to(self.device)[:, None]

    def _head_grid(self, first: int, last: int) -> tuple[torch.Tensor, Callable[[tuple[float, float]], Any]]:
        """The sampling grid of the head motion alone, and a function giving where a face point moved."""
        t = self.tracks
        fw, fh = self.layout.face_width, self.layout.face_height
        angle, scale = t.angle[first:last], t.scale[first:last]
        shift = np.stack([t.shift_x[first:last] * fw, t.shift_y[first:last] * fh], axis=1)
        cos, sin = np.cos(angle), np.sin(angle)
        forward = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2) * scale[:, None, None]
        inverse = np.linalg.inv(forward)
        offset = self.pivot - np.einsum("tij,tj->ti", inverse, self.pivot + shift)
        # source = p + weight * (inverse @ p + offset - p), in grid_sample's [-1, 1] coordinates
        sx, sy = 2.0 / self.width, 2.0 / self.height
        coeffs = np.zeros((last - first, 6, 2))
        coeffs[:, 0, 0], coeffs[:, 1, 1] = sx, sy
        coeffs[:, 2:5, 0] = np.stack([inverse[:, 0, 0] - 1, inverse[:, 0, 1], offset[:, 0]], axis=1) * sx
        coeffs[:, 2:5, 1] = np.stack([inverse[:, 1, 0], inverse[:, 1, 1] - 1, offset[:, 1]], axis=1) * sy
        coeffs[:, 5, 0], coeffs[:, 5, 1] = sx / 2 - 1, sy / 2 - 1
        x0, y0, x1, y1 = self.roi
        grid = self.basis @ torch.from_numpy(coeffs).float().to(self.device)

        def moved(point: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
            where = np.einsum("tij,j->ti", forward, np.asarray(point) - self.pivot) + self.pivot + shift
            where = torch.from_numpy(where).float().to(self.device)
            return where[:, 0, None], where[:, 1, None]

        return grid.reshape(last - first, y1 - y0, x1 - x0, 2), moved

    def _face_shift(
        self,
        first: int,
        last: int,
        moved: Callable[[tuple[float, float]], Any],
        gap: torch.Tensor,
        mouth_half_width: torch.Tensor,
    ) -> torch.Tensor:
        """Vertical source offsets (px) over the face box: lips part, the jaw drops, eyelids close."""
        fw, fh = self.layout.face_width, self.layout.face_height
        rows, cols = self.face_box
        ys, xs = self.ys[rows][None, :], self.xs[cols][None, :]
        mouth_x, mouth_y = moved(self.layout.mouth)
        lens = (1.0 - ((xs - mouth_x) / mouth_half_width).square()).clamp(min=0.0).sqrt()
        jaw = 1.0 - _smoothstep(0.3 * fw, 0.5 * fw, (xs - mouth_x).abs())
        below = ys - mouth_y
        lip_reach = _LOWER_SHARE * self.max_open * float(self.tracks.openness.max(initial=0.0)) + 1.0
        chin = _smoothstep(lip_reach, lip_reach + 0.2 * fh, below)
        lower_lip = (below >= 0).float() * (1.0 - chin)
        lower_jaw = chin * (1.0 - _smoothstep(0.33 * fh, 0.6 * fh, below))
        upper_lip = (below < 0).float() * (
            1.0 - _smoothstep(-(_UPPER_SHARE * lip_reach + 1.0), -0.2 * fh, below)
        )
        shift = (
            -(_LOWER_SHARE * gap)[:, :, None]
            * (lower_lip[:, :, None] * lens[:, None, :] + lower_jaw[:, :, None] * jaw[:, None, :])
            + (_UPPER_SHARE * gap)[:, :, None] * upper_lip[:, :, None] * lens[:, None, :]
        )
        if self.layout.eyes is not None:
            blink = self._track("blink", first, last)
            for eye in self.layout.eyes:
                eye_x, eye_y = moved(eye)
                across = (1.0 - ((xs - eye_x) / (0.15 * fw)).square()).clamp(min=0.0).sqrt()
                lid = eye_y - 0.06 * fh
                down = (ys - lid).clamp(min=0.0) * (1.0 - _smoothstep(0.035 * fh, 0.06 * fh, ys - eye_y))
                shift = shift - blink[:, :, None] * down[:, :, None] * across[:, None, :]
        return shift

    def _mouth_interior(
        self,
        frames: torch.Tensor,
        mouth_x: torch.Tensor,
        mouth_y: torch.Tensor,
        gap: torch.Tensor,
        mw: torch.Tensor,
    ) -> None:
        """Paint the open mouth (dark, teeth under the upper lip) into the lip gap, in place."""
        rows, cols = self.mouth_box
        ys = self.ys[rows][None, :, None]
        xs = self.xs[cols][None, None, :]
        lens = (1.0 - ((xs - mouth_x[:, :, None]) / mw[:, :, None]).square()).clamp(min=0.0).sqrt()
        top = mouth_y[:, :, None] - _UPPER_SHARE * gap[:, :, None] * lens
        bottom = mouth_y[:, :, None] + _LOWER_SHARE * gap[:, :, None] * lens
        alpha = (torch.minimum(ys + 0.5, bottom) - torch.maximum(ys - 0.5, top)).clamp(0.0, 1.0)
        teeth_depth = (0.35 * (bottom - top)).clamp(min=1.0, max=0.04 * self.layout.face_height)
        teeth = (1.0 - _smoothstep(0.0, 1.0, (ys - top) / teeth_depth)) * (
            0.85 * ((gap[:, :, None] - 2.0) / 6.0).clamp(0.0, 1.0)
        )
        interior = self.dark[:, None, None, None] + (self.teeth - self.dark)[:, None, None, None] * teeth
        region = frames[:, :, rows, cols]
        frames[:, :, rows, cols] = region + alpha * (interior - region)


# ---------------------------------------------------------------------------------- the pipeline


class TalkingPortrait:
    """The built-in pipeline: animates a portrait's mouth, head and eyes from speech.

    ``load()`` builds a `PortraitAnimator` on the CPU; ``generate()`` renders on whatever
    device the manager put it on.
    """

    name = "talking-portrait"

    def load(self) -> PortraitAnimator:
        """Build the animator on the CPU.

        Returns:
            The model object for the GPU manager.
        """
        return PortraitAnimator().eval()

    @torch.inference_mode()
    def generate(
        self,
        model: Any,
        image: media.ImageInput,
        audio: media.AudioInput,
        options: GenerateOptions | None = None,
        progress: ProgressCallback | None = None,
    ) -> GeneratedVideo:
        """Render a talking video of ``image`` speaking ``audio``.

        Args:
            model: the `PortraitAnimator` from ``load()``, on the compute device.
            image: a path or a PIL image.
            audio: a path or a ``(sample_rate, samples)`` tuple.
            options: generation options (defaults when None).
            progress: called with ``(fraction, message)``.

        Returns:
            The video with notes (e.g. no face found) and timings: ``read``, ``analyse``,
            ``render`` and ``encode`` seconds.

        Raises:
            TypeError: ``model`` is not this pipeline's model.
            MediaError: the image or audio cannot be used.
        """
        if not isinstance(model, PortraitAnimator):
            raise TypeError(
                f"{self.name} needs the PortraitAnimator its load() returns, got {type(model).__name__}."
            )
        options = GenerateOptions() if options is None else options
        report = progress or (lambda fraction, message: None)
        started = time.perf_counter()
        portrait = media.read_image(image)
        track = media.read_audio(audio, max_seconds=options.max_audio_seconds)
        out_width, out_height = _output_size(portrait.size, options.size)
        frame_count = max(1, round(track.duration * options.fps))
        read_done = time.perf_counter()

        report(0.02, "Finding the face")
        layout, notes = locate_face(portrait, options.mouth)
        layout = layout.scaled(out_width / portrait.width)
        portrait = np.array(portrait.resize((out_width, out_height), Image.Resampling.LANCZOS))
        report(0.05, "Listening to the audio")
        wave = torch.from_numpy(media.resample(track.samples, track.sample_rate, SAMPLE_RATE)).to(
            model.device
        )
        energies = model.band_energies(wave).double().cpu().numpy()
        del wave
        tracks = motion_tracks(frame_features(energies, frame_count, options.fps), options.fps, options)
        if layout.eyes is None:
            tracks = dataclasses.replace(tracks, blink=np.zeros(frame_count))
        renderer = _Renderer(model, portrait, layout, tracks)
        out_rate = (
            track.sample_rate if track.sample_rate in media.AAC_SAMPLE_RATES else media.OUTPUT_AUDIO_RATE
        )
        sound = media.resample(track.samples, track.sample_rate, out_rate)
        del track
        analysed = time.perf_counter()

        logger.info(
            "Animating a %s face (mouth at %.0f,%.0f) at %dx%d, %d frames at %d fps on %s",
            layout.source,
            *layout.mouth,
            out_width,
            out_height,
            frame_count,
            options.fps,
            model.device,
        )
        path = options.output_path or media.temp_video_path("talking-portrait")
        with media.VideoWriter(
            path, width=out_width, height=out_height, fps=options.fps, audio_rate=out_rate
        ) as writer:
            self._write_frames(writer, renderer, sound, out_rate, options.fps, report)
        finished = time.perf_counter()
        report(1.0, "Done")
        timings = {
            "read": read_done - started,
            "analyse": analysed - read_done,
            "render": finished - analysed - writer.encode_seconds,
            "encode": writer.encode_seconds,
        }
        return GeneratedVideo(
            path=os.fspath(path),
            duration_s=frame_count / options.fps,
            frames=frame_count,
            fps=options.fps,
            width=out_width,
            height=out_height,
            notes=tuple(notes),
            timings=timings,
        )

    @staticmethod
    def _write_frames(
        writer: media.VideoWriter,
        renderer: _Renderer,
        sound: np.ndarray,
        rate: int,
        fps: int,
        report: ProgressCallback,
    ) -> None:
        """Render chunk by chunk and stream frames and the matching audio into the writer."""
        width, height = renderer.width, renderer.height
        frame = np.empty(height * width * 3 // 2, dtype=np.uint8)
        luma = frame[: height * width].reshape(height, width)
        chroma = frame[height * width :].reshape(2, height // 2, width // 2)
        background = renderer.background
        luma[:] = background[: height * width].reshape(height, width)
        chroma[:] = background[height * width :].reshape(2, height // 2, width // 2)
        x0, y0, x1, y1 = renderer.roi
        roi_h, roi_w = y1 - y0, x1 - x0
        total = len(renderer.tracks)
        step = renderer.chunk_frames
        written_audio = 0
        for first in range(0, total, step):
            last = min(total, first + step)
            region = renderer.render(first, last)
            for row in region:
                luma[y0:y1, x0:x1] = row[: roi_h * roi_w].reshape(roi_h, roi_w)
                chroma[:, y0 // 2 : y1 // 2, x0 // 2 : x1 // 2] = row[roi_h * roi_w :].reshape(
                    2, roi_h // 2, roi_w // 2
                )
                writer.write_frame(frame.reshape(height * 3 // 2, width))
            audio_end = len(sound) if last == total else min(len(sound), round(last * rate / fps))
            writer.write_audio(sound[written_audio:audio_end])
            written_audio = audio_end
            report(0.05 + 0.95 * last / total, f"Rendered {last} of {total} frames")


def _output_size(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """Scale ``size`` so its long side is ``long_side``; both sides even."""
    width, height = size
    factor = long_side / max(width, height)
    return max(2, round(width * factor / 2) * 2), max(2, round(height * factor / 2) * 2)
