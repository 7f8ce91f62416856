"""pipelines: a portrait and a speech track in, a talking video out.

    from gpu_control import GPUResourceManager
    from pipelines import GenerateOptions, default_pipeline, run_pipeline

    manager = GPUResourceManager()
    video = run_pipeline(manager, default_pipeline(), "portrait.jpg", "speech.wav",
                         GenerateOptions(size=512, seed=1))
    print(video.path, video.duration_s, video.notes)

Bring your own model: any object with ``name``, ``load()`` and
``generate(model, image, audio, options, progress)`` is a `Pipeline`; load one by
``load_pipeline("package.module:attribute")``. See docs/PIPELINES.md.
"""

from .errors import MediaError, PipelineError
from .protocol import GeneratedVideo, GenerateOptions, Pipeline, load_pipeline, run_pipeline
from .talking_portrait import TalkingPortrait

__all__ = [
    "GenerateOptions",
    "GeneratedVideo",
    "MediaError",
    "Pipeline",
    "PipelineError",
    "TalkingPortrait",
    "default_pipeline",
    "load_pipeline",
    "run_pipeline",
]


def default_pipeline() -> TalkingPortrait:
    """The built-in talking-portrait pipeline.

    Returns:
        A new `TalkingPortrait` (its model is built by ``load()``, lazily, by the manager).
    """
    return TalkingPortrait()
