"""The app around a `GPUPool`: settings, the model selector of the form, and the pool's GPU panel.

``python app.py`` always builds a pool (``GPU_DEVICES`` … ``GPU_WAIT_TIMEOUT``; ``--pipeline``
repeatable); `create_app` with a pool of two small models on two emulated cards serves a
panel with a bar per device, a row per model and a model selector for the controls, and a
form whose jobs run through the chosen model's manager.

Attacks on the pool's panel tested here: every per-model control (offload, release, preheat,
timeouts) without the token, with a wrong one and from a foreign Origin, on each model and on
an unknown one (the token is checked before the name, so nothing about names leaks); model
names that are not in the pool (unknown, path-like, markup, 10 MB, a list, an object, a
number, true) answered with the pool's sentence, escaped, and nothing changed; a forged
message line naming an unknown model; the same controls over HTTP through the page's own
event route (``/gradio_api/run/predict``) with the ``fn_index`` that ``/config`` lists.
"""

from __future__ import annotations

import html
import json
import math
import re
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import gradio as gr
import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from app import ConfigError, create_app, load_config, main
from app_pool import PipelineSpec, build_pool, describe_pool, load_pipelines
from gpu_control import ControlAccess, GPUPool, GPUResourceManager, InvalidSetting, Settings
from gpu_control.gradio.gpu_panel import gpu_panel, render_pool
from gpu_control.pool_devices import PoolSettings
from ui.blocks import build_demo
from ui.generate import make_generate_fn

from .conftest import CONTROL_TOKEN
from .helpers import GatedPipeline, app_process, serve
from .test_mcp import call, data_uri, with_session
from .test_security_panel import run_event

TOKEN = "pool-panel-token-0123"
SAME_ORIGIN = SimpleNamespace(headers={"host": "127.0.0.1:7860", "origin": "http://127.0.0.1:7860"})
FOREIGN = SimpleNamespace(headers={"host": "127.0.0.1:7860", "origin": "https://evil.example"})
TWO_CARDS = ["emulated:0", "emulated:1"]
UNKNOWN = "No model named {} in the pool; known models: 'alpha', 'beta'."


class NamedPipeline(GatedPipeline):
    """`GatedPipeline` under another name (a model of the pool)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


class BadlyNamedPipeline(GatedPipeline):
    name = "two words"


def alpha_pipeline() -> NamedPipeline:
    return NamedPipeline("alpha")


def beta_pipeline() -> NamedPipeline:
    return NamedPipeline("beta")


POOL_ENV = (
    "GPU_DEVICES",
    "GPU_BUDGET_GB",
    "GPU_RESERVE_GB",
    "GPU_HOST_BUDGET_GB",
    "GPU_WAIT_TIMEOUT",
    "GPU_DEVICE",
)
HERE = "tests.app.test_pool_app"


def make_pool(
    devices: list[str] | None = None, budget_gb: float = 1.0
) -> tuple[GPUPool, dict[str, NamedPipeline]]:
    pool = GPUPool(devices=devices or TWO_CARDS, budget_gb=budget_gb, wait_timeout=10)
    pipelines = {"alpha": alpha_pipeline(), "beta": beta_pipeline()}
    for name, pipeline in pipelines.items():
        pool.add(name, pipeline.load)
    return pool, pipelines


def text_of(message: str) -> str:
    """The message line's sentence: without its UTC stamp and markup, unescaped."""
    return html.unescape(re.sub(r"<[^>]+>", "", message.split(" · ", 1)[1]))


def where(pool: GPUPool) -> dict[str, str]:
    return {name: pool[name].get_status()["model_location"] for name in pool.names()}


def snapshot(pool: GPUPool) -> dict[str, Any]:
    """Each model's location, counts and timeouts: what a refused control must leave as it was."""
    shot = {}
    for name in pool.names():
        manager = pool[name]
        status = manager.get_status()
        shot[name] = (
            status["model_location"],
            status["counts"],
            manager.idle_timeout,
            manager.release_timeout,
            manager.offload_after_use,
        )
    return shot


def rows(overview: str) -> dict[str, str]:
    """The overview's model rows: {name: location}."""
    return dict(
        re.findall(r'<div class="gpc-model[^"]*" data-model="([^"]+)" data-location="([^"]+)"', overview)
    )


