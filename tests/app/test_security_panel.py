"""Attacks on the GPU controls of the running app: the Gradio API tools and the panel's own events.

Every state-changing control (offload, release, preheat, timeouts) must be refused without the
control token on a locked app, and from a foreign ``Origin`` on any app, whichever way it is
called: ``/gradio_api/call/<tool>``, ``/gradio_api/run/<tool>``, gradio_client, and the UI's
hidden event routes called directly (``/gradio_api/run/predict`` and ``/gradio_api/queue/join``
with the ``fn_index`` that ``/config`` lists). Reads stay open. (MCP: tests/app/test_mcp.py.)
"""

from __future__ import annotations

import html
import json
import re
import threading
import uuid
from typing import Any

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from gpu_control import GPUResourceManager

from .conftest import CONTROL_TOKEN, LiveApp
from .helpers import CHROMIUM, chromium_page, wait_for_message

LOCKED = (
    "GPU control is locked: send the control token (Authorization: Bearer <token>, "
    "or the token field of the GPU panel). Status and generation stay open."
)
FOREIGN = "Refused: this control request came from another site's page (its Origin is not this app's)."
BEARER = {"Authorization": f"Bearer {CONTROL_TOKEN}"}
EVIL = {"Origin": "https://evil.example"}
TOOLS = {"offload_gpu": [], "release_gpu": [], "update_gpu_timeout": [5, 7, False]}
PANEL_INPUTS = {
    "offload": lambda token: [token],
    "release": lambda token: [token],
    "preheat": lambda token: [token],
    "apply": lambda token: ["5", "7", False, token],
}


def state(live: LiveApp) -> tuple[Any, ...]:
    manager = live.manager
    status = manager.get_status()
    return (status["model_location"], status["counts"], manager.idle_timeout, manager.release_timeout)


def prepare(live: LiveApp, control: str) -> None:
    """Put the model where the control would change something: on the device (cached for preheat)."""
    live.manager.preheat()
    if control == "preheat":
        live.manager.force_offload()


def call_tool(url: str, tool: str, data: list[Any], headers: dict[str, str] | None = None) -> tuple[str, Any]:
    """``POST /gradio_api/call/<tool>`` then read its event stream: ("complete"|"error", data)."""
    posted = httpx.post(f"{url}/gradio_api/call/{tool}", json={"data": data}, headers=headers, timeout=10)
    assert posted.status_code == 200, posted.text
    event_id = posted.json()["event_id"]
    stream = httpx.get(f"{url}/gradio_api/call/{tool}/{event_id}", timeout=10).text
    found = re.findall(r"^event: (\w+)\ndata: (.*)$", stream, flags=re.MULTILINE)
    assert found, stream
    event, data = found[-1]
    return event, json.loads(data)


def panel_ids(url: str) -> dict[str, int]:
    """The panel's hidden event routes, by handler name, as ``/config`` lists them."""
    config = httpx.get(f"{url}/config", timeout=10).json()
    ids = {dep.get("api_name"): dep["id"] for dep in config["dependencies"]}
    names = ("offload", "release", "preheat", "apply", "refresh", "on_page_load")
    assert set(names) <= set(ids), sorted(ids)
    return {name: ids[name] for name in names}


