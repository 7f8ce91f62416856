"""The Gradio API of the running app: a video from the examples, and bad input answered with sentences."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from gpu_control_gradio import mount_demo
from gpu_control_gradio.mount import UNEXPECTED
from pipelines.media import VideoWriter
from ui.blocks import example_rows

from .helpers import get_status, make_speech, serve, video_facts


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


def _uses(live) -> int:
    return get_status(live.url)["counts"]["uses"]


def test_a_strip_of_a_portrait_and_a_too_short_clip_are_refused_with_what_to_do(gated, inputs, tmp_path):
    strip = tmp_path / "strip.png"
    Image.new("RGB", (4000, 300), (200, 150, 120)).save(strip)
    blip = make_speech(tmp_path / "blip.wav", seconds=0.1)
    client = Client(gated.url, verbose=False)
    before = _uses(gated)
    with pytest.raises(AppError) as wide:
        client.predict(handle_file(str(strip)), handle_file(str(inputs["audio"])), api_name="/generate_video")
    assert str(wide.value) == (
        "The image 'strip.png' is 4000x300 px, 13.3 times as wide as it is tall; a portrait may be at most "
        "4 times. Crop it around the face."
    )
    with pytest.raises(AppError) as short:
        client.predict(handle_file(str(inputs["image"])), handle_file(str(blip)), api_name="/generate_video")
    assert str(short.value) == (
        "The audio 'blip.wav' is only 0.100 s long; it must last at least 0.5 s. Record or upload a longer clip."
    )
    assert _uses(gated) == before


OPTIONS = [25, 96, 1.0, 1.0, 1.0, 0, ""]
FILE = {"_type": "gradio.FileData"}


def _upload(url: str, path) -> dict:
    with open(path, "rb") as handle:
        answer = httpx.post(f"{url}/gradio_api/upload", files={"files": handle}, timeout=30)
    return {"path": answer.json()[0], "meta": FILE, "orig_name": path.name}


def test_wrong_types_and_unreadable_files_are_422_sentences_without_server_paths(gated, inputs, tmp_path):
    speech = _upload(gated.url, inputs["audio"])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is not a picture")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(inputs["image"].read_bytes()[:300])
    file_form = 'pass {"path": <the path the upload returned>, "meta": {"_type": "gradio.FileData"}}'
    cases = [
        (
            [5, speech, *OPTIONS],
            f"Input 'image' (Portrait) must be a file: upload it first (POST /gradio_api/upload, or handle_file() in gradio_client) and {file_form}; a number was sent.",
        ),
        ([{"x": 1}, speech, *OPTIONS], "Input 'image' (Portrait) must be a file:"),
        (
            ["/etc/passwd", speech, *OPTIONS],
            "; text (in gradio_client, wrap a local file with handle_file()) was sent.",
        ),
        ([[speech], speech, *OPTIONS], "; a list was sent."),
        ([speech, 7, *OPTIONS], "Input 'audio' (Speech) must be a file:"),
        (
            [speech, speech],
            "This call takes 9 input value(s), in this order: 'image' (Portrait), 'audio' (Speech), 'fps' (Frames per second),",
        ),
        (
            [_upload(gated.url, not_an_image), speech, *OPTIONS],
            "Input 'image' (Portrait) could not be read: upload a JPEG, PNG or WebP image.",
        ),
        ([_upload(gated.url, truncated), speech, *OPTIONS], "could not be decoded"),
        (
            [_upload(gated.url, inputs["image"]), speech, "fast", *OPTIONS[1:]],
            "Input 'fps' (Frames per second) could not be read: send a number.",
        ),
    ]
    before = _uses(gated)
    for data, needle in cases:
        answer = httpx.post(f"{gated.url}/gradio_api/run/generate_video", json={"data": data}, timeout=60)
        assert answer.status_code == 422, (data, answer.text)
        text = answer.json()["error"]
        assert needle in text, text
        assert "/tmp/" not in text and "Traceback" not in text and " object at 0x" not in text, text
    assert _uses(gated) == before


def test_bad_calls_to_gradios_routes_are_4xx_sentences_never_5xx(gated):
    config = httpx.get(f"{gated.url}/config", timeout=30).json()
    ids = {d["api_name"]: d["id"] for d in config["dependencies"]}
    calls = [
        (
            "POST",
            "/gradio_api/run/predict",
            {"fn_index": 9999, "data": []},
            404,
            "There is no event number 9999 in this app",
        ),
        (
            "POST",
            "/gradio_api/queue/join",
            {"fn_index": -1, "data": [], "session_hash": "s"},
            404,
            "There is no event number -1",
        ),
        ("POST", "/gradio_api/queue/join", {"data": [], "session_hash": "s"}, 422, "send its fn_index"),
        (
            "POST",
            "/gradio_api/call/no_such_thing",
            {"data": []},
            404,
            "There is no API endpoint '/no_such_thing'",
        ),
        (
            "POST",
            "/gradio_api/run/predict",
            {"fn_index": ids["_mouth_from_click"], "data": [None], "session_hash": "s"},
            422,
            "needs the data of the event",
        ),
        (
            "POST",
            "/gradio_api/run/predict",
            {"fn_index": ids["load_example"], "data": [7], "session_hash": "s"},
            422,
            "must be the number of an example, from 0 to 0",
        ),
        (
            "POST",
            "/gradio_api/run/predict",
            {"fn_index": ids["load_example"], "data": [None], "session_hash": "s"},
            422,
            "must be the number of an example",
        ),
        (
            "POST",
            "/gradio_api/run/predict",
            {"fn_index": ids["show_result"], "data": ["{not json"], "session_hash": "s"},
            422,
            "That is not a result of generate_video",
        ),
        (
            "GET",
            "/gradio_api/call/generate_video/no-such-event",
            None,
            404,
            "There is no job 'no-such-event'",
        ),
        ("GET", "/gradio_api/queue/data?session_hash=no-such-session", None, 404, "No job of this session"),
    ]
    for method, path, body, status, needle in calls:
        answer = httpx.request(method, f"{gated.url}{path}", json=body, timeout=30)
        assert answer.status_code == status, (path, body, answer.status_code, answer.text)
        payload = answer.json()
        assert needle in str(payload.get("detail") or payload.get("error")), (path, answer.text)
    works = httpx.post(
        f"{gated.url}/gradio_api/run/predict",
        json={"fn_index": ids["load_example"], "data": [0], "session_hash": "s"},
    )
    assert works.status_code == 200 and works.json()["data"][0]["value"]["path"].startswith("/")


def test_a_wrong_count_of_inputs_names_the_inputs_not_the_request(gated):
    """``gr.Request`` (and ``gr.Progress``, event data) are filled in by Gradio: they are not inputs."""
    listed = "'timeout_seconds' (1st), 'release_timeout_seconds' (2nd), 'offload_after_use' (3rd)"
    for data, sent in (([60, "never"], "2 were sent"), ([60], "1 was sent")):
        answer = httpx.post(f"{gated.url}/gradio_api/run/update_gpu_timeout", json={"data": data}, timeout=30)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"] == f"This call takes 3 input value(s), in this order: {listed}; {sent}."
    answer = httpx.post(f"{gated.url}/gradio_api/run/generate_video", json={"data": [None]}, timeout=30)
    assert answer.json()["error"].startswith(
        "This call takes 9 input value(s), in this order: 'image' (Portrait), 'audio' (Speech), "
    )
    assert answer.json()["error"].endswith(", 'mouth' (Mouth position (x,y)); 1 was sent.")
    assert gated.manager.idle_timeout == 60.0


def _a_video(folder: Path) -> Path:
    """A real, small video in the app's output folder, named as the app names its videos."""
    path = folder / f"talking-test-{uuid.uuid4().hex[:8]}.mp4"
    with VideoWriter(path, width=64, height=64, fps=10, audio_rate=None) as writer:
        writer.write_frame(np.zeros((64, 64, 3), dtype=np.uint8))
    return path


