"""The per-model REST routes of a pool (``make_router(manager, pool=pool)``) through FastAPI's TestClient.

The pool runs on one emulated card with a 3 MiB budget: ``alpha`` and ``beta`` weigh 1 MiB
each, ``huge`` 4 MiB (it can never fit). ``alpha`` is the default model the seed's routes act on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from torch import nn

from gpu_control import ControlAccess, GPUPool, GPUResourceManager
from gpu_control.rest import install_method_guard, make_router
from gpu_control.security import excerpt

from .sync import Worker

MIB = 2**20
TOKEN = "models-token-0123"
KNOWN = "known models: 'alpha', 'beta', 'huge'."
ACTIONS = ("offload", "release", "preheat", "timeout")
BODIES: dict[str, dict[str, Any]] = {
    "offload": {},
    "release": {},
    "preheat": {},
    "timeout": {"data": {"timeout": "7", "release_timeout": "9", "offload_after_use": "false"}},
}


def sized(mib: int) -> Callable[[], nn.Module]:
    """A load function for a bias-free linear layer of exactly ``mib`` MiB of float32 weights."""

    def load() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(1024, 256 * mib, bias=False)

    return load


def make_pool(wait_timeout: float = 10.0, alpha_mib: int = 1, beta_mib: int = 1) -> GPUPool:
    pool = GPUPool(devices=["emulated:0"], budget_gb=3 / 1024, wait_timeout=wait_timeout)
    pool.add("alpha", sized(alpha_mib), offload_after_use=False)
    pool.add("beta", sized(beta_mib))
    pool.add("huge", sized(4))
    return pool


def client_for(pool: GPUPool, access: ControlAccess | None = None) -> TestClient:
    app = FastAPI(docs_url=None, redoc_url=None)
    app.include_router(make_router(pool["alpha"], pool=pool, access=access))
    install_method_guard(app)
    return TestClient(app)


@pytest.fixture()
def pool() -> Iterator[GPUPool]:
    pool = make_pool()
    yield pool
    pool.close()


@pytest.fixture()
def client(pool: GPUPool) -> TestClient:
    return client_for(pool)


def post(client: TestClient, name: str, action: str, **kwargs: Any) -> Any:
    return client.post(f"/gpu/models/{name}/{action}", **{**BODIES[action], **kwargs})


def where(pool: GPUPool) -> dict[str, str]:
    return {name: pool[name].location.value for name in pool.names()}


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


class Lease:
    """Holds a lease on a model from a worker thread until ``end()``."""

    def __init__(self, manager: GPUResourceManager) -> None:
        self.holding, self._end = threading.Event(), threading.Event()
        self.worker = Worker(self._run)
        self.manager = manager
        self.worker.start()
        assert self.holding.wait(10), "the lease was never taken"

    def _run(self) -> None:
        with self.manager.use():
            self.holding.set()
            assert self._end.wait(10), "the test never ended the lease"

    def end(self) -> None:
        self._end.set()
        self.worker.finish()


def test_models_lists_every_model_device_and_queue_and_loads_nothing(pool, client):
    response = client.get("/gpu/models")

    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["devices", "host", "models", "waiting"]
    assert list(body["models"]) == ["alpha", "beta", "huge"]
    assert [device["device"] for device in body["devices"]] == ["emulated:0"]
    assert body["devices"][0]["budget_gb"] == pytest.approx(3 / 1024)
    assert body["devices"][0]["models"] == []
    assert body["waiting"] == []
    for name, model in body["models"].items():
        assert (model["name"], model["model_location"], model["priority"]) == (name, "unloaded", 0)
        assert model["counts"]["loads"] == 0
    assert client.head("/gpu/models").status_code == 200


def test_models_shows_where_each_model_is_after_moves(pool, client):
    pool["beta"].preheat()

    body = client.get("/gpu/models").json()

    assert body["devices"][0]["models"] == ["beta"]
    assert body["devices"][0]["used_gb"] == pytest.approx(1 / 1024)
    assert {name: model["model_location"] for name, model in body["models"].items()} == {
        "alpha": "unloaded",
        "beta": "gpu",
        "huge": "unloaded",
    }


def test_preheat_offload_release_act_on_the_named_model_only(pool, client):
    preheat = post(client, "beta", "preheat")
    assert preheat.status_code == 200
    assert (preheat.json()["action"], preheat.json()["outcome"]) == ("preheat", "done")
    assert (preheat.json()["status"]["name"], preheat.json()["status"]["model_location"]) == ("beta", "gpu")
    assert where(pool) == {"alpha": "unloaded", "beta": "gpu", "huge": "unloaded"}

    offload = post(client, "beta", "offload").json()
    assert (offload["outcome"], offload["status"]["model_location"]) == ("done", "cpu")
    release = post(client, "beta", "release").json()
    assert (release["outcome"], release["status"]["model_location"]) == ("done", "unloaded")
    again = post(client, "beta", "release").json()
    assert again["outcome"] == "nothing_to_do"
    assert pool["beta"].get_status()["counts"] == {
        "loads": 1,
        "restores": 0,
        "offloads": 1,
        "releases": 1,
        "uses": 1,
    }
    assert pool["alpha"].get_status()["counts"]["loads"] == 0


def test_timeout_changes_only_the_named_model_from_a_form_or_json(pool, client):
    form = post(client, "beta", "timeout")
    assert form.status_code == 200
    assert form.json()["message"] == (
        "Idle timeout set to 7 s. Release timeout set to 9 s. Offload after use turned off."
    )
    assert form.json()["status"]["name"] == "beta"
    beta = pool["beta"]
    assert (beta.idle_timeout, beta.release_timeout, beta.offload_after_use) == (7.0, 9.0, False)

    as_json = client.post("/gpu/models/huge/timeout", json={"timeout": "never"})
    assert as_json.status_code == 200
    assert pool["huge"].idle_timeout == float("inf")
    assert (pool["alpha"].idle_timeout, pool["alpha"].release_timeout) == (60.0, 0.0)


def test_the_single_model_routes_keep_acting_on_the_default_model(pool, client):
    assert client.post("/gpu/preheat").json()["status"]["name"] == "alpha"
    assert client.post("/gpu/timeout", data={"timeout": "30"}).status_code == 200

    assert where(pool) == {"alpha": "gpu", "beta": "unloaded", "huge": "unloaded"}
    assert (pool["alpha"].idle_timeout, pool["beta"].idle_timeout) == (30.0, 60.0)
    assert client.get("/gpu/status").json()["name"] == "alpha"
    assert client.get("/health").json()["name"] == "alpha"


@pytest.mark.parametrize("action", ACTIONS)
def test_an_unknown_name_is_404_naming_the_known_models_and_changes_nothing(pool, client, action):
    before = state(pool)

    response = post(client, "nope", action)

    assert response.status_code == 404
    assert response.json() == {"detail": f"No model named 'nope' in the pool; {KNOWN}"}
    assert state(pool) == before


@pytest.mark.parametrize("action", ACTIONS)
def test_a_very_long_name_is_answered_with_a_short_excerpt(pool, client, action):
    name = "n" * 5000
    response = post(client, name, action)
    assert response.status_code == 404
    detail = response.json()["detail"]
    assert detail == f"No model named {excerpt(name)} in the pool; {KNOWN}"
    assert len(detail) < 200


def test_a_model_removed_from_the_pool_is_404_and_no_longer_listed(pool, client):
    pool.remove("beta")
    response = post(client, "beta", "preheat")
    assert response.status_code == 404
    assert response.json()["detail"] == "No model named 'beta' in the pool; known models: 'alpha', 'huge'."
    assert list(client.get("/gpu/models").json()["models"]) == ["alpha", "huge"]


def test_a_preheat_that_can_never_fit_is_507_with_a_sentence(pool, client):
    response = post(client, "huge", "preheat")

    assert response.status_code == 507
    detail = response.json()["detail"]
    assert detail.startswith("'huge' needs ")
    assert "it can never fit" in detail and "Raise the budget" in detail
    assert "Traceback" not in detail and "\n" not in detail
    assert pool["huge"].location.value != "gpu"
    assert client.get("/gpu/models").json()["devices"][0]["models"] == []


def test_a_preheat_that_finds_no_room_in_time_is_503_naming_what_holds_the_device():
    pool = make_pool(wait_timeout=0, alpha_mib=2, beta_mib=2)
    try:
        client = client_for(pool)
        lease = Lease(pool["alpha"])
        try:
            response = post(client, "beta", "preheat")
            assert response.status_code == 503
            detail = response.json()["detail"]
            assert detail.startswith("No room for 'beta'")
            assert "'alpha'" in detail and "in use by 1 job(s)" in detail
            assert where(pool)["alpha"] == "gpu"
            assert client.get("/gpu/models").json()["waiting"] == []
        finally:
            lease.end()
    finally:
        pool.close()


def test_per_model_routes_answer_at_once_while_another_model_is_in_use(pool, client):
    lease = Lease(pool["alpha"])
    try:
        preheat = post(client, "beta", "preheat").json()
        assert (preheat["outcome"], preheat["status"]["model_location"]) == ("done", "gpu")
        offload = post(client, "beta", "offload").json()
        assert (offload["outcome"], offload["status"]["model_location"]) == ("done", "cpu")
        assert post(client, "beta", "timeout").status_code == 200

        deferred = post(client, "alpha", "offload").json()
        assert (deferred["outcome"], deferred["status"]["pending"]) == ("deferred", ["offload"])
        assert client.get("/gpu/models").json()["models"]["alpha"]["in_use"] == 1
    finally:
        lease.end()
    assert where(pool) == {"alpha": "cpu", "beta": "cpu", "huge": "unloaded"}


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"data": {"timeout": "-5"}}, "timeout must be 0 or more seconds, not '-5'."),
        ({"data": {"timeout": "soon"}}, "not 'soon'."),
        ({"json": {"timeout": None}}, "timeout needs a value, not null"),
        ({"json": {"idle_timeout": 300}}, "Unknown field(s) 'idle_timeout'"),
        ({"json": {"timeout": 5, "release_timeout": -1}}, "release_timeout must be"),
        ({"json": [300]}, "must be an object"),
        ({"data": {}}, "Give at least one of"),
        ({"data": {"timeout": "x" * 100_000}}, "characters)"),
    ],
)
def test_bad_timeout_bodies_are_422_with_a_sentence_and_change_nothing(pool, client, kwargs, needle):
    before = state(pool)
    response = client.post("/gpu/models/beta/timeout", **kwargs)
    assert response.status_code == 422
    assert needle in response.json()["detail"]
    assert len(response.json()["detail"]) < 300
    assert state(pool) == before


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("name", ["beta", "nope"])
def test_locked_per_model_controls_without_the_token_are_401_before_the_name_is_looked_up(
    pool, action, name
):
    client = client_for(pool, ControlAccess(TOKEN))
    pool["beta"].preheat()
    before = state(pool)
    for headers in ({}, {"Authorization": "Bearer wrong-token-0000"}, {"Authorization": TOKEN}):
        response = post(client, name, action, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["detail"].startswith("GPU control is locked")
    assert state(pool) == before


@pytest.mark.parametrize("action", ACTIONS)
def test_a_foreign_origin_is_403_on_every_per_model_control_even_with_the_token(pool, action):
    locked = client_for(pool, ControlAccess(TOKEN))
    pool["beta"].preheat()
    before = state(pool)
    headers = {"Authorization": f"Bearer {TOKEN}", "Origin": "https://evil.example"}
    response = post(locked, "beta", action, headers=headers)
    assert response.status_code == 403
    assert response.json()["detail"].startswith("Refused: this control request came from another site's page")
    open_app = post(client_for(pool), "beta", action, headers={"Origin": "https://evil.example"})
    assert open_app.status_code == 403
    assert state(pool) == before


def test_locked_per_model_controls_with_the_token_work_and_reads_stay_open(pool):
    client = client_for(pool, ControlAccess(TOKEN))
    auth = {"Authorization": f"Bearer {TOKEN}", "Origin": "http://testserver"}
    assert post(client, "beta", "preheat", headers=auth).json()["status"]["model_location"] == "gpu"
    assert post(client, "beta", "timeout", headers=auth).status_code == 200
    assert pool["beta"].idle_timeout == 7.0
    assert post(client, "beta", "offload", headers=auth).json()["status"]["model_location"] == "cpu"
    assert post(client, "beta", "release", headers=auth).json()["status"]["model_location"] == "unloaded"
    assert post(client, "nope", "release", headers=auth).status_code == 404
    assert client.get("/gpu/models", headers={"Origin": "https://evil.example"}).status_code == 200


def test_the_token_is_checked_before_a_huge_timeout_body_is_read(pool):
    client = client_for(pool, ControlAccess(TOKEN))
    response = client.post(
        "/gpu/models/beta/timeout", content=b"x" * (17 * MIB), headers={"content-type": "text/plain"}
    )
    assert response.status_code == 401


def test_a_timeout_body_over_the_limit_is_413(pool, client):
    response = client.post(
        "/gpu/models/beta/timeout", content=b"x" * (17 * MIB), headers={"content-type": "text/plain"}
    )
    assert response.status_code == 413
    assert pool["beta"].idle_timeout == 60.0


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_a_wrong_method_on_a_per_model_route_is_405_with_allow(client, method):
    response = client.request(method, "/gpu/models/beta/offload")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert client.post("/gpu/models").status_code == 405


def test_openapi_documents_the_pool_routes_with_summaries_404_and_the_errors(client):
    paths = client.get("/openapi.json").json()["paths"]

    listing = paths["/gpu/models"]["get"]
    assert "pool" in listing["summary"]
    assert "example" in listing["responses"]["200"]["content"]["application/json"]
    for action in ACTIONS:
        operation = paths[f"/gpu/models/{{name}}/{action}"]["post"]
        assert operation["summary"], action
        assert {"200", "401", "403", "404", "422"} <= set(operation["responses"]), action
        assert "known models" in operation["responses"]["404"]["description"], action
        assert operation["security"] == [{"controlToken": []}], action
        (parameter,) = operation["parameters"]
        assert (parameter["name"], parameter["in"], parameter["required"]) == ("name", "path", True)
        assert "GET /gpu/models" in parameter["description"]
    preheat = paths["/gpu/models/{name}/preheat"]["post"]["responses"]
    assert {"409", "503", "507"} <= set(preheat)
    timeout = paths["/gpu/models/{name}/timeout"]["post"]
    assert "timeout" in timeout["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "507" in paths["/gpu/preheat"]["post"]["responses"]


def test_without_a_pool_there_are_no_pool_routes():
    manager = GPUResourceManager(device="cpu", auto_monitor=False)
    app = FastAPI()
    app.include_router(make_router(manager))
    client = TestClient(app)
    assert client.get("/gpu/models").status_code == 404
    assert client.post("/gpu/models/model/offload").status_code == 404
    assert not any(path.startswith("/gpu/models") for path in app.openapi()["paths"])
