"""The REST router and the offline docs, driven in-process through FastAPI's TestClient."""

from __future__ import annotations

import threading

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from torch import nn

from gpu_control import GPUResourceManager, LoadError
from gpu_control.rest import install_offline_docs, make_router

from .helpers import small_model


def make_client(**kwargs) -> tuple[TestClient, GPUResourceManager]:
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("auto_monitor", False)
    manager = GPUResourceManager(**kwargs)
    app = FastAPI(docs_url=None, redoc_url=None)
    app.include_router(make_router(manager))
    install_offline_docs(app)
    return TestClient(app), manager


def test_status_of_a_fresh_manager_is_unloaded_and_loads_nothing():
    calls = []
    client, _ = make_client(load_func=lambda: calls.append(1) or small_model())

    response = client.get("/gpu/status")

    assert response.status_code == 200
    body = response.json()
    assert body["model_location"] == "unloaded"
    assert body["counts"] == {"loads": 0, "restores": 0, "offloads": 0, "releases": 0, "uses": 0}
    assert body["idle_timeout"] == 60.0
    assert calls == []


def test_health_answers_ok_with_the_location():
    client, _ = make_client()
    assert client.get("/health").json() == {
        "status": "ok",
        "name": "model",
        "model_location": "unloaded",
        "transition": None,
    }


def test_offload_and_release_of_an_unloaded_model_have_nothing_to_do():
    client, _ = make_client()
    for path in ("/gpu/offload", "/gpu/release"):
        response = client.post(path)
        assert response.status_code == 200
        body = response.json()
        assert body["outcome"] == "nothing_to_do"
        assert body["status"]["model_location"] == "unloaded"


def test_preheat_then_offload_then_release_move_the_model_and_say_done():
    client, _ = make_client(load_func=small_model)

    preheat = client.post("/gpu/preheat").json()
    assert (preheat["action"], preheat["outcome"], preheat["status"]["model_location"]) == (
        "preheat",
        "done",
        "gpu",
    )
    again = client.post("/gpu/preheat").json()
    assert again["outcome"] == "nothing_to_do"

    offload = client.post("/gpu/offload").json()
    assert (offload["action"], offload["outcome"], offload["status"]["model_location"]) == (
        "offload",
        "done",
        "cpu",
    )
    assert offload["message"].startswith("The model is in the host cache")

    release = client.post("/gpu/release").json()
    assert (release["outcome"], release["status"]["model_location"]) == ("done", "unloaded")
    assert release["status"]["counts"]["releases"] == 1


def test_offload_and_release_during_a_lease_are_deferred_then_carried_out():
    client, manager = make_client(load_func=small_model, offload_after_use=False)
    inside, leave = threading.Event(), threading.Event()

    def job() -> None:
        with manager.use():
            inside.set()
            assert leave.wait(10)

    worker = threading.Thread(target=job)
    worker.start()
    try:
        assert inside.wait(10)
        offload = client.post("/gpu/offload").json()
        release = client.post("/gpu/release").json()
        assert (offload["outcome"], release["outcome"]) == ("deferred", "deferred")
        assert release["status"]["pending"] == ["offload", "release"]
        assert client.get("/gpu/status").json()["model_location"] == "gpu"
    finally:
        leave.set()
    worker.join(10)
    assert not worker.is_alive()
    status = client.get("/gpu/status").json()
    assert status["model_location"] == "unloaded"
    assert status["pending"] == []


def test_preheat_without_a_load_function_is_409_with_a_sentence():
    client, _ = make_client()
    response = client.post("/gpu/preheat")
    assert response.status_code == 409
    assert "No load function" in response.json()["detail"]


def test_preheat_whose_load_fails_is_503_and_the_error_shows_in_status():
    def broken() -> nn.Module:
        raise OSError("checkpoint not found")

    client, _ = make_client(load_func=broken)
    response = client.post("/gpu/preheat")
    assert response.status_code == 503
    assert "checkpoint not found" in response.json()["detail"]
    assert "checkpoint not found" in client.get("/gpu/status").json()["last_error"]


def test_timeout_from_a_multipart_form_like_curl_dash_f():
    client, manager = make_client()
    response = client.post("/gpu/timeout", files={"timeout": (None, "300")})
    assert response.status_code == 200
    body = response.json()
    assert body["outcome"] == "done"
    assert body["message"] == "Idle timeout set to 300 s."
    assert manager.idle_timeout == 300.0
    assert body["status"]["idle_timeout"] == 300.0


def test_timeout_from_a_urlencoded_form_and_from_the_query_string():
    client, manager = make_client()
    assert client.post("/gpu/timeout", data={"timeout": "45.5"}).status_code == 200
    assert manager.idle_timeout == 45.5
    assert client.post("/gpu/timeout?timeout=12").status_code == 200
    assert manager.idle_timeout == 12.0