# ---------------------------------------------------------------------------- settings


def test_defaults_build_a_pool_of_the_builtin_pipeline_on_the_auto_devices():
    config = load_config([], {})
    assert config.pipelines == () and config.pipeline is None
    assert config.pool == PoolSettings()


def test_the_pool_variables_are_read():
    env = {
        "GPU_DEVICES": "emulated:0,emulated:1",
        "GPU_BUDGET_GB": "emulated:0=2,emulated:1=3",
        "GPU_RESERVE_GB": "0.5",
        "GPU_HOST_BUDGET_GB": "4",
        "GPU_WAIT_TIMEOUT": "30",
    }
    assert load_config([], env).pool == PoolSettings(
        devices="emulated:0,emulated:1",
        budget_gb="emulated:0=2,emulated:1=3",
        reserve_gb=0.5,
        host_budget_gb=4.0,
        wait_timeout=30.0,
    )


def test_gpu_device_picks_the_one_device_unless_gpu_devices_is_set_and_the_flag_wins_over_both():
    assert load_config([], {"GPU_DEVICE": "cpu"}).pool.devices == "cpu"
    assert load_config([], {"GPU_DEVICE": "auto"}).pool.devices is None
    both = {"GPU_DEVICE": "cpu", "GPU_DEVICES": "emulated:0,emulated:1"}
    assert load_config([], both).pool.devices == "emulated:0,emulated:1"
    assert load_config(["--device", "cpu"], both).pool.devices == "cpu"


def test_pipeline_is_repeatable_with_or_without_a_name():
    config = load_config(["--pipeline", "a=pkg.mod:make", "--pipeline", " pkg.other:Thing "], {})
    assert config.pipelines == (PipelineSpec("pkg.mod:make", "a"), PipelineSpec("pkg.other:Thing"))
    assert config.pipeline == "pkg.mod:make"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (
            [],
            {"GPU_DEVICES": "tpu"},
            "GPU_DEVICES: Unknown device 'tpu': use cuda, cuda:N, cpu or emulated:N.",
        ),
        ([], {"GPU_DEVICES": "emulated:0,emulated:0"}, "GPU_DEVICES: Device emulated:0 is named twice"),
        ([], {"GPU_DEVICES": "cpu,emulated:0"}, "GPU_DEVICES: devices mixes emulated and real devices"),
        ([], {"GPU_BUDGET_GB": "lots"}, "GPU_BUDGET_GB must be a number of GiB"),
        ([], {"GPU_BUDGET_GB": "-1"}, "GPU_BUDGET_GB must be 0 or more GiB, not '-1'."),
        ([], {"GPU_BUDGET_GB": "0"}, "GPU_BUDGET_GB must be more than 0 GiB (at least one byte), not '0'."),
        (
            [],
            {"GPU_DEVICES": "emulated:0", "GPU_BUDGET_GB": "emulated:3=1"},
            "GPU_BUDGET_GB names 'emulated:3', which is not one of the pool's devices (emulated:0).",
        ),
        ([], {"GPU_RESERVE_GB": "some"}, "GPU_RESERVE_GB must be a number of GiB"),
        (
            [],
            {"GPU_DEVICES": "emulated:0", "GPU_RESERVE_GB": "30"},
            "GPU_RESERVE_GB=30 leaves no room on emulated:0 (24.0 GiB): lower it or give GPU_BUDGET_GB.",
        ),
        ([], {"GPU_HOST_BUDGET_GB": "0"}, "GPU_HOST_BUDGET_GB must be more than 0 GiB (at least one byte), not '0'."),
        ([], {"GPU_WAIT_TIMEOUT": "inf"}, "GPU_WAIT_TIMEOUT must be a finite number of seconds, not 'inf'."),
        ([], {"GPU_WAIT_TIMEOUT": "-1"}, "GPU_WAIT_TIMEOUT must be 0 or more seconds, not '-1'."),
        (["--pipeline", "two words=pkg.mod:make"], {}, "--pipeline 'two words=pkg.mod:make': the model name"),
        (
            ["--pipeline", "=pkg.mod:make"],
            {},
            "--pipeline '=pkg.mod:make': the model name before '=' must be",
        ),
        (
            ["--pipeline", "a=pkg.mod:one", "--pipeline", "a=pkg.mod:two"],
            {},
            "Two --pipeline flags name the model 'a': give each its own name with "
            "--pipeline NAME=module:attr.",
        ),
    ],
)
def test_bad_pool_values_raise_config_error_naming_the_flag_or_variable(argv, env, message):
    with pytest.raises(ConfigError) as caught:
        load_config(argv, env)
    assert str(caught.value).startswith(message)
    assert len(str(caught.value)) < 300