def test_the_result_display_takes_any_json_without_a_5xx(gated):
    """``show_result`` gets generate_video's JSON back from the browser, so from anyone."""
    video = _a_video(gated.output_dir)
    shown = [
        ('"frames": 1e309', "– frames"),
        ('"frames": -1e309, "duration_s": NaN', "– s of video · – frames"),
        ('"frames": "many", "fps": [25], "width": {"a": 1}, "height": true', "– frames at – fps · –×– px"),
        ('"frames": 1' + "0" * 400, "– frames"),
        ('"timings": {"acquire": Infinity, "generate": "fast"}, "acquired_by": [1]', "<b>–</b>"),
        ('"notes": "a text", "timings": [1]', "What this job cost"),
    ]
    not_a_result = "That is not a result of generate_video; generate a video first."
    not_there = "That video is not on the server (old videos are deleted); generate it again."
    refused = [
        ("[1, 2]", not_a_result),
        ('"text"', not_a_result),
        ("[" * 100_000 + "]" * 100_000, not_a_result),
        ("1" * 5000, not_a_result),
        ('{"video_path": 5}', not_a_result),
        ('{"frames": 3}', not_a_result),
        (json.dumps({"video_path": "talking-" + "a" * 300 + ".mp4"}), not_there),
        (json.dumps({"video_path": "talking-\u0000.mp4"}), not_there),
        (json.dumps({"video_path": str(gated.output_dir)}), not_there),
    ]
    try:
        for fields, needle in shown:
            text = '{"video_path": ' + json.dumps(str(video)) + ", " + fields + "}"
            answer = httpx.post(f"{gated.url}/gradio_api/run/show_result", json={"data": [text]}, timeout=30)
            assert answer.status_code == 200, (fields, answer.text)
            played, card = answer.json()["data"]
            assert played["orig_name"] == video.name and needle in card, (fields, card)
        for text, sentence in refused:
            answer = httpx.post(f"{gated.url}/gradio_api/run/show_result", json={"data": [text]}, timeout=30)
            assert (answer.status_code, answer.json()["error"]) == (422, sentence), text[:80]
    finally:
        video.unlink()