def test_timeout_from_json_with_every_field():
    client, manager = make_client()
    response = client.post(
        "/gpu/timeout", json={"timeout": 120, "release_timeout": 600, "offload_after_use": False}
    )
    assert response.status_code == 200
    assert response.json()["message"] == (
        "Idle timeout set to 120 s. Release timeout set to 600 s. Offload after use turned off."
    )
    assert (manager.idle_timeout, manager.release_timeout, manager.offload_after_use) == (120.0, 600.0, False)


def test_timeout_inf_means_never():
    client, manager = make_client()
    response = client.post("/gpu/timeout", data={"timeout": "inf"})
    assert response.status_code == 200
    assert response.json()["status"]["idle_timeout"] is None
    assert manager.idle_timeout == float("inf")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"data": {"timeout": "-5"}}, "timeout must be 0 or more seconds"),
        ({"data": {"timeout": "soon"}}, "timeout must be a number of seconds"),
        ({"data": {"timeout": "nan"}}, "not NaN"),
        ({"json": {"timeout": True}}, "timeout must be a number of seconds"),
        ({"json": {"timeout": None}}, "Give at least one of"),
        ({"data": {}}, "Give at least one of"),
        ({}, "Give at least one of"),
        ({"json": {"idle_timeout": 300}}, "Unknown field(s) 'idle_timeout'"),
        ({"json": [300]}, "must be an object"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, "not valid JSON"),
        ({"content": b"300", "headers": {"content-type": "text/plain"}}, "Send the values as a form"),
        ({"files": {"timeout": ("t.txt", b"300")}}, "not a file upload"),
        ({"json": {"release_timeout": "inf"}}, "release_timeout must be a finite number"),
        ({"json": {"offload_after_use": "maybe"}}, "offload_after_use must be true or false"),
    ],
)
def test_invalid_timeout_requests_are_422_with_a_sentence_and_change_nothing(kwargs, needle):
    client, manager = make_client(idle_timeout=60, release_timeout=0, offload_after_use=True)
    response = client.post("/gpu/timeout", **kwargs)
    assert response.status_code == 422
    assert needle in response.json()["detail"]
    assert (manager.idle_timeout, manager.release_timeout, manager.offload_after_use) == (60.0, 0.0, True)


def test_one_invalid_field_leaves_the_valid_ones_unapplied():
    client, manager = make_client(idle_timeout=60)
    response = client.post("/gpu/timeout", json={"timeout": 5, "release_timeout": -1})
    assert response.status_code == 422
    assert manager.idle_timeout == 60.0


def test_load_error_in_preheat_is_a_load_error_for_python_callers_too():
    client, manager = make_client(load_func=lambda: None)
    assert client.post("/gpu/preheat").status_code == 503
    with pytest.raises(LoadError):
        manager.preheat()


def test_docs_page_and_its_assets_are_served_locally():
    client, _ = make_client()
    page = client.get("/docs")
    assert page.status_code == 200
    assert "cdn." not in page.text
    assert "/docs/static/swagger-ui-bundle.js" in page.text
    assert "/docs/static/swagger-ui.css" in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"):
        assert client.get(f"/docs/static/{asset}").status_code == 200
    assert client.get("/docs/oauth2-redirect").status_code == 200


def test_openapi_schema_is_3_0_and_lists_every_endpoint_with_the_form_body():
    client, _ = make_client()
    schema = client.get("/openapi.json").json()
    assert schema["openapi"] == "3.0.3"
    assert set(schema["paths"]) == {
        "/health",
        "/gpu/status",
        "/gpu/offload",
        "/gpu/release",
        "/gpu/preheat",
        "/gpu/timeout",
    }
    body = schema["paths"]["/gpu/timeout"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/x-www-form-urlencoded", "multipart/form-data", "application/json"}
    assert "timeout" in body["multipart/form-data"]["schema"]["properties"]


def test_rest_module_imports_neither_gradio_nor_pipelines():
    import ast
    import inspect

    from gpu_control import rest

    tree = ast.parse(inspect.getsource(rest))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"gradio", "pipelines", "ui"}


def test_timeout_with_a_number_too_large_for_a_float_is_a_422_not_a_500():
    import json

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from gpu_control import GPUResourceManager
    from gpu_control.rest import make_router

    app = FastAPI()
    app.include_router(make_router(GPUResourceManager(device="cpu", auto_monitor=False)))
    client = TestClient(app)
    huge = client.post("/gpu/timeout", content='{"timeout": 1' + "0" * 400 + "}",
                       headers={"Content-Type": "application/json"})
    assert huge.status_code == 422
    nested = client.post("/gpu/timeout", content="[" * 100_000 + "]" * 100_000,
                         headers={"Content-Type": "application/json"})
    assert nested.status_code == 422
    assert json.loads(nested.text)["detail"]
