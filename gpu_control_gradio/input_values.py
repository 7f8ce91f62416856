"""What the input guards share: how a file URL is recognised, and how a sent value is named.

`gpu_control_gradio.input_guard` (Gradio's input preprocessing) and
`gpu_control_gradio.mcp_guard` (MCP tool arguments) refuse the same things with the same
words; the words and the checks both need live here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["URL_INPUTS_OFF", "describe_value", "is_url"]

URL_INPUTS_OFF = (
    "This server does not accept file URLs (ALLOW_URL_INPUTS is off): upload the file instead "
    "(POST /gradio_api/upload, or handle_file() in gradio_client) or, over MCP, pass it as a data: URI."
)
"""The answer to a file URL when ``ALLOW_URL_INPUTS`` is off."""


def is_url(value: Any) -> bool:
    """Whether ``value`` is an http(s) URL (text starting with ``http://`` or ``https://``).

    Args:
        value: any value sent as an input.

    Returns:
        True for http(s) URL text, whatever its case and surrounding spaces.
    """
    return isinstance(value, str) and value.strip().lower().startswith(("http://", "https://"))


def describe_value(value: Any) -> str:
    """What kind of value was sent, in words (never the value itself).

    Args:
        value: any value sent as an input.

    Returns:
        A few words such as ``"a number"`` or ``"a list"``, to end a sentence with.
    """
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text (in gradio_client, wrap a local file with handle_file())"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object in another form"
    return f"a {type(value).__name__}"
