"""The GPU panel's button and settings handlers, called as Gradio calls them (no browser)."""

from __future__ import annotations

import html
import math
import re
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pytest

from gpu_control import ControlAccess, GPUResourceManager
from gpu_control_gradio.gpu_panel import MESSAGE_TTL_S, gpu_panel

from ..gpu_control.sync import Worker
from .helpers import GatedPipeline, Job

TOKEN = "panel-token-0123456"
SAME_ORIGIN = SimpleNamespace(headers={"host": "127.0.0.1:7860", "origin": "http://127.0.0.1:7860"})
FOREIGN = SimpleNamespace(headers={"host": "127.0.0.1:7860", "origin": "https://evil.example"})
BEARER = SimpleNamespace(headers={"host": "127.0.0.1:7860", "authorization": f"Bearer {TOKEN}"})


def build(access: ControlAccess | None = None, load_func: Callable[[], Any] | None = None):
    pipeline = GatedPipeline()
    manager = GPUResourceManager(device="cpu", load_func=load_func or pipeline.load, auto_monitor=False)
    with gr.Blocks() as demo:
        gpu_panel(manager, access=access)
    return manager, {fn.name: fn.fn for fn in demo.fns.values()}, demo


@pytest.fixture()
def panel() -> Iterator[tuple[GPUResourceManager, dict[str, Any]]]:
    manager, handlers, _ = build()
    yield manager, handlers
    manager.force_release()


@pytest.fixture()
def locked_panel() -> Iterator[tuple[GPUResourceManager, dict[str, Any]]]:
    manager, handlers, _ = build(ControlAccess(TOKEN))
    yield manager, handlers
    manager.force_release()




def settings(manager: GPUResourceManager) -> tuple[float, float, bool]:
    return (manager.idle_timeout, manager.release_timeout, manager.offload_after_use)


def text_of(message: str) -> str:
    """The message line's sentence: without its UTC stamp and markup, unescaped."""
    return html.unescape(re.sub(r"<[^>]+>", "", message.split(" · ", 1)[1]))


def test_page_load_fills_the_settings_from_the_manager(panel):
    manager, handlers = panel
    manager.update_timeout(math.inf)
    manager.update_release_timeout(900)
    html, idle, release, after_use = handlers["on_page_load"]()
    assert 'data-location="unloaded"' in html
    assert (idle, release, after_use) == ("never", "900", True)
    manager.update_timeout(2.5)
    manager.update_release_timeout(0)
    assert handlers["on_page_load"]()[1:] == ("2.5", "never", True)


def test_apply_sets_all_three_and_never_only_when_typed(panel):
    manager, handlers = panel
    _, message = handlers["apply"]("300", " 600 ", False, "", SAME_ORIGIN)
    assert text_of(message) == (
        "Idle timeout set to 300 s. Release timeout set to 600 s. Offload after use turned off."
    )
    assert settings(manager) == (300.0, 600.0, False)
    assert "data-watch" not in message
    _, message = handlers["apply"]("Never", "never", True, "", SAME_ORIGIN)
    assert "Idle timeout set to never. Release timeout set to never." in message
    assert settings(manager) == (math.inf, 0.0, True)


@pytest.mark.parametrize(
    ("idle", "release", "needle"),
    [
        ("-5", "0", "Idle timeout must be 0 or more seconds"),
        ("abc", "0", "Idle timeout must be a number of seconds"),
        ("1e309", "0", "Idle timeout"),
        ("1e308", "0", "Idle timeout"),
        ("", "0", "Idle timeout is empty: type a number of seconds, or never."),
        (None, "0", "Idle timeout is empty"),
        ("60", "-1", "Release timeout must be 0 or more seconds"),
        ("60", "inf", "Release timeout"),
        ("60", "forever", "Release timeout must be a number of seconds"),
        ("60", "2592001", "Release timeout"),
        ("60", "", "Release timeout is empty"),
        ("9" * 10_000_000, "0", "characters)"),
    ],
)
def test_apply_with_a_bad_timeout_says_so_and_changes_nothing(panel, idle, release, needle):
    manager, handlers = panel
    manager.update_timeout(120)
    html, message = handlers["apply"](idle, release, False, "", SAME_ORIGIN)
    sentence = text_of(message)
    assert needle in sentence
    assert sentence.endswith("Nothing was changed.")
    assert len(sentence) < 300
    assert 'class="gpc-failed"' in message
    assert settings(manager) == (120.0, 0.0, True)
    assert 'data-location="unloaded"' in html


