"""Media files as messages show them: checked to exist, named without their folder.

`pipelines.media` (images, audio) and `pipelines.video` (probing an MP4) open files a user
named; a message about such a file shows its name only, never the folder it lies in (a path
on the server), and a decoder's own error text is cleaned the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import MediaError

__all__ = ["decoder_reason", "existing_file", "shown_name"]

_SHOWN_CHARS = 60


def existing_file(source: Any, kind: str) -> Path:
    """Turn a path-like into a Path that exists and is a file.

    Args:
        source: the path given (text or ``os.PathLike``).
        kind: what the file should be, capitalised, for messages (``"Image"``, ``"Audio"``).

    Returns:
        The path.

    Raises:
        MediaError: ``source`` is not a path, or names a folder or nothing.
    """
    try:
        path = Path(os.fspath(source))
    except TypeError as error:
        raise MediaError(
            f"{kind} input of type {type(source).__name__} is not supported; pass a file path."
        ) from error
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "was not found"
        raise MediaError(f"{kind} file '{shown_name(path)}' {what}; check the path.")
    return path


def shown_name(path: Path) -> str:
    """A file's name as messages show it: never its folder (a server path), cut to 60 characters.

    Args:
        path: the file.

    Returns:
        Its name, ending in ``...`` when it was cut.
    """
    name = path.name
    return name if len(name) <= _SHOWN_CHARS else f"{name[: _SHOWN_CHARS - 3]}..."


def decoder_reason(error: BaseException, path: Path) -> str:
    """A decoder's error text for a message, with the file's folder (a server path) taken out.

    Args:
        error: what the decoder raised.
        path: the file it was decoding.

    Returns:
        The OS's reason, or the error's text with every form of ``path`` replaced by the
        file's shown name, at most 200 characters.
    """
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return error.strerror
    text = str(error)
    for form in {str(path), os.fspath(path.resolve()) if path.exists() else str(path)}:
        text = text.replace(form, shown_name(path))
    return text[:200]
