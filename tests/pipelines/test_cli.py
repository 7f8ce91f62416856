"""python -m pipelines: single videos, batches sharing one model, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import gpu_control
from pipelines import __main__ as cli
from pipelines import media

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def managers(monkeypatch: pytest.MonkeyPatch) -> list[gpu_control.GPUResourceManager]:
    """Record every manager the CLI makes (on the CPU) and its force_offload calls."""
    made: list[gpu_control.GPUResourceManager] = []

    class Recording(gpu_control.GPUResourceManager):
        def __init__(self, **kwargs: object) -> None:
            self.kwargs = dict(kwargs)
            self.offload_calls = 0
            super().__init__(**{**kwargs, "device": "cpu"})
            made.append(self)

        def force_offload(self):  # type: ignore[no-untyped-def]
            self.offload_calls += 1
            return super().force_offload()

    monkeypatch.setattr(cli, "GPUResourceManager", Recording)
    yield made
    for manager in made:
        manager.force_release()
        manager.stop_monitor()


def test_one_pair_writes_the_named_file(
    example_image: Path, short_speech: Path, tmp_path: Path, managers, capsys
) -> None:
    out = tmp_path / "talk.mp4"
    assert (
        cli.main(
            [str(example_image), str(short_speech), "-o", str(out), "--size", "128", "--seed", "3", "-q"]
        )
        == 0
    )
    info = media.probe_video(out)
    assert (info.width, info.height, info.frames) == (128, 128, 45)
    assert f"{out}  (1.80 s, 128x128, 25 fps)" in capsys.readouterr().out
    (manager,) = managers
    assert manager.kwargs["offload_after_use"] is True and manager.offload_calls == 0
    assert manager.get_status()["counts"]["offloads"] == 1


def test_several_pairs_share_one_model_and_offload_once(
    example_image: Path, short_speech: Path, tmp_path: Path, managers
) -> None:
    folder = tmp_path / "videos"
    args = [str(example_image), str(short_speech)] * 3
    assert cli.main([*args, "-o", str(folder), "--size", "64", "--fps", "10", "-q"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "portrait_short-2.mp4",
        "portrait_short-3.mp4",
        "portrait_short.mp4",
    ]
    (manager,) = managers
    counts = manager.get_status()["counts"]
    assert manager.kwargs["offload_after_use"] is False
    assert (counts["loads"], counts["uses"], counts["restores"], counts["offloads"]) == (1, 3, 0, 1)
    assert manager.offload_calls == 1


def test_options_reach_the_pipeline(
    example_image: Path, short_speech: Path, tmp_path: Path, managers
) -> None:
    out = tmp_path / "wide.mp4"
    argv = [
        str(example_image),
        str(short_speech),
        "-o",
        str(out),
        "--size",
        "96",
        "--fps",
        "12",
        "--mouth",
        "0.5,0.3",
        "-q",
    ]
    assert cli.main(argv) == 0
    info = media.probe_video(out)
    assert (info.width, info.fps, info.frames) == (96, 12, 22)


def test_a_user_pipeline_is_used(
    user_module: str, example_image: Path, short_speech: Path, tmp_path: Path, managers
) -> None:
    out = tmp_path / "grey.mp4"
    assert (
        cli.main(
            [
                str(example_image),
                str(short_speech),
                "-o",
                str(out),
                "--pipeline",
                f"{user_module}:factory",
                "-q",
            ]
        )
        == 0
    )
    assert media.probe_video(out).width == 64


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{image}"], "expected IMAGE AUDIO pairs, got an odd number of paths (1)"),
        (["{audio}", "{audio}"], "The image 'short.wav' is not an image file"),
        (["{image}", "{image}"], "The audio 'portrait.jpg' has no audio track"),
        (["{image}", "{audio}", "--fps", "100"], "Option fps=100 is out of range; use a value from 1 to 60."),
        (["{image}", "{audio}", "--mouth", "left"], "Option mouth='left' must be two numbers"),
        (["{image}", "{audio}", "--max-audio-seconds", "1"], "the limit is 1 s"),
        (
            ["{image}", "{audio}", "{image}", "{audio}", "-o", "one.mp4"],
            "names one file, but 2 pairs were given; pass a folder",
        ),
        (["{image}", "{audio}", "--pipeline", "nowhere"], "must look like 'package.module:attribute'"),
    ],
)
def test_bad_input_exits_2_with_one_line_before_loading(
    example_image: Path, short_speech: Path, tmp_path: Path, managers, capsys, argv: list[str], message: str
) -> None:
    filled = [a.format(image=example_image, audio=short_speech) for a in argv]
    assert cli.main([*filled, "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err
    assert all(m.get_status()["counts"]["loads"] == 0 for m in managers)


def test_a_later_bad_pair_stops_the_batch_before_any_video(
    example_image: Path, short_speech: Path, tmp_path: Path, managers
) -> None:
    folder = tmp_path / "out"
    assert (
        cli.main(
            [
                str(example_image),
                str(short_speech),
                str(example_image),
                str(tmp_path / "gone.wav"),
                "-o",
                str(folder),
                "-q",
            ]
        )
        == 2
    )
    assert not folder.exists() or not any(folder.iterdir())


def test_a_failing_generation_exits_1(
    user_module: str, example_image: Path, short_speech: Path, tmp_path: Path, managers, capsys
) -> None:
    argv = [
        str(example_image),
        str(short_speech),
        "-o",
        str(tmp_path / "x.mp4"),
        "--pipeline",
        f"{user_module}:failing",
        "-q",
    ]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err == "error: generation failed: RuntimeError: the model ran out of luck\n"


def test_the_module_runs_as_a_program(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipelines", str(tmp_path / "a.jpg"), str(tmp_path / "b.wav")],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == "error: Image file 'a.jpg' was not found; check the path.\n"
