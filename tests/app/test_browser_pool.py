"""The pool's GPU panel in a real browser (Playwright driving the system Chromium).

Two models of about 5 MiB on two emulated cards of 8 MiB each: the panel shows a bar per card
and a row per model; choosing the second model in the selector and pressing Preheat and
Offload moves that model and no other. Saves a screenshot of the page with both models on
their cards: to docs/screenshot-pool.png when UPDATE_SCREENSHOT=1 is set, else to pytest's
temporary folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from app import create_app
from gpu_control import GPUPool

from .helpers import CHROMIUM, GatedPipeline, chromium_page, serve, wait_for_message

DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "screenshot-pool.png"
BALLAST = 5 * 2**20 // 4  # float32 values: about 5 MiB per model, so two never share an 8 MiB card

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs the system Chromium at /usr/bin/chromium"),
]


class HeavyPipeline(GatedPipeline):
    """`GatedPipeline` under another name, whose model carries about 5 MiB of unused weights."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def load(self) -> nn.Module:
        model = super().load()
        model.register_parameter("ballast", nn.Parameter(torch.zeros(BALLAST), requires_grad=False))
        return model


@pytest.fixture()
def pool_app(tmp_path: Path) -> Iterator[tuple[str, GPUPool]]:
    pool = GPUPool(devices=["emulated:0", "emulated:1"], budget_gb=8 / 1024, wait_timeout=10)
    pipelines = {"alpha": HeavyPipeline("alpha"), "beta": HeavyPipeline("beta")}
    for name, pipeline in pipelines.items():
        pool.add(name, pipeline.load)
    app = create_app(
        pool["alpha"],
        pipelines["alpha"],
        output_dir=tmp_path / "outputs",
        examples=[],
        refresh_seconds=1.0,
        pool=pool,
        pipelines=pipelines,
    )
    with serve(app) as url:
        yield url, pool
    pool.close()


def where(pool: GPUPool) -> dict[str, str]:
    return {name: pool[name].get_status()["model_location"] for name in pool.names()}


def _row(page: Any, model: str, location: str) -> None:
    selector = f'#gpu-pool .gpc-model[data-model="{model}"][data-location="{location}"]'
    page.wait_for_selector(selector, timeout=30_000)


def _choose(page: Any, model: str) -> None:
    page.click("#gpu-model input")
    page.click(f'#gpu-model li[aria-label="{model}"]')
    page.wait_for_selector(f'#gpu-pool .gpc-selected[data-model="{model}"]', timeout=15_000)


def test_the_pool_panel_shows_cards_and_models_and_acts_on_the_chosen_model(pool_app, tmp_path):
    url, pool = pool_app
    with chromium_page(url) as (page, errors):
        _row(page, "alpha", "unloaded")
        assert page.locator("#gpu-pool .gpc-device").count() == 2
        assert page.locator("#gpu-pool .gpc-model").count() == 2
        assert page.get_attribute("#gpu-pool .gpc-selected", "data-model") == "alpha"
        assert page.locator("#model-choice").count() == 1  # the form's selector: two pipelines

        _choose(page, "beta")
        page.click("#gpu-preheat")
        _row(page, "beta", "gpu")
        wait_for_message(page, "beta: The model is on ")
        page.wait_for_selector('#gpu-status .gpc-panel[data-location="gpu"]', timeout=15_000)
        assert where(pool) == {"alpha": "unloaded", "beta": "gpu"}
        page.click("#gpu-offload")
        _row(page, "beta", "cpu")
        wait_for_message(page, "beta: The model is in the host cache")
        assert where(pool) == {"alpha": "unloaded", "beta": "cpu"}
        assert pool["alpha"].get_status()["counts"]["loads"] == 0

        _choose(page, "alpha")
        page.click("#gpu-preheat")
        _row(page, "alpha", "gpu")
        _choose(page, "beta")
        page.click("#gpu-preheat")
        _row(page, "beta", "gpu")
        wait_for_message(page, "beta: The model is on ")
        assert where(pool) == {"alpha": "gpu", "beta": "gpu"}
        devices = {device["device"]: device["models"] for device in pool.get_status()["devices"]}
        assert sorted(devices.values()) == [["alpha"], ["beta"]]
        for device, models in devices.items():
            bar = page.inner_text(f'#gpu-pool .gpc-device[data-device="{device}"]')
            assert f"{device} · {models[0]}" in bar

        page.add_style_tag(content="* { transition: none !important; }")  # the bars at their width now
        update = os.environ.get("UPDATE_SCREENSHOT") == "1"
        shot = DOCS_SCREENSHOT if update else tmp_path / "screenshot-pool.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
    assert errors == []
