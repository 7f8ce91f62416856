"""`python app.py` as deployed: the address it listens on, the control token, and stopping in time.

Each test starts the real app in a subprocess on a free port and reaches it on 127.0.0.1 only.
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpu_control_gradio.input_guard import URL_INPUTS_OFF
from serving import CANCEL_WAIT_S, STREAMS_CLOSE_S

from .helpers import AppProcess, app_process, listening_addresses, upload, wait_for

MARGIN_S = 4.0
"""What a stop may take beyond the waits it is allowed (the event loop's tick, the lifespan, exit)."""

GRACE_S = 1.0
"""The shutdown grace period of the tests that stop the app during a job."""

SHORT_GRACE = {"SHUTDOWN_GRACE_S": f"{GRACE_S:g}"}

CANCELLED = "The job was cancelled: the server is shutting down. Nothing was kept."


def _start_job(url: str, inputs: dict[str, Path]) -> str:
    """Submit a job through the Gradio API's ``/call`` route; returns its event id."""
    files = upload(url, inputs["image"], inputs["audio"])
    answer = httpx.post(
        f"{url}/gradio_api/call/generate_video",
        json={"data": [*files, 12, 64, 1.0, 1.0, 1.0, 0, ""]},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["event_id"]


def _job_events(app: AppProcess, event_id: str) -> Any:
    """The job's event stream (``/call/generate_video/<event id>``), to open before a signal."""
    return httpx.stream("GET", f"{app.url}/gradio_api/call/generate_video/{event_id}", timeout=30)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _partial_videos(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.part.mp4"))


def _read_events(stream: httpx.Response) -> list[str]:
    """The lines of an event stream up to its end (or until the server cut it)."""
    lines = []
    try:
        for line in stream.iter_lines():
            lines.append(line)
    except httpx.RemoteProtocolError:
        lines.append("<cut>")
    return lines


def _sigterm_during_a_job(
    tmp_path: Path, inputs: dict[str, Path], pipeline: str, timeout: float, **env: str
) -> tuple[AppProcess, float, list[str]]:
    """Serve ``pipeline`` writing to ``tmp_path``, start a job, and send SIGTERM once the job is
    writing its video; return the stopped app, how long it took to exit, and the job's events."""
    with app_process("--output-dir", str(tmp_path), "--pipeline", pipeline, **env) as app:
        app.wait_until_serving()
        event_id = _start_job(app.url, inputs)
        with _job_events(app, event_id) as stream:
            wait_for(lambda: _partial_videos(tmp_path), timeout=30)  # the job is writing its video
            took = app.stop(signal.SIGTERM, timeout=timeout)
            events = _read_events(stream)
    return app, took, events


def test_listens_on_loopback_by_default_and_says_control_is_open(tmp_path):
    with app_process("--output-dir", str(tmp_path)) as app:
        line = app.wait_for_line("Talking Portrait on ")
        app.wait_until_serving()
        assert listening_addresses(app.port) == {"127.0.0.1"}
        start = f"Talking Portrait on http://127.0.0.1:{app.port} (listening on 127.0.0.1, this machine only;"
        assert start in line
        assert "; GPU control open (no GPU_CONTROL_TOKEN);" in line
        assert httpx.post(f"{app.url}/gpu/offload", timeout=10).status_code == 200
        rebound = {"Host": f"attacker.example:{app.port}", "Origin": f"http://attacker.example:{app.port}"}
        refused = httpx.post(f"{app.url}/gpu/offload", headers=rebound, timeout=10)
        assert refused.status_code == 403, "DNS rebinding: a rebound name must not control a loopback app"
        app.stop(signal.SIGTERM, timeout=MARGIN_S + STREAMS_CLOSE_S)
    assert "WARNING" not in app.output


def test_every_interface_without_a_token_warns_that_control_is_open(tmp_path):
    with app_process("--output-dir", str(tmp_path), GRADIO_SERVER_NAME="0.0.0.0") as app:
        line = app.wait_for_line("Talking Portrait on ")
        warning = app.wait_for_line(" WARNING app: ")
        app.wait_until_serving()
        assert listening_addresses(app.port) == {"0.0.0.0"}
    start = f"Talking Portrait on http://localhost:{app.port} (listening on 0.0.0.0, reachable from the"
    assert f"{start} network;" in line
    assert "; GPU control open (no GPU_CONTROL_TOKEN);" in line
    assert warning.endswith(
        f"WARNING app: Anyone who can reach 0.0.0.0:{app.port} can offload, release and re-time the GPU: "
        "set GPU_CONTROL_TOKEN or --control-token-file to lock GPU control "
        "(status and generation stay open).\n"
    )


def test_a_token_from_the_environment_locks_control_and_is_never_logged(tmp_path):
    token = f"env-{uuid.uuid4().hex}"
    with app_process("--output-dir", str(tmp_path), GPU_CONTROL_TOKEN=token) as app:
        line = app.wait_for_line("Talking Portrait on ")
        app.wait_until_serving()
        assert httpx.post(f"{app.url}/gpu/offload", timeout=10).status_code == 401
        assert httpx.post(f"{app.url}/gpu/offload", headers=_bearer("not-the-token")).status_code == 401
        assert httpx.post(f"{app.url}/gpu/offload", headers=_bearer(token)).status_code == 200
        assert httpx.get(f"{app.url}/gpu/status", timeout=10).status_code == 200
        app.stop(signal.SIGTERM, timeout=MARGIN_S + STREAMS_CLOSE_S)
    assert "; GPU control locked by the control token;" in line
    assert token not in app.output


def test_a_token_file_wins_over_the_environment_and_silences_the_warning(tmp_path):
    secret = tmp_path / "control-token"
    file_token = f"file-{uuid.uuid4().hex}"
    secret.write_text(f"{file_token}\n", encoding="utf-8")
    env_token = f"env-{uuid.uuid4().hex}"
    with app_process(
        "--output-dir",
        str(tmp_path / "out"),
        "--control-token-file",
        str(secret),
        GRADIO_SERVER_NAME="0.0.0.0",
        GPU_CONTROL_TOKEN=env_token,
    ) as app:
        line = app.wait_for_line("Talking Portrait on ")
        app.wait_until_serving()
        with_env = httpx.post(f"{app.url}/gpu/release", headers=_bearer(env_token))
        with_file = httpx.post(f"{app.url}/gpu/release", headers=_bearer(file_token))
        assert (with_env.status_code, with_file.status_code) == (401, 200)
        app.stop(signal.SIGTERM, timeout=MARGIN_S + STREAMS_CLOSE_S)
    assert "(listening on 0.0.0.0, reachable from the network;" in line
    assert "; GPU control locked by the control token;" in line
    assert "WARNING" not in app.output
    assert file_token not in app.output and env_token not in app.output


def test_allow_url_inputs_false_refuses_a_url_file_input_with_a_sentence(tmp_path, inputs):
    with app_process("--output-dir", str(tmp_path), ALLOW_URL_INPUTS="false") as app:
        app.wait_until_serving()
        audio = upload(app.url, inputs["audio"])[0]
        url = f"{app.url}/gradio_api/file=face.png"  # this app's own address: nothing else is ever asked
        image = {"path": url, "url": url, "meta": {"_type": "gradio.FileData"}}
        answer = httpx.post(
            f"{app.url}/gradio_api/call/generate_video",
            json={"data": [image, audio, 12, 64, 1.0, 1.0, 1.0, 0, ""]},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        event_id = answer.json()["event_id"]
        with _job_events(app, event_id) as stream:
            events = _read_events(stream)
    assert events[0] == "event: error"
    assert URL_INPUTS_OFF in events[1]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_with_an_open_event_stream_exits_within_the_grace_period(tmp_path, sig):
    with app_process("--output-dir", str(tmp_path), **SHORT_GRACE) as app:
        app.wait_until_serving()
        session = uuid.uuid4().hex
        with httpx.Client(timeout=30) as client:
            with client.stream("GET", f"{app.url}/gradio_api/heartbeat/{session}") as stream:
                chunks = stream.iter_text()
                assert next(chunks) == "data: ALIVE\n\n"  # a browser tab's stream, open for good
                took = app.stop(sig, timeout=GRACE_S + MARGIN_S)
                rest = []
                try:
                    rest.extend(chunks)
                except httpx.RemoteProtocolError:
                    rest.append("<cut>")
    assert app.process.returncode == 0
    assert rest == ["<cut>"]
    assert took < STREAMS_CLOSE_S + MARGIN_S
    assert "INFO serving: Shutting down\n" in app.output
    assert "Traceback" not in app.output and "ERROR" not in app.output


def test_sigterm_during_a_long_job_cancels_it_after_the_grace_period_and_keeps_nothing(tmp_path, inputs):
    app, took, events = _sigterm_during_a_job(
        tmp_path,
        inputs,
        "tests.app.helpers:EndlessPipeline",
        GRACE_S + CANCEL_WAIT_S + STREAMS_CLOSE_S + MARGIN_S,
        **SHORT_GRACE,
    )
    assert app.process.returncode == 0
    assert took >= GRACE_S, "the running job was not given its grace period"
    assert events[0] == "event: error"
    assert CANCELLED in events[1]
    assert list(tmp_path.iterdir()) == []
    assert f"waiting up to {GRACE_S:g} s for 1 running job(s) to finish" in app.output
    assert f"WARNING serving: Cancelling 1 job(s) still running after {GRACE_S:g} s\n" in app.output
    assert "INFO serving: The cancelled job stopped\n" in app.output
    assert "Traceback" not in app.output


def test_sigterm_during_a_short_job_lets_it_finish_and_deliver_its_video(tmp_path, inputs):
    app, _, events = _sigterm_during_a_job(
        tmp_path, inputs, "tests.app.helpers:ShortPipeline", 60, SHUTDOWN_GRACE_S="60"
    )
    assert app.process.returncode == 0
    assert events[0] == "event: complete", events
    videos = sorted(path.name for path in tmp_path.iterdir())
    assert len(videos) == 1 and videos[0].startswith("talking-") and videos[0].endswith(".mp4")
    assert videos[0] in events[1]
    assert "Cancelling" not in app.output


def test_a_job_that_ignores_cancellation_does_not_hold_the_exit_and_leaves_nothing(tmp_path, inputs):
    app, _, _ = _sigterm_during_a_job(
        tmp_path,
        inputs,
        "tests.app.helpers:StubbornPipeline",
        GRACE_S + CANCEL_WAIT_S + STREAMS_CLOSE_S + MARGIN_S,
        **SHORT_GRACE,
    )
    assert app.process.returncode == 0
    assert list(tmp_path.iterdir()) == []
    stuck = f"WARNING serving: 1 job(s) did not stop within {CANCEL_WAIT_S:g} s of being cancelled\n"
    assert stuck in app.output
    exiting = "WARNING app: Exiting with 1 job(s) that ignored cancellation; nothing they wrote was kept\n"
    assert exiting in app.output


def test_a_killed_runs_partial_video_is_deleted_at_the_next_start(tmp_path, inputs):
    keep = tmp_path / "talking-earlier.mp4"
    keep.write_bytes(b"a finished video")
    with app_process("--output-dir", str(tmp_path), "--pipeline", "tests.app.helpers:EndlessPipeline") as app:
        app.wait_until_serving()
        _start_job(app.url, inputs)
        left = wait_for(lambda: _partial_videos(tmp_path), timeout=30)
        app.stop(signal.SIGKILL, timeout=30)
    assert len(left) == 1 and _partial_videos(tmp_path) == left
    with app_process("--output-dir", str(tmp_path)) as app:
        line = app.wait_for_line("partial video(s)")
        app.wait_until_serving()
    deleted = f"INFO serving: Deleted 1 partial video(s) left in {tmp_path} by an interrupted run\n"
    assert line.endswith(deleted)
    assert sorted(tmp_path.iterdir()) == [keep]
