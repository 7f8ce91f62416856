"""The REST router and the offline docs, driven in-process through FastAPI's TestClient."""

from __future__ import annotations

import asyncio
import threading

import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from fastapi.testclient import TestClient
from torch import nn

from gpu_control import ControlAccess, GPUResourceManager, LoadError
from gpu_control.rest import MAX_BODY_BYTES, install_method_guard, install_offline_docs, make_router

from .helpers import small_model

JSON = {"content-type": "application/json"}
MULTIPART = {"content-type": "multipart/form-data; boundary=b"}
URLENCODED = {"content-type": "application/x-www-form-urlencoded"}


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
        ({"data": {"timeout": "-5"}}, "timeout must be"),
        ({"data": {"timeout": "soon"}}, "not 'soon'."),
        ({"data": {"timeout": "nan"}}, "timeout must be"),
        ({"data": {"timeout": "1e309"}}, "not '1e309'."),
        ({"data": {"timeout": "2592001"}}, "not '2592001'."),
        ({"json": {"timeout": True}}, "timeout must be a number of seconds"),
        ({"json": {"timeout": 1e308}}, "timeout must be a number of seconds"),
        ({"content": b'{"timeout": 1e400}', "headers": {"content-type": "application/json"}}, "not '1e400'."),
        ({"content": b'{"timeout": NaN}', "headers": JSON}, "timeout must be"),
        ({"json": {"timeout": None}}, "timeout needs a value, not null"),
        ({"json": {"timeout": 5, "release_timeout": None}}, "release_timeout needs a value, not null"),
        ({"json": {"offload_after_use": None}}, "offload_after_use needs a value, not null"),
        ({"data": {}}, "Give at least one of"),
        ({}, "Give at least one of"),
        ({"json": {"idle_timeout": 300}}, "Unknown field(s) 'idle_timeout'"),
        ({"json": [300]}, "must be an object"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, "not valid JSON"),
        ({"content": b"\xff\xfe\xfd", "headers": {"content-type": "application/json"}}, "not valid JSON"),
        ({"content": b'{"timeout": ' + b"1" * 5000 + b"}", "headers": JSON}, "not valid JSON"),
        ({"content": b"300", "headers": {"content-type": "text/plain"}}, "Send the values as a form"),
        ({"files": {"timeout": ("t.txt", b"300")}}, "not a file upload"),
        ({"content": b"timeout=300", "headers": {"content-type": "multipart/form-data"}}, "cannot be read"),
        ({"content": b"--b\r\ngarbage", "headers": MULTIPART}, "Give at least one"),
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


# ---------------------------------------------------------------------- control token, origin

TOKEN = "rest-test-token-0123"


def make_locked(token: str | None = TOKEN, **kwargs) -> tuple[TestClient, GPUResourceManager]:
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("auto_monitor", False)
    kwargs.setdefault("load_func", small_model)
    manager = GPUResourceManager(**kwargs)
    app = FastAPI(docs_url=None, redoc_url=None)
    app.include_router(make_router(manager, access=ControlAccess(token)))
    install_offline_docs(app)
    return TestClient(app), manager


def control_paths(client: TestClient) -> list[str]:
    """Every state-changing route of the app, from its schema: a route added later is covered too."""
    schema = client.get("/openapi.json").json()
    paths = [path for path, operations in schema["paths"].items() if set(operations) - {"get", "head"}]
    assert set(paths) >= {"/gpu/offload", "/gpu/release", "/gpu/preheat", "/gpu/timeout"}
    return paths


def settings(manager: GPUResourceManager) -> tuple:
    status = manager.get_status()
    keys = ("model_location", "idle_timeout", "release_timeout", "offload_after_use", "counts")
    return tuple(status[key] for key in keys)


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token-0123", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer", f"bearer{TOKEN}"],
)
def test_locked_controls_without_the_right_token_are_401_and_change_nothing(authorization):
    client, manager = make_locked()
    manager.preheat()
    before = settings(manager)
    headers = {} if authorization is None else {"Authorization": authorization}
    for path in control_paths(client):
        response = client.post(path, headers=headers, data={"timeout": "5"})
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["detail"].startswith("GPU control is locked: send the control token")
    assert settings(manager) == before


