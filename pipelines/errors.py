"""Errors raised by the pipelines package.

    ValueError
    └── MediaError      an image or audio input the user must fix (the message says how)
    RuntimeError
    └── PipelineError   a pipeline cannot be loaded or broke its contract

Bad generation options raise a plain ``ValueError`` whose message names the option.
"""

from __future__ import annotations

__all__ = ["MediaError", "PipelineError"]


class MediaError(ValueError):
    """An image or audio input cannot be used; the message says what is wrong and what to do."""


class PipelineError(RuntimeError):
    """A pipeline cannot be loaded (bad ``module:attr``, import failure, missing member)
    or returned something that is not a readable video."""
