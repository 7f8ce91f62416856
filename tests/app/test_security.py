"""Attacks on the real app: here the REST controls over HTTP (token, foreign Origin, cross-site forms).

Every refused request is checked twice: its answer (status, header, sentence) and the
manager's state before and after (nothing moved, no setting changed).

The other attacks live beside this file, one file per surface, so that each stays readable:

- ``test_security_panel.py``: the Gradio API tools and the UI's own (hidden) event routes;
  MCP tools over streamable HTTP and SSE are in ``test_mcp.py``.
- ``test_security_files.py``: server files through every file parameter of every route
  (Gradio API, gradio_client, MCP), ``/gradio_api/file=`` and the output folder.
- ``test_security_urls.py``: URL inputs (``ALLOW_URL_INPUTS``), SSRF to loopback, private and
  link-local addresses, ``/gradio_api/file=<url>``, MCP URLs of this server's own uploads.
  Both share ``security_helpers.py`` (the planted secrets, attack paths, route helpers).
- ``test_security_app.py``: the real ``python app.py``: default address, token from the
  environment or a file, SIGTERM with an open event stream and during a job, partial files.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app import create_app
from gpu_control import ControlAccess, GPUResourceManager

from .conftest import CONTROL_TOKEN
from .helpers import GatedPipeline, serve

CONTROLS: dict[str, dict[str, Any]] = {
    "/gpu/offload": {},
    "/gpu/release": {},
    "/gpu/preheat": {},
    "/gpu/timeout": {"data": {"timeout": "0", "release_timeout": "5", "offload_after_use": "false"}},
}
LOCKED = "GPU control is locked: send the control token (Authorization: Bearer <token>, "
FOREIGN = "Refused: this control request came from another site's page (its Origin is not this app's)."
EVIL = "https://evil.example"


def state(manager: GPUResourceManager) -> tuple:
    """What a control could change: where the model is, the settings and the move counters."""
    status = manager.get_status()
    return (
        status["model_location"],
        status["idle_timeout"],
        status["release_timeout"],
        status["offload_after_use"],
        status["counts"],
        status["pending"],
    )


def post(url: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}{path}", headers=headers or {}, timeout=30, **{**CONTROLS[path], **kwargs})


@pytest.mark.parametrize("path", list(CONTROLS))
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer not-the-token-0000",
        f"Bearer {CONTROL_TOKEN[:-1]}",
        f"Bearer {CONTROL_TOKEN}0",
        f"Basic {CONTROL_TOKEN}",
        CONTROL_TOKEN,
        "Bearer " + "A" * 8000,
    ],
)
def test_locked_control_without_the_right_token_is_401_and_changes_nothing(locked, path, authorization):
    locked.manager.preheat()
    before = state(locked.manager)
    headers = {} if authorization is None else {"Authorization": authorization}
    response = post(locked.url, path, headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["detail"].startswith(LOCKED)
    assert state(locked.manager) == before


@pytest.mark.parametrize("path", list(CONTROLS))
def test_locked_control_ignores_a_token_in_the_query_string_or_a_cookie(locked, path):
    locked.manager.preheat()
    before = state(locked.manager)
    response = httpx.post(
        f"{locked.url}{path}",
        params={"token": CONTROL_TOKEN, "access_token": CONTROL_TOKEN},
        cookies={"token": CONTROL_TOKEN},
        timeout=30,
    )
    assert response.status_code == 401
    assert state(locked.manager) == before


def test_locked_controls_with_the_token_do_what_they_say(locked):
    auth = {"Authorization": f"Bearer {CONTROL_TOKEN}"}
    preheat = post(locked.url, "/gpu/preheat", auth).json()
    assert (preheat["outcome"], preheat["status"]["model_location"]) == ("done", "gpu")
    assert post(locked.url, "/gpu/offload", auth).json()["status"]["model_location"] == "cpu"
    timeout = post(locked.url, "/gpu/timeout", auth)
    assert timeout.status_code == 200
    manager = locked.manager
    assert (manager.idle_timeout, manager.release_timeout, manager.offload_after_use) == (0.0, 5.0, False)
    assert post(locked.url, "/gpu/release", auth).json()["status"]["model_location"] == "unloaded"


def test_locked_controls_from_the_apps_own_page_with_the_token_work(locked):
    headers = {"Authorization": f"Bearer {CONTROL_TOKEN}", "Origin": locked.url}
    assert post(locked.url, "/gpu/preheat", headers).status_code == 200
    assert locked.manager.get_status()["model_location"] == "gpu"


def test_the_token_is_checked_before_a_huge_body_is_read(locked):
    response = httpx.post(
        f"{locked.url}/gpu/timeout",
        content=b'{"timeout": "' + b"9" * 10_000_000 + b'"}',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 401
    assert locked.manager.idle_timeout == 60.0


@pytest.mark.parametrize("app_name", ["gated", "locked"])
@pytest.mark.parametrize("with_token", [False, True])
@pytest.mark.parametrize(
    "origin",
    [EVIL, "null", "http://127.0.0.1.evil.example", "http://localhost", "file://", "javascript:alert(1)"],
)
@pytest.mark.parametrize("path", list(CONTROLS))
def test_a_foreign_origin_is_403_with_or_without_a_token_and_changes_nothing(
    request, app_name, with_token, origin, path
):
    live = request.getfixturevalue(app_name)
    live.manager.preheat()
    before = state(live.manager)
    headers = {"Origin": origin}
    if with_token:
        headers["Authorization"] = f"Bearer {CONTROL_TOKEN}"
    response = post(live.url, path, headers)
    assert response.status_code == 403
    assert response.json() == {"detail": FOREIGN}
    assert state(live.manager) == before


@pytest.mark.parametrize("app_name", ["gated", "locked"])
@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", b"timeout=0&release_timeout=1&offload_after_use=false"),
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="timeout"\r\n\r\n0\r\n--x--\r\n',
        ),
        ("text/plain", b"timeout=0\r\n"),
    ],
)
def test_a_cross_site_browser_form_cannot_change_anything(request, app_name, content_type, body):
    live = request.getfixturevalue(app_name)
    live.manager.preheat()
    before = state(live.manager)
    browser = {
        "Origin": EVIL,
        "Referer": f"{EVIL}/attack.html",
        "Sec-Fetch-Site": "cross-site",
        "Sec-Fetch-Mode": "navigate",
        "Content-Type": content_type,
        "Cookie": "session=whatever",
    }
    for path in CONTROLS:
        response = httpx.post(f"{live.url}{path}", content=body, headers=browser, timeout=30)
        assert response.status_code == 403, path
    assert state(live.manager) == before


def test_the_open_app_still_takes_same_origin_and_origin_less_controls(gated):
    assert post(gated.url, "/gpu/preheat", {"Origin": gated.url}).status_code == 200
    assert post(gated.url, "/gpu/offload").status_code == 200
    assert gated.manager.get_status()["model_location"] == "cpu"


@pytest.mark.parametrize("path", ["/gpu/status", "/health", "/metrics", "/docs", "/openapi.json"])
def test_reads_stay_open_while_locked_even_from_another_origin(locked, path):
    response = httpx.get(f"{locked.url}{path}", headers={"Origin": EVIL}, timeout=30)
    assert response.status_code == 200


def test_the_docs_offer_the_bearer_token_on_every_control(locked):
    schema = httpx.get(f"{locked.url}/openapi.json").json()
    assert schema["components"]["securitySchemes"]["controlToken"]["scheme"] == "bearer"
    for path in CONTROLS:
        operation = schema["paths"][path]["post"]
        assert operation["security"] == [{"controlToken": []}]
        assert {"401", "403"} <= set(operation["responses"])


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Authorization": "Bearer \u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9".encode("latin-1")}, 401),
        ({"Authorization": b"Bearer \xff\xfe"}, 401),
        ({"Origin": b"https://\xff\xfe"}, 403),
        ({"Origin": "http://[::1"}, 403),
        ({"Origin": "http://127.0.0.1:99999"}, 403),
        ({"Host": "", "Origin": "http://"}, 403),
    ],
)
def test_odd_credentials_and_origins_are_refused_without_a_5xx(locked, headers, expected):
    locked.manager.preheat()
    before = state(locked.manager)
    response = httpx.post(f"{locked.url}/gpu/offload", headers=headers, timeout=30)
    assert response.status_code == expected
    assert state(locked.manager) == before


def test_a_huge_declared_body_is_413_at_once_without_waiting_for_it(locked):
    """A client announcing 100 EB and sending nothing gets its answer at once (no read, no memory)."""
    host, port = locked.url.removeprefix("http://").split(":")
    request = (
        "POST /gpu/timeout HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        f"Authorization: Bearer {CONTROL_TOKEN}\r\n"
        "Content-Type: application/json\r\n"
        "Content-Length: 99999999999999999999\r\n"
        "Connection: close\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request.encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            assert chunk, "the server closed the connection without an answer"
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert locked.manager.idle_timeout == 60.0


@pytest.fixture(scope="module")
def loopback_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, GPUResourceManager]]:
    """An app as `python app.py` builds it on 127.0.0.1 without a token: ``local_only``."""
    pipeline = GatedPipeline()
    manager = GPUResourceManager(device="cpu", load_func=pipeline.load, name=pipeline.name)
    app = create_app(
        manager, pipeline, output_dir=tmp_path_factory.mktemp("loopback"), examples=[],
        access=ControlAccess(local_only=True),
    )
    with serve(app) as url:
        yield url, manager
    manager.stop_monitor()


@pytest.mark.parametrize(
    "path, body",
    [
        ("/gpu/timeout", {"data": {"timeout": "2592000"}}),
        ("/gradio_api/run/update_gpu_timeout", {"json": {"data": [2592000, None, None]}}),
    ],
)
def test_dns_rebinding_cannot_drive_an_open_app_on_loopback(loopback_app, path, body):
    """A page on attacker.example that rebinds its name to 127.0.0.1 is same-origin; its Host is not local."""
    url, manager = loopback_app
    port = url.rsplit(":", 1)[1]
    rebound = {"Host": f"attacker.example:{port}", "Origin": f"http://attacker.example:{port}"}
    before = state(manager)
    answer = httpx.post(f"{url}{path}", headers=rebound, timeout=10, **body)
    assert 400 <= answer.status_code < 500
    assert "only at a loopback address" in answer.text
    assert state(manager) == before
    local = {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}
    assert httpx.post(f"{url}{path}", headers=local, timeout=10, **body).status_code == 200
    assert manager.idle_timeout == 2592000
    manager.update_timeout(60)


# ---------------------------------------------------------------------------------------------------------
# Issue 10, a pool of models: the per-model REST controls (/gpu/models/{name}/...) of an app wired like
# `create_app` around a GPUPool of ``alpha`` (the default) and ``beta`` (see tests/app/test_mcp_models.py,
# which drives the same app's MCP tools). Same rules as the single-model controls above; a name that is not
# in the pool, however it is spelled or encoded, reaches no model.
# ---------------------------------------------------------------------------------------------------------

MODEL_CONTROLS: dict[str, dict[str, Any]] = {
    f"/gpu/models/{name}/{action}": CONTROLS[f"/gpu/{action}"]
    for name in ("beta", "nope")
    for action in ("offload", "release", "preheat", "timeout")
}


@pytest.fixture(scope="module")
def pool_locked_live() -> Iterator[Any]:
    from .test_mcp_models import serve_pool_app

    with serve_pool_app(ControlAccess(CONTROL_TOKEN)) as live:
        yield live


@pytest.fixture(scope="module")
def pool_open_live() -> Iterator[Any]:
    from .test_mcp_models import serve_pool_app

    with serve_pool_app() as live:
        yield live


def _preheated(live: Any) -> Iterator[Any]:
    """``live`` with both models reset and on the device before the test, reset after it."""
    from .test_mcp_models import reset

    reset(live.pool)
    for name in live.pool.names():
        live.pool[name].preheat()
    yield live
    reset(live.pool)


@pytest.fixture()
def pool_locked(pool_locked_live: Any) -> Iterator[Any]:
    yield from _preheated(pool_locked_live)


@pytest.fixture()
def pool_open(pool_open_live: Any) -> Iterator[Any]:
    yield from _preheated(pool_open_live)


def pool_state(live: Any) -> dict[str, tuple[Any, ...]]:
    from .test_mcp_models import state as models_state

    return models_state(live.pool)


def post_model(url: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}{path}", headers=headers or {}, timeout=30, **{**MODEL_CONTROLS[path], **kwargs})


def raw_post(url: str, path: str) -> tuple[int, str, int, Any]:
    """POST a path exactly as written (no client-side clean-up of ``..`` or escapes).

    Returns:
        The status, the content type, the body's length and the body's JSON ``detail``.
    """
    import http.client
    import json
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request("POST", path, body=b"")
        response = connection.getresponse()
        body = response.read()
        return response.status, response.getheader("content-type", ""), len(body), json.loads(body)["detail"]
    finally:
        connection.close()


@pytest.mark.parametrize("path", list(MODEL_CONTROLS))
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer not-the-token-0000", f"Bearer {CONTROL_TOKEN}0", f"Basic {CONTROL_TOKEN}", CONTROL_TOKEN],
)
def test_pool_model_controls_without_the_right_token_are_401_and_change_nothing(
    pool_locked, path, authorization
):
    before = pool_state(pool_locked)
    headers = {} if authorization is None else {"Authorization": authorization}
    response = post_model(pool_locked.url, path, headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["detail"].startswith(LOCKED)
    assert pool_state(pool_locked) == before


@pytest.mark.parametrize("path", [path for path in MODEL_CONTROLS if "/beta/" in path])
def test_pool_model_controls_ignore_a_token_in_the_query_string_or_a_cookie(pool_locked, path):
    before = pool_state(pool_locked)
    response = httpx.post(
        f"{pool_locked.url}{path}",
        params={"token": CONTROL_TOKEN},
        cookies={"token": CONTROL_TOKEN},
        timeout=30,
    )
    assert response.status_code == 401
    assert pool_state(pool_locked) == before


@pytest.mark.parametrize("app_name", ["pool_open", "pool_locked"])
@pytest.mark.parametrize("with_token", [False, True])
@pytest.mark.parametrize("origin", [EVIL, "null", "http://127.0.0.1.evil.example"])
@pytest.mark.parametrize("path", list(MODEL_CONTROLS))
def test_pool_model_controls_from_a_foreign_origin_are_403_and_change_nothing(
    request, app_name, with_token, origin, path
):
    live = request.getfixturevalue(app_name)
    before = pool_state(live)
    headers = {"Origin": origin}
    if with_token:
        headers["Authorization"] = f"Bearer {CONTROL_TOKEN}"
    response = post_model(live.url, path, headers)
    assert (response.status_code, response.json()) == (403, {"detail": FOREIGN})
    assert pool_state(live) == before


@pytest.mark.parametrize("app_name", ["pool_open", "pool_locked"])
def test_a_cross_site_browser_form_cannot_change_any_model(request, app_name):
    live = request.getfixturevalue(app_name)
    before = pool_state(live)
    browser = {
        "Origin": EVIL,
        "Referer": f"{EVIL}/attack.html",
        "Sec-Fetch-Site": "cross-site",
        "Sec-Fetch-Mode": "navigate",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    for path in MODEL_CONTROLS:
        response = httpx.post(f"{live.url}{path}", content=b"timeout=0", headers=browser, timeout=30)
        assert response.status_code == 403, path
    assert pool_state(live) == before


def test_locked_pool_model_controls_with_the_token_do_what_they_say(pool_locked):
    auth = {"Authorization": f"Bearer {CONTROL_TOKEN}", "Origin": pool_locked.url}
    offload = post_model(pool_locked.url, "/gpu/models/beta/offload", auth).json()
    assert (offload["status"]["name"], offload["status"]["model_location"]) == ("beta", "cpu")
    assert post_model(pool_locked.url, "/gpu/models/beta/timeout", auth).status_code == 200
    beta = pool_locked.pool["beta"]
    assert (beta.idle_timeout, beta.release_timeout, beta.offload_after_use) == (0.0, 5.0, False)
    unknown = post_model(pool_locked.url, "/gpu/models/nope/release", auth)
    assert unknown.status_code == 404
    assert pool_locked.pool["alpha"].location.value == "gpu"


def test_the_pool_status_stays_open_while_locked_even_from_another_origin(pool_locked):
    response = httpx.get(f"{pool_locked.url}/gpu/models", headers={"Origin": EVIL}, timeout=30)
    assert response.status_code == 200
    assert list(response.json()["models"]) == ["alpha", "beta"]


def test_the_token_is_checked_before_a_huge_per_model_timeout_body_is_read(pool_locked):
    response = httpx.post(
        f"{pool_locked.url}/gpu/models/beta/timeout",
        content=b'{"timeout": "' + b"9" * 10_000_000 + b'"}',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 401
    assert pool_locked.pool["beta"].idle_timeout == 60.0


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/gpu/models/../alpha/offload", None),
        ("/gpu/models/beta/../alpha/release", None),
        ("/gpu/models/%2e%2e/offload", ".."),
        ("/gpu/models/%2E%2E%2Falpha/offload", None),
        ("/gpu/models/beta%2F..%2Falpha/release", None),
        ("/gpu/models/%252e%252e/release", "%2e%2e"),
        ("/gpu/models/..%5Calpha/release", "..\\alpha"),
        ("/gpu/models/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E/offload", "<img src=x onerror=alert(1)>"),
        ("/gpu/models/a'b%22c/preheat", "a'b\"c"),
        ("/gpu/models/beta%00/release", "beta\x00"),
        ("/gpu/models/%20beta/release", " beta"),
        ("/gpu/models/BETA/release", "BETA"),
        ("/gpu/models/alpha%3F/release", "alpha?"),
        ("/gpu/models/%ff/release", "\ufffd"),
        ("/gpu/models//offload", None),
        ("/gpu/models/" + "n" * 8000 + "/release", "n" * 8000),
    ],
    ids=lambda value: value[:40] if isinstance(value, str) else "no-route",
)
def test_odd_and_traversal_like_model_names_reach_no_model(pool_open, path, name):
    from gpu_control.security import excerpt

    before = pool_state(pool_open)
    status, content_type, length, detail = raw_post(pool_open.url, path)
    assert status == 404
    assert content_type.startswith("application/json")
    if name is None:
        assert detail == "Not Found"
    else:
        assert detail == f"No model named {excerpt(name)} in the pool; known models: 'alpha', 'beta'."
    assert length < 300
    assert pool_state(pool_open) == before


def test_the_docs_offer_the_bearer_token_on_every_per_model_control(pool_locked):
    schema = httpx.get(f"{pool_locked.url}/openapi.json", timeout=30).json()
    for action in ("offload", "release", "preheat", "timeout"):
        operation = schema["paths"][f"/gpu/models/{{name}}/{action}"]["post"]
        assert operation["security"] == [{"controlToken": []}]
        assert {"401", "403", "404"} <= set(operation["responses"])