def test_an_unexpected_exception_never_reaches_the_client(tmp_path):
    """``mount_demo`` turns Gradio's ``show_error`` off: the text of a bug's exception stays in the log."""
    secret = "/srv/secret/path details"

    def explode(text: str) -> str:
        raise RuntimeError(secret)

    with gr.Blocks() as demo:
        box = gr.Textbox()
        gr.Button().click(explode, inputs=box, outputs=box, api_name="explode")
    app = mount_demo(FastAPI(), demo, path="/")
    with serve(app) as url:
        direct = httpx.post(f"{url}/gradio_api/run/explode", json={"data": ["x"]}, timeout=30)
        joined = httpx.post(f"{url}/gradio_api/call/explode", json={"data": ["x"]}, timeout=30)
        stream = httpx.get(f"{url}/gradio_api/call/explode/{joined.json()['event_id']}", timeout=30)
    assert (direct.status_code, direct.json()) == (500, {"error": UNEXPECTED})
    assert stream.status_code == 200
    assert stream.text.strip() == 'event: error\ndata: {"error": null}'
    assert "secret" not in direct.text + stream.text


@pytest.mark.parametrize(
    "route, body",
    [
        ("queue/join", '{"data": [], "fn_index": 1e400, "session_hash": "a"}'),
        ("queue/join", '{"data": [], "fn_index": -Infinity}'),
        ("call/offload_gpu", '{"data": 1e400}'),
        ("call/offload_gpu", '{"data": [], "session_hash": 1e400}'),
        ("run/offload_gpu", '{"data": [], "trigger_id": NaN}'),
    ],
)
def test_a_number_json_cannot_carry_is_a_422_sentence_not_a_500(gated, route, body):
    before = get_status(gated.url)["counts"]
    answer = httpx.post(
        f"{gated.url}/gradio_api/{route}",
        content=body,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert answer.status_code == 422
    assert answer.json() == {
        "detail": "The body holds a number JSON cannot carry (NaN, Infinity, or one too large): "
        "send finite numbers."
    }
    assert get_status(gated.url)["counts"] == before
