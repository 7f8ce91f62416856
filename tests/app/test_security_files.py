"""Attacks on file containment and URL fetching, against the real app on a loopback port.

No request may make the app read, copy or serve a file the user did not upload (or the app
did not create), through any file parameter of any route: the Gradio API (``/call``, ``/run``,
``/queue/join`` with the UI's events, the private example event included), gradio_client, MCP,
and ``GET /gradio_api/file=``, which serves from the output folder only the videos the app
wrote (no dotfile, no other file, nothing a link leads to). No request may make the server fetch a URL from a loopback,
private or link-local address, ``/gradio_api/file=<url>`` never fetches anything, and with URL
inputs off no URL is even looked up.

The secrets are a real portrait and a real speech clip (unique per run), so a file that got
through would be turned into a video: the pipeline's call count and Gradio's cache folder for
the secret's content show it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import numpy as np
import pytest
import soundfile
from gradio import processing_utils
from gradio import utils as gradio_utils
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import encode_file_path
from mcp import ClientSession
from PIL import Image

import app as app_module
from app import create_app
from gpu_control import GPUResourceManager
from gpu_control.security import excerpt
from pipelines.media import VideoWriter
from ui.input_guard import URL_INPUTS_OFF, check_mcp_arguments
from ui.mount import FILE_URL_REFUSED, OUTPUT_FILE_REFUSED, output_file_allowed

from .conftest import LiveApp
from .helpers import ROOT, GatedPipeline, make_portrait, make_speech, serve, upload, video_facts
from .test_mcp import call, data_uri, with_session

FILE = {"_type": "gradio.FileData"}
OPTIONS = [25, 96, 1.0, 1.0, 1.0, 0, ""]  # fps, size, expressiveness, head_motion, blinks, seed, mouth
NOT_UPLOADED = "names a file that was not uploaded to this server"
NOT_FETCHED = "could not be fetched; only public http(s) addresses are fetched"


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def secrets() -> Iterator[dict[str, Any]]:
    """A secret portrait and speech clip next to the app (the working folder) and in the temp folder,
    and a symlink to the portrait planted in Gradio's upload folder."""
    token = uuid.uuid4().hex
    rng = np.random.default_rng(int(token[:8], 16))
    beside_app = Path(app_module.__file__).resolve().parent
    portrait = beside_app / f"secret-{token}.png"
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(portrait)
    speech = Path(os.environ.get("TMPDIR", "/tmp")) / f"secret-{token}.wav"
    soundfile.write(speech, (0.3 * rng.standard_normal(16000)).astype(np.float32), 16000)
    planted = Path(gradio_utils.get_upload_folder()) / f"planted-{token}"
    planted.mkdir(parents=True)
    (planted / "portrait.png").symlink_to(portrait)
    (planted / "speech.wav").symlink_to(speech)
    try:
        yield {"portrait": portrait, "speech": speech, "planted": planted, "token": token}
    finally:
        portrait.unlink(missing_ok=True)
        speech.unlink(missing_ok=True)
        shutil.rmtree(planted, ignore_errors=True)


def attack_paths(secrets: dict[str, Any], kind: str) -> dict[str, str]:
    """Ways to name a server file the user never uploaded, for the image or the audio input."""
    secret = secrets["portrait" if kind == "image" else "speech"]
    link = secrets["planted"] / ("portrait.png" if kind == "image" else "speech.wav")
    upload_folder = gradio_utils.get_upload_folder()
    return {
        "etc-passwd": "/etc/passwd",
        "proc-environ": "/proc/self/environ",
        "absolute": str(secret),
        "relative": os.path.relpath(secret),
        "dot-dot-from-upload-folder": f"{upload_folder}/../..{secret}",
        "url-encoded": quote(str(secret), safe=""),
        "file-url": f"file://{secret}",
        "symlink-in-upload-folder": str(link),
    }


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


