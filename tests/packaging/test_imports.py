"""What each part of gpu_control imports: the core needs no extra, each integration its own only."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGE = ROOT / "gpu_control"
# Which modules of the package may import which optional packages (at any depth).
EXTRA_USERS = {
    "fastapi": {"rest", "rest_models", "http_guard", "metrics", "gradio"},
    "starlette": {"http_guard", "gradio"},
    "pydantic": {"rest"},
    "swagger_ui_bundle": {"rest"},
    "prometheus_client": {"metrics"},
    "gradio": {"gradio"},
    "gradio_client": {"gradio"},
    "mcp": {"gradio"},
}
NEVER = {"pipelines", "ui", "app", "app_pool", "serving", "diffusers", "transformers", "accelerate"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and not node.level
    }
    return {name.split(".")[0] for name in names}


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_each_optional_package_is_imported_only_by_its_integration_and_never_the_app():
    for path in sorted(PACKAGE.rglob("*.py")):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        imported = _imports(path)
        assert not imported & NEVER, f"{path.name} imports {imported & NEVER}"
        for optional, users in EXTRA_USERS.items():
            if optional in imported:
                assert part in users, f"gpu_control/{path.relative_to(PACKAGE)} imports {optional}"


def test_import_gpu_control_loads_no_integration_package():
    loaded = _run(
        "import sys, gpu_control; print(sorted(m for m in ('gradio', 'fastapi', 'starlette', "
        "'pydantic', 'diffusers', 'transformers', 'accelerate', 'prometheus_client', 'pipelines', 'ui') "
        "if m in sys.modules))"
    )
    assert loaded == "[]"


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("gpu_control.rest", "fastapi", "rest"),
        ("gpu_control.rest", "pydantic", "rest"),
        ("gpu_control.rest_models", "fastapi", "rest"),
        ("gpu_control.http_guard", "starlette", "rest"),
        ("gpu_control.metrics", "fastapi", "rest"),
        ("gpu_control_gradio", "gradio", "gradio"),
        ("gpu_control_gradio.gpu_panel", "gradio", "gradio"),
    ],
)
def test_a_missing_extra_is_named_in_the_import_error(module: str, blocked: str, extra: str):
    code = (
        f"import json, sys; sys.modules[{blocked!r}] = None\n"
        f"try:\n    import {module}\nexcept ImportError as error:\n"
        "    print(json.dumps([type(error).__name__, error.name, str(error)]))\n"
    )
    kind, name, message = json.loads(_run(code))
    assert (kind, name) == ("ImportError", blocked)
    assert message.startswith(("gpu_control.", "gpu_control_gradio")) and f"needs '{blocked}', which is not installed" in message
    assert message.endswith(f'pip install "gpu-control[{extra}]"')


def test_the_offline_docs_and_metrics_name_the_rest_extra_when_their_package_is_missing():
    code = (
        "import json, sys\n"
        "from fastapi import FastAPI\n"
        "from gpu_control import GPUResourceManager\n"
        "from gpu_control.metrics import install_metrics\n"
        "from gpu_control.rest import install_offline_docs\n"
        "sys.modules['swagger_ui_bundle'] = None; sys.modules['prometheus_client'] = None\n"
        "found = []\n"
        "docs = lambda: install_offline_docs(FastAPI())\n"
        "metrics = lambda: install_metrics(FastAPI(), GPUResourceManager())\n"
        "for call in (docs, metrics):\n"
        "    try:\n        call()\n    except ImportError as error:\n        found.append(str(error))\n"
        "print(json.dumps(found))\n"
    )
    assert json.loads(_run(code)) == [
        "The offline /docs page needs 'swagger_ui_bundle', which is not installed; install the REST router "
        'with: pip install "gpu-control[rest]"',
        "GET /metrics needs 'prometheus_client', which is not installed; install the REST router with: "
        'pip install "gpu-control[rest]"',
    ]


def test_the_version_is_written_once_and_read_by_the_build():
    import gpu_control
    from gpu_control import _version

    assert gpu_control.__version__ == _version.__version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and "\nversion =" not in pyproject.split("[tool.")[0]
    assert f"## {gpu_control.__version__}" in (ROOT / "CHANGELOG.md").read_text()
