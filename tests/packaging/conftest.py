"""The packaging tests: the wheel, built once per run, installed into fresh virtual environments.

``GPU_CONTROL_SKIP_PACKAGING=1`` skips the tests that make virtual environments (on a machine
that cannot); they run by default, in CI too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP_ENV = "GPU_CONTROL_SKIP_PACKAGING"
# Left out of the copy of the checkout that the wheel is built from (the checkout stays clean).
NOT_SOURCES = (
    ".git",
    "__pycache__",
    ".*cache",
    ".hypothesis",
    "*.egg-info",
    "build",
    "dist",
    "site",
    "outputs",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(SKIP_ENV, "").strip().lower() not in {"1", "true", "yes"}:
        return
    skip = pytest.mark.skip(reason=f"{SKIP_ENV} is set")
    for item in items:
        if "packaging" in item.keywords:
            item.add_marker(skip)


def clean_env() -> dict[str, str]:
    """The environment for a subprocess that must not see the checkout (no PYTHONPATH)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    return env


def run(*command: str | Path, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run a command; fail the test with its output when it fails."""
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, (
        f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result


def make_venv(path: Path, *, system_site_packages: bool) -> Path:
    """A virtual environment without pip of its own (this interpreter's pip installs into it)."""
    command = [sys.executable, "-m", "venv", "--without-pip"]
    if system_site_packages:
        command.append("--system-site-packages")
    run(*command, path, cwd=path.parent)
    return path / "bin" / "python"


def pip_into(python: Path, *args: str, cwd: Path) -> None:
    """``pip install`` into the environment of ``python``."""
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", *args, cwd=cwd, timeout=300)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The gpu-control wheel, built offline from a copy of the checkout (as ``pip install .`` builds it)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCES), symlinks=True)
    dist = work / "dist"
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        ".",
        "-w",
        dist,
        cwd=source,
    )
    (built,) = dist.glob("gpu_control-*.whl")
    return built
