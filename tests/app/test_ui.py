"""The UI's pure parts: the panel's HTML, number formats, the cost card, examples, URLs, clicks."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from gpu_control import GPUResourceManager
from gpu_control_gradio.gpu_panel import (
    ToolError,
    format_countdown,
    format_gb,
    format_seconds,
    format_size,
    render_status,
)
from ui.blocks import _mouth_from_click, _public_url, cost_html, example_rows, make_generate_fn

from .helpers import GatedPipeline, make_portrait, make_speech


def status(**overrides):
    base = {
        "name": "demo",
        "model_location": "unloaded",
        "transition": None,
        "in_use": 0,
        "pending": [],
        "idle_time": None,
        "idle_timeout": 60.0,
        "release_timeout": 0.0,
        "offload_after_use": True,
        "auto_offload_in": None,
        "auto_release_in": None,
        "device": "cpu",
        "gpu_available": False,
        "gpu_name": None,
        "gpu_memory_allocated_gb": 0.0,
        "gpu_memory_reserved_gb": 0.0,
        "gpu_memory_free_gb": None,
        "gpu_memory_total_gb": None,
        "model_size_gb": None,
        "cpu_cache_gb": 0,
        "last_transition": None,
        "last_error": None,
        "leak": None,
        "leaked_gb": 0.0,
        "counts": {"loads": 0, "restores": 0, "offloads": 0, "releases": 0, "uses": 0},
    }
    return {**base, **overrides}


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "–"), (0, "0.00 GB"), (14.2, "14.20 GB"), (0.004, "4.1 MB"), (4732 / 2**30, "4.6 KB")],
)
def test_format_size(value, text):
    assert format_size(value) == text


@pytest.mark.parametrize(
    ("seconds", "measured", "countdown"),
    [
        (0.314, "0.31 s", "1 s"),
        (47.2, "47 s", "48 s"),
        (252, "4 min 12 s", "4 min 12 s"),
        (7500, "2 h 05 min", "2 h 05 min"),
        (None, "never", "never"),
        (float("inf"), "never", "never"),
    ],
)
def test_durations(seconds, measured, countdown):
    assert format_seconds(seconds) == measured
    assert format_countdown(seconds) == countdown


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (59.5, "1 min 00 s"),
        (3599.6, "1 h 00 min"),
        (3 * 86400 + 4 * 3600 + 59, "3 d 04 h"),
        (2592000, "30 d 00 h"),
        (1e308, "over a year"),
        (-3, "0 s"),
        (float("-inf"), "0 s"),
        (float("nan"), "–"),
    ],
)
def test_countdowns_stay_short_whatever_the_value(seconds, text):
    assert format_countdown(seconds) == text


def test_a_huge_timeout_never_prints_a_long_number():
    page = render_status(
        status(
            model_location="gpu",
            idle_timeout=1e308,
            release_timeout=1e300,
            auto_offload_in=1e308,
            idle_time=1e20,
        )
    )
    assert max(len(run) for run in re.findall(r"\d+", page)) <= 6
    assert "Auto-offload in <b>over a year</b>" in page
    assert "idle timeout over a year · release timeout over a year" in page


def test_format_gb_always_two_decimals():
    assert [format_gb(v) for v in (64.9, 0.5, None)] == ["64.90 GB", "0.50 GB", "–"]


def test_unloaded_panel_says_not_loaded_and_nothing_loads_until_asked():
    page = render_status(status())
    assert 'data-location="unloaded"' in page
    assert "Not loaded" in page
    assert "Loads on the first request" in page
    assert "No CUDA device here" in page


def test_panel_on_a_gpu_shows_memory_bar_countdown_and_last_transition():
    page = render_status(
        status(
            model_location="gpu",
            device="cuda:0",
            gpu_available=True,
            gpu_name="NVIDIA H100 80GB HBM3",
            gpu_memory_allocated_gb=14.2,
            gpu_memory_reserved_gb=14.3,
            gpu_memory_free_gb=64.9,
            gpu_memory_total_gb=79.1,
            model_size_gb=14.1,
            idle_time=12.4,
            auto_offload_in=47.6,
            last_transition={
                "kind": "restore",
                "reason": "request",
                "seconds": 0.31,
                "bytes_copied": 15138816000,
                "at": "2026-11-27T05:40:00Z",
            },
            counts={"loads": 1, "restores": 3, "offloads": 3, "releases": 0, "uses": 4},
        )
    )
    assert "On GPU · cuda:0" in page
    assert "NVIDIA H100 80GB HBM3" in page
    assert "used <b>14.20 GB</b> of 79.10 GB" in page
    assert "free <b>64.90 GB</b>" in page
    assert 'style="width:18.0%"' in page
    assert "Auto-offload in <b>48 s</b>" in page
    assert "Idle for 12 s" in page
    assert "<b>restore</b> (for a job) · in <b>0.31 s</b> · 14.10 GB copied · 05:40:00 UTC" in page
    assert "<b>3</b><span>restores</span>" in page


def test_panel_during_a_job_shows_in_use_and_pending_requests():
    page = render_status(status(model_location="gpu", in_use=1, pending=["offload", "release"]))
    assert "Working on CPU" in page
    assert "in use · 1" in page
    assert "offload pending" in page and "release pending" in page
    assert "Running 1 job: timers wait for it." in page


def test_panel_during_a_move_shows_an_amber_badge():
    page = render_status(status(model_location="cpu", transition="restoring", device="cuda:1"))
    assert 'data-transition="restoring"' in page
    assert "gpc-moving" in page and "Restoring to cuda:1…" in page


def test_panel_in_host_ram_counts_down_to_release():
    page = render_status(
        status(model_location="cpu", release_timeout=600.0, auto_release_in=299.5, idle_time=3)
    )
    assert "In host RAM (cached)" in page
    assert "Auto-release in <b>5 min 00 s</b>" in page


def test_panel_escapes_errors_and_shows_leaks():
    page = render_status(
        status(last_error="OSError: <missing> & gone", leak="1.00 GB still referenced", leaked_gb=1.0)
    )
    assert "OSError: &lt;missing&gt; &amp; gone" in page
    assert "Memory not freed (1.00 GB)" in page
    assert "<missing>" not in page


def test_cost_card_names_the_phases_and_lists_notes():
    card = cost_html(
        {
            "acquired_by": "restore",
            "offloaded": True,
            "timings": {"validate": 0.01, "acquire": 0.31, "generate": 8.4, "release": 0.12, "render": 6.0},
            "duration_s": 4.0,
            "frames": 100,
            "fps": 25,
            "width": 256,
            "height": 256,
            "notes": ["No face found <here>; the mouth was placed at the centre."],
        }
    )
    assert "<span>Restore from RAM</span><b>0.31 s</b>" in card
    assert "<span>Generate</span><b>8.40 s</b>" in card
    assert "<span>Offload to RAM</span><b>0.12 s</b>" in card
    assert "<span>Total</span><b>8.83 s</b>" in card
    assert "generate = render 6.00 s" in card
    assert "4.00 s of video · 100 frames at 25 fps · 256×256 px" in card
    assert "No face found &lt;here&gt;" in card


@pytest.mark.parametrize(
    "result",
    [
        {"frames": float("inf"), "duration_s": float("nan"), "fps": -25, "width": 10**400, "height": True},
        {"frames": "many", "duration_s": "long", "fps": None, "width": [1], "height": {"a": 1}},
        {"timings": [1, 2], "notes": "not a list", "acquired_by": ["load"], "offloaded": "yes"},
        {
            "timings": {
                "acquire": "x",
                "generate": float("inf"),
                "release": -1,
                "render": float("nan"),
                "7": 10**400,
            }
        },
        {"notes": [1, None, {"a": 1}]},
        {},
        [],
        "text",
    ],
    ids=["non-finite", "text", "wrong-containers", "bad-timings", "bad-notes", "empty", "a-list", "a-string"],
)
def test_cost_card_shows_a_dash_for_anything_that_is_not_a_finite_number(result):
    """The result comes back from the browser: whatever it holds, the card renders and shows no junk."""
    card = cost_html(result)
    phases = re.findall(r"<span>([^<]*)</span><b>([^<]*)</b>", card)
    assert phases == [("Acquire model", "–"), ("Generate", "–"), ("End of job", "–"), ("Total", "–")]
    assert "– s of video · – frames at – fps · –×– px" in card
    assert "tp-note" not in card and "generate =" not in card


def test_cost_card_writes_a_huge_number_in_a_few_digits():
    card = cost_html({"frames": 1e300, "duration_s": 2e9, "fps": 25, "width": 10**20, "height": 512})
    assert "2e+09 s of video · 1e+300 frames at 25 fps · 1e+20×512 px" in card


def test_example_rows_pair_images_with_audio(tmp_path):
    assert example_rows(tmp_path) == []
    (tmp_path / "b.png").write_bytes(b"")
    assert example_rows(tmp_path) == []
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "voice.wav").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert example_rows(tmp_path) == [
        [str(tmp_path / "a.jpg"), str(tmp_path / "voice.wav")],
        [str(tmp_path / "b.png"), str(tmp_path / "voice.wav")],
    ]


def test_repository_examples_exist():
    rows = example_rows()
    assert rows and all(Path(p).is_file() for row in rows for p in row)


def test_public_url_honours_forwarded_headers():
    direct = SimpleNamespace(
        headers={"host": "127.0.0.1:7860"}, url="http://127.0.0.1:7860/gradio_api/queue/join"
    )
    assert _public_url(direct, "/out/a b.mp4") == "http://127.0.0.1:7860/gradio_api/file=/out/a%20b.mp4"
    proxied = SimpleNamespace(
        headers={
            "host": "10.0.0.2:7860",
            "x-forwarded-host": "me-app.hf.space",
            "x-forwarded-proto": "https",
        },
        url="",
    )
    assert _public_url(proxied, "/out/v.mp4") == "https://me-app.hf.space/gradio_api/file=/out/v.mp4"
    assert _public_url(None, "/out/v.mp4") is None


def test_clicking_the_portrait_sets_the_mouth_as_fractions(tmp_path):
    image = make_portrait(tmp_path / "face.png", size=200)
    assert _mouth_from_click(str(image), SimpleNamespace(index=[100, 150])) == "0.500,0.750"
    assert _mouth_from_click(None, SimpleNamespace(index=[1, 1])) == ""


@pytest.fixture()
def generate(tmp_path):
    pipeline = GatedPipeline()
    manager = GPUResourceManager(device="cpu", load_func=pipeline.load, auto_monitor=False)
    return make_generate_fn(manager, pipeline, tmp_path), manager, tmp_path


def test_generate_fn_writes_into_the_output_folder_and_reports_the_load(generate):
    fn, manager, folder = generate
    image, audio = make_portrait(folder / "face.png"), make_speech(folder / "speech.wav", seconds=0.6)
    result = json.loads(fn(str(image), str(audio), fps=10, size=64, progress=lambda *a, **k: None))
    assert Path(result["video_path"]).parent == folder
    assert result["video_url"] is None
    assert (result["acquired_by"], result["offloaded"], result["frames"]) == ("load", True, 6)
    assert manager.get_status()["model_location"] == "cpu"


@pytest.mark.parametrize(
    ("image", "audio", "options", "needle"),
    [
        (None, "x.wav", {}, "Add a portrait image first"),
        ("x.png", "", {}, "Add a speech track first"),
        ("x.png", "x.wav", {"mouth": "2,2"}, "Option mouth='2,2' must hold fractions from 0 to 1"),
        ("missing.png", "x.wav", {}, "missing.png"),
    ],
)
def test_generate_fn_turns_user_mistakes_into_tool_errors(generate, image, audio, options, needle):
    fn, manager, _ = generate
    with pytest.raises(ToolError) as caught:
        fn(image, audio, progress=lambda *a, **k: None, **options)
    assert needle in str(caught.value)
    assert manager.get_status()["counts"]["uses"] == 0
