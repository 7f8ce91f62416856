"""Live apps for the app tests: the real `create_app`, served by uvicorn on a loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app import create_app
from gpu_control import ControlAccess, GPUResourceManager
from pipelines import Pipeline, default_pipeline
from ui.blocks import example_rows

from .helpers import GatedPipeline, make_portrait, make_speech, serve
from .security_helpers import plant_secrets

CONTROL_TOKEN = "test-control-token-0123"
"""The control token of the ``locked`` app."""


@dataclass
class LiveApp:
    url: str
    manager: GPUResourceManager
    pipeline: Pipeline
    output_dir: Path


def _reset(manager: GPUResourceManager) -> None:
    manager.force_release()
    manager.update_timeout(60)
    manager.update_release_timeout(0)
    manager.set_offload_after_use(True)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A drawn portrait and a short speech-like clip made for the tests."""
    folder = tmp_path_factory.mktemp("inputs")
    return {"image": make_portrait(folder / "face.png"), "audio": make_speech(folder / "speech.wav")}


@pytest.fixture(scope="module")
def secrets() -> Iterator[dict[str, Any]]:
    """The secrets of `plant_secrets`, planted anew for each module that asks (the file and URL attacks)."""
    with plant_secrets() as planted:
        yield planted


def _gated_app(
    tmp_path_factory: pytest.TempPathFactory, inputs: dict[str, Path], access: ControlAccess | None
) -> Iterator[LiveApp]:
    """Serve the app around a `GatedPipeline` until the session ends."""
    pipeline = GatedPipeline()
    manager = GPUResourceManager(device="cpu", load_func=pipeline.load, name=pipeline.name)
    output_dir = tmp_path_factory.mktemp("locked-outputs" if access else "gated-outputs")
    app = create_app(
        manager,
        pipeline,
        output_dir=output_dir,
        examples=[[str(inputs["image"]), str(inputs["audio"])]],
        access=access,
    )
    with serve(app) as url:
        yield LiveApp(url, manager, pipeline, output_dir)
    manager.stop_monitor()


def _fresh(live: LiveApp) -> Iterator[LiveApp]:
    """``live`` reset to defaults (released, gate open) before and after a test."""
    live.pipeline.gate = None
    live.pipeline.generating.clear()
    _reset(live.manager)
    yield live
    if live.pipeline.gate is not None:
        live.pipeline.gate.set()
    live.pipeline.gate = None
    _reset(live.manager)


@pytest.fixture(scope="session")
def gated_live(tmp_path_factory: pytest.TempPathFactory, inputs: dict[str, Path]) -> Iterator[LiveApp]:
    """The app around a small test pipeline whose generation a test can hold open."""
    yield from _gated_app(tmp_path_factory, inputs, None)


@pytest.fixture()
def gated(gated_live: LiveApp) -> Iterator[LiveApp]:
    """The gated app, reset to defaults (released, gate open) before and after each test."""
    yield from _fresh(gated_live)


@pytest.fixture(scope="session")
def locked_live(tmp_path_factory: pytest.TempPathFactory, inputs: dict[str, Path]) -> Iterator[LiveApp]:
    """The gated app with control locked by `CONTROL_TOKEN`."""
    yield from _gated_app(tmp_path_factory, inputs, ControlAccess(CONTROL_TOKEN))


@pytest.fixture()
def locked(locked_live: LiveApp) -> Iterator[LiveApp]:
    """The locked app, reset to defaults (released, gate open) before and after each test."""
    yield from _fresh(locked_live)


@pytest.fixture(scope="session")
def real_live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    """The app around the built-in pipeline with the repository's examples."""
    rows = example_rows()
    if not rows:
        pytest.fail("examples/ holds no portrait + speech pair; the app's examples cannot run")
    pipeline = default_pipeline()
    manager = GPUResourceManager(device="cpu", load_func=pipeline.load, name=pipeline.name)
    output_dir = tmp_path_factory.mktemp("real-outputs")
    with serve(create_app(manager, pipeline, output_dir=output_dir, refresh_seconds=1.0)) as url:
        yield LiveApp(url, manager, pipeline, output_dir)
    manager.stop_monitor()
