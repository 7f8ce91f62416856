"""Build the API reference of gpu_control from its docstrings, offline, with pdoc.

    python docs/build_api.py [OUTPUT_DIR]      # default: site/api; open site/api/index.html

Exits with status 1, listing them, when the build warns (a docstring pdoc cannot read, a module
that cannot be imported). Deprecation warnings raised by third-party packages while they are
imported are not the reference's and are left out. Needs pdoc (requirements-dev.txt) and the
``rest`` and ``gradio`` extras, whose modules are documented too.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pdoc
import pdoc.render

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "site" / "api"
# The public modules: the package's front, its settings and errors, and the integrations.
MODULES = [
    "gpu_control",
    "gpu_control.config",
    "gpu_control.errors",
    "gpu_control.share",
    "gpu_control.rest",
    "gpu_control.rest_models",
    "gpu_control.http_guard",
    "gpu_control.metrics",
    "gpu_control_gradio",  # and gpu_control_gradio.gpu_panel, which it exports under that name
    "gpu_control_gradio.gpu_tools",
    "gpu_control_gradio.mount",
]


def _ours(warning: warnings.WarningMessage) -> bool:
    """Whether a warning is about the reference (not a third-party deprecation at import time)."""
    third_party = "site-packages" in warning.filename and "pdoc" not in warning.filename
    return not (third_party and issubclass(warning.category, (DeprecationWarning, PendingDeprecationWarning)))


def build(output: Path = DEFAULT_OUTPUT) -> list[str]:
    """Write the HTML reference to ``output``.

    Args:
        output: the directory to write into (created if missing).

    Returns:
        The warnings of the build, one line each (empty when it is clean).
    """
    sys.path.insert(0, str(ROOT))
    import gpu_control

    pdoc.render.configure(docformat="google", footer_text=f"gpu-control {gpu_control.__version__}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*MODULES, output_directory=output)
    return [
        f"{Path(w.filename).name}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught if _ours(w)
    ]


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUTPUT
    problems = build(target)
    for line in problems:
        print(line, file=sys.stderr)
    print(f"API reference: {target / 'index.html'} ({len(problems)} warning(s))")
    sys.exit(1 if problems else 0)