def test_locked_controls_with_the_token_work():
    client, manager = make_locked(offload_after_use=True)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/gpu/preheat", headers=auth).json()["outcome"] == "done"
    assert client.post("/gpu/offload", headers=auth).json()["status"]["model_location"] == "cpu"
    timeout = client.post("/gpu/timeout", headers=auth, json={"timeout": 7})
    assert timeout.json()["status"]["idle_timeout"] == 7.0
    assert client.post("/gpu/release", headers=auth).json()["status"]["model_location"] == "unloaded"
    lower = {"authorization": f"bearer   {TOKEN}  "}
    assert client.post("/gpu/preheat", headers=lower).status_code == 200


def test_locked_reads_stay_open():
    client, _ = make_locked()
    assert client.get("/gpu/status").status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200


def test_the_token_is_checked_before_the_body_is_read():
    client, manager = make_locked()
    response = client.post("/gpu/timeout", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 401
    assert manager.idle_timeout == 60.0


@pytest.mark.parametrize("token", [None, TOKEN])
@pytest.mark.parametrize(
    "origin", ["https://evil.example", "null", "http://testserver.evil.example", "garbage"]
)
def test_a_foreign_origin_is_403_with_or_without_a_token_and_changes_nothing(token, origin):
    client, manager = make_locked(token)
    manager.preheat()
    before = settings(manager)
    headers = {"Origin": origin, "Authorization": f"Bearer {TOKEN}"}
    for path in control_paths(client):
        response = client.post(path, headers=headers, data={"timeout": "5"})
        assert response.status_code == 403, path
        assert response.json()["detail"].startswith("Refused: this control request came from another site")
    assert settings(manager) == before


def test_the_default_access_refuses_a_foreign_origin_and_allows_its_own():
    client, manager = make_client(load_func=small_model)
    foreign = client.post("/gpu/preheat", headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 403
    assert manager.get_status()["model_location"] == "unloaded"
    own = client.post("/gpu/preheat", headers={"Origin": "http://testserver"})
    assert own.status_code == 200
    assert manager.get_status()["model_location"] == "gpu"


def test_openapi_documents_401_403_and_the_bearer_scheme_on_every_control():
    client, _ = make_locked()
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["controlToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "The control token (GPU_CONTROL_TOKEN), needed for every POST when the app has one.",
    }
    for path in control_paths(client):
        operation = schema["paths"][path]["post"]
        assert {"401", "403", "422"} <= set(operation["responses"]), path
        assert operation["security"] == [{"controlToken": []}], path
    for path in ("/gpu/status", "/health"):
        assert "security" not in schema["paths"][path]["get"]


# ---------------------------------------------------------------------- 405 behind a mount at "/"


def make_mounted() -> tuple[TestClient, GPUResourceManager]:
    """The router with a catch-all app mounted at "/" after it, as Gradio is in the real app."""

    async def catch_all(scope, receive, send):
        await PlainTextResponse("mounted app", status_code=404)(scope, receive, send)

    manager = GPUResourceManager(device="cpu", auto_monitor=False)
    app = FastAPI(docs_url=None, redoc_url=None)
    app.include_router(make_router(manager))
    install_offline_docs(app)
    install_method_guard(app)
    app.mount("/", catch_all)
    return TestClient(app), manager


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/gpu/offload", "POST"),
        ("PUT", "/gpu/release", "POST"),
        ("DELETE", "/gpu/preheat", "POST"),
        ("GET", "/gpu/timeout", "POST"),
        ("OPTIONS", "/gpu/timeout", "POST"),
        ("POST", "/gpu/status", "GET, HEAD"),
        ("PATCH", "/health", "GET, HEAD"),
        ("POST", "/docs", "GET"),
        ("POST", "/openapi.json", "GET, HEAD"),
    ],
)
def test_a_wrong_method_is_405_with_allow_though_an_app_is_mounted_at_the_root(method, path, allow):
    client, manager = make_mounted()
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    if method != "HEAD":
        assert response.json() == {"detail": f"{path} answers {allow.replace(', ', ' and ')} only."}
    assert manager.get_status()["model_location"] == "unloaded"


