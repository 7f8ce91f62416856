"""What the file and URL attack tests share: the planted secrets, the ways to name them, the routes.

`plant_secrets` puts a secret portrait and speech clip where an attacker would aim (beside the
app, in the temp folder, linked from Gradio's upload folder); `attack_paths` names them every
way a file parameter could; `via_run`, `via_call` and `raw_get` send a request exactly as
written; `assert_untouched` checks that nothing was generated and no secret was copied.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import httpx
import numpy as np
import soundfile
from gradio import processing_utils
from gradio import utils as gradio_utils
from PIL import Image

import app as app_module

if TYPE_CHECKING:
    from .conftest import LiveApp

FILE = {"_type": "gradio.FileData"}
OPTIONS = [25, 96, 1.0, 1.0, 1.0, 0, ""]  # fps, size, expressiveness, head_motion, blinks, seed, mouth


@contextlib.contextmanager
def plant_secrets() -> Iterator[dict[str, Any]]:
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


def via_run(url: str, data: list[Any]) -> str:
    """Send ``data`` to ``/run/generate_video``, expect a 422 and return its error text."""
    answer = httpx.post(f"{url}/gradio_api/run/generate_video", json={"data": data}, timeout=60)
    assert answer.status_code == 422, answer.text
    return answer.json()["error"]


def via_call(url: str, data: list[Any]) -> str:
    """Send ``data`` to ``/call/generate_video``, expect the event stream to end in an error, return it."""
    joined = httpx.post(f"{url}/gradio_api/call/generate_video", json={"data": data}, timeout=30)
    assert joined.status_code == 200, joined.text
    stream = httpx.get(f"{url}/gradio_api/call/generate_video/{joined.json()['event_id']}", timeout=60)
    events = [block.split("\n") for block in stream.text.strip().split("\n\n")]
    last = events[-1]
    assert last[0] == "event: error", stream.text
    return json.loads(last[1].removeprefix("data: "))["error"]


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


def assert_untouched(live: LiveApp, secrets: dict[str, Any], calls: int, uses: int) -> None:
    """Nothing was generated and no secret was copied into Gradio's cache (or uploaded to it)."""
    assert live.pipeline.calls == calls
    assert live.manager.get_status()["counts"]["uses"] == uses
    for secret in (secrets["portrait"], secrets["speech"]):
        copy = Path(gradio_utils.get_upload_folder()) / processing_utils.hash_file(secret)
        assert not copy.exists(), f"{secret.name} was copied to {copy}"
