"""The README's integration examples are the tested files, and the API reference builds cleanly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

EXAMPLE_BLOCK = re.compile(r"<!-- (examples/integration/[\w.]+) -->\n```python\n(.*?)```\n", re.DOTALL)


def test_the_readme_integration_examples_are_the_files_the_tests_run():
    blocks = dict(EXAMPLE_BLOCK.findall((ROOT / "README.md").read_text()))
    files = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "examples" / "integration").glob("*.py"))
    assert (
        sorted(blocks)
        == files
        == [
            "examples/integration/fastapi_app.py",
            "examples/integration/gradio_app.py",
            "examples/integration/plain_python.py",
        ]
    )
    for name, text in blocks.items():
        assert text == (ROOT / name).read_text(), f"the README's copy of {name} differs from the file"


def test_the_readme_and_docs_import_the_gradio_pieces_from_the_library():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        assert "from ui import" not in text and "ui.mount_demo" not in text, path.name


def test_the_api_reference_builds_offline_without_warnings(tmp_path: Path):
    pytest.importorskip("pdoc", reason="pdoc is in requirements-dev.txt")
    out = tmp_path / "api"
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "build_api.py"), str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and "(0 warning(s))" in result.stdout
    front = (out / "gpu_control.html").read_text()
    for anchor in ("GPUResourceManager", "GPUPool", "Settings", "GPUResourceManager.use", "GPUPool.add"):
        assert f'id="{anchor}"' in front, anchor
    assert "Lazy load -&gt; device -&gt; host cache -&gt; released" in front
    for page in ("config", "errors", "rest", "metrics"):
        assert (out / "gpu_control" / f"{page}.html").is_file(), page
    for page in ("gpu_panel", "mount"):
        assert (out / "gpu_control_gradio" / f"{page}.html").is_file(), page
    assert 'id="mount_demo"' in (out / "gpu_control_gradio.html").read_text()
    pages = "".join(path.read_text() for path in out.rglob("*.html"))
    assert not re.search(r'<(?:script|link)[^>]+(?:src|href)="(?:https?:)?//', pages), (
        "a page loads from the web"
    )
