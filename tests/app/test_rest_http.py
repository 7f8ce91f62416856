"""REST endpoints of the running app, over HTTP: every endpoint, and 422 for every bad value."""

from __future__ import annotations

import httpx
import pytest

from .helpers import get_status


def test_status_at_start_shows_nothing_loaded(gated):
    response = httpx.get(f"{gated.url}/gpu/status")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    status = response.json()
    assert status["model_location"] == "unloaded"
    assert status["name"] == "test-portrait"
    assert status["device"] == "cpu"
    assert {"idle_time", "idle_timeout", "gpu_memory_allocated_gb", "counts", "last_transition"} <= set(
        status
    )


def test_health(gated):
    response = httpx.get(f"{gated.url}/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_preheat_offload_release_cycle_over_http(gated):
    preheat = httpx.post(f"{gated.url}/gpu/preheat", timeout=30).json()
    assert (preheat["outcome"], preheat["status"]["model_location"]) == ("done", "gpu")
    offload = httpx.post(f"{gated.url}/gpu/offload").json()
    assert (offload["outcome"], offload["status"]["model_location"]) == ("done", "cpu")
    again = httpx.post(f"{gated.url}/gpu/offload").json()
    assert again["outcome"] == "nothing_to_do"
    release = httpx.post(f"{gated.url}/gpu/release").json()
    assert (release["outcome"], release["status"]["model_location"]) == ("done", "unloaded")
    assert httpx.post(f"{gated.url}/gpu/release").json()["outcome"] == "nothing_to_do"


def test_timeout_with_curl_style_form_json_and_all_fields(gated):
    form = httpx.post(f"{gated.url}/gpu/timeout", files={"timeout": (None, "300")})
    assert form.status_code == 200
    assert form.json()["status"]["idle_timeout"] == 300.0
    body = {"timeout": 90, "release_timeout": 600, "offload_after_use": False}
    as_json = httpx.post(f"{gated.url}/gpu/timeout", json=body)
    assert as_json.status_code == 200
    status = get_status(gated.url)
    assert (status["idle_timeout"], status["release_timeout"], status["offload_after_use"]) == (
        90.0,
        600.0,
        False,
    )


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"files": {"timeout": (None, "-1")}},
        {"files": {"timeout": (None, "abc")}},
        {"data": {"timeout": "nan"}},
        {"json": {"timeout": "later"}},
        {"json": {"timeout": 10, "release_timeout": "inf"}},
        {"json": {"offload_after_use": "perhaps"}},
        {"json": {"timeouts": 10}},
        {"json": ["timeout", 10]},
        {"json": {}},
        {},
        {"content": b"{", "headers": {"content-type": "application/json"}},
        {"content": b"timeout 300", "headers": {"content-type": "text/plain"}},
    ],
)
def test_bad_timeout_requests_get_422_with_a_sentence_and_change_nothing(gated, request_kwargs):
    response = httpx.post(f"{gated.url}/gpu/timeout", **request_kwargs)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail.endswith((".", ")")) and len(detail) > 20
    status = get_status(gated.url)
    assert (status["idle_timeout"], status["release_timeout"], status["offload_after_use"]) == (
        60.0,
        0.0,
        True,
    )


def test_wrong_methods_are_client_errors_not_500(gated):
    # Behind the Gradio mount at "/", a GET on a POST-only route falls through to Gradio's 404.
    assert httpx.get(f"{gated.url}/gpu/offload").status_code == 404
    assert httpx.post(f"{gated.url}/gpu/status").status_code in (404, 405)
    assert get_status(gated.url)["model_location"] == "unloaded"


def test_docs_render_from_local_assets(gated):
    page = httpx.get(f"{gated.url}/docs")
    assert page.status_code == 200
    assert "https://" not in page.text
    assert httpx.get(f"{gated.url}/docs/static/swagger-ui-bundle.js").status_code == 200
    schema = httpx.get(f"{gated.url}/openapi.json").json()
    assert {"/gpu/status", "/gpu/offload", "/gpu/release", "/gpu/timeout", "/health"} <= set(schema["paths"])


def test_gradio_ui_is_mounted_at_the_root_next_to_rest(gated):
    page = httpx.get(f"{gated.url}/")
    assert page.status_code == 200
    assert "<html" in page.text.lower()
    config = httpx.get(f"{gated.url}/config").json()
    assert config["title"] == "Talking Portrait · gpu_control"
