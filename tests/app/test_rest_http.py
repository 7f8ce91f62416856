"""REST endpoints of the running app, over HTTP: every endpoint, and 422 for every bad value."""

from __future__ import annotations

import threading

import httpx
import pytest
from gradio_client import Client, handle_file

from .helpers import get_status, wait_for


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


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/gpu/offload", "POST"),
        ("GET", "/gpu/release", "POST"),
        ("GET", "/gpu/preheat", "POST"),
        ("GET", "/gpu/timeout", "POST"),
        ("PUT", "/gpu/timeout", "POST"),
        ("DELETE", "/gpu/release", "POST"),
        ("POST", "/gpu/status", "GET, HEAD"),
        ("POST", "/health", "GET, HEAD"),
        ("POST", "/metrics", "GET"),
    ],
)
def test_wrong_methods_are_405_with_allow_though_gradio_is_mounted_at_the_root(gated, method, path, allow):
    response = httpx.request(method, f"{gated.url}{path}")
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert response.json() == {"detail": f"{path} answers {allow.replace(', ', ' and ')} only."}
    assert get_status(gated.url)["model_location"] == "unloaded"


def test_gradio_routes_are_not_touched_by_the_method_guard(gated):
    assert httpx.get(f"{gated.url}/gradio_api/info").status_code == 200
    assert httpx.get(f"{gated.url}/gpu/no-such-page").status_code == 404


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


def test_metrics_follow_rest_controls_with_exact_counts(gated):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        response = httpx.get(f"{gated.url}/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        }

    model = (("model", "test-portrait"),)
    before = scrape()
    assert httpx.post(f"{gated.url}/gpu/preheat", timeout=30).json()["outcome"] == "done"
    assert httpx.post(f"{gated.url}/gpu/offload").json()["outcome"] == "done"
    after = scrape()

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted({**dict(model), **labels}.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("gpu_control_transitions_total", kind="load", reason="preheat") == 1.0
    assert grew("gpu_control_transitions_total", kind="offload", reason="manual") == 1.0
    assert grew("gpu_control_transition_seconds_count", kind="load") == 1.0
    assert grew("gpu_control_transition_errors_total", kind="load") == 0.0
    assert after[("gpu_control_model_location", (("location", "cpu"), *model))] == 1.0
    assert after[("gpu_control_model_leases", model)] == 0.0
    assert after[("gpu_control_queue_depth", ())] == 0.0
    assert after[("gpu_control_model_host_bytes", model)] == get_status(gated.url)["cpu_cache_gb"] * 2**30


def test_metrics_queue_depth_counts_the_running_job_and_those_waiting_for_the_slot(gated, inputs):
    def depth() -> float:
        lines = httpx.get(f"{gated.url}/metrics").text.splitlines()
        return float(next(line for line in lines if line.startswith("gpu_control_queue_depth ")).split()[1])

    gated.pipeline.gate = threading.Event()
    calls = gated.pipeline.calls
    client = Client(gated.url, verbose=False)
    jobs = [
        client.submit(
            handle_file(str(inputs["image"])),
            handle_file(str(inputs["audio"])),
            size=96,
            seed=seed,
            api_name="/generate_video",
        )
        for seed in range(3)
    ]
    assert gated.pipeline.generating.wait(30), "the first job never started"
    assert wait_for(lambda: depth() == 3.0)  # one running, two waiting for the slot
    assert gated.pipeline.calls == calls + 1
    gated.pipeline.gate.set()
    for job in jobs:
        job.result(timeout=60)
    assert wait_for(lambda: depth() == 0.0)
