"""The Pipeline protocol, its options and result, and the one entry point `run_pipeline`.

A pipeline turns a portrait and a speech track into a video. It has two halves so that the
GPU manager can own the heavy part:

- ``load()`` builds the model object (torch modules and tensors) on the CPU; the manager
  calls it lazily and moves the result between the host cache and the compute device;
- ``generate(model, image, audio, options, progress)`` runs on whatever device the model's
  tensors are on and writes an MP4.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from . import media
from .errors import MediaError, PipelineError

__all__ = [
    "DEFAULT_MAX_AUDIO_SECONDS",
    "MAX_AUDIO_SECONDS_ENV",
    "OPTION_RANGES",
    "GenerateOptions",
    "GeneratedVideo",
    "Pipeline",
    "ProgressCallback",
    "load_pipeline",
    "run_pipeline",
]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]

MAX_AUDIO_SECONDS_ENV = "PIPELINE_MAX_AUDIO_SECONDS"
DEFAULT_MAX_AUDIO_SECONDS = 300.0
DEFAULT_FPS = 25
DEFAULT_SIZE = 512

# name: (low, high) inclusive ranges, shared by validation, the CLI help and the docs.
OPTION_RANGES: dict[str, tuple[float, float]] = {
    "fps": (1, 60),
    "size": (64, 2048),
    "expressiveness": (0.0, 2.0),
    "head_motion": (0.0, 2.0),
    "blinks": (0.0, 3.0),
    "seed": (0, 2**32 - 1),
    "max_audio_seconds": (1.0, 24 * 3600.0),
}


def _default_max_audio_seconds() -> float:
    """Read ``PIPELINE_MAX_AUDIO_SECONDS`` (default 300)."""
    raw = os.environ.get(MAX_AUDIO_SECONDS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_AUDIO_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{MAX_AUDIO_SECONDS_ENV}={raw!r} is not a number of seconds.") from None
    low, high = OPTION_RANGES["max_audio_seconds"]
    if not low <= seconds <= high:
        raise ValueError(f"{MAX_AUDIO_SECONDS_ENV}={raw!r} is out of range; use {low:g} to {high:g} seconds.")
    return seconds


@dataclass(frozen=True, kw_only=True)
class GenerateOptions:
    """How to generate a video; every field is checked when the object is made.

    Attributes:
        fps: frames per second (1-60).
        size: the output's long side in px (64-2048), made even; the short side follows
            the portrait's aspect ratio.
        expressiveness: how wide the mouth opens (0-2; 0 keeps it closed).
        head_motion: how much the head sways and nods (0-2; 0 keeps it still).
        blinks: blink rate relative to a natural one (0-3; 0 disables blinking).
        seed: makes head motion and blink timing repeatable (0 to 2**32-1).
        mouth: optional ``(x, y)`` position of the mouth as fractions of the image width and
            height (0-1), overriding face detection.
        max_audio_seconds: longest accepted audio; default from ``PIPELINE_MAX_AUDIO_SECONDS``
            (300 when unset).
        output_path: where to write the MP4; None writes a new file in the temp folder.

    Raises:
        ValueError: a field is out of range or of the wrong type; the message names it.
    """

    fps: int = DEFAULT_FPS
    size: int = DEFAULT_SIZE
    expressiveness: float = 1.0
    head_motion: float = 1.0
    blinks: float = 1.0
    seed: int = 0
    mouth: tuple[float, float] | None = None
    max_audio_seconds: float = field(default_factory=_default_max_audio_seconds)
    output_path: str | None = None

    def __post_init__(self) -> None:
        for name in ("fps", "size", "seed"):
            self._set(name, _whole(name, getattr(self, name)))
        self._set("size", self.size - self.size % 2)
        for name in ("expressiveness", "head_motion", "blinks", "max_audio_seconds"):
            self._set(name, _real(name, getattr(self, name)))
        for name, (low, high) in OPTION_RANGES.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(
                    f"Option {name}={value!r} is out of range; use a value from {low:g} to {high:g}."
                )
        if self.mouth is not None:
            self._set("mouth", _mouth(self.mouth))
        if self.output_path is not None:
            self._set("output_path", _output_path(self.output_path))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> GenerateOptions:
        """Build options from loose values (UI sliders, form fields, JSON, CLI strings).

        Keys may use ``_`` or ``-``; None or an empty string means the default; numbers may
        come as strings; ``mouth`` may be ``"x,y"`` or a pair.

        Args:
            values: option names to values.

        Returns:
            The validated options.

        Raises:
            ValueError: an unknown option, or a value that is not valid (the message names it).
        """
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = str(key).strip().replace("-", "_")
            if name not in known:
                raise ValueError(f"Unknown option {key!r}; the options are {', '.join(sorted(known))}.")
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            if isinstance(value, str) and name not in ("mouth", "output_path"):
                value = _parse_number(name, value)
            kwargs[name] = value
        return cls(**kwargs)


def _parse_number(name: str, text: str) -> float:
    """Parse a number given as text."""
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"Option {name}={text!r} is not a number.") from None


def _whole(name: str, value: Any) -> int:
    """Accept a whole number, also as a float with no fractional part (UI sliders give floats)."""
    number = _real(name, value)
    if not number.is_integer():
        raise ValueError(f"Option {name}={value!r} must be a whole number.")
    return int(number)


def _real(name: str, value: Any) -> float:
    """Accept a finite int or float."""
    if isinstance(value, bool):
        raise ValueError(f"Option {name}={value!r} must be a number.")  # noqa: TRY004 (options raise ValueError)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Option {name}={value!r} must be a number.") from None
    if not math.isfinite(number):
        raise ValueError(f"Option {name}={value!r} must be a finite number.")
    return number


def _mouth(value: Any) -> tuple[float, float]:
    """Parse the mouth override: ``"x,y"`` or a pair of fractions in [0, 1]."""
    if isinstance(value, str):
        parts: Any = [p for p in value.replace(";", ",").split(",") if p.strip()]
    else:
        parts = value
    try:
        x, y = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(
            f"Option mouth={value!r} must be two numbers 'x,y' (fractions of the image width and height)."
        ) from None
    if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
        raise ValueError(
            f"Option mouth={value!r} must hold fractions from 0 to 1 (0,0 is the top-left corner)."
        )
    return (x, y)


def _output_path(value: Any) -> str:
    """Accept a str or path-like output path."""
    try:
        path = os.fspath(value)
    except TypeError:
        raise ValueError(f"Option output_path={value!r} must be a file path.") from None
    if not path:
        raise ValueError("Option output_path must not be empty.")
    return str(path)


@dataclass(frozen=True)
class GeneratedVideo:
    """A video a pipeline wrote.

    Attributes:
        path: the MP4 file.
        duration_s: its length in seconds.
        frames: the number of video frames.
        fps: frames per second.
        width: frame width in px.
        height: frame height in px.
        notes: remarks for the user (e.g. that no face was found).
        timings: seconds spent in each measured phase.
    """

    path: str
    duration_s: float
    frames: int
    fps: int
    width: int
    height: int
    notes: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    def __fspath__(self) -> str:
        return self.path

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of all fields."""
        return {**dataclasses.asdict(self), "notes": list(self.notes)}


