"""The pool's GPU panel: a bar per device, a row per model, a model selector for the controls.

Attacks on the pool's panel tested here: every per-model control (offload, release, preheat,
timeouts) without the token, with a wrong one and from a foreign Origin, on each model and on
an unknown one (the token is checked before the name, so nothing about names leaks); model
names that are not in the pool (unknown, path-like, markup, 10 MB, a list, an object, a
number, true) answered with the pool's sentence, escaped, and nothing changed; a forged
message line naming an unknown model. The same controls over HTTP through the page's own
event route are in test_pool_app.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import gradio as gr
import pytest

from gpu_control import ControlAccess, GPUPool, GPUResourceManager
from gpu_control_gradio.gpu_panel import gpu_panel, render_pool

from .helpers import Job
from .pool_app_helpers import (
    FOREIGN,
    SAME_ORIGIN,
    TOKEN,
    TWO_CARDS,
    UNKNOWN,
    make_pool,
    ready_for,
    rows,
    snapshot,
    text_of,
    where,
)

# ---------------------------------------------------------------------------- the panel's handlers


def build_panel(access: ControlAccess | None = None, pool_args: dict[str, Any] | None = None):
    pool, pipelines = make_pool(**(pool_args or {}))
    with gr.Blocks() as demo:
        panel = gpu_panel(
            pool["alpha"], pool=pool, access=access, load_funcs={n: p.load for n, p in pipelines.items()}
        )
    return pool, {fn.name: fn.fn for fn in demo.fns.values()}, panel


@pytest.fixture()
def pool_panel() -> Iterator[tuple[GPUPool, dict[str, Any]]]:
    pool, handlers, _ = build_panel()
    yield pool, handlers
    pool.close()


@pytest.fixture()
def locked_pool_panel() -> Iterator[tuple[GPUPool, dict[str, Any]]]:
    pool, handlers, _ = build_panel(ControlAccess(TOKEN))
    yield pool, handlers
    pool.close()


def test_the_panel_shows_a_bar_per_device_a_row_per_model_and_selects_the_default(pool_panel):
    pool, handlers = pool_panel
    pool["beta"].update_timeout(math.inf)
    overview, card, idle, release, after_use = handlers["on_page_load"]()
    assert re.findall(r'data-device="([^"]+)"', overview) == TWO_CARDS
    assert rows(overview) == {"alpha": "unloaded", "beta": "unloaded"}
    assert 'class="gpc-model gpc-selected" data-model="alpha"' in overview
    assert 'data-location="unloaded"' in card and "alpha · emulated:0" in card
    assert "GPU memory" not in card  # the device bars stand for it
    assert (idle, release, after_use) == ("60", "never", True)
    overview, card, idle, release, after_use, message = handlers["on_select"]("beta")
    assert 'class="gpc-model gpc-selected" data-model="beta"' in overview
    assert "beta · " in card
    assert (idle, release, after_use, message) == ("never", "never", True, gr.skip())


def test_preheat_offload_and_release_act_on_the_selected_model_only(pool_panel):
    pool, handlers = pool_panel
    overview, card, message = handlers["preheat"]("beta", "", SAME_ORIGIN)
    assert where(pool) == {"alpha": "unloaded", "beta": "gpu"}
    assert rows(overview) == {"alpha": "unloaded", "beta": "gpu"}
    assert 'data-location="gpu"' in card
    assert text_of(message).startswith("beta: The model is on ")
    assert 'data-model="beta"' in message
    _, card, message = handlers["offload"]("beta", "", SAME_ORIGIN)
    assert where(pool) == {"alpha": "unloaded", "beta": "cpu"}
    assert text_of(message).startswith("beta: The model is in the host cache")
    _, _, message = handlers["release"]("beta", "", SAME_ORIGIN)
    assert where(pool) == {"alpha": "unloaded", "beta": "unloaded"}
    assert pool["beta"].get_status()["counts"]["loads"] == 1
    assert pool["alpha"].get_status()["counts"] == {
        "loads": 0,
        "restores": 0,
        "offloads": 0,
        "releases": 0,
        "uses": 0,
    }


def test_apply_sets_the_selected_models_timeouts_only(pool_panel):
    pool, handlers = pool_panel
    _, _, message = handlers["apply"]("beta", "300", "600", False, "", SAME_ORIGIN)
    assert text_of(message) == (
        "beta: Idle timeout set to 300 s. Release timeout set to 600 s. Offload after use turned off."
    )
    assert (pool["beta"].idle_timeout, pool["beta"].release_timeout, pool["beta"].offload_after_use) == (
        300.0,
        600.0,
        False,
    )
    assert (pool["alpha"].idle_timeout, pool["alpha"].release_timeout, pool["alpha"].offload_after_use) == (
        60.0,
        0.0,
        True,
    )
    _, _, message = handlers["apply"]("alpha", "-5", "0", True, "", SAME_ORIGIN)
    assert text_of(message).startswith("alpha: Idle timeout must be 0 or more seconds")
    assert text_of(message).endswith("Nothing was changed.")


@pytest.mark.parametrize("model", ["", None])
def test_an_empty_model_means_the_default_one(pool_panel, model):
    pool, handlers = pool_panel
    handlers["preheat"](model, "", SAME_ORIGIN)
    assert where(pool) == {"alpha": "gpu", "beta": "unloaded"}


ODD_MODELS = {
    "unknown": ("gamma", "'gamma'"),
    "path": ("../alpha", "'../alpha'"),
    "case": ("ALPHA", "'ALPHA'"),
    "markup": ("<script>alert(1)</script>", "'<script>alert(1)</script>'"),
    "huge": ("b" * 10_000_000, None),
    "list": (["alpha"], None),
    "object": ({"name": "alpha"}, None),
    "number": (5, "5"),
    "true": (True, "True"),
}


@pytest.mark.parametrize("control", ["offload", "release", "preheat", "apply"])
@pytest.mark.parametrize("odd", sorted(ODD_MODELS))
def test_a_model_not_in_the_pool_is_refused_in_words_and_nothing_changes(pool_panel, control, odd):
    pool, handlers = pool_panel
    pool["alpha"].preheat()
    pool["beta"].preheat()
    pool["beta"].force_offload()
    before = snapshot(pool)
    model, shown = ODD_MODELS[odd]
    if control == "apply":
        overview, card, message = handlers["apply"](model, "5", "7", False, "", SAME_ORIGIN)
    else:
        overview, card, message = handlers[control](model, "", SAME_ORIGIN)
    sentence = text_of(message)
    assert sentence.startswith("No model named ")
    assert sentence.endswith("in the pool; known models: 'alpha', 'beta'. Nothing was done.")
    if shown is not None:
        assert sentence == UNKNOWN.format(shown) + " Nothing was done."
    assert len(message) < 600 and "<script>" not in message
    assert 'class="gpc-refused"' in message and "data-model" not in message
    assert snapshot(pool) == before
    assert rows(overview) == {"alpha": "gpu", "beta": "cpu"}
    assert 'data-location="gpu"' in card  # the default model's card


def test_selecting_or_refreshing_an_unknown_model_says_so_and_changes_nothing(pool_panel):
    pool, handlers = pool_panel
    overview, card, idle, release, after_use, message = handlers["on_select"]("<b>gamma</b>")
    assert text_of(message) == UNKNOWN.format("'<b>gamma</b>'")
    assert (idle, release, after_use) == (gr.skip(), gr.skip(), gr.skip())
    assert "<b>gamma" not in card and "&lt;b&gt;gamma" in card
    assert rows(overview) == {"alpha": "unloaded", "beta": "unloaded"}
    overview, card, _ = handlers["refresh"]("gamma", "")
    assert "known models: &#x27;alpha&#x27;, &#x27;beta&#x27;" in card
    assert where(pool) == {"alpha": "unloaded", "beta": "unloaded"}




def test_the_message_follows_a_deferred_offload_of_the_model_it_names_whatever_is_selected(pool_panel):
    pool, handlers = pool_panel
    pool["beta"].preheat()
    with Job(pool["beta"]) as job:
        overview, _, deferred = handlers["offload"]("beta", "", SAME_ORIGIN)
        assert text_of(deferred).startswith("beta: Deferred: the model is in use")
        assert 'data-model="beta" data-watch="offload"' in deferred
        assert handlers["refresh"]("alpha", deferred)[2] == gr.skip()
        job.end()
    overview, card, message = handlers["refresh"]("alpha", deferred)
    assert text_of(message).startswith("beta: The deferred offload is done: the model is in the host cache (")
    assert rows(overview) == {"alpha": "unloaded", "beta": "cpu"}
    assert 'data-location="unloaded"' in card  # alpha's card: the selection did not move
    forged = deferred.replace('data-model="beta"', 'data-model="gamma"')
    assert handlers["refresh"]("alpha", forged)[2] == ""


def test_the_overview_shows_an_eviction_on_a_shared_card():
    pool, handlers, _ = build_panel(pool_args={"devices": ["emulated:0"], "budget_gb": 400 / 2**30})
    try:
        handlers["preheat"]("alpha", "", SAME_ORIGIN)
        overview, _, message = handlers["preheat"]("beta", "", SAME_ORIGIN)
        assert text_of(message).startswith("beta: The model is on ")
        assert rows(overview) == {"alpha": "cpu", "beta": "gpu"}
        assert re.search(
            r'data-device="emulated:0"><div class="gpc-row"><span><b>emulated:0</b> · beta</span>', overview
        )
        assert 'style="width:72.0%"' in overview  # 288 of 400 bytes
    finally:
        pool.close()


CONTROLS = {
    "offload": lambda handlers, model, token, request: handlers["offload"](model, token, request),
    "release": lambda handlers, model, token, request: handlers["release"](model, token, request),
    "preheat": lambda handlers, model, token, request: handlers["preheat"](model, token, request),
    "apply": lambda handlers, model, token, request: handlers["apply"](
        model, "5", "7", False, token, request
    ),
}


@pytest.mark.parametrize("control", sorted(CONTROLS))
@pytest.mark.parametrize("model", ["alpha", "beta", "gamma"])
@pytest.mark.parametrize(
    ("token", "request_", "answer"),
    [
        ("", SAME_ORIGIN, "Locked: enter the control token in the field above to "),
        (None, None, "Locked: enter the control token"),
        ("wrong-token-000000", SAME_ORIGIN, "Locked: the control token is not right, so nothing was done"),
        (TOKEN, FOREIGN, "Refused: this control request came from another site's page"),
    ],
)
def test_a_locked_pool_panel_refuses_every_control_on_every_model_before_looking_at_the_name(
    locked_pool_panel, control, model, token, request_, answer
):
    pool, handlers = locked_pool_panel
    ready_for(pool, control)
    before = snapshot(pool)
    _, _, message = CONTROLS[control](handlers, model, token, request_)
    assert text_of(message).startswith(answer)
    assert "known models" not in message and "data-model" not in message
    assert 'class="gpc-refused"' in message
    assert snapshot(pool) == before


@pytest.mark.parametrize("control", sorted(CONTROLS))
def test_a_locked_pool_panel_obeys_the_token_on_the_chosen_model_only(locked_pool_panel, control):
    pool, handlers = locked_pool_panel
    ready_for(pool, control)
    before = snapshot(pool)
    _, _, message = CONTROLS[control](handlers, "beta", TOKEN, SAME_ORIGIN)
    assert "gpc-refused" not in message and text_of(message).startswith("beta: ")
    after = snapshot(pool)
    assert after["alpha"] == before["alpha"]
    assert after["beta"] != before["beta"]


def test_reads_stay_open_on_a_locked_pool_panel(locked_pool_panel):
    pool, handlers = locked_pool_panel
    pool["beta"].preheat()
    assert rows(handlers["on_page_load"]()[0]) == {"alpha": "unloaded", "beta": "gpu"}
    assert 'data-location="gpu"' in handlers["refresh"]("beta", "")[1]
    assert handlers["on_select"]("beta")[1:5] == (handlers["refresh"]("beta", "")[1], "60", "never", True)


def test_the_panel_selects_its_managers_model_first_and_preheats_with_the_given_load_functions():
    pool, pipelines = make_pool()
    loads: list[str] = []

    def beta_load() -> Any:
        loads.append("beta")
        return pipelines["beta"].load()

    try:
        with gr.Blocks() as demo:
            panel = gpu_panel(pool["beta"], pool=pool, load_funcs={"beta": beta_load})
        handlers = {fn.name: fn.fn for fn in demo.fns.values()}
        assert panel.model.value == "beta"
        assert 'class="gpc-model gpc-selected" data-model="beta"' in handlers["on_page_load"]()[0]
        handlers["preheat"]("beta", "", SAME_ORIGIN)
        handlers["preheat"]("alpha", "", SAME_ORIGIN)
        assert loads == ["beta"]
        assert (pipelines["alpha"].loads, pipelines["beta"].loads) == (1, 1)
        assert where(pool) == {"alpha": "gpu", "beta": "gpu"}
    finally:
        pool.close()


def test_a_pool_panel_needs_a_model():
    with gr.Blocks(), pytest.raises(ValueError, match="The pool has no model"):
        gpu_panel(GPUResourceManager(device="cpu", auto_monitor=False), pool=GPUPool(devices=["emulated:0"]))


def test_render_pool_escapes_what_it_shows_and_lists_the_waiting_queue():
    status = {
        "devices": [
            {"device": "<i>card</i>", "budget_gb": 2.0, "used_gb": 1.5, "free_gb": 0.5, "models": ["a<b"]}
        ],
        "host": {"budget_gb": 8.0, "used_gb": 1.0},
        "models": {
            "a<b": {
                "model_location": "gpu",
                "device": "<i>card</i>",
                "model_size_gb": 1.5,
                "in_use": 2,
                "priority": 3,
                "transition": None,
            },
            "c": {
                "model_location": "cpu",
                "device": "<i>card</i>",
                "model_size_gb": 0.5,
                "in_use": 0,
                "priority": 0,
                "transition": None,
                "auto_release_in": 47.2,
            },
        },
        "waiting": [{"model": "c", "priority": 0, "device": None, "needed_gb": 0.5, "waited_s": 3.2}],
    }
    page = render_pool(status, "c")
    assert "<i>" not in page and "a<b" not in page and "&lt;i&gt;card&lt;/i&gt;" in page
    assert 'style="width:75.0%"' in page
    assert "timers wait for its jobs" in page and "release in 48 s" in page
    assert '<span class="gpc-chip gpc-busy">in use · 2</span>' in page and "priority 0 · idle" in page
    assert "c waits for 0.50 GB on any device (priority 0, for 3 s)" in page
    assert '<div class="gpc-model gpc-selected" data-model="c" data-location="cpu"' in page
