"""The GPU tools of an app with a pool, through the `mcp` client and the Gradio API.

Most tests here serve an app wired as `create_app` wires one (the REST router first, the
method guard, then the Blocks with the GPU tools mounted with MCP on) around a `GPUPool` of two
small models on an emulated card: ``alpha`` (the default model) and ``beta``; the last one
serves the real `create_app` with a pool.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr
import httpx
import pytest
import torch
from fastapi import FastAPI
from gradio_client import Client
from gradio_client.exceptions import AppError
from mcp import ClientSession
from torch import nn

from app import create_app
from gpu_control import ControlAccess, GPUPool
from gpu_control_gradio import mount_demo
from gpu_control_gradio.gpu_tools import register_gpu_api
from gpu_control.rest import install_method_guard, make_router
from gpu_control.security import excerpt

from .conftest import CONTROL_TOKEN
from .helpers import GatedPipeline, serve
from .test_mcp import FOREIGN, LOCKED, call, with_session

TOOLS = {"list_models", "get_gpu_status", "offload_gpu", "release_gpu", "update_gpu_timeout"}
CONTROL_CALLS = {
    "offload_gpu": {},
    "release_gpu": {},
    "update_gpu_timeout": {"timeout_seconds": 5, "release_timeout_seconds": 7, "offload_after_use": False},
}
UNKNOWN = "No model named {} in the pool; known models: 'alpha', 'beta'."
ODD_NAMES = [
    "nope",
    "../x",
    "..",
    "%2e%2e",
    "alpha/../beta",
    " alpha",
    "ALPHA",
    "<script>alert(1)</script>",
    "a'b\"c",
    "n" * 100_000,
]
TOKEN_HEADERS = {"Authorization": f"Bearer {CONTROL_TOKEN}"}


@dataclass
class PoolApp:
    url: str
    pool: GPUPool


def linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(256, 256, bias=False)


@contextlib.contextmanager
def serve_pool_app(access: ControlAccess | None = None) -> Iterator[PoolApp]:
    """Serve REST + the GPU tools (MCP on) for a pool of ``alpha`` and ``beta`` until the block ends."""
    pool = GPUPool(devices=["emulated:0"], budget_gb=1 / 1024)
    pool.add("alpha", linear, offload_after_use=False)
    pool.add("beta", linear)
    app = FastAPI(docs_url=None, redoc_url=None)
    app.include_router(make_router(pool["alpha"], pool=pool, access=access))
    install_method_guard(app)
    with gr.Blocks() as demo:
        register_gpu_api(pool["alpha"], access=access, pool=pool)
    try:
        with serve(mount_demo(app, demo, path="/", mcp_server=True)) as url:
            yield PoolApp(url, pool)
    finally:
        pool.close()


def reset(pool: GPUPool) -> None:
    for name in pool.names():
        manager = pool[name]
        manager.force_release()
        manager.update_timeout(60)
        manager.update_release_timeout(0)
        manager.set_offload_after_use(name != "alpha")


def state(pool: GPUPool) -> dict[str, tuple[Any, ...]]:
    """What a control could change, per model: location, settings, move counters."""
    result = {}
    for name in pool.names():
        status = pool[name].get_status()
        result[name] = (
            status["model_location"],
            status["idle_timeout"],
            status["release_timeout"],
            status["offload_after_use"],
            status["counts"],
        )
    return result


@pytest.fixture(scope="module")
def pool_open_live() -> Iterator[PoolApp]:
    with serve_pool_app() as live:
        yield live


@pytest.fixture(scope="module")
def pool_locked_live() -> Iterator[PoolApp]:
    with serve_pool_app(ControlAccess(CONTROL_TOKEN)) as live:
        yield live


@pytest.fixture()
def pooled(pool_open_live: PoolApp) -> Iterator[PoolApp]:
    reset(pool_open_live.pool)
    yield pool_open_live
    reset(pool_open_live.pool)


@pytest.fixture()
def pool_locked(pool_locked_live: PoolApp) -> Iterator[PoolApp]:
    reset(pool_locked_live.pool)
    yield pool_locked_live
    reset(pool_locked_live.pool)


def tools_of(url: str) -> dict[str, Any]:
    async def body(session: ClientSession) -> Any:
        return (await session.list_tools()).tools

    return {tool.name: tool for tool in with_session(url, body)}


def answer(result: Any) -> Any:
    assert not result.isError, result.content[0].text
    return json.loads(result.content[0].text)


def test_the_tools_are_list_models_and_the_four_with_an_optional_model_argument(pooled):
    tools = tools_of(pooled.url)

    assert set(tools) == TOOLS
    assert tools["list_models"].inputSchema.get("properties", {}) == {}
    assert "model argument" in tools["list_models"].description
    for name in ("get_gpu_status", "offload_gpu", "release_gpu", "update_gpu_timeout"):
        schema = tools[name].inputSchema
        assert schema["properties"]["model"]["type"] == "string", name
        assert "list_models" in schema["properties"]["model"]["description"], name
        assert "model" not in schema.get("required", []), name
        assert "request" not in schema["properties"], name
    assert tools["update_gpu_timeout"].inputSchema["required"] == ["timeout_seconds"]
    assert "Authorization: Bearer <token>" in tools["offload_gpu"].description


def test_list_models_names_each_model_where_it_is_and_the_devices(pooled):
    pooled.pool["beta"].preheat()

    listing = answer(call(pooled.url, "list_models"))

    assert listing["default_model"] == "alpha"
    assert [model["name"] for model in listing["models"]] == ["alpha", "beta"]
    alpha, beta = listing["models"]
    assert (alpha["model_location"], beta["model_location"]) == ("unloaded", "gpu")
    assert (beta["device"], beta["priority"], beta["in_use"]) == ("emulated:0", 0, 0)
    assert beta["model_size_gb"] == pytest.approx(0.25 / 1024)
    assert [device["device"] for device in listing["devices"]] == ["emulated:0"]
    assert listing["devices"][0]["models"] == ["beta"]
    assert set(listing["host"]) == {"budget_gb", "used_gb"}
    assert listing["waiting"] == []


def test_get_gpu_status_shows_the_named_model_or_the_default(pooled):
    assert answer(call(pooled.url, "get_gpu_status", {"model": "beta"}))["name"] == "beta"
    assert answer(call(pooled.url, "get_gpu_status", {"model": ""}))["name"] == "alpha"
    assert answer(call(pooled.url, "get_gpu_status"))["name"] == "alpha"


def test_offload_and_release_move_only_the_named_model(pooled):
    pool = pooled.pool
    pool["alpha"].preheat()
    pool["beta"].preheat()

    offload = answer(call(pooled.url, "offload_gpu", {"model": "beta"}))
    assert (offload["outcome"], offload["status"]["name"], offload["status"]["model_location"]) == (
        "done",
        "beta",
        "cpu",
    )
    release = answer(call(pooled.url, "release_gpu", {"model": "beta"}))
    assert (release["outcome"], release["status"]["model_location"]) == ("done", "unloaded")
    assert pool["alpha"].location.value == "gpu"

    default = answer(call(pooled.url, "offload_gpu"))
    assert (default["status"]["name"], default["status"]["model_location"]) == ("alpha", "cpu")


def test_update_gpu_timeout_changes_only_the_named_model(pooled):
    arguments = {**CONTROL_CALLS["update_gpu_timeout"], "model": "beta"}
    changed = answer(call(pooled.url, "update_gpu_timeout", arguments))
    assert changed["message"] == (
        "Idle timeout set to 5 s. Release timeout set to 7 s. Offload after use turned off."
    )
    beta, alpha = pooled.pool["beta"], pooled.pool["alpha"]
    assert (beta.idle_timeout, beta.release_timeout, beta.offload_after_use) == (5.0, 7.0, False)
    assert (alpha.idle_timeout, alpha.release_timeout) == (60.0, 0.0)


@pytest.mark.parametrize("name", ODD_NAMES, ids=lambda name: name[:20])
@pytest.mark.parametrize("tool", ["get_gpu_status", *sorted(CONTROL_CALLS)])
def test_an_unknown_or_odd_model_name_is_a_sentence_naming_the_known_models(pooled, tool, name):
    pooled.pool["alpha"].preheat()
    before = state(pooled.pool)

    result = call(pooled.url, tool, {**CONTROL_CALLS.get(tool, {}), "model": name})

    assert (result.isError, result.content[0].text) == (True, UNKNOWN.format(excerpt(name)))
    assert len(result.content[0].text) < 200
    assert state(pooled.pool) == before


def test_a_model_argument_that_is_not_text_is_refused_before_the_tool_runs(pooled):
    result = call(pooled.url, "offload_gpu", {"model": ["beta"]})
    assert (result.isError, result.content[0].text) == (True, "Argument 'model' must be text, not ['beta'].")


def test_the_tools_answer_at_once_while_another_model_is_in_use(pooled):
    pool = pooled.pool
    inside, leave = threading.Event(), threading.Event()

    def job() -> None:
        with pool["alpha"].use():
            inside.set()
            assert leave.wait(10)

    worker = threading.Thread(target=job)
    worker.start()
    try:
        assert inside.wait(10)
        pool["beta"].preheat()
        beta = answer(call(pooled.url, "offload_gpu", {"model": "beta"}))
        assert (beta["outcome"], beta["status"]["model_location"]) == ("done", "cpu")
        alpha = answer(call(pooled.url, "offload_gpu", {"model": "alpha"}))
        assert (alpha["outcome"], alpha["status"]["pending"]) == ("deferred", ["offload"])
        listing = answer(call(pooled.url, "list_models"))
        assert [model["in_use"] for model in listing["models"]] == [1, 0]
    finally:
        leave.set()
    worker.join(10)
    assert not worker.is_alive()
    assert pool["alpha"].location.value == "cpu"


def test_the_gradio_api_takes_the_model_argument_too(pooled):
    client = Client(pooled.url, verbose=False)
    pooled.pool["beta"].preheat()

    assert json.loads(client.predict(api_name="/list_models"))["default_model"] == "alpha"
    assert json.loads(client.predict(model="beta", api_name="/get_gpu_status"))["name"] == "beta"
    released = json.loads(client.predict(model="beta", api_name="/release_gpu"))
    assert (released["outcome"], released["status"]["model_location"]) == ("done", "unloaded")
    changed = json.loads(client.predict(timeout_seconds=42, model="beta", api_name="/update_gpu_timeout"))
    assert (changed["status"]["name"], pooled.pool["beta"].idle_timeout) == ("beta", 42.0)
    with pytest.raises(AppError, match="known models: 'alpha', 'beta'"):
        client.predict(model="nope", api_name="/offload_gpu")


@pytest.mark.parametrize("tool", sorted(CONTROL_CALLS))
@pytest.mark.parametrize("model", ["beta", "nope", ""])
def test_locked_control_tools_refuse_any_model_without_the_token(pool_locked, tool, model):
    pool_locked.pool["beta"].preheat()
    before = state(pool_locked.pool)
    for headers in (None, {"Authorization": "Bearer wrong-token-0000"}, {"Authorization": CONTROL_TOKEN}):
        result = call(pool_locked.url, tool, {**CONTROL_CALLS[tool], "model": model}, headers=headers)
        assert (result.isError, result.content[0].text) == (True, LOCKED), headers
    assert state(pool_locked.pool) == before


@pytest.mark.parametrize("tool", sorted(CONTROL_CALLS))
def test_a_foreign_origin_is_refused_for_any_model_even_with_the_token(pool_locked, tool):
    pool_locked.pool["beta"].preheat()
    before = state(pool_locked.pool)
    headers = {**TOKEN_HEADERS, "Origin": "https://evil.example"}
    result = call(pool_locked.url, tool, {**CONTROL_CALLS[tool], "model": "beta"}, headers=headers)
    assert (result.isError, result.content[0].text) == (True, FOREIGN)
    assert state(pool_locked.pool) == before


def test_locked_control_tools_work_with_the_token_and_reads_stay_open(pool_locked):
    pool = pool_locked.pool
    pool["beta"].preheat()
    offload = answer(call(pool_locked.url, "offload_gpu", {"model": "beta"}, headers=TOKEN_HEADERS))
    assert (offload["outcome"], offload["status"]["model_location"]) == ("done", "cpu")
    unknown = call(pool_locked.url, "release_gpu", {"model": "nope"}, headers=TOKEN_HEADERS)
    assert (unknown.isError, unknown.content[0].text) == (True, UNKNOWN.format("'nope'"))
    assert answer(call(pool_locked.url, "list_models"))["models"][1]["model_location"] == "cpu"
    assert answer(call(pool_locked.url, "get_gpu_status", {"model": "beta"}))["name"] == "beta"


def test_the_real_app_with_a_pool_offers_the_pool_tools_and_routes(tmp_path):
    """`create_app(..., pool=, pipelines=)` wires the tools and routes above into the app itself."""
    pipelines = {"alpha": GatedPipeline(), "beta": GatedPipeline()}
    pool = GPUPool(devices=["emulated:0"], budget_gb=1 / 1024)
    for name, pipeline in pipelines.items():
        pool.add(name, pipeline.load)
    app = create_app(
        pool["alpha"], pipelines["alpha"], output_dir=tmp_path, examples=[], pool=pool, pipelines=pipelines
    )
    try:
        with serve(app) as url:
            assert set(tools_of(url)) >= TOOLS | {"generate_video"}
            listing = answer(call(url, "list_models"))
            assert [model["name"] for model in listing["models"]] == ["alpha", "beta"]
            pool["beta"].preheat()
            offload = answer(call(url, "offload_gpu", {"model": "beta"}))
            assert (offload["status"]["name"], offload["status"]["model_location"]) == ("beta", "cpu")
            assert list(httpx.get(f"{url}/gpu/models", timeout=30).json()["models"]) == ["alpha", "beta"]
            release = httpx.post(f"{url}/gpu/models/beta/release", timeout=30).json()
            assert release["status"]["model_location"] == "unloaded"
    finally:
        pool.close()