@runtime_checkable
class Pipeline(Protocol):
    """Turns a portrait and a speech track into a video, with its heavy part managed.

    Attributes:
        name: a short label for logs and the UI.
    """

    name: str

    def load(self) -> Any:
        """Build the model on the CPU: everything heavy, as torch modules and tensors."""
        ...

    def generate(
        self,
        model: Any,
        image: media.ImageInput,
        audio: media.AudioInput,
        options: GenerateOptions,
        progress: ProgressCallback | None,
    ) -> GeneratedVideo | str:
        """Write an MP4 and return it (a `GeneratedVideo`, or just its path).

        Find the compute device from the model's own tensors (the manager has moved them);
        never move the model. ``image`` is a path or a PIL image; ``audio`` a path or a
        ``(sample_rate, samples)`` tuple. Call ``progress(fraction, message)`` now and then.
        """
        ...


_PROTOCOL_MEMBERS = ("name", "load", "generate")


def load_pipeline(spec: str) -> Pipeline:
    """Load a user's pipeline from ``"package.module:attribute"``.

    The attribute may be a pipeline instance, a class (called with no arguments) or a
    factory function with no arguments returning a pipeline. A dotted attribute
    (``module:Class.factory``) is followed.

    Args:
        spec: ``module:attribute``.

    Returns:
        The pipeline.

    Raises:
        PipelineError: the spec is malformed, the module does not import, the attribute is
            missing, calling it fails, or the result lacks a protocol member.
    """
    module_name, sep, attr_path = str(spec).strip().partition(":")
    if not sep or not module_name or not attr_path:
        raise PipelineError(f"Pipeline {spec!r} must look like 'package.module:attribute'.")
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise PipelineError(
                f"Cannot import module {module_name!r} for pipeline {spec!r}: it was not found (is it on PYTHONPATH?)."
            ) from error
        raise PipelineError(
            f"Importing module {module_name!r} for pipeline {spec!r} failed: {error}."
        ) from error
    except Exception as error:
        raise PipelineError(
            f"Importing module {module_name!r} for pipeline {spec!r} failed: {type(error).__name__}: {error}."
        ) from error
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise PipelineError(f"Module {module_name!r} has no attribute {attr_path!r} (pipeline {spec!r}).")
        target = getattr(target, part)
    if isinstance(target, type) or not _missing_members(target):
        candidate = target() if isinstance(target, type) else target
    elif callable(target):
        try:
            candidate = target()
        except Exception as error:
            raise PipelineError(
                f"Calling {spec!r} to make the pipeline failed: {type(error).__name__}: {error}."
            ) from error
    else:
        candidate = target
    missing = _missing_members(candidate)
    if missing:
        raise PipelineError(
            f"{spec!r} gave a {type(candidate).__name__} that is not a pipeline: it lacks {', '.join(missing)} "
            "(a pipeline needs a name, load() and generate(model, image, audio, options, progress))."
        )
    return candidate


