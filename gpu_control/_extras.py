"""Optional integrations: the sentence that says which extra to install when one is missing."""

from __future__ import annotations

_WHAT = {"rest": "the REST router", "gradio": "the Gradio panel and tools"}


def missing_extra(extra: str, user: str, error: ModuleNotFoundError) -> ImportError:
    """The ImportError to raise when ``user`` cannot import a package of the extra ``extra``.

    Args:
        extra: the distribution's extra that brings the package (``rest``, ``gradio``).
        user: what needs it, as the sentence names it (``gpu_control.rest``).
        error: the failed import.

    Returns:
        An ImportError whose message names the missing package and the install command.
    """
    return ImportError(
        f"{user} needs '{error.name}', which is not installed; install {_WHAT[extra]} with: "
        f'pip install "gpu-control[{extra}]"',
        name=error.name,
    )