@pytest.fixture()
def clean_env(monkeypatch):
    for name in POOL_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("argv", "env", "line"),
    [
        (
            [],
            {"GPU_DEVICES": "tpu"},
            "error: GPU_DEVICES: Unknown device 'tpu': use cuda, cuda:N, cpu or emulated:N.",
        ),
        (
            [],
            {"GPU_WAIT_TIMEOUT": "soon"},
            "error: GPU_WAIT_TIMEOUT must be a number of seconds from 0 to 2592000",
        ),
        (
            ["--pipeline", f"{HERE}:alpha_pipeline", "--pipeline", f"{HERE}:alpha_pipeline"],
            {},
            "error: Two --pipeline flags name the model 'alpha': give each its own name with "
            "--pipeline NAME=module:attr.",
        ),
        (
            ["--pipeline", f"{HERE}:BadlyNamedPipeline"],
            {},
            f"error: The pipeline of --pipeline '{HERE}:BadlyNamedPipeline' is named 'two words', "
            "which cannot name a model (1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
            f"or digit): name it with --pipeline NAME={HERE}:BadlyNamedPipeline.",
        ),
    ],
)
def test_main_exits_2_with_one_sentence_for_a_bad_pool_setting(clean_env, capsys, argv, env, line):
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(line)
    assert err.count("\n") == 1 and "Traceback" not in err


def test_pipelines_are_loaded_by_name_in_order_and_become_the_pool_models():
    specs = (PipelineSpec(f"{HERE}:beta_pipeline", "second"), PipelineSpec(f"{HERE}:alpha_pipeline"))
    pipelines = load_pipelines(specs)
    assert list(pipelines) == ["second", "alpha"]
    settings = Settings(idle_timeout=7, release_timeout=9, offload_after_use=False)
    pool = build_pool(PoolSettings(devices="emulated:0,emulated:1", budget_gb="2"), settings, pipelines)
    try:
        assert pool.names() == ["second", "alpha"]
        manager = pool["alpha"]
        assert (manager.idle_timeout, manager.release_timeout, manager.offload_after_use) == (7, 9, False)
        assert where(pool) == {"second": "unloaded", "alpha": "unloaded"}
        assert describe_pool(pool) == (
            "models 'second', 'alpha' on emulated:0 (budget 2.00 GB), emulated:1 (budget 2.00 GB)"
        )
    finally:
        pool.close()
    assert list(load_pipelines(())) == ["talking-portrait"]


def test_python_app_py_serves_a_pool_of_two_pipelines_and_logs_devices_and_budgets(tmp_path):
    with app_process(
        "--output-dir",
        str(tmp_path),
        "--pipeline",
        f"first={HERE}:alpha_pipeline",
        "--pipeline",
        f"{HERE}:beta_pipeline",
        GPU_DEVICES="emulated:0,emulated:1",
        GPU_BUDGET_GB="1.5",
    ) as app:
        app.wait_until_serving()
        line = app.wait_for_line("Talking Portrait on ")
        devices = "emulated:0 (budget 1.50 GB), emulated:1 (budget 1.50 GB)"
        assert f"models 'first', 'beta' on {devices}, nothing loaded yet" in line
        models = httpx.get(f"{app.url}/gpu/models", timeout=10).json()
        assert list(models["models"]) == ["first", "beta"]
        assert [device["device"] for device in models["devices"]] == TWO_CARDS
        status = httpx.get(f"{app.url}/gpu/status", timeout=10).json()
        assert (status["name"], status["monitor_running"]) == ("first", True)
        app.stop(signal.SIGTERM, timeout=30)
    assert app.process.returncode == 0
    assert "Traceback" not in app.output


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