def run_event(
    url: str, name: str, data: list[Any], headers: dict[str, str] | None = None, session: str | None = None
) -> list[Any]:
    """Call a panel event the way the page does (``POST /gradio_api/run/predict``); its outputs."""
    body = {"fn_index": panel_ids(url)[name], "data": data, "session_hash": session or uuid.uuid4().hex}
    answer = httpx.post(f"{url}/gradio_api/run/predict", json=body, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def queue_event(url: str, name: str, data: list[Any], headers: dict[str, str] | None = None) -> list[Any]:
    """Call a panel event through the queue (``/gradio_api/queue/join`` + ``/queue/data``)."""
    session = uuid.uuid4().hex
    body = {"fn_index": panel_ids(url)[name], "data": data, "session_hash": session}
    joined = httpx.post(f"{url}/gradio_api/queue/join", json=body, headers=headers, timeout=10)
    assert joined.status_code == 200, joined.text
    params = {"session_hash": session}
    with httpx.stream("GET", f"{url}/gradio_api/queue/data", params=params, timeout=30) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            message = json.loads(line[5:])
            if message.get("msg") == "process_completed":
                assert message["success"], message
                return message["output"]["data"]
    raise AssertionError("the queue never completed the event")


def sentence(message: str) -> str:
    """The panel message's sentence: without its UTC stamp and markup, unescaped."""
    return html.unescape(re.sub(r"<[^>]+>", "", message.split(" · ", 1)[1]))


# ---------------------------------------------------------------------------- the API tools


@pytest.mark.parametrize("tool", sorted(TOOLS))
@pytest.mark.parametrize(
    "headers", [None, {"Authorization": "Bearer wrong-token-0000"}], ids=["no-token", "wrong-token"]
)
def test_call_route_refuses_locked_tools_without_the_token(locked, tool, headers):
    prepare(locked, tool)
    before = state(locked)
    event, data = call_tool(locked.url, tool, TOOLS[tool], headers)
    assert (event, data["error"]) == ("error", LOCKED)
    assert state(locked) == before


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_call_route_obeys_the_bearer_token(locked, tool):
    prepare(locked, tool)
    before = state(locked)
    event, data = call_tool(locked.url, tool, TOOLS[tool], BEARER)
    assert event == "complete", data
    assert json.loads(data[0])["outcome"] == "done"
    assert state(locked) != before


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_run_route_refuses_locked_tools_with_a_sentence_not_a_server_error(locked, tool):
    prepare(locked, tool)
    before = state(locked)
    answer = httpx.post(f"{locked.url}/gradio_api/run/{tool}", json={"data": TOOLS[tool]}, timeout=10)
    assert 400 <= answer.status_code < 500, answer.text
    assert answer.json()["error"] == LOCKED
    assert state(locked) == before
    allowed = httpx.post(f"{locked.url}/gradio_api/run/{tool}", json={"data": TOOLS[tool]}, headers=BEARER)
    assert allowed.status_code == 200, allowed.text
    assert state(locked) != before


def test_gradio_client_needs_the_token_in_its_headers(locked):
    locked.manager.preheat()
    with pytest.raises(AppError) as refused:
        Client(locked.url, verbose=False).predict(api_name="/release_gpu")
    assert LOCKED in str(refused.value)
    assert locked.manager.get_status()["model_location"] == "gpu"
    answer = json.loads(Client(locked.url, verbose=False, headers=BEARER).predict(api_name="/release_gpu"))
    assert (answer["outcome"], answer["status"]["model_location"]) == ("done", "unloaded")


def test_status_stays_open_on_a_locked_app(locked):
    event, data = call_tool(locked.url, "get_gpu_status", [])
    assert event == "complete"
    assert json.loads(data[0])["model_location"] == "unloaded"


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_a_foreign_origin_cannot_use_the_tools_of_the_open_app(gated, tool):
    prepare(gated, tool)
    before = state(gated)
    event, data = call_tool(gated.url, tool, TOOLS[tool], EVIL)
    assert (event, data["error"]) == ("error", FOREIGN)
    answer = httpx.post(f"{gated.url}/gradio_api/run/{tool}", json={"data": TOOLS[tool]}, headers=EVIL)
    assert answer.json()["error"] == FOREIGN
    assert state(gated) == before
    event, _ = call_tool(gated.url, tool, TOOLS[tool], {"Origin": gated.url})
    assert event == "complete"


def test_update_gpu_timeout_without_a_value_is_a_sentence(gated):
    event, data = call_tool(gated.url, "update_gpu_timeout", [None, None, None])
    assert (event, data["error"]) == (
        "error",
        "timeout_seconds is required: a number of seconds from 0 to 2592000 (30 days), or never.",
    )
    assert gated.manager.idle_timeout == 60.0


# ------------------------------------------------------------------- the panel's own events


@pytest.mark.parametrize("control", sorted(PANEL_INPUTS))
@pytest.mark.parametrize("route", [run_event, queue_event], ids=["run-predict", "queue-join"])
def test_panel_events_called_directly_are_refused_without_the_token(locked, control, route):
    prepare(locked, control)
    before = state(locked)
    for token, answer in [
        ("", "Locked: enter the control token in the field above to "),
        ("wrong-token-0000", "Locked: the control token is not right, so nothing was done"),
    ]:
        _, message = route(locked.url, control, PANEL_INPUTS[control](token))
        assert sentence(message).startswith(answer)
        assert state(locked) == before


@pytest.mark.parametrize("control", sorted(PANEL_INPUTS))
@pytest.mark.parametrize(("token", "headers"), [(CONTROL_TOKEN, None), ("", BEARER)], ids=["typed", "header"])
def test_panel_events_obey_the_typed_token_or_the_header(locked, control, token, headers):
    prepare(locked, control)
    before = state(locked)
    _, message = run_event(locked.url, control, PANEL_INPUTS[control](token), headers)
    assert "gpc-refused" not in message
    assert state(locked) != before


@pytest.mark.parametrize("control", sorted(PANEL_INPUTS))
def test_panel_events_from_a_foreign_origin_are_refused_even_with_the_token(locked, gated, control):
    for live, token in ((locked, CONTROL_TOKEN), (gated, "")):
        prepare(live, control)
        before = state(live)
        _, message = run_event(live.url, control, PANEL_INPUTS[control](token), {**BEARER, **EVIL})
        assert sentence(message) == FOREIGN
        assert state(live) == before


def test_panel_reads_stay_open_on_a_locked_app(locked):
    locked.manager.preheat()
    page, idle, release, after_use = run_event(locked.url, "on_page_load", [])
    assert 'data-location="gpu"' in page
    assert (idle, release, after_use) == ("60", "never", True)
    assert 'data-location="gpu"' in run_event(locked.url, "refresh", [""])[0]


def test_the_page_shows_the_lock_and_the_token_field_only_when_locked(locked, gated):
    def components(url: str) -> dict[str, dict[str, Any]]:
        config = httpx.get(f"{url}/config", timeout=10).json()
        props = [component["props"] for component in config["components"]]
        return {prop["elem_id"]: prop for prop in props if prop.get("elem_id")}

    locked_page, open_page = components(locked.url), components(gated.url)
    assert locked_page["gpu-token"]["type"] == "password" and locked_page["gpu-token"]["visible"] is True
    assert "Control is locked" in locked_page["gpu-lock-note"]["value"]
    assert open_page["gpu-token"]["visible"] is False and open_page["gpu-lock-note"]["visible"] is False


# --------------------------------------------------------------------- bad timeouts, messages


@pytest.mark.parametrize(
    ("idle", "release", "needle"),
    [
        ("-5", "never", "Idle timeout must be 0 or more seconds"),
        ("abc", "never", "Idle timeout must be a number of seconds"),
        ("1e309", "never", "Idle timeout"),
        ("1e308", "never", "Idle timeout"),
        ("", "never", "Idle timeout is empty: type a number of seconds, or never."),
        ("60", "-1", "Release timeout must be 0 or more seconds"),
        ("60", "x" * 1_000_000, "characters)"),
    ],
)
def test_the_panel_answers_a_bad_timeout_with_a_sentence_and_changes_nothing(gated, idle, release, needle):
    gated.manager.update_timeout(120)
    _, message = run_event(gated.url, "apply", [idle, release, False, ""])
    text = sentence(message)
    assert needle in text and text.endswith("Nothing was changed.")
    assert len(text) < 300
    manager = gated.manager
    assert (manager.idle_timeout, manager.release_timeout, manager.offload_after_use) == (120.0, 0.0, True)


def test_the_panel_sets_never_only_when_asked(gated):
    _, message = run_event(gated.url, "apply", ["never", "never", True, ""])
    assert sentence(message) == (
        "Idle timeout set to never. Release timeout set to never. Offload after use turned on."
    )
    assert (gated.manager.idle_timeout, gated.manager.release_timeout) == (float("inf"), 0.0)


def hold(manager: GPUResourceManager) -> tuple[threading.Thread, threading.Event, list[BaseException]]:
    """A job holding the model's lease until the returned event is set (errors collected)."""
    inside, leave, errors = threading.Event(), threading.Event(), []

    def job() -> None:
        try:
            with manager.use():
                inside.set()
                if not leave.wait(15):
                    raise TimeoutError("the test never ended the job")
        except BaseException as error:  # checked by the test after join()
            errors.append(error)
            inside.set()

    worker = threading.Thread(target=job)
    worker.start()
    assert inside.wait(10)
    return worker, leave, errors


def test_the_message_line_reports_a_deferred_offload_once_the_job_ends(locked):
    locked.manager.preheat()
    session = uuid.uuid4().hex
    worker, leave, errors = hold(locked.manager)
    try:
        _, deferred = run_event(locked.url, "offload", [CONTROL_TOKEN], session=session)
        assert sentence(deferred).startswith("Deferred: the model is in use")
        assert run_event(locked.url, "refresh", [deferred], session=session)[1]["__type__"] == "update"
    finally:
        leave.set()
        worker.join(10)
    assert not worker.is_alive() and errors == []
    page, message = run_event(locked.url, "refresh", [deferred], session=session)
    assert 'data-location="cpu"' in page
    assert sentence(message).startswith("The deferred offload is done: the model is in the host cache (")


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs the system Chromium at /usr/bin/chromium")
def test_the_locked_panel_in_a_browser_asks_for_the_token_and_follows_a_deferred_offload(locked):
    with chromium_page(locked.url) as (page, errors):
        page.wait_for_selector('#gpu-status .gpc-panel[data-location="unloaded"]', timeout=30_000)
        assert page.is_visible("#gpu-lock-note .gpc-lock-waiting")
        before = state(locked)
        page.click("#gpu-preheat")
        assert "Locked: enter the control token in the field above to preheat." in wait_for_message(
            page, "Locked"
        )
        assert state(locked) == before

        page.fill("#gpu-token input", CONTROL_TOKEN)
        assert page.is_visible("#gpu-lock-note .gpc-lock-typed")
        assert not page.is_visible("#gpu-lock-note .gpc-lock-waiting")
        page.click("#gpu-preheat")
        wait_for_message(page, "kept until the idle timeout")

        worker, leave, job_errors = hold(locked.manager)
        try:
            page.click("#gpu-offload")
            wait_for_message(page, "Deferred: the model is in use")
        finally:
            leave.set()
            worker.join(10)
        assert not worker.is_alive() and job_errors == []
        assert "The deferred offload is done: the model is in the host cache" in wait_for_message(
            page, "The deferred offload is done"
        )
        page.fill("#gpu-idle-timeout input", "-5")
        page.click("#gpu-apply")
        assert "Idle timeout must be 0 or more seconds, not '-5'. Nothing was changed." in wait_for_message(
            page, "Nothing was changed"
        )
        assert locked.manager.idle_timeout == 60.0
    assert errors == []
