"""pipelines.protocol: options, results, loading a user's pipeline and run_pipeline."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile

import pipelines
from pipelines import (
    GeneratedVideo,
    GenerateOptions,
    MediaError,
    Pipeline,
    PipelineError,
    TalkingPortrait,
    default_pipeline,
    load_pipeline,
    run_pipeline,
)

# ------------------------------------------------------------------------------------ exports


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in vars(pipelines) if not name.startswith("_")}
    modules = {"errors", "jobs", "media", "media_files", "protocol", "talking_portrait", "video"}
    assert set(pipelines.__all__) == public - modules
    for name in ("Pipeline", "GenerateOptions", "GeneratedVideo", "MediaError", "PipelineError"):
        assert name in pipelines.__all__
    for name in ("load_pipeline", "run_pipeline", "default_pipeline"):
        assert name in pipelines.__all__


def test_media_error_is_a_value_error() -> None:
    assert issubclass(MediaError, ValueError)
    assert not issubclass(PipelineError, ValueError)


def test_default_pipeline_is_the_builtin_talking_portrait() -> None:
    pipeline = default_pipeline()
    assert isinstance(pipeline, TalkingPortrait)
    assert isinstance(pipeline, Pipeline)
    assert pipeline.name == "talking-portrait"


# ------------------------------------------------------------------------------------ options


def test_options_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIPELINE_MAX_AUDIO_SECONDS", raising=False)
    options = GenerateOptions()
    assert (options.fps, options.size, options.seed, options.mouth, options.output_path) == (
        25,
        512,
        0,
        None,
        None,
    )
    assert (options.expressiveness, options.head_motion, options.blinks) == (1.0, 1.0, 1.0)
    assert options.max_audio_seconds == 300.0


def test_options_are_frozen_and_keyword_only() -> None:
    options = GenerateOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.fps = 30  # type: ignore[misc]
    with pytest.raises(TypeError):
        GenerateOptions(25)  # type: ignore[misc]


def test_options_make_the_size_even() -> None:
    assert GenerateOptions(size=513).size == 512


def test_replacing_a_field_validates_it_again() -> None:
    with pytest.raises(ValueError, match="size=10 is out of range"):
        dataclasses.replace(GenerateOptions(), size=10)


def test_max_audio_seconds_defaults_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_MAX_AUDIO_SECONDS", "45")
    assert GenerateOptions().max_audio_seconds == 45.0
    monkeypatch.setenv("PIPELINE_MAX_AUDIO_SECONDS", "a minute")
    with pytest.raises(ValueError, match="PIPELINE_MAX_AUDIO_SECONDS='a minute' is not a number"):
        GenerateOptions()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("fps", 0, "fps=0 is out of range; use a value from 1 to 60"),
        ("fps", 24.5, "fps=24.5 must be a whole number"),
        ("fps", True, "fps=True must be a number"),
        ("size", 32, "size=32 is out of range; use a value from 64 to 2048"),
        ("size", "big", "size='big' must be a number"),
        ("expressiveness", -0.1, "expressiveness=-0.1 is out of range"),
        ("head_motion", float("nan"), "head_motion=nan must be a finite number"),
        ("blinks", 4, "blinks=4.0 is out of range; use a value from 0 to 3"),
        ("seed", -1, "seed=-1 is out of range"),
        ("mouth", (0.5,), "mouth=\\(0.5,\\) must be two numbers"),
        ("mouth", (1.5, 0.5), "must hold fractions from 0 to 1"),
        ("max_audio_seconds", 0, "max_audio_seconds=0.0 is out of range"),
        ("output_path", 3, "output_path=3 must be a file path"),
    ],
)
def test_options_reject_bad_values_naming_the_option(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GenerateOptions(**{field: value})


def test_from_mapping_takes_loose_ui_values() -> None:
    options = GenerateOptions.from_mapping(
        {
            "fps": 30.0,
            "size": "384",
            "expressiveness": "1.5",
            "head-motion": 0,
            "blinks": None,
            "seed": " 7 ",
            "mouth": "0.5, 0.7",
            "max_audio_seconds": "",
            "output_path": Path("/tmp/x.mp4"),
        }
    )
    assert (options.fps, options.size, options.expressiveness, options.head_motion) == (30, 384, 1.5, 0.0)
    assert (options.blinks, options.seed, options.mouth, options.output_path) == (
        1.0,
        7,
        (0.5, 0.7),
        "/tmp/x.mp4",
    )
    assert options.max_audio_seconds == GenerateOptions().max_audio_seconds


def test_from_mapping_rejects_unknown_options_and_bad_text() -> None:
    with pytest.raises(ValueError, match="Unknown option 'speed'; the options are blinks, expressiveness"):
        GenerateOptions.from_mapping({"speed": 2})
    with pytest.raises(ValueError, match="Option fps='fast' is not a number"):
        GenerateOptions.from_mapping({"fps": "fast"})
    with pytest.raises(ValueError, match="mouth='middle' must be two numbers"):
        GenerateOptions.from_mapping({"mouth": "middle"})


def test_generated_video_is_path_like(tmp_path: Path) -> None:
    video = GeneratedVideo(
        path=str(tmp_path / "v.mp4"), duration_s=1.0, frames=25, fps=25, width=64, height=64
    )
    assert os.fspath(video) == str(tmp_path / "v.mp4")
    assert video.to_dict()["notes"] == [] and video.to_dict()["timings"] == {}


# ------------------------------------------------------------------------------------ load_pipeline


@pytest.mark.parametrize("attr", ["instance", "GreyPipeline", "factory"])
def test_load_pipeline_accepts_an_instance_a_class_or_a_factory(user_module: str, attr: str) -> None:
    pipeline = load_pipeline(f"{user_module}:{attr}")
    assert type(pipeline).__name__ == "GreyPipeline"
    assert isinstance(pipeline, Pipeline)


def test_load_pipeline_follows_a_dotted_attribute() -> None:
    assert isinstance(load_pipeline("pipelines:TalkingPortrait"), TalkingPortrait)
    assert isinstance(load_pipeline("pipelines.talking_portrait:TalkingPortrait"), TalkingPortrait)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("user_pipes", "must look like 'package.module:attribute'"),
        (":factory", "must look like"),
        ("no_such_module_here:x", "Cannot import module 'no_such_module_here' .* it was not found"),
        (
            "raises_on_import:x",
            "Importing module 'raises_on_import' .* failed: RuntimeError: no GPU driver here",
        ),
        ("user_pipes:nothing", "Module 'user_pipes' has no attribute 'nothing'"),
        ("user_pipes:NotAPipeline", "gave a NotAPipeline that is not a pipeline: it lacks generate\\(\\)"),
        (
            "user_pipes:CALLS",
            "gave a list that is not a pipeline: it lacks name .*, load\\(\\), generate\\(\\)",
        ),
    ],
)
def test_load_pipeline_says_what_is_wrong(user_module: str, spec: str, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        load_pipeline(spec)


def test_load_pipeline_reports_a_failing_factory(user_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import user_pipes

    def broken() -> None:
        raise OSError("weights not found")

    monkeypatch.setattr(user_pipes, "broken", broken, raising=False)
    with pytest.raises(
        PipelineError, match="Calling 'user_pipes:broken' .* failed: OSError: weights not found"
    ):
        load_pipeline("user_pipes:broken")


# ------------------------------------------------------------------------------------ run_pipeline


def test_a_user_pipeline_runs_through_the_manager(
    user_module: str, manager, short_speech: Path, example_image: Path, tmp_path: Path
) -> None:
    import user_pipes

    pipeline = load_pipeline(f"{user_module}:factory")
    seen: list[float] = []
    video = run_pipeline(
        manager,
        pipeline,
        example_image,
        short_speech,
        GenerateOptions(fps=10, output_path=str(tmp_path / "grey.mp4")),
        progress=lambda fraction, message: seen.append(fraction),
    )
    assert isinstance(video, GeneratedVideo)
    assert (video.path, video.frames, video.fps, video.width, video.height) == (
        str(tmp_path / "grey.mp4"),
        18,
        10,
        64,
        64,
    )
    assert video.duration_s == pytest.approx(1.8)
    assert set(video.timings) == {"validate", "acquire", "generate", "release"}
    assert all(seconds >= 0 for seconds in video.timings.values())
    assert seen[0] == 0.0 and seen[-1] == 1.0
    call = user_pipes.CALLS[-1]
    assert call["device"] == "cpu" and call["image"] == example_image and call["audio"] == short_speech
    status = manager.get_status()
    assert status["model_location"] == "cpu"
    assert (
        status["counts"]["loads"] == 1 and status["counts"]["uses"] == 1 and status["counts"]["offloads"] == 1
    )


def test_a_second_run_restores_instead_of_loading(
    user_module: str, manager, short_speech: Path, example_image: Path, tmp_path: Path
) -> None:
    pipeline = load_pipeline(f"{user_module}:factory")
    for name in ("a.mp4", "b.mp4"):
        run_pipeline(
            manager,
            pipeline,
            example_image,
            short_speech,
            GenerateOptions(fps=5, output_path=str(tmp_path / name)),
        )
    counts = manager.get_status()["counts"]
    assert (counts["loads"], counts["restores"], counts["uses"]) == (1, 1, 2)
    assert pipeline.loads == 1


@pytest.mark.parametrize("bad", ["image", "audio", "too_long"])
def test_bad_input_fails_before_the_model_is_loaded(
    user_module: str, manager, short_speech: Path, example_image: Path, tmp_path: Path, bad: str
) -> None:
    pipeline = load_pipeline(f"{user_module}:factory")
    image, audio, options = example_image, short_speech, GenerateOptions(output_path=str(tmp_path / "x.mp4"))
    if bad == "image":
        image = short_speech
    elif bad == "audio":
        audio = (16000, np.zeros(16000, np.int16))
    else:
        options = dataclasses.replace(options, max_audio_seconds=1.0)
    with pytest.raises(MediaError):
        run_pipeline(manager, pipeline, image, audio, options)
    assert pipeline.loads == 0
    assert manager.get_status()["model_location"] == "unloaded"


def test_a_failing_generate_still_ends_the_lease(
    user_module: str, manager, short_speech: Path, example_image: Path, tmp_path: Path
) -> None:
    pipeline = load_pipeline(f"{user_module}:failing")
    with pytest.raises(RuntimeError, match="ran out of luck"):
        run_pipeline(
            manager,
            pipeline,
            example_image,
            short_speech,
            GenerateOptions(output_path=str(tmp_path / "x.mp4")),
        )
    status = manager.get_status()
    assert status["in_use"] == 0 and status["model_location"] == "cpu" and status["counts"]["offloads"] == 1


@pytest.mark.parametrize(
    ("attr", "message"),
    [
        ("returns_number", "returned a int; generate\\(\\) must return the path of the MP4"),
        ("returns_missing_file", "returned '/nonexistent/video.mp4', which is not a readable video"),
    ],
)
def test_a_pipeline_returning_no_video_is_reported(
    user_module: str, manager, short_speech: Path, example_image: Path, attr: str, message: str
) -> None:
    with pytest.raises(PipelineError, match=message):
        run_pipeline(
            manager, load_pipeline(f"{user_module}:{attr}"), example_image, short_speech, GenerateOptions()
        )


def test_run_pipeline_passes_gradio_style_inputs_through(
    user_module: str, manager, example_image: Path, make_speech, to_int16, tmp_path: Path
) -> None:
    import user_pipes
    from PIL import Image

    image = Image.open(example_image)
    audio = (16000, np.stack([to_int16(make_speech([("speech", 1.0)]))] * 2, axis=1))
    video = run_pipeline(
        manager,
        load_pipeline(f"{user_module}:factory"),
        image,
        audio,
        GenerateOptions(fps=10, output_path=str(tmp_path / "g.mp4")),
    )
    assert video.frames == 10
    assert user_pipes.CALLS[-1]["image"] is image and user_pipes.CALLS[-1]["audio"] is audio


def test_run_pipeline_uses_a_temp_file_when_no_output_path_is_given(
    manager, short_speech: Path, example_image: Path
) -> None:
    video = run_pipeline(manager, default_pipeline(), example_image, short_speech, GenerateOptions(size=128))
    try:
        assert Path(video.path).is_file() and video.path.endswith(".mp4")
        assert soundfile.info(short_speech).duration == pytest.approx(video.duration_s, abs=1 / 25)
    finally:
        Path(video.path).unlink()
