"""The Gradio API of the running app through gradio_client: a video from the examples, and errors."""

from __future__ import annotations

import json

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from ui.blocks import example_rows

from .helpers import get_status, video_facts


def test_generate_video_from_the_first_example_with_the_builtin_pipeline(real_live):
    image, audio = example_rows()[0]
    client = Client(real_live.url, verbose=False)

    result = json.loads(
        client.predict(
            image=handle_file(image), audio=handle_file(audio), size=160, fps=12, api_name="/generate_video"
        )
    )

    facts = video_facts(result["video_path"])
    assert facts["codec"] == "h264"
    assert facts["audio"] == ["aac"]
    assert (facts["width"], facts["height"]) == (result["width"], result["height"])
    assert max(result["width"], result["height"]) == 160
    assert facts["frames"] == result["frames"] > 0
    assert result["fps"] == 12
    assert result["acquired_by"] in ("load", "restore")
    assert set(result["timings"]) >= {"acquire", "generate", "release"}
    assert result["video_path"].startswith(str(real_live.output_dir))
    download = httpx.get(result["video_url"])
    assert download.status_code == 200
    assert download.content[4:8] == b"ftyp"
    assert get_status(real_live.url)["model_location"] == "cpu"


def test_first_job_loads_second_restores_and_both_offload(gated, inputs):
    client = Client(gated.url, verbose=False)
    args = {
        "image": handle_file(str(inputs["image"])),
        "audio": handle_file(str(inputs["audio"])),
        "size": 96,
    }
    before = get_status(gated.url)["counts"]
    first = json.loads(client.predict(**args, api_name="/generate_video"))
    second = json.loads(client.predict(**args, api_name="/generate_video"))
    assert (first["acquired_by"], first["offloaded"]) == ("load", True)
    assert (second["acquired_by"], second["offloaded"]) == ("restore", True)
    after = get_status(gated.url)["counts"]
    assert {key: after[key] - before[key] for key in after} == {
        "loads": 1,
        "restores": 1,
        "offloads": 2,
        "releases": 0,
        "uses": 2,
    }


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"fps": 0}, "Value 0 is less than minimum value 1"),
        ({"size": 4096}, "Value 4096 is greater than maximum value 2048"),
        ({"mouth": "left"}, "Option mouth='left' must be two numbers"),
        ({"image": None}, "Add a portrait image first"),
        ({"audio": None}, "Add a speech track first"),
    ],
)
def test_bad_inputs_come_back_as_sentences_and_load_nothing(gated, inputs, overrides, needle):
    client = Client(gated.url, verbose=False)
    args = {
        "image": handle_file(str(inputs["image"])),
        "audio": handle_file(str(inputs["audio"])),
        "size": 96,
    }
    args.update(overrides)
    before = get_status(gated.url)["counts"]["uses"]
    with pytest.raises(AppError, match=needle):
        client.predict(**args, api_name="/generate_video")
    status = get_status(gated.url)
    assert (status["model_location"], status["counts"]["uses"]) == ("unloaded", before)


def test_a_file_that_is_not_audio_is_a_media_error_with_what_to_do(gated, inputs, tmp_path):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not a recording")
    client = Client(gated.url, verbose=False)
    before = get_status(gated.url)["counts"]["uses"]
    with pytest.raises(AppError) as caught:
        client.predict(
            image=handle_file(str(inputs["image"])),
            audio=handle_file(str(not_audio)),
            api_name="/generate_video",
        )
    assert "notes.wav" in str(caught.value)
    assert get_status(gated.url)["counts"]["uses"] == before


def test_gpu_tools_are_callable_as_gradio_api_endpoints(gated):
    client = Client(gated.url, verbose=False)
    status = json.loads(client.predict(api_name="/get_gpu_status"))
    assert status["model_location"] == "unloaded"
    changed = json.loads(client.predict(timeout_seconds=42, api_name="/update_gpu_timeout"))
    assert changed["status"]["idle_timeout"] == 42.0
    assert json.loads(client.predict(api_name="/offload_gpu"))["outcome"] == "nothing_to_do"
    assert json.loads(client.predict(api_name="/release_gpu"))["outcome"] == "nothing_to_do"