def test_the_guard_lets_right_methods_and_other_paths_through():
    client, _ = make_mounted()
    assert client.get("/gpu/status").status_code == 200
    assert client.head("/openapi.json").status_code == 200
    assert client.post("/gpu/offload").json()["outcome"] == "nothing_to_do"
    assert client.get("/gpu/elsewhere").text == "mounted app"
    assert client.post("/other").text == "mounted app"


def test_without_the_guard_the_mount_shadows_the_405():
    manager = GPUResourceManager(device="cpu", auto_monitor=False)
    app = FastAPI()
    app.include_router(make_router(manager))
    app.mount("/", PlainTextResponse("mounted app", status_code=404))
    assert TestClient(app).get("/gpu/offload").status_code == 404


def test_the_guard_covers_routes_added_after_it():
    client, _ = make_mounted()
    app = client.app

    @app.get("/late")
    async def late() -> dict:
        return {}

    app.router.routes.insert(0, app.router.routes.pop())  # before the mount, as a user would
    assert client.get("/late").status_code == 200
    response = client.post("/late")
    assert (response.status_code, response.headers["allow"]) == (405, "GET")


# ---------------------------------------------------------------------- bad data: short, clear, no 5xx


def test_a_10_mb_timeout_value_is_answered_with_a_short_excerpt_on_every_body_type():
    client, manager = make_client()
    huge = "9" * 10_000_000
    bodies = ({"json": {"timeout": huge}}, {"data": {"timeout": huge}}, {"files": {"timeout": (None, huge)}})
    for kwargs in bodies:
        response = client.post("/gpu/timeout", **kwargs)
        assert response.status_code == 422
        detail = response.json()["detail"]
        assert len(response.content) < 400, len(response.content)
        assert detail.startswith("timeout must be")
        assert "(10000002 characters)" in detail
    assert manager.idle_timeout == 60.0


def test_unknown_field_names_are_cut_and_counted():
    client, _ = make_client()
    fields = {"x" * 1_000_000: 1, **{f"extra{i}": i for i in range(500)}}
    response = client.post("/gpu/timeout", json=fields)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert len(detail) < 300
    assert detail.endswith("and 498 more; use timeout, release_timeout or offload_after_use.")
    assert detail.startswith("Unknown field(s) 'extra0', 'extra1', 'extra10'")


