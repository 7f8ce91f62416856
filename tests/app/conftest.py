"""Live apps for the app tests: the real `create_app`, served by uvicorn on a loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app import create_app
from gpu_control import ControlAccess, GPUResourceManager
from pipelines import Pipeline, default_pipeline
from ui.blocks import example_rows

from .helpers import GatedPipeline, make_portrait, make_speech, serve


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


@pytest.fixture(scope="session")
def gated_live(tmp_path_factory: pytest.TempPathFactory, inputs: dict[str, Path]) -> Iterator[LiveApp]:
    """The app around a small test pipeline whose generation a test can hold open."""
    pipeline = GatedPipeline()
    manager = GPUResourceManager(device="cpu", load_func=pipeline.load, name=pipeline.name)
    output_dir = tmp_path_factory.mktemp("gated-outputs")
    app = create_app(
        manager, pipeline, output_dir=output_dir, examples=[[str(inputs["image"]), str(inputs["audio"])]]
    )
    with serve(app) as url:
        yield LiveApp(url, manager, pipeline, output_dir)
    manager.stop_monitor()


@pytest.fixture()
def gated(gated_live: LiveApp) -> Iterator[LiveApp]:
    """The gated app, reset to defaults (released, gate open) before and after each test."""
    gated_live.pipeline.gate = None
    gated_live.pipeline.generating.clear()
    _reset(gated_live.manager)
    yield gated_live
    if gated_live.pipeline.gate is not None:
        gated_live.pipeline.gate.set()
    gated_live.pipeline.gate = None
    _reset(gated_live.manager)


@pytest.fixture(scope="session")
def locked_live(tmp_path_factory: pytest.TempPathFactory, inputs: dict[str, Path]) -> Iterator[LiveApp]:
    """The gated app with control locked by `CONTROL_TOKEN`."""
    pipeline = GatedPipeline()
    manager = GPUResourceManager(device="cpu", load_func=pipeline.load, name=pipeline.name)
    output_dir = tmp_path_factory.mktemp("locked-outputs")
    app = create_app(
        manager,
        pipeline,
        output_dir=output_dir,
        examples=[[str(inputs["image"]), str(inputs["audio"])]],
        access=ControlAccess(CONTROL_TOKEN),
    )
    with serve(app) as url:
        yield LiveApp(url, manager, pipeline, output_dir)
    manager.stop_monitor()


@pytest.fixture()
def locked(locked_live: LiveApp) -> Iterator[LiveApp]:
    """The locked app, reset to defaults (released, gate open) before and after each test."""
    locked_live.pipeline.gate = None
    locked_live.pipeline.generating.clear()
    _reset(locked_live.manager)
    yield locked_live
    if locked_live.pipeline.gate is not None:
        locked_live.pipeline.gate.set()
    locked_live.pipeline.gate = None
    _reset(locked_live.manager)


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