class Job:
    """A job holding one model's lease until `end()`; its thread's errors reach the test."""

    def __init__(self, manager: GPUResourceManager) -> None:
        self.manager = manager
        self.inside, self.leave = threading.Event(), threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            with self.manager.use():
                self.inside.set()
                if not self.leave.wait(10):
                    raise TimeoutError("the test never ended the job")
        except BaseException as error:  # handed to the test thread by end()
            self.errors.append(error)
            self.inside.set()

    def __enter__(self) -> Job:
        self.thread.start()
        assert self.inside.wait(10)
        return self

    def end(self) -> None:
        self.leave.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        if self.errors:
            raise self.errors[0]

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive() or not self.leave.is_set():
            self.end()


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


def _ready(pool: GPUPool, control: str) -> None:
    """Both models where the control would change something: on the device (cached for preheat)."""
    for name in pool.names():
        pool[name].preheat()
        if control == "preheat":
            pool[name].force_offload()


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
    _ready(pool, control)
    before = snapshot(pool)
    _, _, message = CONTROLS[control](handlers, model, token, request_)
    assert text_of(message).startswith(answer)
    assert "known models" not in message and "data-model" not in message
    assert 'class="gpc-refused"' in message
    assert snapshot(pool) == before


@pytest.mark.parametrize("control", sorted(CONTROLS))
def test_a_locked_pool_panel_obeys_the_token_on_the_chosen_model_only(locked_pool_panel, control):
    pool, handlers = locked_pool_panel
    _ready(pool, control)
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


# ---------------------------------------------------------------------------- the form and the app


def test_one_pipeline_with_a_pool_keeps_the_form_as_it_was(tmp_path):
    pool, pipelines = make_pool()
    try:
        with_pool = build_demo(
            pool["alpha"],
            pipelines["alpha"],
            output_dir=tmp_path,
            examples=[],
            pool=pool,
            pipelines={"alpha": pipelines["alpha"]},
        )
        ids = {getattr(block, "elem_id", None) for block in with_pool.blocks.values()}
        assert "model-choice" not in ids and {"gpu-pool", "gpu-model"} <= ids
        two = build_demo(
            pool["alpha"],
            pipelines["alpha"],
            output_dir=tmp_path,
            examples=[],
            pool=pool,
            pipelines=pipelines,
        )
        choice = next(b for b in two.blocks.values() if getattr(b, "elem_id", None) == "model-choice")
        assert (choice.choices, choice.value) == ([("alpha", "alpha"), ("beta", "beta")], "alpha")
        with pytest.raises(ValueError, match="Several pipelines need a pool"):
            build_demo(
                pool["alpha"], pipelines["alpha"], output_dir=tmp_path, examples=[], pipelines=pipelines
            )
    finally:
        pool.close()


def test_generate_runs_through_the_chosen_models_manager(tmp_path, inputs):
    pool, pipelines = make_pool()
    try:
        models = {name: (pool[name], pipelines[name]) for name in pool.names()}
        generate = make_generate_fn(pool["alpha"], pipelines["alpha"], tmp_path, models=models)
        assert (
            "model: which model makes the video: one of 'alpha', 'beta' (empty: 'alpha')." in generate.__doc__
        )
        assert "), model (the one that made the video) and acquired_by (" in generate.__doc__
        progress = lambda *args, **kwargs: None  # noqa: E731
        result = json.loads(
            generate(str(inputs["image"]), str(inputs["audio"]), size=64, model="beta", progress=progress)
        )
        assert (result["model"], result["acquired_by"]) == ("beta", "load")
        assert (pipelines["alpha"].calls, pipelines["beta"].calls) == (0, 1)
        assert (
            pool["alpha"].get_status()["counts"]["uses"],
            pool["beta"].get_status()["counts"]["uses"],
        ) == (0, 1)
        result = json.loads(generate(str(inputs["image"]), str(inputs["audio"]), size=64, progress=progress))
        assert result["model"] == "alpha" and pipelines["alpha"].calls == 1
        for odd, shown in [("gamma", "'gamma'"), (["beta"], "['beta']"), ("x" * 100_000, None)]:
            with pytest.raises(gr.Error) as caught:
                generate(str(inputs["image"]), str(inputs["audio"]), model=odd, progress=progress)
            assert caught.value.message.endswith("; pick one of 'alpha', 'beta'.")
            assert len(caught.value.message) < 300
            if shown:
                assert caught.value.message == f"No model named {shown}; pick one of 'alpha', 'beta'."
        assert (pipelines["alpha"].calls, pipelines["beta"].calls) == (1, 1)
        single = make_generate_fn(
            pool["alpha"], pipelines["alpha"], tmp_path, models={"alpha": models["alpha"]}
        )
        assert "model" not in single.__code__.co_varnames
    finally:
        pool.close()


