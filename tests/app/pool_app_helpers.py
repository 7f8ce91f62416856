"""Doubles shared by the pool app tests: two named pipelines, a pool of them, readers of the panel."""

from __future__ import annotations

import html
import re
from types import SimpleNamespace
from typing import Any

from gpu_control import GPUPool

from .helpers import GatedPipeline

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
HERE = "tests.app.pool_app_helpers"


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


def ready_for(pool: GPUPool, control: str) -> None:
    """Both models where the control would change something: on the device (cached for preheat)."""
    for name in pool.names():
        pool[name].preheat()
        if control == "preheat":
            pool[name].force_offload()
