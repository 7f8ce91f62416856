"""Guards on what a mounted Blocks app takes as input: files, URLs, and MCP tool arguments.

`guard_inputs` (called by `gpu_control_gradio.mount_demo`) wraps two places of a Blocks app:

- its input preprocessing, which every route reaches (UI events, ``/gradio_api/call``,
  ``/run``, ``/queue/join``, MCP): a wrong count of values, a file input that is not a Gradio
  file object, and (when URL inputs are off) an http(s) file input are refused with a sentence
  before Gradio touches them; whatever Gradio itself refuses (a file that was not uploaded, a
  URL to a private address, an unreadable image) is answered with a sentence instead of
  Gradio's dump of server paths and object reprs. Gradio's upload check stays the one that
  decides which files are allowed.
- its MCP server (`gpu_control_gradio.mcp_guard`): tool arguments are checked against the tool's schema, and
  file arguments are data: URIs or http(s) URLs (when allowed), never objects with a server
  path. ``check_mcp_arguments`` and ``mcp_argument_problem`` are importable from here too.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from typing import Any

import gradio as gr
from gradio import utils as gradio_utils
from gradio.exceptions import ComponentProcessingError, InvalidPathError

from gpu_control.security import excerpt

from .input_values import URL_INPUTS_OFF, describe_value, is_url
from .mcp_guard import check_mcp_arguments, guard_mcp, mcp_argument_problem

__all__ = ["URL_INPUTS_OFF", "check_mcp_arguments", "guard_inputs", "mcp_argument_problem"]

logger = logging.getLogger(__name__)

_COMPONENT_INDEX = re.compile(r"input component at index (\d+)")

_UPLOAD_HOW = (
    "upload it first (POST /gradio_api/upload, or handle_file() in gradio_client) and pass "
    '{"path": <the path the upload returned>, "meta": {"_type": "gradio.FileData"}}'
)


def guard_inputs(demo: gr.Blocks, *, allow_url_inputs: bool = True, api_prefix: str = "/gradio_api/") -> None:
    """Guard the inputs of ``demo`` (call it once, after mounting, when the MCP server exists).

    Args:
        demo: the mounted Blocks.
        allow_url_inputs: whether http(s) URLs are accepted as file inputs (Gradio then fetches
            them, never from loopback, private or link-local addresses).
        api_prefix: where Gradio's API is served, e.g. ``/gradio_api/`` (for the URLs of this
            server's own files).
    """
    _guard_preprocessing(demo, allow_url_inputs=allow_url_inputs)
    if demo.mcp_server_obj is not None:
        guard_mcp(demo.mcp_server_obj, allow_url_inputs=allow_url_inputs, file_route=api_prefix + "file=")


def _guard_preprocessing(demo: gr.Blocks, *, allow_url_inputs: bool) -> None:
    """Wrap the Blocks' input preprocessing: URL inputs when off, and sentences for bad input."""
    preprocess = demo.preprocess_data

    async def preprocess_data(block_fn: Any, inputs: list[Any], state: Any, *args: Any, **kwargs: Any) -> Any:
        _check_inputs(block_fn, inputs, allow_url_inputs=allow_url_inputs)
        try:
            return await preprocess(block_fn, inputs, state, *args, **kwargs)
        except gr.Error:
            raise
        except Exception as error:  # noqa: BLE001 - every preprocessing failure becomes a sentence
            logger.info("Refused the input of %s: %s", getattr(block_fn, "name", "an event"), error)
            raise gr.Error(_sentence(block_fn, inputs, error), print_exception=False) from None

    demo.preprocess_data = preprocess_data  # type: ignore[method-assign]


def _input_names(block_fn: Any) -> list[str]:
    """How messages name each input: its API parameter name and its label, e.g. ``'image' (Portrait)``.

    The parameters Gradio fills in itself (``gr.Request``, ``gr.Progress``, event data, …) are
    not inputs and are skipped. Worked out only for a refusal, not for every event (a panel's
    timer ticks every second or two).
    """
    fn = getattr(block_fn, "fn", None)
    params = [p.name for p in gradio_utils.get_positional_input_parameters(fn)] if callable(fn) else []
    names = []
    for index, block in enumerate(block_fn.inputs):
        label = getattr(block, "label", None)
        param = params[index] if index < len(params) else None
        if param and label:
            names.append(f"'{param}' ({label})")
        else:
            names.append(f"'{param or label}'" if param or label else f"number {index + 1}")
    return names


def _is_file_input(block: Any) -> bool:
    """Whether a component takes files (its data model holds a ``path``: FileData, ImageData, lists)."""
    model = getattr(block, "data_model", None)
    return model is not None and _model_takes_files(model)


@functools.lru_cache(maxsize=64)
def _model_takes_files(model: type) -> bool:
    try:
        return '"path"' in json.dumps(model.model_json_schema())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a model without a JSON schema takes no file
        return False


