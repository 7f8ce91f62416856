"""The gpu-control wheel: what it holds, a core install without any extra, and the README's
integration examples run against the installed wheel with the ``rest`` and ``gradio`` extras."""

from __future__ import annotations

import json
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import gpu_control

from .conftest import ROOT, make_venv, pip_into, run

EXAMPLES = ROOT / "examples" / "integration"
RUNNER = Path(__file__).with_name("run_examples.py")

CORE_CHECK = r"""
import importlib.util, json, sys, tempfile
import torch
import gpu_control
from gpu_control import GPUPool, GPUResourceManager

found = {"file": gpu_control.__file__, "version": gpu_control.__version__}
heavy = ("gradio", "fastapi", "pydantic", "diffusers", "transformers")
found["loaded"] = sorted(m for m in heavy if m in sys.modules)
found["installed"] = sorted(m for m in ("gradio", "fastapi") if importlib.util.find_spec(m))

def use(manager):
    with manager.use() as model:
        return float(model(torch.ones(1, model.in_features, device=manager.device)).sum())

manager = GPUResourceManager(device="cpu", load_func=lambda: torch.nn.Linear(64, 64))
use(manager)
offloaded = manager.get_status()["model_location"]
use(manager)
release = manager.force_release().outcome.value
status = manager.get_status()
found["manager"] = [offloaded, release, status["model_location"], status["counts"]]

pool = GPUPool(devices=["emulated:0"], budget_gb=0.0004)  # room for one 257 KiB model
a = pool.add("a", lambda: torch.nn.Linear(256, 256), offload_after_use=False)
b = pool.add("b", lambda: torch.nn.Linear(256, 256), offload_after_use=False)
use(a)
use(b)
found["pool"] = {name: model["model_location"] for name, model in pool.get_status()["models"].items()}
pool.close()

found["missing"] = {}
for name in ("gpu_control.rest", "gpu_control.metrics", "gpu_control_gradio"):
    try:
        __import__(name)
    except ImportError as error:
        found["missing"][name] = str(error)
print(json.dumps(found))
"""


def test_the_wheel_holds_the_gpu_control_package_typed_with_core_dependencies_and_extras(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata_name,) = [name for name in names if name.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    assert {name.split("/")[0] for name in names} == {
        "gpu_control",
        "gpu_control_gradio",
        f"gpu_control-{gpu_control.__version__}.dist-info",
    }
    assert {
        "gpu_control/py.typed",
        "gpu_control_gradio/py.typed",
        "gpu_control_gradio/__init__.py",
        "gpu_control_gradio/gpu_panel.py",
    } <= set(names)
    assert not [name for name in names if "__pycache__" in name or name.startswith(("ui/", "pipelines/"))]
    assert metadata["Name"] == "gpu-control"
    assert metadata["Version"] == gpu_control.__version__
    requires = metadata.get_all("Requires-Dist")
    core = sorted(req.split(">")[0].split("=")[0].split("<")[0] for req in requires if "extra ==" not in req)
    assert core == ["numpy", "psutil", "torch"]
    assert set(metadata.get_all("Provides-Extra")) == {"nvml", "rest", "gradio", "models", "all"}
    extras = " ".join(req for req in requires if "extra ==" in req)
    for needed in (
        "fastapi",
        "swagger-ui-bundle",
        "prometheus_client",
        "gradio[mcp]==6.31.0",
        "diffusers==0.42.1",
    ):
        assert needed in extras


@pytest.mark.packaging
def test_a_fresh_venv_without_extras_imports_gpu_control_and_runs_a_lifecycle(wheel: Path, tmp_path: Path):
    python = make_venv(tmp_path / "core", system_site_packages=False)
    pip_into(python, "torch==2.13.0", "numpy", "psutil", cwd=tmp_path)
    pip_into(python, "--no-deps", str(wheel), cwd=tmp_path)

    found = json.loads(run(python, "-I", "-c", CORE_CHECK, cwd=tmp_path).stdout)
    assert found["file"].startswith(str(tmp_path / "core"))
    assert found["version"] == gpu_control.__version__
    assert found["loaded"] == [] and found["installed"] == []
    counts = {"loads": 1, "restores": 1, "offloads": 2, "releases": 1, "uses": 2}
    assert found["manager"] == ["cpu", "done", "unloaded", counts]
    assert found["pool"] == {"a": "cpu", "b": "gpu"}
    assert found["missing"] == {
        "gpu_control.rest": "gpu_control.rest needs 'fastapi', which is not installed; install the REST "
        'router with: pip install "gpu-control[rest]"',
        "gpu_control.metrics": "gpu_control.metrics needs 'fastapi', which is not installed; install the "
        'REST router with: pip install "gpu-control[rest]"',
        "gpu_control_gradio": "gpu_control_gradio needs 'gradio', which is not installed; install the Gradio "
        'panel and tools with: pip install "gpu-control[gradio]"',
    }
    plain = run(python, "-I", RUNNER, EXAMPLES, "plain", cwd=tmp_path).stdout
    assert "{'first': 'cpu', 'second': 'gpu'}" in plain
    share = tmp_path / "share"
    share.mkdir()
    status = run(
        tmp_path / "core" / "bin" / "gpu-control", "status", "--share-dir", share, "--json", cwd=tmp_path
    )
    assert json.loads(status.stdout) == {"devices": []}


@pytest.mark.packaging
def test_the_readme_integration_examples_run_against_the_wheel_with_rest_and_gradio(
    wheel: Path, tmp_path: Path
):
    python = make_venv(tmp_path / "full", system_site_packages=True)
    pip_into(python, f"gpu-control[rest,gradio] @ {wheel.as_uri()}", cwd=tmp_path)
    installed = str(tmp_path / "full")

    def example(which: str) -> dict:
        found = json.loads(run(python, "-I", RUNNER, EXAMPLES, which, cwd=tmp_path).stdout.splitlines()[-1])
        assert found.pop("gpu_control_file").startswith(installed)
        return found

    assert example("plain") == {}
    assert example("fastapi") == {
        "score": True,
        "after": "cpu",
        "uses": 1,
        "docs": True,
        "metrics": True,
        "release": "done",
        "wrong_method": 405,
    }
    gradio = example("gradio")
    assert gradio.pop("escape") in {403, 404}
    assert gradio == {
        "page": True,
        "score": True,
        "status_location": "cpu",
        "offload": "nothing_to_do",
        "tools": ["get_gpu_status", "offload_gpu", "release_gpu", "score", "update_gpu_timeout"],
        "rest_uses": 1,
    }
