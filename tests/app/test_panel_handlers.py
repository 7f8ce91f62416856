"""The GPU panel's button and settings handlers, called as Gradio calls them (no browser)."""

from __future__ import annotations

import math
import threading

import gradio as gr
import pytest

from gpu_control import GPUResourceManager
from ui.gpu_panel import gpu_panel

from .helpers import GatedPipeline


@pytest.fixture()
def panel():
    pipeline = GatedPipeline()
    manager = GPUResourceManager(device="cpu", load_func=pipeline.load, auto_monitor=False)
    with gr.Blocks() as demo:
        gpu_panel(manager)
    handlers = {fn.name: fn.fn for fn in demo.fns.values()}
    yield manager, handlers
    manager.force_release()


def test_page_load_fills_the_settings_from_the_manager(panel):
    manager, handlers = panel
    manager.update_timeout(math.inf)
    manager.update_release_timeout(900)
    html, idle, release, after_use = handlers["on_page_load"]()
    assert 'data-location="unloaded"' in html
    assert (idle, release, after_use) == (None, 900.0, True)


def test_apply_sets_all_three_and_blank_idle_means_never(panel):
    manager, handlers = panel
    _, message = handlers["apply"](300, 600, False)
    assert "Idle timeout set to 300 s. Release timeout set to 600 s. Offload after use turned off." in message
    assert (manager.idle_timeout, manager.release_timeout, manager.offload_after_use) == (300.0, 600.0, False)
    handlers["apply"](None, None, True)
    assert (manager.idle_timeout, manager.release_timeout, manager.offload_after_use) == (math.inf, 0.0, True)


def test_apply_with_a_bad_value_raises_a_gradio_error_and_changes_nothing(panel):
    manager, handlers = panel
    with pytest.raises(gr.Error) as caught:
        handlers["apply"](30, -1, False)
    assert "Release timeout must be 0 or more seconds" in caught.value.message
    assert "Nothing was changed." in caught.value.message
    assert (manager.idle_timeout, manager.release_timeout, manager.offload_after_use) == (60.0, 0.0, True)


def test_preheat_offload_release_buttons_move_the_model(panel):
    _, handlers = panel
    html, message = handlers["preheat"]()
    assert 'data-location="gpu"' in html and "kept until the idle timeout" in message
    html, message = handlers["offload"]()
    assert 'data-location="cpu"' in html and "The model is in the host cache" in message
    html, message = handlers["release"]()
    assert 'data-location="unloaded"' in html and "The model is released" in message
    assert message.split(" · ")[0].endswith("UTC</span>")


def test_buttons_during_a_job_answer_at_once(panel):
    manager, handlers = panel
    inside, leave = threading.Event(), threading.Event()

    def job() -> None:
        with manager.use():
            inside.set()
            assert leave.wait(10)

    worker = threading.Thread(target=job)
    worker.start()
    try:
        assert inside.wait(10)
        assert "Nothing to do: a job is using the model" in handlers["preheat"]()[1]
        html, message = handlers["offload"]()
        assert "Deferred: the model is in use" in message
        assert "offload pending" in html and "Working on CPU" in html
        assert "Deferred: the model is in use" in handlers["release"]()[1]
    finally:
        leave.set()
        worker.join(10)
    assert not worker.is_alive()
    assert 'data-location="unloaded"' in handlers["current"]()