class Listener:
    """A TCP listener on 127.0.0.1 that records every connection made to it."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self._seen: list[Any] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="recording-listener", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError), self._lock:
                connection, address = self._sock.accept()
                self._seen.append(address)
                connection.close()

    def connections(self) -> list[Any]:
        """Every connection so far, those still waiting in the backlog included."""
        with self._lock:
            self._sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    connection, address = self._sock.accept()
                    self._seen.append(address)
                    connection.close()
            self._sock.settimeout(0.05)
            return list(self._seen)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        assert not self._thread.is_alive()
        self._sock.close()


@pytest.fixture()
def listener() -> Iterator[Listener]:
    recorder = Listener()
    yield recorder
    recorder.close()


@pytest.fixture()
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Host names the process looks up under ``.invalid``: recorded and never sent to a DNS server.

    ``link-local.invalid`` resolves to the link-local metadata address 169.254.169.254; the others
    do not resolve. Everything else resolves as usual.
    """
    seen: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if not name.endswith(".invalid"):
            return real(host, *args, **kwargs)
        seen.append(name)
        if name == "link-local.invalid":
            return real("169.254.169.254", *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "no such host (test)")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return seen


@pytest.fixture(scope="module")
def urls_off(tmp_path_factory: pytest.TempPathFactory, inputs: dict[str, Path]) -> Iterator[LiveApp]:
    """The app with ``allow_url_inputs=False``."""
    pipeline = GatedPipeline()
    manager = GPUResourceManager(device="cpu", load_func=pipeline.load, name=pipeline.name)
    output_dir = tmp_path_factory.mktemp("urls-off-outputs")
    app = create_app(manager, pipeline, output_dir=output_dir, examples=[], allow_url_inputs=False)
    with serve(app) as url:
        yield LiveApp(url, manager, pipeline, output_dir)
    manager.stop_monitor()


# ------------------------------------------------------------------------------ routes


def via_run(url: str, data: list[Any]) -> str:
    answer = httpx.post(f"{url}/gradio_api/run/generate_video", json={"data": data}, timeout=60)
    assert answer.status_code == 422, answer.text
    return answer.json()["error"]


def via_call(url: str, data: list[Any]) -> str:
    joined = httpx.post(f"{url}/gradio_api/call/generate_video", json={"data": data}, timeout=30)
    assert joined.status_code == 200, joined.text
    stream = httpx.get(f"{url}/gradio_api/call/generate_video/{joined.json()['event_id']}", timeout=60)
    events = [block.split("\n") for block in stream.text.strip().split("\n\n")]
    last = events[-1]
    assert last[0] == "event: error", stream.text
    return json.loads(last[1].removeprefix("data: "))["error"]


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