def test_the_limits_themselves_are_accepted(panel):
    manager, handlers = panel
    _, message = handlers["apply"]("0", "2592000", True, "", SAME_ORIGIN)
    assert "Nothing was changed" not in message
    assert settings(manager) == (0.0, 2592000.0, True)


def test_preheat_offload_release_buttons_move_the_model(panel):
    _, handlers = panel
    html, message = handlers["preheat"]("", SAME_ORIGIN)
    assert 'data-location="gpu"' in html and "kept until the idle timeout" in message
    html, message = handlers["offload"]("", SAME_ORIGIN)
    assert 'data-location="cpu"' in html and "The model is in the host cache" in message
    assert "data-watch" not in message
    html, message = handlers["release"]("", SAME_ORIGIN)
    assert 'data-location="unloaded"' in html and "The model is released" in message
    assert re.fullmatch(r"\d\d:\d\d:\d\d UTC", re.sub(r"<[^>]+>", "", message.split(" · ")[0]))


def test_buttons_during_a_job_answer_at_once_and_the_message_follows_the_deferred_offload(panel):
    manager, handlers = panel
    manager.preheat()
    with Job(manager) as job:
        html, deferred = handlers["offload"]("", SAME_ORIGIN)
        assert "Deferred: the model is in use" in deferred
        assert "offload pending" in html and "Working on CPU" in html
        assert 'data-watch="offload"' in deferred
        assert handlers["refresh"](deferred)[1] == gr.skip()
        job.end()
    html, message = handlers["refresh"](deferred)
    assert 'data-location="cpu"' in html
    assert text_of(message).startswith("The deferred offload is done: the model is in the host cache (")
    assert "data-watch" not in message
    assert handlers["refresh"](message)[1] == gr.skip()


def test_the_message_follows_a_deferred_release(panel):
    manager, handlers = panel
    manager.preheat()
    with Job(manager) as job:
        _, deferred = handlers["release"]("", SAME_ORIGIN)
        assert "Deferred: the model is in use" in deferred
        job.end()
    html, message = handlers["refresh"](deferred)
    assert 'data-location="unloaded"' in html
    assert text_of(message).startswith("The deferred release is done: the model is released (")


def test_an_offload_overtaken_by_a_release_says_so(panel):
    manager, handlers = panel
    manager.preheat()
    with Job(manager) as job:
        _, deferred = handlers["offload"]("", SAME_ORIGIN)
        manager.force_release()
        job.end()
    _, message = handlers["refresh"](deferred)
    assert text_of(message) == "The deferred offload was overtaken by a release: the model is released."


def test_preheat_during_a_deferred_release_cancels_it_and_the_message_says_so(panel):
    manager, handlers = panel
    manager.preheat()
    with Job(manager) as job:
        _, deferred = handlers["release"]("", SAME_ORIGIN)
        _, preheat_message = handlers["preheat"]("", SAME_ORIGIN)
        assert text_of(preheat_message).startswith("Preheat cancelled the pending release")
        assert "data-watch" not in preheat_message
        job.end()
    _, message = handlers["refresh"](deferred)
    assert text_of(message) == (
        "The deferred release did not happen (cancelled, e.g. by Preheat); the model is on the device."
    )
    assert manager.get_status()["model_location"] == "gpu"


def test_a_deferred_release_stopped_by_a_failed_load_says_so():
    started, finish = threading.Event(), threading.Event()

    def failing_load() -> Any:
        started.set()
        assert finish.wait(10)
        raise OSError("disk gone")

    manager, handlers, _ = build(load_func=failing_load)
    loader = Worker(manager.get_model)
    loader.start()
    try:
        assert started.wait(10)
        _, deferred = handlers["release"]("", SAME_ORIGIN)
        assert text_of(deferred) == "Deferred: the model is loading; the release follows."
    finally:
        finish.set()
        loader.join(10)
    assert not loader.is_alive() and type(loader.error).__name__ == "LoadError"
    _, message = handlers["refresh"](deferred)
    assert text_of(message) == (
        "The deferred release did not happen: an error came first (see Last error above)."
    )
    assert 'class="gpc-failed"' in message