def _has_file_meta(value: dict[str, Any]) -> bool:
    """Whether Gradio treats ``value`` as a file, and so applies its upload check to it."""
    meta = value.get("meta")
    return (
        isinstance(value.get("path"), str)
        and isinstance(meta, dict)
        and meta.get("_type") == "gradio.FileData"
    )


def _file_objects(value: Any) -> list[dict[str, Any]]:
    """The dicts in ``value`` that name a file (have a ``path`` key), outermost first."""
    if isinstance(value, dict):
        if "path" in value:
            return [value]
        return [found for item in value.values() for found in _file_objects(item)]
    if isinstance(value, (list, tuple)):
        return [found for item in value for found in _file_objects(item)]
    return []


def _check_inputs(block_fn: Any, inputs: Any, *, allow_url_inputs: bool) -> None:
    """Refuse wrong counts, malformed file inputs and (when off) URL file inputs, with a sentence.

    A file given without Gradio's ``meta`` marker would skip Gradio's upload check (an image
    input then opens any server path), so it is refused here; the check itself stays Gradio's.
    """
    wanted = len(block_fn.inputs)
    if not isinstance(inputs, list) or len(inputs) < wanted:
        got = len(inputs) if isinstance(inputs, list) else 0
        listed = ", ".join(_input_names(block_fn)[:wanted])
        raise gr.Error(
            f"This call takes {wanted} input value(s), in this order: {listed}; "
            f"{got} {'was' if got == 1 else 'were'} sent.",
            print_exception=False,
        )
    for index, block in enumerate(block_fn.inputs):
        value = inputs[index]
        if isinstance(block, gr.Dataset):  # an example's number, as the UI sends it
            count = len(block.samples)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
                raise gr.Error(
                    f"Input {_input_names(block_fn)[index]} must be the number of an example, "
                    f"from 0 to {count - 1}.",
                    print_exception=False,
                )
            continue
        if value is None or not _is_file_input(block):
            continue
        files = _file_objects(value)
        if not _well_formed(block, value, files):
            raise gr.Error(
                f"Input {_input_names(block_fn)[index]} must be a file: {_UPLOAD_HOW}; "
                f"{describe_value(value)} was sent.",
                print_exception=False,
            )
        if not allow_url_inputs and any(
            is_url(found.get("path")) or is_url(found.get("url")) for found in files
        ):
            raise gr.Error(f"Input {_input_names(block_fn)[index]}: {URL_INPUTS_OFF}", print_exception=False)


def _well_formed(block: Any, value: Any, files: list[dict[str, Any]]) -> bool:
    """Whether every file in a file input's value carries Gradio's marker (or is a data: URI)."""
    if "path" not in getattr(block.data_model, "model_fields", {}):  # a list or a structure of files
        return all(_has_file_meta(found) for found in files)
    if not isinstance(value, dict):
        return False
    if value.get("path") is None and str(value.get("url") or "").startswith("data:"):
        return True  # an image given inline: Gradio decodes it, no file is read
    return files == [value] and _has_file_meta(value)


def _sentence(block_fn: Any, inputs: list[Any], error: Exception) -> str:
    """The message for an input Gradio could not preprocess (no server path, no repr)."""
    names = _input_names(block_fn)
    files = [
        (index, value)
        for index, (block, value) in enumerate(zip(block_fn.inputs, inputs, strict=False))
        if _is_file_input(block) and isinstance(value, dict)
    ]
    if isinstance(error, InvalidPathError):
        index = next(
            (i for i, v in files if not is_url(v.get("path")) and not _uploaded(v.get("path"))),
            files[0][0] if files else None,
        )
        which = f"Input {names[index]}" if index is not None else "A file input"
        return f"{which} names a file that was not uploaded to this server: {_UPLOAD_HOW}."
    match = _COMPONENT_INDEX.search(str(error)) if isinstance(error, ComponentProcessingError) else None
    if match:
        index = int(match.group(1))
        block = block_fn.inputs[index] if index < len(block_fn.inputs) else None
        kind = type(block).__name__ if block is not None else ""
        hint = {
            "Image": "upload a JPEG, PNG or WebP image",
            "Audio": "upload a WAV, MP3, FLAC, OGG or M4A file",
            "Slider": "send a number",
            "Number": "send a number",
            "Textbox": "send text",
            "Checkbox": "send true or false",
        }.get(kind, "check its type on the API page (?view=api)")
        name = names[index] if index < len(names) else f"number {index + 1}"
        return f"Input {name} could not be read: {hint}."
    urls = [i for i, v in files if is_url(v.get("path"))]
    if urls:
        shown = excerpt(inputs[urls[0]]["path"].strip())
        return (
            f"Input {names[urls[0]]}: the file at {shown} could not be fetched; "
            "only public http(s) addresses are fetched, never local or private ones. Upload the file instead."
        )
    return "The input values could not be used; check their types on the API page (?view=api)."


def _uploaded(path: Any) -> bool:
    """Whether ``path`` lies in Gradio's upload folder (used to name the input, not to decide)."""
    try:
        return isinstance(path, str) and gradio_utils.is_in_or_equal(path, gradio_utils.get_upload_folder())
    except (OSError, ValueError):
        return False
