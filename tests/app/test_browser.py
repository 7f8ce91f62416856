"""The app in a real browser (Playwright driving the system Chromium).

The page loads and the GPU panel shows where the model is; Preheat and Offload move it and
the panel follows; an example runs with one click, and Offload and Release pressed while it
runs answer "Deferred"; the video plays; /docs renders offline. Saves a screenshot of the page:
to docs/screenshot.png when UPDATE_SCREENSHOT=1 is set (the README shows it), else to pytest's
temporary folder.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import create_app
from gpu_control import GPUResourceManager
from pipelines import default_pipeline
from ui.blocks import example_rows

from .helpers import CHROMIUM, chromium_page, serve, wait_for_message

DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "screenshot.png"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs the system Chromium at /usr/bin/chromium"),
]


class HeldPipeline:
    """The built-in pipeline, held at the start of generation (model leased) while ``gate`` is closed."""

    def __init__(self) -> None:
        self.inner = default_pipeline()
        self.name = self.inner.name
        self.gate = threading.Event()
        self.gate.set()
        self.generating = threading.Event()

    def load(self) -> Any:
        return self.inner.load()

    def generate(self, model: Any, image: Any, audio: Any, options: Any, progress: Any) -> Any:
        self.generating.set()
        assert self.gate.wait(60), "the test never let the job go on"
        return self.inner.generate(model, image, audio, options, progress)


@pytest.fixture()
def browser_app(tmp_path: Path) -> Iterator[tuple[str, HeldPipeline]]:
    pipeline = HeldPipeline()
    manager = GPUResourceManager(device="cpu", load_func=pipeline.load, name=pipeline.name)
    app = create_app(manager, pipeline, output_dir=tmp_path, examples=example_rows()[:1], refresh_seconds=1.0)
    with serve(app) as url:
        yield url, pipeline
    pipeline.gate.set()
    manager.stop_monitor()
    manager.force_release()


def _panel(page: Any, location: str) -> None:
    page.wait_for_selector(f'#gpu-status .gpc-panel[data-location="{location}"]', timeout=30_000)


def test_page_panel_buttons_example_video_and_docs_in_chromium(browser_app, tmp_path):
    url, pipeline = browser_app
    assert example_rows(), "examples/ holds no portrait + speech pair"
    with chromium_page(url) as (page, errors):
        _panel(page, "unloaded")
        assert "Not loaded" in page.inner_text("#gpu-status")
        page.click("#gpu-preheat")
        _panel(page, "gpu")
        assert "Ready on CPU" in page.inner_text("#gpu-status .gpc-badge")
        page.click("#gpu-offload")
        _panel(page, "cpu")
        wait_for_message(page, "The model is in the host cache")
        assert "In host RAM" in page.inner_text("#gpu-status .gpc-badge")

        pipeline.gate.clear()
        page.click('#examples [data-testid="dataset-cell-0-0"]')
        assert pipeline.generating.wait(30), "clicking the example did not start a job"
        page.click("#gpu-offload")
        wait_for_message(page, "Deferred: the model is in use")
        page.click("#gpu-release")
        wait_for_message(page, "Deferred: the model is in use")
        page.wait_for_selector("#gpu-status .gpc-chip.gpc-pending", timeout=15_000)
        assert "in use" in page.inner_text("#gpu-status .gpc-head")
        pipeline.gate.set()

        _panel(page, "unloaded")
        duration = page.wait_for_function(
            """() => {
                const video = document.querySelector('#result-video video');
                if (!video || !(video.readyState >= 1) || !(video.duration > 0)) return null;
                if (video.paused) { video.muted = true; video.play(); }
                return video.currentTime > 0.2 && video.videoWidth > 0 ? video.duration : null;
            }""",
            timeout=60_000,
            polling=250,
        ).json_value()
        assert duration > 1.0
        page.evaluate("document.querySelector('#result-video video').pause()")
        assert "What this job cost" in page.inner_text("#job-cost")

        page.click('#examples [data-testid="dataset-cell-0-0"]')
        _panel(page, "cpu")
        page.wait_for_function(
            "() => (document.querySelector('#job-cost')?.innerText || '').includes('Load model')",
            timeout=60_000,
        )
        page.evaluate("document.querySelector('#result-video video')?.pause()")
        shot = DOCS_SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path / "screenshot.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000

        page.goto(f"{url}/docs")
        page.wait_for_selector(".swagger-ui .opblock", timeout=20_000)
        assert page.locator(".swagger-ui .opblock").count() == 7
    assert errors == []