def test_preheat_while_the_model_loads_answers_at_once():
    started, finish = threading.Event(), threading.Event()

    def slow_load() -> Any:
        started.set()
        assert finish.wait(10)
        return GatedPipeline().load()

    manager, handlers, _ = build(load_func=slow_load)
    loader = Worker(manager.get_model)
    loader.start()
    try:
        assert started.wait(10)
        html, message = handlers["preheat"]("", SAME_ORIGIN)
        assert text_of(message) == "Already loading: the model will be on the device in a moment."
        assert 'data-transition="loading"' in html
    finally:
        finish.set()
        loader.join(10)
    assert not loader.is_alive() and loader.error is None
    assert manager.get_status()["counts"]["loads"] == 1
    manager.force_release()


def test_an_old_message_is_cleared_by_the_refresh(panel):
    _, handlers = panel
    _, message = handlers["offload"]("", SAME_ORIGIN)
    assert handlers["refresh"](message)[1] == gr.skip()
    shown_at = float(re.search(r'data-at="([0-9.]+)"', message)[1])
    old = message.replace(f'data-at="{shown_at:.3f}"', f'data-at="{shown_at - MESSAGE_TTL_S - 1:.3f}"')
    assert old != message
    assert handlers["refresh"](old)[1] == ""
    assert handlers["refresh"]("")[1] == gr.skip()
    assert handlers["refresh"](None)[1] == gr.skip()
    assert handlers["refresh"]("<b>not a panel message</b>")[1] == ""
    assert handlers["refresh"]("x" * 10_000_000)[1] == ""


def test_the_open_panel_hides_the_token_field_and_the_lock_note():
    _, _, demo = build()
    token = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "gpu-token")
    note = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "gpu-lock-note")
    assert (token.type, token.visible, note.visible) == ("password", False, False)
    _, _, locked_demo = build(ControlAccess(TOKEN))
    blocks = {getattr(block, "elem_id", None): block for block in locked_demo.blocks.values()}
    assert blocks["gpu-token"].visible and blocks["gpu-lock-note"].visible
    assert "Control is locked" in blocks["gpu-lock-note"].value


CONTROLS = {
    "offload": lambda handlers, token, request: handlers["offload"](token, request),
    "release": lambda handlers, token, request: handlers["release"](token, request),
    "preheat": lambda handlers, token, request: handlers["preheat"](token, request),
    "apply": lambda handlers, token, request: handlers["apply"]("5", "7", False, token, request),
}


def snapshot(manager: GPUResourceManager) -> tuple[Any, ...]:
    status = manager.get_status()
    return (status["model_location"], status["counts"], settings(manager))


@pytest.mark.parametrize("control", sorted(CONTROLS))
@pytest.mark.parametrize(
    ("token", "request_", "answer"),
    [
        ("", SAME_ORIGIN, "Locked: enter the control token in the field above to "),
        (None, None, "Locked: enter the control token"),
        ("wrong-token-000000", SAME_ORIGIN, "Locked: the control token is not right, so nothing was done"),
        (TOKEN, FOREIGN, "Refused: this control request came from another site's page"),
    ],
)
def test_a_locked_panel_refuses_every_control_without_the_token(
    locked_panel, control, token, request_, answer
):
    manager, handlers = locked_panel
    manager.preheat()
    before = snapshot(manager)
    html, message = CONTROLS[control](handlers, token, request_)
    assert text_of(message).startswith(answer)
    assert 'class="gpc-refused"' in message
    assert snapshot(manager) == before
    assert "data-watch" not in message
    assert 'data-location="gpu"' in html


@pytest.mark.parametrize("control", sorted(CONTROLS))
@pytest.mark.parametrize(("token", "request_"), [(TOKEN, SAME_ORIGIN), (f"  {TOKEN} ", None), ("", BEARER)])
def test_a_locked_panel_obeys_the_token_typed_or_in_the_header(locked_panel, control, token, request_):
    manager, handlers = locked_panel
    manager.preheat()
    if control == "preheat":
        manager.force_offload()
    before = snapshot(manager)
    _, message = CONTROLS[control](handlers, token, request_)
    assert "gpc-refused" not in message
    assert snapshot(manager) != before


def test_reads_stay_open_on_a_locked_panel(locked_panel):
    manager, handlers = locked_panel
    manager.preheat()
    assert 'data-location="gpu"' in handlers["on_page_load"]()[0]
    assert 'data-location="gpu"' in handlers["refresh"]("")[0]


def test_an_open_panel_still_refuses_a_foreign_origin(panel):
    manager, handlers = panel
    manager.preheat()
    _, message = handlers["release"]("", FOREIGN)
    assert "another site" in message
    assert manager.get_status()["model_location"] == "gpu"
