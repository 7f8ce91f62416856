"""GET /metrics: the Prometheus text after real transitions, parsed and counted exactly."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gpu_control import GPUResourceManager, LoadError, TransferError
from gpu_control.metrics import install_metrics
from gpu_control.weights import Transfer, attach

from .helpers import small_model

MODEL_BYTES = (16 * 32 + 32 + 32 * 4 + 4) * 4  # small_model's float32 weights


class CopyingEngine:
    """The real engine, reporting every move to or from the device as a copy of the whole model.

    On a CPU-only machine the real engine copies nothing (the device is the host); this one
    says what a GPU would have copied, so the byte counters can be checked exactly.
    ``fail_next_to_device`` makes the next move to the device fail.
    """

    def __init__(self) -> None:
        self.fail_next_to_device = False

    def __call__(self, model: Any, device: torch.device, **kwargs: Any) -> Any:
        inner = attach(model, device, **kwargs)
        engine = self

        class Copying:
            def __getattr__(self, name: str) -> Any:
                return getattr(inner, name)

            def to_device(self) -> Transfer:
                if engine.fail_next_to_device:
                    engine.fail_next_to_device = False
                    raise RuntimeError("simulated copy failure")
                moved = inner.to_device()
                return Transfer(inner.size_bytes, moved.seconds, 1)

            def to_host(self) -> Transfer:
                moved = inner.to_host()
                return Transfer(inner.size_bytes, moved.seconds, 1)

        return Copying()


def make(**kwargs: Any) -> tuple[TestClient, GPUResourceManager, CopyingEngine]:
    engine = CopyingEngine()
    kwargs.setdefault("load_func", small_model)
    queue_depth = kwargs.pop("queue_depth", None)
    manager = GPUResourceManager(device="cpu", auto_monitor=False, engine=engine, **kwargs)
    app = FastAPI()
    install_metrics(app, manager, queue_depth=queue_depth)
    return TestClient(app), manager, engine


def scrape(client: TestClient, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of GET /metrics, keyed by (sample name, sorted labels)."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_a_fresh_manager_is_unloaded_with_every_counter_at_zero():
    client, _, _ = make(name="fresh")
    samples = scrape(client)
    assert value(samples, "gpu_control_model_location", model="fresh", location="unloaded") == 1.0
    assert value(samples, "gpu_control_model_location", model="fresh", location="cpu") == 0.0
    assert value(samples, "gpu_control_model_location", model="fresh", location="gpu") == 0.0
    assert value(samples, "gpu_control_model_transition", model="fresh", transition="none") == 1.0
    assert value(samples, "gpu_control_model_device_bytes", model="fresh") == 0.0
    assert value(samples, "gpu_control_model_host_bytes", model="fresh") == 0.0
    assert value(samples, "gpu_control_model_leases", model="fresh") == 0.0
    for kind in ("load", "restore", "offload", "release"):
        assert value(samples, "gpu_control_transition_errors_total", model="fresh", kind=kind) == 0.0
        assert value(samples, "gpu_control_bytes_copied_total", model="fresh", kind=kind) == 0.0
        assert value(samples, "gpu_control_transition_seconds_count", model="fresh", kind=kind) == 0.0
    assert not [key for key in samples if key[0] == "gpu_control_transitions_total"]
    assert not [key for key in samples if key[0] == "gpu_control_queue_depth"]


def test_load_offload_restore_release_are_counted_by_kind_and_reason_with_bytes_and_durations():
    client, manager, _ = make(name="m", offload_after_use=False)
    manager.preheat()
    on_device = scrape(client)
    assert value(on_device, "gpu_control_model_location", model="m", location="gpu") == 1.0
    assert value(on_device, "gpu_control_model_device_bytes", model="m") == MODEL_BYTES
    assert value(on_device, "gpu_control_model_host_bytes", model="m") == MODEL_BYTES

    manager.force_offload()
    with manager.use():
        pass
    manager.force_offload()
    manager.force_release()

    samples = scrape(client)
    assert value(samples, "gpu_control_model_location", model="m", location="unloaded") == 1.0
    assert value(samples, "gpu_control_model_device_bytes", model="m") == 0.0
    assert value(samples, "gpu_control_model_host_bytes", model="m") == 0.0
    counted = {
        dict(labels)["kind"] + "/" + dict(labels)["reason"]: count
        for (name, labels), count in samples.items()
        if name == "gpu_control_transitions_total"
    }
    assert counted == {
        "load/preheat": 1.0,
        "offload/manual": 2.0,
        "restore/request": 1.0,
        "release/manual": 1.0,
    }
    assert value(samples, "gpu_control_transition_seconds_count", model="m", kind="offload") == 2.0
    assert value(samples, "gpu_control_transition_seconds_count", model="m", kind="load") == 1.0
    assert value(samples, "gpu_control_transition_seconds_bucket", model="m", kind="offload", le="+Inf") == 2
    last = manager.get_status()["last_transition"]
    assert last["kind"] == "release"
    assert value(samples, "gpu_control_transition_seconds_sum", model="m", kind="release") == last["seconds"]
    # a load moves the model to the device once, each restore once, each offload back once
    assert value(samples, "gpu_control_bytes_copied_total", model="m", kind="load") == MODEL_BYTES
    assert value(samples, "gpu_control_bytes_copied_total", model="m", kind="restore") == MODEL_BYTES
    assert value(samples, "gpu_control_bytes_copied_total", model="m", kind="offload") == 2 * MODEL_BYTES
    assert value(samples, "gpu_control_bytes_copied_total", model="m", kind="release") == 0.0
    counts = {"loads": 1, "restores": 1, "offloads": 2, "releases": 1, "uses": 2}
    assert manager.get_status()["counts"] == counts


def test_host_cache_shows_bytes_in_host_ram_and_none_on_the_device():
    client, manager, _ = make(name="m")
    manager.preheat()
    manager.force_offload()
    samples = scrape(client)
    assert value(samples, "gpu_control_model_location", model="m", location="cpu") == 1.0
    assert value(samples, "gpu_control_model_device_bytes", model="m") == 0.0
    assert value(samples, "gpu_control_model_host_bytes", model="m") == MODEL_BYTES


def test_failed_loads_and_restores_are_errors_not_transitions():
    def broken() -> torch.nn.Module:
        raise OSError("checkpoint not found")

    client, manager, engine = make(name="m", load_func=broken)
    with pytest.raises(LoadError):
        manager.preheat()
    with pytest.raises(LoadError):
        manager.preheat()
    manager.preheat(small_model)
    manager.force_offload()
    engine.fail_next_to_device = True
    with pytest.raises(TransferError):
        manager.preheat()

    samples = scrape(client)
    assert value(samples, "gpu_control_transition_errors_total", model="m", kind="load") == 2.0
    assert value(samples, "gpu_control_transition_errors_total", model="m", kind="restore") == 1.0
    assert value(samples, "gpu_control_transition_errors_total", model="m", kind="offload") == 0.0
    assert value(samples, "gpu_control_transitions_total", model="m", kind="load", reason="preheat") == 1.0
    restored = (("kind", "restore"), ("model", "m"), ("reason", "preheat"))
    assert ("gpu_control_transitions_total", restored) not in samples
    assert value(samples, "gpu_control_transition_seconds_count", model="m", kind="load") == 1.0
    assert value(samples, "gpu_control_model_location", model="m", location="cpu") == 1.0


def test_leases_and_location_during_a_job():
    client, manager, _ = make(name="m")
    inside, leave = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def job() -> None:
        try:
            with manager.use():
                inside.set()
                assert leave.wait(10)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            errors.append(error)

    worker = threading.Thread(target=job)
    worker.start()
    try:
        assert inside.wait(10)
        during = scrape(client)
    finally:
        leave.set()
        worker.join(10)
    assert not worker.is_alive()
    assert errors == []
    assert value(during, "gpu_control_model_leases", model="m") == 1.0
    assert value(during, "gpu_control_model_location", model="m", location="gpu") == 1.0
    after = scrape(client)
    assert value(after, "gpu_control_model_leases", model="m") == 0.0
    assert value(after, "gpu_control_model_location", model="m", location="cpu") == 1.0
    assert value(after, "gpu_control_transitions_total", model="m", kind="offload", reason="after_use") == 1.0


def test_queue_depth_gauge_reads_the_callback_at_each_scrape():
    depth = [0]
    client, _, _ = make(queue_depth=lambda: depth[0])
    assert value(scrape(client), "gpu_control_queue_depth") == 0.0
    depth[0] = 3
    assert value(scrape(client), "gpu_control_queue_depth") == 3.0


def test_a_broken_queue_depth_callback_leaves_the_gauge_out_and_the_rest_served(caplog):
    def broken() -> int:
        raise RuntimeError("queue gone")

    client, _, _ = make(name="m", queue_depth=broken)
    samples = scrape(client)
    assert not [key for key in samples if key[0] == "gpu_control_queue_depth"]
    assert value(samples, "gpu_control_model_location", model="m", location="unloaded") == 1.0
    assert "queue_depth callback failed" in caplog.text


def test_each_app_has_its_own_registry():
    first, first_manager, _ = make(name="one")
    second, _, _ = make(name="two")
    first_manager.preheat()
    one, two = scrape(first), scrape(second)
    assert value(one, "gpu_control_transitions_total", model="one", kind="load", reason="preheat") == 1.0
    assert not [key for key in two if dict(key[1]).get("model") == "one"]
    assert not [key for key in two if key[0] == "gpu_control_transitions_total"]


def test_several_managers_in_one_app_are_told_apart_by_the_model_label():
    managers = [
        GPUResourceManager(device="cpu", auto_monitor=False, load_func=small_model, name=name)
        for name in "ab"
    ]
    app = FastAPI()
    install_metrics(app, managers)
    managers[1].preheat()
    samples = scrape(TestClient(app))
    assert value(samples, "gpu_control_model_location", model="a", location="unloaded") == 1.0
    assert value(samples, "gpu_control_model_location", model="b", location="gpu") == 1.0


def test_managers_sharing_a_name_are_refused():
    managers = [GPUResourceManager(device="cpu", auto_monitor=False) for _ in range(2)]
    with pytest.raises(ValueError, match="name of its own"):
        install_metrics(FastAPI(), managers)


def test_openmetrics_when_the_scraper_asks_and_plain_text_for_an_odd_accept_header():
    client, _, _ = make()
    openmetrics = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert openmetrics.status_code == 200
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")
    for accept in ("text/plain; version=abc", "text/plain; version=1.x.y", "*/*", ";;;=", "\x7f"):
        response = client.get("/metrics", headers={"Accept": accept})
        assert response.status_code == 200, accept
        assert "gpu_control_model_location" in response.text


def test_metrics_route_is_a_get_in_the_schema_at_the_chosen_path():
    app = FastAPI()
    install_metrics(app, GPUResourceManager(device="cpu", auto_monitor=False), path="/ops/metrics")
    client = TestClient(app)
    assert client.get("/ops/metrics").status_code == 200
    assert set(client.get("/openapi.json").json()["paths"]["/ops/metrics"]) == {"get"}


def test_import_gpu_control_does_not_import_prometheus_client():
    code = (
        "import sys, gpu_control, gpu_control.rest, gpu_control.metrics; "
        "print('prometheus_client' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "False"
