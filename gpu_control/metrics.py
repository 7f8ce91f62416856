"""Prometheus metrics of one or more managers, for any FastAPI app.

    install_metrics(app, manager, queue_depth=lambda: gate.running)   # before mounting at "/"
    # GET /metrics -> the Prometheus text format (OpenMetrics when the scraper asks for it)

Every metric has the label ``model`` (the manager's name); the queue depth has none.

====================================================  =========================================
``gpu_control_model_location{location}``              1 where the model is (unloaded, cpu, gpu)
``gpu_control_model_transition{transition}``          1 for the move under way (``none``: idle)
``gpu_control_model_device_bytes``                    the model's bytes on the compute device
``gpu_control_model_host_bytes``                      the model's bytes in host RAM (the cache)
``gpu_control_model_leases``                          jobs holding the model on the device
``gpu_control_transitions_total{kind,reason}``        finished moves (load/restore/offload/release)
``gpu_control_transition_seconds{kind}``              how long finished moves took (histogram)
``gpu_control_bytes_copied_total{kind}``              bytes copied between host and device
``gpu_control_transition_errors_total{kind}``         moves that failed
``gpu_control_queue_depth``                           jobs waiting or running (with ``queue_depth``)
====================================================  =========================================

The state is read from `GPUResourceManager.get_status` at each scrape (it never waits for a
move); the counters and the histogram are fed by a transition listener, from the moment
`install_metrics` is called. Each installed app has a registry of its own. ``prometheus_client``
is imported only here, so ``import gpu_control`` does not need it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ._extras import missing_extra

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
except ModuleNotFoundError as error:
    raise missing_extra("rest", "gpu_control.metrics", error) from error

from .manager import GPUResourceManager, Location, Transition
from .memory import GIB
from .states import KIND_NAMES

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

__all__ = ["KINDS", "install_metrics"]

logger = logging.getLogger(__name__)

KINDS = tuple(KIND_NAMES.values())
"""The kinds of move a manager reports to its transition listeners."""

_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def install_metrics(
    app: FastAPI,
    manager: GPUResourceManager | Sequence[GPUResourceManager],
    *,
    path: str = "/metrics",
    queue_depth: Callable[[], int] | None = None,
) -> CollectorRegistry:
    """Serve the managers' metrics at ``path`` in the Prometheus text format (open to read).

    Call it before anything is mounted at ``/`` (a route added after the mount is shadowed).

    Args:
        app: the FastAPI application.
        manager: the manager, or several managers with distinct names, to report on.
        path: where the metrics are served.
        queue_depth: returns how many jobs are waiting or running (the ``gpu_control_queue_depth``
            gauge); None leaves the gauge out.

    Returns:
        The registry of this app's metrics (to read them in tests or add your own).

    Raises:
        ImportError: ``prometheus_client`` is not installed (the ``rest`` extra).
        ValueError: two managers share a name.
    """
    try:
        from prometheus_client import CollectorRegistry, Counter, Histogram
    except ModuleNotFoundError as error:
        raise missing_extra("rest", "GET /metrics", error) from error

    managers = [manager] if isinstance(manager, GPUResourceManager) else list(manager)
    names = [each.name for each in managers]
    if len(set(names)) != len(names):
        raise ValueError(f"Each manager needs a name of its own for its metrics; got {names}.")
    registry = CollectorRegistry()
    registry.register(_StateCollector(managers, queue_depth))
    transitions = Counter(
        "gpu_control_transitions",
        "Finished moves of a model, by kind and reason.",
        ["model", "kind", "reason"],
        registry=registry,
    )
    seconds = Histogram(
        "gpu_control_transition_seconds",
        "How long finished moves took, by kind.",
        ["model", "kind"],
        buckets=_DURATION_BUCKETS,
        registry=registry,
    )
    copied = Counter(
        "gpu_control_bytes_copied",
        "Bytes copied between host and device, by kind of move.",
        ["model", "kind"],
        registry=registry,
    )
    errors = Counter(
        "gpu_control_transition_errors",
        "Moves that failed (the model stayed where it was or was dropped), by kind.",
        ["model", "kind"],
        registry=registry,
    )
    for each in managers:
        for kind in KINDS:
            seconds.labels(each.name, kind)
            copied.labels(each.name, kind)
            errors.labels(each.name, kind)

        def record(event: dict[str, Any], model: str = each.name) -> None:
            kind = str(event["kind"])
            copied.labels(model, kind).inc(max(0, int(event.get("bytes_copied") or 0)))
            if event.get("ok"):
                transitions.labels(model, kind, str(event["reason"])).inc()
                seconds.labels(model, kind).observe(float(event["seconds"]))
            else:
                errors.labels(model, kind).inc()

        each.add_transition_listener(record)

    def metrics(request: Request) -> Response:
        encoder, content_type = _encoder(request.headers.get("accept", ""))
        return Response(encoder(registry), media_type=content_type)

    app.add_api_route(
        path,
        metrics,
        methods=["GET"],
        summary="Prometheus metrics: where each model is, its memory, moves, errors and the queue",
        tags=["metrics"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "The Prometheus text format"}},
    )
    return registry


def _encoder(accept: str) -> tuple[Callable[[CollectorRegistry], bytes], str]:
    """The exposition format the scraper asks for; the classic text format for anything odd."""
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest

    try:
        return choose_encoder(accept)
    except (TypeError, ValueError):  # e.g. "text/plain; version=abc"
        return generate_latest, CONTENT_TYPE_PLAIN_0_0_4


class _StateCollector:
    """Reads each manager's status at scrape time: location, move, bytes, leases; the queue."""

    def __init__(self, managers: list[GPUResourceManager], queue_depth: Callable[[], int] | None) -> None:
        self._managers = managers
        self._queue_depth = queue_depth

    def collect(self) -> Iterator[Metric]:
        """Yield the gauges (called by the registry at each scrape)."""
        from prometheus_client.core import GaugeMetricFamily

        location = GaugeMetricFamily(
            "gpu_control_model_location",
            "1 for where the model is (unloaded; cpu: the host cache; gpu: the compute device), 0 elsewhere.",
            labels=["model", "location"],
        )
        moving = GaugeMetricFamily(
            "gpu_control_model_transition",
            "1 for the move under way (none: no move), 0 for the others.",
            labels=["model", "transition"],
        )
        device_bytes = GaugeMetricFamily(
            "gpu_control_model_device_bytes", "The model's bytes on the compute device.", labels=["model"]
        )
        host_bytes = GaugeMetricFamily(
            "gpu_control_model_host_bytes",
            "The model's bytes in host RAM (the host cache).",
            labels=["model"],
        )
        leases = GaugeMetricFamily(
            "gpu_control_model_leases", "Jobs holding the model on the device.", labels=["model"]
        )
        for manager in self._managers:
            status = manager.get_status()
            name = manager.name
            for place in Location:
                location.add_metric([name, place.value], float(status["model_location"] == place.value))
            for move in ("none", *(each.value for each in Transition)):
                moving.add_metric([name, move], float((status["transition"] or "none") == move))
            size = status["model_size_gb"] or 0.0
            on_device = status["model_location"] == Location.GPU.value
            device_bytes.add_metric([name], float(round(size * GIB)) if on_device else 0.0)
            host_bytes.add_metric([name], float(round((status["cpu_cache_gb"] or 0.0) * GIB)))
            leases.add_metric([name], float(status["in_use"]))
        yield from (location, moving, device_bytes, host_bytes, leases)
        if self._queue_depth is not None:
            try:
                depth = float(self._queue_depth())
            except Exception:  # a broken callback must not break the scrape
                logger.warning(
                    "The queue_depth callback failed; gpu_control_queue_depth left out", exc_info=True
                )
                return
            yield GaugeMetricFamily("gpu_control_queue_depth", "Jobs waiting or running.", value=depth)
