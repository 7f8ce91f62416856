"""Attacks on file containment, against the real app on a loopback port.

No request may make the app read, copy or serve a file the user did not upload (or the app
did not create), through any file parameter of any route: the Gradio API (``/call``, ``/run``,
``/queue/join`` with the UI's events, the private example event included), gradio_client, MCP,
and ``GET /gradio_api/file=``, which serves from the output folder only the videos the app
wrote (no dotfile, no other file, nothing a link leads to). URL inputs are attacked in
``test_security_urls.py``.

The secrets are a real portrait and a real speech clip (unique per run), so a file that got
through would be turned into a video: the pipeline's call count and Gradio's cache folder for
the secret's content show it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import soundfile
from gradio import processing_utils
from gradio import utils as gradio_utils
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from app import create_app
from gpu_control import GPUResourceManager
from gpu_control_gradio.input_guard import check_mcp_arguments
from gpu_control_gradio.mount import OUTPUT_FILE_REFUSED, output_file_allowed
from gpu_control.security import excerpt
from pipelines.media import VideoWriter

from .conftest import LiveApp
from .helpers import ROOT, GatedPipeline, make_portrait, make_speech, serve
from .security_helpers import (
    FILE,
    OPTIONS,
    assert_untouched,
    attack_paths,
    raw_get,
    via_call,
    via_run,
)
from .test_mcp import call, data_uri

NOT_UPLOADED = "names a file that was not uploaded to this server"


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def own_inputs(tmp_path_factory: pytest.TempPathFactory, secrets: dict[str, Any]) -> dict[str, Path]:
    """A portrait and a speech clip whose content no other test run shares (Gradio's cache folder
    is named after the content, and another run's app deletes its own copies when it stops)."""
    folder = tmp_path_factory.mktemp("own-inputs")
    portrait = make_portrait(folder / "face.png")
    pixels = np.asarray(Image.open(portrait)).copy()
    pixels[0, 0] = [int(secrets["token"][i : i + 2], 16) for i in (0, 2, 4)]
    Image.fromarray(pixels).save(portrait)
    speech = make_speech(folder / "speech.wav")
    samples, rate = soundfile.read(speech, dtype="float32")
    samples[0] = int(secrets["token"][:4], 16) / 2**17
    soundfile.write(speech, samples, rate)
    return {"image": portrait, "audio": speech}


@pytest.fixture()
def uploaded(gated_live: LiveApp, own_inputs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """The test portrait and speech uploaded the normal way: the other input of each attack."""
    files = {}
    for kind in ("image", "audio"):
        with open(own_inputs[kind], "rb") as handle:
            answer = httpx.post(f"{gated_live.url}/gradio_api/upload", files={"files": handle}, timeout=30)
        files[kind] = {"path": answer.json()[0], "meta": FILE}
    return files


# ------------------------------------------------------------------------------ routes


def via_queue(url: str, fn_index: int, data: list[Any]) -> str:
    """Join the queue as the UI does, for one event, and return the error the job ended with."""
    session = uuid.uuid4().hex
    body = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None}
    joined = httpx.post(f"{url}/gradio_api/queue/join", json=body, timeout=30)
    assert joined.status_code == 200, joined.text
    with httpx.stream(
        "GET", f"{url}/gradio_api/queue/data", params={"session_hash": session}, timeout=60
    ) as s:
        for line in s.iter_lines():
            if not line.startswith("data: "):
                continue
            message = json.loads(line.removeprefix("data: "))
            if message["msg"] == "process_completed":
                assert message["success"] is False, message
                return message["output"]["error"]
    pytest.fail("the queue never completed the job")


def generate_events(url: str) -> dict[str, int]:
    """The fn_index of the Generate button's event and of the example click's (private) event."""
    config = httpx.get(f"{url}/config", timeout=30).json()
    found = {
        d["api_name"]: d["id"]
        for d in config["dependencies"]
        if str(d.get("api_name")).startswith("generate_video")
    }
    assert set(found) == {"generate_video", "generate_video_1"}
    return {"button": found["generate_video"], "example": found["generate_video_1"]}


def assert_sentence(text: str) -> None:
    """A sentence: no traceback, no repr, no path in Gradio's folders, nothing of /etc/passwd."""
    assert text and "Traceback" not in text and " object at 0x" not in text
    assert "/tmp/gradio" not in text and gradio_utils.get_upload_folder() not in text
    assert "root:" not in text


# ------------------------------------------------------------------------------ attacks


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_no_route_of_the_gradio_api_takes_a_server_file(gated, secrets, uploaded, kind):
    events = generate_events(gated.url)
    calls, uses = gated.pipeline.calls, gated.manager.get_status()["counts"]["uses"]
    for name, path in attack_paths(secrets, kind).items():
        files = {**uploaded, kind: {"path": path, "meta": FILE}}
        data = [files["image"], files["audio"], *OPTIONS]
        answers = {
            "run": via_run(gated.url, data),
            "call": via_call(gated.url, data),
            "queue-button": via_queue(gated.url, events["button"], data),
            "queue-example": via_queue(gated.url, events["example"], data),
        }
        for route, text in answers.items():
            assert NOT_UPLOADED in text, (name, route, text)
            assert text.startswith(f"Input '{kind}' ("), (name, route, text)
            assert_sentence(text)
    assert_untouched(gated, secrets, calls, uses)


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_a_file_without_gradios_marker_is_refused_not_opened(gated, secrets, own_inputs, uploaded, kind):
    """Without ``meta`` Gradio skips its upload check and an image input opens any server path."""
    calls, uses = gated.pipeline.calls, gated.manager.get_status()["counts"]["uses"]
    client = Client(gated.url, verbose=False)
    for name, path in attack_paths(secrets, kind).items():
        for value in ({"path": path}, path):
            files = {
                "image": handle_file(str(own_inputs["image"])),
                "audio": handle_file(str(own_inputs["audio"])),
            }
            files[kind] = value
            with pytest.raises(AppError) as caught:
                client.predict(files["image"], files["audio"], *OPTIONS, api_name="/generate_video")
            text = str(caught.value)
            assert f"Input '{kind}' (" in text and "must be a file" in text, (name, text)
            assert_sentence(text)
            sent = {**uploaded, kind: value}
            direct = via_run(gated.url, [sent["image"], sent["audio"], *OPTIONS])
            assert direct.startswith(f"Input '{kind}' (") and "must be a file" in direct
    assert_untouched(gated, secrets, calls, uses)


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_mcp_never_takes_a_server_path_for_a_file(gated, secrets, inputs, kind):
    calls, uses = gated.pipeline.calls, gated.manager.get_status()["counts"]["uses"]
    files = {"image": data_uri(inputs["image"], "image/png"), "audio": data_uri(inputs["audio"], "audio/wav")}
    for name, path in attack_paths(secrets, kind).items():
        for value in (path, {"path": path, "meta": FILE}):
            result = call(gated.url, "generate_video", {**files, kind: value, "size": 96})
            text = result.content[0].text
            assert result.isError, (name, text)
            assert ("must be a file as a data: URI" in text) or (
                "not as objects with a server path" in text
            ), text
            assert_sentence(text.replace(excerpt(path), "<the path sent>"))
    assert_untouched(gated, secrets, calls, uses)


def test_mcp_arguments_of_the_wrong_kind_get_a_short_sentence(gated, inputs):
    speech = data_uri(inputs["audio"], "audio/wav")
    cases = [
        (
            "generate_video",
            {"image": speech, "audio": speech, "fps": "x" * 100_000},
            "Argument 'fps' must be a number, not 'xxx",
        ),
        (
            "generate_video",
            {"image": 5, "audio": speech},
            "Argument 'image' must be a file as a data: URI (data:image/png;base64,...) or an http(s) URL, "
            "not a number.",
        ),
        ("generate_video", {"audio": speech}, "Argument 'image' is required."),
        (
            "generate_video",
            {"image": "data:image/png;base64,!!!", "audio": speech},
            "Input 'image' (Portrait) could not be read",
        ),
        ("x" * 10_000, {}, "There is no tool 'xxx"),
    ]
    calls = gated.pipeline.calls
    for tool, arguments, needle in cases:
        result = call(gated.url, tool, arguments)
        text = result.content[0].text
        assert result.isError and text.startswith(needle), text
        assert len(text) < 300 and "Traceback" not in text and "/tmp/" not in text, text
    assert gated.pipeline.calls == calls


def test_mcp_file_objects_are_refused_in_any_argument():
    positions = [["image"], ["audio"]]
    with pytest.raises(ValueError, match="not as objects with a server path"):
        check_mcp_arguments(
            {"image": "data:,", "mouth": {"path": "/etc/passwd", "meta": FILE}},
            positions,
            allow_url_inputs=True,
        )
    with pytest.raises(ValueError, match="not as objects with a server path"):
        check_mcp_arguments({"mouth": [{"path": "/etc/passwd"}]}, positions, allow_url_inputs=True)
    check_mcp_arguments(
        {"image": "data:image/png;base64,AA==", "audio": None}, positions, allow_url_inputs=True
    )


# ------------------------------------------------------------------------------ the file route


def test_the_file_route_serves_only_uploads_and_the_output_folder(gated, secrets, inputs, uploaded):
    result = json.loads(
        Client(gated.url, verbose=False).predict(
            handle_file(str(inputs["image"])),
            handle_file(str(inputs["audio"])),
            *OPTIONS,
            api_name="/generate_video",
        )
    )
    status, body = raw_get(gated.url, f"/gradio_api/file={quote(result['video_path'])}")
    assert (status, body[4:8]) == (200, b"ftyp")
    status, _ = raw_get(gated.url, f"/gradio_api/file={quote(uploaded['image']['path'])}")
    assert status == 200
    outside_output = f"{gated.output_dir}/../{os.path.relpath(secrets['portrait'], gated.output_dir.parent)}"
    paths = [
        *attack_paths(secrets, "image").values(),
        *attack_paths(secrets, "audio").values(),
        outside_output,
    ]
    for path in paths:
        for route in (
            f"/gradio_api/file={path}",
            f"/gradio_api/file={quote(path, safe='')}",
            f"/gradio_api/file/{path}",
        ):
            status, body = raw_get(gated.url, route)
            assert status in (403, 404), (route, status)
            assert b"root:" not in body and secrets["portrait"].read_bytes()[:64] not in body, route


REFUSED_BODY = json.dumps({"detail": OUTPUT_FILE_REFUSED}).encode()


def output_routes(path: Path | str) -> list[str]:
    """The ways to ask Gradio's file route for ``path``: plain, URL-encoded, the older ``/file/``."""
    return [
        f"/gradio_api/file={path}",
        f"/gradio_api/file={quote(str(path), safe='')}",
        f"/gradio_api/file/{path}",
    ]


def test_the_output_folder_serves_only_the_videos_the_app_wrote(gated, secrets, tmp_path):
    out = gated.output_dir
    video = out / f"talking-{secrets['token']}.mp4"
    with VideoWriter(video, width=64, height=64, fps=10, audio_rate=None) as writer:
        writer.write_frame(np.zeros((64, 64, 3), dtype=np.uint8))
    (out / ".env").write_text(f"GPU_CONTROL_TOKEN={secrets['token']}")
    (out / "secret.txt").write_text(secrets["token"])
    (out / "app.py").write_text(f"TOKEN = {secrets['token']!r}")
    (out / "x.mp4").write_bytes(video.read_bytes())
    (out / f".talking-{secrets['token']}.part.mp4").write_bytes(video.read_bytes())
    for folder in ("sub", ".hidden"):
        (out / folder).mkdir()
        (out / folder / video.name).write_bytes(video.read_bytes())
    (out / "talking-out.mp4").symlink_to(secrets["portrait"])
    (out / "talking-dot.mp4").symlink_to(out / ".env")
    (tmp_path / "talking-in.mp4").symlink_to(out / ".env")
    refused = [
        out / ".env",
        out / "secret.txt",
        out / "app.py",
        out / "x.mp4",
        out / f".talking-{secrets['token']}.part.mp4",
        out / "sub" / video.name,
        out / ".hidden" / video.name,
        out / "talking-out.mp4",
        out / "talking-dot.mp4",
        f"{out}/sub/../.env",
        tmp_path / "talking-in.mp4",
        out,
    ]
    try:
        for path in refused:
            for route in output_routes(path):
                status, body = raw_get(gated.url, route)
                assert (status, body) == (404, REFUSED_BODY), route
        for route in [*output_routes(video), f"/gradio_api/file={out}/sub/../{video.name}"]:
            status, body = raw_get(gated.url, route)
            assert (status, body) == (200, video.read_bytes()), route
    finally:
        for name in (
            ".env",
            "secret.txt",
            "app.py",
            "x.mp4",
            "talking-out.mp4",
            "talking-dot.mp4",
            video.name,
        ):
            (out / name).unlink()
        (out / f".talking-{secrets['token']}.part.mp4").unlink()
        shutil.rmtree(out / "sub")
        shutil.rmtree(out / ".hidden")


def test_output_file_allowed_follows_the_pattern_and_never_a_dotfile(tmp_path):
    """The rule itself, for any pattern: a regular file in the folder, matching, no part starting with '.'."""
    for name in ("a.mp4", ".a.mp4", "a.txt", "sub/b.mp4", ".sub/b.mp4"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "link.mp4").symlink_to(tmp_path / "a.txt")
    allowed = {
        name: output_file_allowed(str(tmp_path / name), tmp_path, "*.mp4")
        for name in ("a.mp4", ".a.mp4", "a.txt", "sub/b.mp4", "folder.mp4", "link.mp4", "missing.mp4", "")
    }
    assert allowed == {
        "a.mp4": True,
        ".a.mp4": False,
        "a.txt": False,
        "sub/b.mp4": False,
        "folder.mp4": False,
        "link.mp4": False,
        "missing.mp4": False,
        "": False,
    }
    assert output_file_allowed(str(tmp_path / "sub/b.mp4"), tmp_path, "*/*.mp4") is True
    assert output_file_allowed(str(tmp_path / ".sub/b.mp4"), tmp_path, "*/*.mp4") is False
    assert output_file_allowed("/etc/passwd", tmp_path, "*.mp4") is True  # not the folder's: Gradio decides
    assert output_file_allowed("a\x00.mp4", tmp_path, "*.mp4") is False
    linked = tmp_path.parent / f"{tmp_path.name}-link"
    linked.symlink_to(tmp_path)  # the output folder given by a link's name
    assert output_file_allowed(str(linked / "a.mp4"), linked, "*.mp4") is True
    assert output_file_allowed(str(linked / ".a.mp4"), linked, "*.mp4") is False
    assert output_file_allowed(str(tmp_path / ".a.mp4"), linked, "*.mp4") is False
    (tmp_path / "out.mp4").symlink_to(tmp_path.parent)  # a link out of the folder
    assert output_file_allowed(str(linked / "out.mp4"), linked, "*.mp4") is False
    assert output_file_allowed(str(tmp_path / "out.mp4"), tmp_path, "*.mp4") is False


def test_an_output_folder_that_holds_the_app_serves_none_of_its_files(secrets):
    """``python app.py --output-dir .``: the app's source and a token file lie in the output folder."""
    token_file = ROOT / f".control-token-{secrets['token']}"
    token_file.write_text(secrets["token"])
    pipeline = GatedPipeline()
    manager = GPUResourceManager(device="cpu", load_func=pipeline.load, name=pipeline.name)
    try:
        with serve(create_app(manager, pipeline, output_dir=ROOT, examples=[])) as url:
            for path in (token_file, ROOT / "app.py", ROOT / "README.md", ROOT / "ui" / "blocks.py"):
                for route in output_routes(path):
                    status, body = raw_get(url, route)
                    assert (status, body) == (404, REFUSED_BODY), route
    finally:
        manager.stop_monitor()
        token_file.unlink()


def test_only_videos_from_the_output_folder_are_shown(gated, secrets):
    """The result step takes the video's name from the browser: a video elsewhere is never served."""
    bait = secrets["portrait"].with_name(f"talking-{secrets['token']}.mp4")
    with VideoWriter(bait, width=64, height=64, fps=10, audio_rate=None) as writer:
        writer.write_frame(np.frombuffer(bytes.fromhex(secrets["token"] * 768), np.uint8).reshape(64, 64, 3))
    show = next(
        d["id"]
        for d in httpx.get(f"{gated.url}/config").json()["dependencies"]
        if d["api_name"] == "show_result"
    )
    try:
        answer = httpx.post(
            f"{gated.url}/gradio_api/run/predict",
            json={"fn_index": show, "data": [json.dumps({"video_path": str(bait)})], "session_hash": "s"},
            timeout=30,
        )
        assert answer.status_code == 422
        assert (
            answer.json()["error"]
            == "That video is not on the server (old videos are deleted); generate it again."
        )
        assert not (Path(gradio_utils.get_upload_folder()) / processing_utils.hash_file(bait)).exists()
    finally:
        bait.unlink()


@pytest.mark.parametrize("name", ["secret.txt", ".env", "x.mp4", "talking-x.mp4.txt"])
def test_the_result_step_shows_only_the_apps_videos_from_the_output_folder(gated, name):
    """Inside the output folder too, only ``talking-*.mp4`` files can be shown (and so cached and served)."""
    planted = gated.output_dir / name
    planted.write_bytes(f"not for visitors {name} {uuid.uuid4()}".encode())  # unique: a fresh cache name
    dependencies = httpx.get(f"{gated.url}/config").json()["dependencies"]
    show = next(d["id"] for d in dependencies if d["api_name"] == "show_result")
    try:
        answer = httpx.post(
            f"{gated.url}/gradio_api/run/predict",
            json={"fn_index": show, "data": [json.dumps({"video_path": name})], "session_hash": "s"},
            timeout=30,
        )
        assert answer.status_code == 422
        gone = "That video is not on the server (old videos are deleted); generate it again."
        assert answer.json()["error"] == gone
        assert not (Path(gradio_utils.get_upload_folder()) / processing_utils.hash_file(planted)).exists()
    finally:
        planted.unlink()