def assert_untouched(live: LiveApp, secrets: dict[str, Any], calls: int, uses: int) -> None:
    """Nothing was generated and no secret was copied into Gradio's cache (or uploaded to it)."""
    assert live.pipeline.calls == calls
    assert live.manager.get_status()["counts"]["uses"] == uses
    for secret in (secrets["portrait"], secrets["speech"]):
        copy = Path(gradio_utils.get_upload_folder()) / processing_utils.hash_file(secret)
        assert not copy.exists(), f"{secret.name} was copied to {copy}"


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
            "Argument 'image' must be a file as a data: URI (data:image/png;base64,...) or an http(s) URL, not a number.",
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


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET a path exactly as written (no client-side clean-up of ``..`` or escapes)."""
    host = urlsplit(url)
    connection = http.client.HTTPConnection(host.hostname, host.port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


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
            for path in (token_file, ROOT / "app.py", ROOT / "README.md", ROOT / "ui" / "mount.py"):
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


# ------------------------------------------------------------------------------ URLs


def test_the_file_route_never_fetches_a_url(gated, listener, lookups):
    targets = [
        f"http://127.0.0.1:{listener.port}/x.png",
        "http://file-route.invalid/x.png",
        "https://file-route.invalid/x",
    ]
    for target in targets:
        for route in (
            f"/gradio_api/file={target}",
            f"/gradio_api/file={quote(target, safe='')}",
            f"/gradio_api/file={quote(quote(target, safe=''), safe='')}",
            f"/gradio_api/file/{target}",
            f"/gradio_api/file={target.replace('http', 'HTTP', 1)}",
            f"/gradio_api/file=//{target.split('://', 1)[1]}",
        ):
            status, body = raw_get(gated.url, route)
            assert status in (403, 404), (route, status, body)
    assert (listener.connections(), lookups) == ([], [])
    status, body = raw_get(gated.url, f"/gradio_api/file={targets[1]}")
    assert (status, json.loads(body)["detail"]) == (403, FILE_URL_REFUSED)


def test_with_url_inputs_off_a_url_is_refused_before_any_lookup(urls_off, listener, lookups, inputs):
    calls = urls_off.pipeline.calls
    speech = data_uri(inputs["audio"], "audio/wav")
    for target in ("http://url-inputs.invalid/face.png", f"http://127.0.0.1:{listener.port}/face.png"):
        data = [{"path": target, "meta": FILE}, {"path": target, "meta": FILE}, *OPTIONS]
        assert via_run(urls_off.url, data) == f"Input 'image' (Portrait): {URL_INPUTS_OFF}"
        assert via_call(urls_off.url, data) == f"Input 'image' (Portrait): {URL_INPUTS_OFF}"
        with pytest.raises(AppError, match="does not accept file URLs"):
            Client(urls_off.url, verbose=False).predict(
                handle_file(target), handle_file(target), api_name="/generate_video"
            )
        result = call(urls_off.url, "generate_video", {"image": target, "audio": speech})
        assert (result.isError, result.content[0].text) == (True, f"Argument 'image': {URL_INPUTS_OFF}")
    assert (listener.connections(), lookups, urls_off.pipeline.calls) == ([], [], calls)


def test_with_url_inputs_on_loopback_private_and_link_local_addresses_are_never_fetched(
    gated, listener, lookups, inputs
):
    calls = gated.pipeline.calls
    speech = data_uri(inputs["audio"], "audio/wav")
    for target in (
        f"http://127.0.0.1:{listener.port}/face.png",
        f"http://localhost:{listener.port}/face.png",
        f"http://link-local.invalid:{listener.port}/face.png",
    ):
        audio = {"path": f"{target}.wav", "meta": FILE}
        text = via_run(gated.url, [{"path": target, "meta": FILE}, audio, *OPTIONS])
        assert text.startswith("Input 'image' (Portrait): the file at") and NOT_FETCHED in text, text
        result = call(gated.url, "generate_video", {"image": target, "audio": speech})
        assert result.isError and NOT_FETCHED in result.content[0].text, result.content[0].text
    assert listener.connections() == []
    assert lookups.count("link-local.invalid") >= 2
    assert gated.pipeline.calls == calls


def test_the_tool_description_says_how_to_pass_files(gated, urls_off):
    """Gradio's own sentence asks for "the returned path" of its upload tool; the app's says what it takes."""

    async def describe(session: ClientSession) -> Any:
        tools = (await session.list_tools()).tools
        return next(t for t in tools if t.name == "generate_video")

    on_tool = with_session(gated.url, describe)
    off_tool = with_session(urls_off.url, describe)
    assert (
        " Pass each file as a data: URI (data:<mime type>;base64,...) or as an http(s) URL of a public file; "
        "to pass a local file, upload it to this app with the upload_file_to_gradio tool, if present, and "
        "pass the URL that tool returns. Returns: JSON text"
    ) in on_tool.description
    assert (
        " Pass each file as a data: URI (data:<mime type>;base64,...); this server does not take file URLs. "
        "Returns: JSON text"
    ) in off_tool.description
    for tool in (on_tool, off_tool):
        assert "returned path" not in tool.description and "Gradio File Input" not in tool.description
    assert "upload_file_to_gradio" not in off_tool.description and "http" not in off_tool.description
    on, off = on_tool.inputSchema["properties"], off_tool.inputSchema["properties"]
    for kind in ("image", "audio"):
        assert (
            "a data: URI" in on[kind]["description"]
            and "an http(s) URL of a public file" in on[kind]["description"]
        )
        assert (
            "a data: URI" in off[kind]["description"]
            and "this server does not fetch URLs" in off[kind]["description"]
        )
        assert "http(s) URL of a public file" not in off[kind]["description"]


def test_a_url_of_this_server_is_taken_only_for_a_file_uploaded_to_it(gated, secrets, listener, inputs):
    """The URL of an upload (what Gradio's upload_file_to_gradio returns) is read from the upload
    folder without a connection; no other file of the server is reached that way."""
    calls, uses = gated.pipeline.calls, gated.manager.get_status()["counts"]["uses"]
    (speech,) = upload(gated.url, inputs["audio"])
    audio = f"{gated.url}/gradio_api/file={encode_file_path(speech['path'])}"
    upload_folder = gradio_utils.get_upload_folder()
    video = gated.output_dir / f"talking-{secrets['token']}.mp4"
    with VideoWriter(video, width=64, height=64, fps=10, audio_rate=None) as writer:
        writer.write_frame(np.zeros((64, 64, 3), dtype=np.uint8))
    paths = [
        *attack_paths(secrets, "image").values(),
        f"{upload_folder}/../..{secrets['portrait']}",
        str(video),
        upload_folder,
        f"{upload_folder}/no-such-upload/face.png",
    ]
    try:
        for path in paths:
            for image in (
                f"{gated.url}/gradio_api/file={encode_file_path(path)}",
                f"{gated.url}/gradio_api/file={quote(path, safe='')}",
                f"{gated.url.replace('127.0.0.1', 'localhost')}/gradio_api/file={path}",
            ):
                result = call(gated.url, "generate_video", {"image": image, "audio": audio, "size": 64})
                sentence = (
                    f"Argument 'image': {excerpt(image)} names a file of this server that was not uploaded "
                    "to it; upload the file (the upload_file_to_gradio tool, or POST /gradio_api/upload) and "
                    "pass the URL of the upload, or send the file as a data: URI."
                )
                assert (result.isError, result.content[0].text) == (True, sentence), image
    finally:
        video.unlink()
    assert listener.connections() == []
    assert_untouched(gated, secrets, calls, uses)


def test_with_url_inputs_off_a_url_of_this_server_is_refused_too(urls_off, inputs):
    (portrait,) = upload(urls_off.url, inputs["image"])
    image = f"{urls_off.url}/gradio_api/file={encode_file_path(portrait['path'])}"
    result = call(
        urls_off.url, "generate_video", {"image": image, "audio": data_uri(inputs["audio"], "audio/wav")}
    )
    assert (result.isError, result.content[0].text) == (True, f"Argument 'image': {URL_INPUTS_OFF}")
    assert urls_off.pipeline.calls == 0


def test_mcp_request_headers_never_choose_where_the_server_connects(tmp_path, listener, inputs):
    """Gradio's MCP loopback client is pinned to the server, not built from the first call's headers."""
    pipeline = GatedPipeline()
    manager = GPUResourceManager(device="cpu", load_func=pipeline.load, name=pipeline.name)
    app = create_app(manager, pipeline, output_dir=tmp_path, examples=[])
    elsewhere = f"127.0.0.1:{listener.port}"
    headers = {"X-Forwarded-Host": elsewhere, "X-Gradio-Server": f"http://{elsewhere}"}
    try:
        with serve(app) as url:
            arguments = {
                "image": data_uri(inputs["image"], "image/png"),
                "audio": data_uri(inputs["audio"], "audio/wav"),
                "size": 64,
            }
            first = call(url, "generate_video", arguments, headers=headers)
            assert not first.isError, first.content[0].text
            assert video_facts(json.loads(first.content[0].text)["video_path"])["frames"] > 0
    finally:
        manager.stop_monitor()
    assert listener.connections() == []