@dataclass
class PoolLive:
    url: str
    pool: GPUPool
    pipelines: dict[str, NamedPipeline]


def _pool_app(tmp_path_factory, inputs, access: ControlAccess | None) -> Iterator[PoolLive]:
    pool, pipelines = make_pool()
    app = create_app(
        pool["alpha"],
        pipelines["alpha"],
        output_dir=tmp_path_factory.mktemp("pool-outputs"),
        examples=[[str(inputs["image"]), str(inputs["audio"])]],
        access=access,
        pool=pool,
        pipelines=pipelines,
    )
    with serve(app) as url:
        yield PoolLive(url, pool, pipelines)
    pool.close()


def _reset(pool: GPUPool) -> None:
    for name in pool.names():
        manager = pool[name]
        manager.force_release()
        manager.update_timeout(60)
        manager.update_release_timeout(0)
        manager.set_offload_after_use(True)


@pytest.fixture(scope="module")
def pool_live_app(tmp_path_factory, inputs) -> Iterator[PoolLive]:
    yield from _pool_app(tmp_path_factory, inputs, None)


@pytest.fixture(scope="module")
def locked_pool_live_app(tmp_path_factory, inputs) -> Iterator[PoolLive]:
    yield from _pool_app(tmp_path_factory, inputs, ControlAccess(CONTROL_TOKEN))


@pytest.fixture()
def pool_live(pool_live_app) -> Iterator[PoolLive]:
    _reset(pool_live_app.pool)
    yield pool_live_app
    _reset(pool_live_app.pool)


@pytest.fixture()
def locked_pool_live(locked_pool_live_app) -> Iterator[PoolLive]:
    _reset(locked_pool_live_app.pool)
    yield locked_pool_live_app
    _reset(locked_pool_live_app.pool)


def test_the_app_reports_every_model_in_rest_and_metrics(pool_live):
    models = httpx.get(f"{pool_live.url}/gpu/models", timeout=10).json()
    assert list(models["models"]) == ["alpha", "beta"]
    metrics = httpx.get(f"{pool_live.url}/metrics", timeout=10).text
    assert 'gpu_control_model_leases{model="alpha"}' in metrics
    assert 'gpu_control_model_leases{model="beta"}' in metrics
    assert httpx.get(f"{pool_live.url}/gpu/status", timeout=10).json()["name"] == "alpha"


def test_a_job_for_the_second_model_runs_through_its_manager(pool_live, inputs):
    client = Client(pool_live.url, verbose=False)
    files = {
        "image": handle_file(str(inputs["image"])),
        "audio": handle_file(str(inputs["audio"])),
        "size": 64,
    }
    calls = {name: pipeline.calls for name, pipeline in pool_live.pipelines.items()}
    result = json.loads(client.predict(**files, model="beta", api_name="/generate_video"))
    assert (result["model"], result["acquired_by"], result["offloaded"]) == ("beta", "load", True)
    assert pool_live.pipelines["beta"].calls == calls["beta"] + 1
    assert pool_live.pipelines["alpha"].calls == calls["alpha"]
    assert where(pool_live.pool) == {"alpha": "unloaded", "beta": "cpu"}
    with pytest.raises(AppError, match=re.escape("No model named 'gamma'; pick one of 'alpha', 'beta'.")):
        client.predict(**files, model="gamma", api_name="/generate_video")
    assert where(pool_live.pool) == {"alpha": "unloaded", "beta": "cpu"}


