"""Attacks on URL fetching, against the real app on a loopback port.

No request may make the server fetch a URL from a loopback, private or link-local address
(through the Gradio API, gradio_client or MCP), ``/gradio_api/file=<url>`` never fetches
anything, and with URL inputs off (``ALLOW_URL_INPUTS``) no URL is even looked up. Over MCP,
a URL of this server's own file route is taken only for a file uploaded to it, read from the
upload folder without a connection; no request header chooses where the server connects.

A recording listener on 127.0.0.1 shows every connection made, and host names under
``.invalid`` are answered by the test (``link-local.invalid`` is 169.254.169.254), never by a
DNS server, so every lookup is seen and nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from gradio import utils as gradio_utils
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import encode_file_path
from mcp import ClientSession

from app import create_app
from gpu_control import GPUResourceManager
from gpu_control_gradio.input_guard import URL_INPUTS_OFF
from gpu_control_gradio.mount import FILE_URL_REFUSED
from gpu_control.security import excerpt
from pipelines.media import VideoWriter

from .conftest import LiveApp
from .helpers import GatedPipeline, serve, upload, video_facts
from .security_helpers import (
    FILE,
    OPTIONS,
    assert_untouched,
    attack_paths,
    raw_get,
    via_call,
    via_run,
)
from .test_mcp import call, data_uri, with_session

NOT_FETCHED = "could not be fetched; only public http(s) addresses are fetched"


# ------------------------------------------------------------------------------ fixtures


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


# ------------------------------------------------------------------------------ attacks


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