def _missing_members(obj: Any) -> list[str]:
    """Protocol members that ``obj`` lacks or has in the wrong form."""
    missing = []
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        missing.append("name (a non-empty str)")
    for method in ("load", "generate"):
        if not callable(getattr(obj, method, None)):
            missing.append(f"{method}()")
    return missing


def run_pipeline(
    manager: Any,
    pipeline: Pipeline,
    image: media.ImageInput,
    audio: media.AudioInput,
    options: GenerateOptions | None = None,
    progress: ProgressCallback | None = None,
) -> GeneratedVideo:
    """Check the inputs, borrow the model from the manager, generate, and describe the video.

    The inputs are read and checked before the model is touched, so a bad file fails in
    milliseconds rather than after a model load. The pipeline receives them as given.
    Timings added: ``validate``, ``acquire`` (getting the model onto the device),
    ``generate`` and ``release`` (ending the lease, which includes the immediate offload).

    Args:
        manager: a `gpu_control.GPUResourceManager` (anything with ``use(load_func)``).
        pipeline: the pipeline.
        image: a path or a PIL image.
        audio: a path or a ``(sample_rate, samples)`` tuple.
        options: generation options (defaults when None).
        progress: called with ``(fraction, message)``.

    Returns:
        The video, with the pipeline's notes and all timings.

    Raises:
        MediaError: the image or audio cannot be used.
        PipelineError: the pipeline returned something that is not a readable video.
    """
    options = GenerateOptions() if options is None else options
    started = time.perf_counter()
    media.read_image(image)
    media.read_audio(audio, max_seconds=options.max_audio_seconds)
    checked = time.perf_counter()
    if progress is not None:
        progress(0.0, "Getting the model ready")
    with manager.use(pipeline.load) as model:
        acquired = time.perf_counter()
        result = pipeline.generate(model, image, audio, options, progress)
        generated = time.perf_counter()
    released = time.perf_counter()
    video = _as_generated_video(pipeline, result)
    timings = {
        **video.timings,
        "validate": checked - started,
        "acquire": acquired - checked,
        "generate": generated - acquired,
        "release": released - generated,
    }
    logger.info(
        "%s wrote %s (%.1f s, %dx%d): acquire %.2f s, generate %.2f s, release %.2f s",
        pipeline.name,
        video.path,
        video.duration_s,
        video.width,
        video.height,
        timings["acquire"],
        timings["generate"],
        timings["release"],
    )
    return dataclasses.replace(video, timings=timings)


def _as_generated_video(pipeline: Pipeline, result: Any) -> GeneratedVideo:
    """Accept a GeneratedVideo as is; probe a returned path."""
    if isinstance(result, GeneratedVideo):
        return result
    try:
        path = os.fspath(result)
    except TypeError:
        raise PipelineError(
            f"Pipeline {pipeline.name!r} returned a {type(result).__name__}; generate() must return the path "
            "of the MP4 it wrote (str) or a GeneratedVideo."
        ) from None
    try:
        info = media.probe_video(path)
    except MediaError as error:
        raise PipelineError(
            f"Pipeline {pipeline.name!r} returned {path!r}, which is not a readable video: {error}"
        ) from error
    return GeneratedVideo(
        path=str(path),
        duration_s=info.duration_s,
        frames=info.frames,
        fps=round(info.fps),
        width=info.width,
        height=info.height,
    )