def test_mcp_offers_the_model_argument_and_runs_the_job_with_that_model(pool_live, inputs):
    async def tools(session: Any) -> Any:
        return {tool.name: tool for tool in (await session.list_tools()).tools}

    listed = with_session(pool_live.url, tools)
    assert {"list_models", "generate_video"} <= set(listed)
    schema = listed["generate_video"].inputSchema["properties"]["model"]
    assert "one of 'alpha', 'beta' (empty: 'alpha')" in schema["description"]
    files = {"image": data_uri(inputs["image"], "image/png"), "audio": data_uri(inputs["audio"], "audio/wav")}
    result = call(pool_live.url, "generate_video", {**files, "size": 64, "model": "beta"})
    assert not result.isError, result.content[0].text
    assert json.loads(result.content[0].text)["model"] == "beta"
    assert where(pool_live.pool) == {"alpha": "unloaded", "beta": "cpu"}
    refused = call(pool_live.url, "generate_video", {**files, "model": "../beta"})
    assert refused.isError
    assert refused.content[0].text == (
        "Argument 'model' does not fit the tool (enum ['alpha', 'beta']): '../beta' was sent."
    )
    assert where(pool_live.pool) == {"alpha": "unloaded", "beta": "cpu"}


PANEL_DATA = {
    "offload": lambda model, token: [model, token],
    "release": lambda model, token: [model, token],
    "preheat": lambda model, token: [model, token],
    "apply": lambda model, token: [model, "5", "7", False, token],
}


@pytest.mark.parametrize("control", sorted(PANEL_DATA))
@pytest.mark.parametrize(
    ("model", "token", "headers", "answer"),
    [
        ("beta", "", None, "Locked: enter the control token"),
        ("gamma", "", None, "Locked: enter the control token"),
        ("beta", "wrong-token-000000", None, "Locked: the control token is not right"),
        (
            "beta",
            CONTROL_TOKEN,
            {"Origin": "https://evil.example"},
            "Refused: this control request came from",
        ),
        ("gamma", CONTROL_TOKEN, None, "No model named 'gamma' in the pool; known models: 'alpha', 'beta'."),
        (["beta"], CONTROL_TOKEN, None, "No model named ['beta'] in the pool"),
    ],
)
def test_the_pool_panels_event_routes_refuse_over_http(
    locked_pool_live, control, model, token, headers, answer
):
    pool = locked_pool_live.pool
    _ready(pool, control)
    before = snapshot(pool)
    _, _, message = run_event(locked_pool_live.url, control, PANEL_DATA[control](model, token), headers)
    assert text_of(message).startswith(answer)
    assert snapshot(pool) == before


@pytest.mark.parametrize("control", sorted(PANEL_DATA))
def test_the_pool_panels_event_routes_act_on_the_chosen_model_with_the_token(locked_pool_live, control):
    pool = locked_pool_live.pool
    _ready(pool, control)
    before = snapshot(pool)
    _, _, message = run_event(locked_pool_live.url, control, PANEL_DATA[control]("beta", CONTROL_TOKEN))
    assert text_of(message).startswith("beta: ")
    after = snapshot(pool)
    assert (after["alpha"], after["beta"] != before["beta"]) == (before["alpha"], True)


# ---------------------------------------------------------------------------- the pool core (gpu_control)
# These fail until gpu_control is fixed; the app meanwhile names the variable itself (app_pool.py).


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"GPU_DEVICES": "tpu"}, "GPU_DEVICES"),
        ({"GPU_DEVICES": "emulated:0,emulated:0"}, "GPU_DEVICES"),
        ({"GPU_DEVICES": "cpu,emulated:0"}, "GPU_DEVICES"),
    ],
)
def test_pool_settings_from_env_names_the_variable_of_a_bad_device_list(env, variable):
    with pytest.raises(InvalidSetting) as caught:
        PoolSettings.from_env(env)
    assert variable in str(caught.value)


def test_pool_settings_from_env_refuses_a_reserve_that_the_pool_then_refuses():
    env = {"GPU_DEVICES": "emulated:0", "GPU_RESERVE_GB": "30"}  # an emulated card has 24 GiB
    with pytest.raises(InvalidSetting, match="reserve_gb=30 leaves no room"):
        GPUPool(**PoolSettings(devices="emulated:0", reserve_gb=30.0).pool_kwargs())
    with pytest.raises(InvalidSetting, match="GPU_RESERVE_GB"):
        PoolSettings.from_env(env)


def test_membership_of_an_unhashable_name_is_false_not_a_type_error():
    pool, _ = make_pool()
    try:
        assert ["alpha"] not in pool
        assert {"name": "alpha"} not in pool
    finally:
        pool.close()