def test_a_streamed_body_over_the_limit_is_413_and_changes_nothing():
    client, manager = make_client()

    def chunks():
        for _ in range(MAX_BODY_BYTES // 2**20 + 1):
            yield b" " * 2**20

    streamed = client.post("/gpu/timeout", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert streamed.json()["detail"] == (
        "The body is larger than 16 MiB; send only timeout, release_timeout or offload_after_use."
    )
    assert manager.idle_timeout == 60.0


def test_a_declared_length_over_the_limit_is_413_before_reading():
    client, _ = make_client()
    app = client.app
    sent = []

    async def call(content_length: int) -> list[dict]:
        async def receive() -> dict:
            sent.append(1)
            return {"type": "http.request", "body": b"{}", "more_body": False}

        messages: list[dict] = []

        async def send(message: dict) -> None:
            messages.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/gpu/timeout", "raw_path": b"/gpu/timeout", "root_path": "",
            "query_string": b"", "server": ("testserver", 80), "client": ("testclient", 1),
            "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                        (b"content-length", str(content_length).encode())],
        }
        await app(scope, receive, send)
        return messages

    messages = asyncio.run(call(MAX_BODY_BYTES + 1))
    assert messages[0]["status"] == 413
    assert sent == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"content": b"[" * 200_000, "headers": JSON},
        {"content": b'{"timeout": ' + b"[" * 900 + b"]" * 900 + b"}", "headers": JSON},
        {"content": b'{"offload_after_use": ' + b"[" * 900 + b"]" * 900 + b"}", "headers": JSON},
        {"content": b'{"timeout": {"a": {"b": 1}}}', "headers": {"content-type": "text/json+json; x=y"}},
        {"content": b"\x00\x01\x02", "headers": {"content-type": "application/octet-stream"}},
        {"content": b"timeout=%ff%fe", "headers": URLENCODED},
        {"content": b"timeout=" + b"%" * 1000, "headers": URLENCODED},
        {"content": b"--b\r\nContent-Disposition: form-data; name=\"timeout\"\r\n\r\n\xff\xfe\r\n--b--\r\n",
         "headers": {"content-type": "multipart/form-data; boundary=b"}},
        {"content": b"--b\r\nContent-Disposition: form-data; name=\"\xff\"\r\n\r\n1\r\n--b--\r\n",
         "headers": {"content-type": "multipart/form-data; boundary=b"}},
        {"data": {f"f{i}": "1" for i in range(1500)}},
        {"json": {"timeout": "1" * 5000}},
        {"json": {"timeout": -1e308, "release_timeout": 1e308, "offload_after_use": 2}},
        {"params": {"timeout": "x" * 4000}},
        {"content": b'{"timeout": 5}', "headers": {"content-type": b"application/js\xffon"}},
        {"content": b"timeout=5", "headers": {"content-type": "multipart/mixed"}},
    ],
)
def test_bad_bodies_are_client_errors_with_a_short_sentence_and_no_internals(kwargs):
    client = TestClient(make_client()[0].app, raise_server_exceptions=False)
    response = client.post("/gpu/timeout", **kwargs)
    assert 400 <= response.status_code < 500, response.text[:300]
    detail = response.json()["detail"]
    assert isinstance(detail, str) and len(detail) < 300, detail[:300]
    for leak in ("Traceback", "File \"", "object at 0x", "/work/", "site-packages", "Error("):
        assert leak not in detail


def test_bodies_on_the_other_controls_are_ignored_not_5xx():
    client = TestClient(make_client()[0].app, raise_server_exceptions=False)
    for path in ("/gpu/offload", "/gpu/release"):
        for kwargs in ({"content": b"\xff" * 1000}, {"json": {"x": [[[]]]}}, {"files": {"f": ("a", b"1")}}):
            assert client.post(path, **kwargs).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/gpu/status"])
def test_head_answers_like_get_for_uptime_probes(path):
    client, _ = make_mounted()
    response = client.head(path)
    assert (response.status_code, response.content) == (200, b"")
    assert response.headers["content-type"] == "application/json"


def test_release_timeout_never_is_zero_as_on_the_other_interfaces():
    client, manager = make_client(release_timeout=600)
    response = client.post("/gpu/timeout", json={"release_timeout": "Never"})
    assert (response.status_code, response.json()["message"]) == (200, "Release timeout set to never.")
    assert manager.release_timeout == 0.0


def test_a_month_is_written_in_whole_seconds():
    client, manager = make_client()
    response = client.post("/gpu/timeout", json={"timeout": 2_592_000})
    assert response.json()["message"] == "Idle timeout set to 2592000 s."


def test_the_library_and_its_http_pieces_load_neither_gradio_nor_the_app():
    import subprocess
    import sys

    code = (
        "import sys, gpu_control, gpu_control.rest, gpu_control.http_guard, gpu_control.metrics, "
        "gpu_control.security; print(sorted(m for m in ('gradio', 'pipelines', 'ui', 'prometheus_client') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"
