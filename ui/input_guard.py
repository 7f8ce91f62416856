"""Guards on what a mounted Blocks app takes as input: files, URLs, and MCP tool arguments.

`guard_inputs` (called by `ui.mount_demo`) wraps two places of a Blocks app:

- its input preprocessing, which every route reaches (UI events, ``/gradio_api/call``,
  ``/run``, ``/queue/join``, MCP): a wrong count of values, a file input that is not a Gradio
  file object, and (when URL inputs are off) an http(s) file input are refused with a sentence
  before Gradio touches them; whatever Gradio itself refuses (a file that was not uploaded, a
  URL to a private address, an unreadable image) is answered with a sentence instead of
  Gradio's dump of server paths and object reprs. Gradio's upload check stays the one that
  decides which files are allowed.
- its MCP server: arguments that do not fit a tool's schema (an unknown name included) get a
  sentence with a short excerpt; file arguments are data: URIs or http(s) URLs (when allowed),
  never objects with a server path, which Gradio's MCP client would upload from the server's
  own disk. A URL of this server's own ``/gradio_api/file=<path>`` route naming a file in
  Gradio's upload folder (what Gradio's ``upload_file_to_gradio`` tool returns) is taken as
  that uploaded file, without a connection; the tool descriptions say how to pass files.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import gradio as gr
from gradio import utils as gradio_utils
from gradio.exceptions import ComponentProcessingError, InvalidPathError
from gradio_client import handle_file

from gpu_control.security import excerpt

__all__ = ["URL_INPUTS_OFF", "check_mcp_arguments", "guard_inputs", "mcp_argument_problem"]

logger = logging.getLogger(__name__)

_COMPONENT_INDEX = re.compile(r"input component at index (\d+)")

URL_INPUTS_OFF = (
    "This server does not accept file URLs (ALLOW_URL_INPUTS is off): upload the file instead "
    "(POST /gradio_api/upload, or handle_file() in gradio_client) or, over MCP, pass it as a data: URI."
)
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
        _guard_mcp(demo.mcp_server_obj, allow_url_inputs=allow_url_inputs, file_route=api_prefix + "file=")


def _guard_preprocessing(demo: gr.Blocks, *, allow_url_inputs: bool) -> None:
    """Wrap the Blocks' input preprocessing: URL inputs when off, and sentences for bad input."""
    preprocess = demo.preprocess_data

    async def preprocess_data(block_fn: Any, inputs: list[Any], state: Any, *args: Any, **kwargs: Any) -> Any:
        names = _input_names(block_fn)
        _check_inputs(block_fn, inputs, names, allow_url_inputs=allow_url_inputs)
        try:
            return await preprocess(block_fn, inputs, state, *args, **kwargs)
        except gr.Error:
            raise
        except Exception as error:  # noqa: BLE001 - every preprocessing failure becomes a sentence
            logger.info("Refused the input of %s: %s", getattr(block_fn, "name", "an event"), error)
            raise gr.Error(_sentence(block_fn, inputs, names, error), print_exception=False) from None

    demo.preprocess_data = preprocess_data  # type: ignore[method-assign]


def _input_names(block_fn: Any) -> list[str]:
    """How messages name each input: its API parameter name and its label, e.g. ``'image' (Portrait)``.

    The parameters Gradio fills in itself (``gr.Request``, ``gr.Progress``, event data, …) are
    not inputs and are skipped.
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


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower().startswith(("http://", "https://"))


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


def _describe(value: Any) -> str:
    """What kind of value was sent, in words (never the value itself)."""
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


def _check_inputs(block_fn: Any, inputs: Any, names: list[str], *, allow_url_inputs: bool) -> None:
    """Refuse wrong counts, malformed file inputs and (when off) URL file inputs, with a sentence.

    A file given without Gradio's ``meta`` marker would skip Gradio's upload check (an image
    input then opens any server path), so it is refused here; the check itself stays Gradio's.
    """
    wanted = len(block_fn.inputs)
    if not isinstance(inputs, list) or len(inputs) < wanted:
        got = len(inputs) if isinstance(inputs, list) else 0
        listed = ", ".join(names[i] for i in range(wanted))
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
                    f"Input {names[index]} must be the number of an example, from 0 to {count - 1}.",
                    print_exception=False,
                )
            continue
        if value is None or not _is_file_input(block):
            continue
        files = _file_objects(value)
        if not _well_formed(block, value, files):
            raise gr.Error(
                f"Input {names[index]} must be a file: {_UPLOAD_HOW}; {_describe(value)} was sent.",
                print_exception=False,
            )
        if not allow_url_inputs and any(
            _is_url(found.get("path")) or _is_url(found.get("url")) for found in files
        ):
            raise gr.Error(f"Input {names[index]}: {URL_INPUTS_OFF}", print_exception=False)


def _well_formed(block: Any, value: Any, files: list[dict[str, Any]]) -> bool:
    """Whether every file in a file input's value carries Gradio's marker (or is a data: URI)."""
    if "path" not in getattr(block.data_model, "model_fields", {}):  # a list or a structure of files
        return all(_has_file_meta(found) for found in files)
    if not isinstance(value, dict):
        return False
    if value.get("path") is None and str(value.get("url") or "").startswith("data:"):
        return True  # an image given inline: Gradio decodes it, no file is read
    return files == [value] and _has_file_meta(value)


def _sentence(block_fn: Any, inputs: list[Any], names: list[str], error: Exception) -> str:
    """The message for an input Gradio could not preprocess (no server path, no repr)."""
    files = [
        (index, value)
        for index, (block, value) in enumerate(zip(block_fn.inputs, inputs, strict=False))
        if _is_file_input(block) and isinstance(value, dict)
    ]
    if isinstance(error, InvalidPathError):
        index = next(
            (i for i, v in files if not _is_url(v.get("path")) and not _uploaded(v.get("path"))),
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
    urls = [i for i, v in files if _is_url(v.get("path"))]
    if urls:
        return (
            f"Input {names[urls[0]]}: the file at {excerpt(inputs[urls[0]]['path'].strip())} could not be fetched; "
            "only public http(s) addresses are fetched, never local or private ones. Upload the file instead."
        )
    return "The input values could not be used; check their types on the API page (?view=api)."


def _uploaded(path: Any) -> bool:
    """Whether ``path`` lies in Gradio's upload folder (used to name the input, not to decide)."""
    try:
        return isinstance(path, str) and gradio_utils.is_in_or_equal(path, gradio_utils.get_upload_folder())
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------- MCP


_FILES_SENTENCE = {
    True: (
        " Pass each file as a data: URI (data:<mime type>;base64,...) or as an http(s) URL of a public"
        " file; to pass a local file, upload it to this app with the upload_file_to_gradio tool,"
        " if present, and pass the URL that tool returns."
    ),
    False: " Pass each file as a data: URI (data:<mime type>;base64,...); this server does not take file URLs.",
}
"""What the tool descriptions say about files, instead of Gradio's sentence (by ``allow_url_inputs``)."""


def _guard_mcp(gradio_mcp: Any, *, allow_url_inputs: bool, file_route: str = "/gradio_api/file=") -> None:
    """Check MCP tool arguments before the MCP SDK and Gradio's MCP server see them.

    The SDK's own answer to a value of the wrong type echoes the whole value (a 10 MB string
    included), Gradio echoes an unknown tool's or argument's name whole, and Gradio's MCP
    client uploads the server's own file for an argument shaped like a Gradio file object.
    Gradio's description of file-taking tools asks for "the returned path" of its upload tool,
    which is a URL of this server that its URL check refuses as a local address: such a URL is
    taken as the uploaded file instead, and the description says what is accepted.
    """
    from mcp import types

    convert = gradio_mcp.convert_strings_to_filedata
    describe = gradio_mcp.get_fn_description
    gradio_sentence = gradio_mcp._file_data_tool_description

    def get_fn_description(block_fn: Any, tool_name: str) -> tuple[str, dict[str, str]]:
        description, parameters = describe(block_fn, tool_name)
        ours = _FILES_SENTENCE[allow_url_inputs]
        return description.replace(gradio_sentence + ".", ours).replace(gradio_sentence, ours), parameters

    def convert_strings_to_filedata(value: Any, filedata_positions: list[list[Any]]) -> Any:
        check_mcp_arguments(value, filedata_positions, allow_url_inputs=allow_url_inputs)
        value, filedata_positions = _take_own_uploads(
            value, filedata_positions, _own_hosts(gradio_mcp), file_route
        )
        try:
            return convert(value, filedata_positions)
        except Exception as error:  # noqa: BLE001 - a bad data: URI becomes a sentence
            logger.info("Refused an MCP file argument: %s", error)
            raise ValueError(
                "A file argument could not be decoded: send it as data:<mime type>;base64,<the file's bytes in base64>."
            ) from None

    gradio_mcp.get_fn_description = get_fn_description
    gradio_mcp.convert_strings_to_filedata = convert_strings_to_filedata
    handler = gradio_mcp.mcp_server.request_handlers.get(types.CallToolRequest)
    if handler is None:
        return

    async def call_tool(request: Any) -> Any:
        arguments = request.params.arguments or {}
        problem = mcp_argument_problem(
            gradio_mcp, request.params.name, arguments, allow_url_inputs=allow_url_inputs
        )
        if problem is None:
            return await handler(request)
        return types.ServerResult(
            types.CallToolResult(content=[types.TextContent(type="text", text=problem)], isError=True)
        )

    gradio_mcp.mcp_server.request_handlers[types.CallToolRequest] = call_tool


def _own_hosts(gradio_mcp: Any) -> set[tuple[str, int | None]]:
    """(host, port) pairs naming this server: the MCP request's Host, X-Forwarded-Host, loopback on its port."""
    try:
        request = gradio_mcp.mcp_server.request_context.request
    except LookupError:
        request = None
    headers = getattr(request, "headers", None) or {}
    named = [headers.get("host", ""), headers.get("x-forwarded-host", "").split(",")[0]]
    if gradio_mcp.local_url:  # pinned by `ui.mount`: http://<address>:<port>/
        port = urlsplit(gradio_mcp.local_url).port
        named += [f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")]
    hosts: set[tuple[str, int | None]] = set()
    for name in named:
        try:
            parts = urlsplit(f"//{name.strip()}")
            if parts.hostname:
                hosts.add((parts.hostname, parts.port))
        except ValueError:  # a port that is not a number names nothing
            continue
    return hosts


def _own_upload(name: str, url: str, own_hosts: set[tuple[str, int | None]], file_route: str) -> Path | None:
    """The file in Gradio's upload folder that ``url`` names on this server's file route.

    Returns:
        The file (links resolved); None when ``url`` is not a URL of this server's file route.

    Raises:
        ValueError: when it is, but names no file uploaded to this server.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    ours = (parts.hostname, port) in own_hosts or (
        port in (None, default) and (parts.hostname, None) in own_hosts
    )
    route = file_route.lstrip("/")
    if not ours or f"/{route}" not in parts.path:
        return None
    named = unquote(parts.path.split(f"/{route}", 1)[1])
    upload_folder = Path(gradio_utils.get_upload_folder()).resolve()
    try:
        found = Path(os.path.abspath(named)).resolve()
        uploaded = found.is_relative_to(upload_folder) and found != upload_folder and found.is_file()
    except (OSError, ValueError, RuntimeError):
        uploaded = False
    if not uploaded:
        raise ValueError(
            f"Argument '{name}': {excerpt(url)} names a file of this server that was not uploaded to it; "
            "upload the file (the upload_file_to_gradio tool, or POST /gradio_api/upload) and pass the URL "
            "of the upload, or send the file as a data: URI."
        )
    return found


def _take_own_uploads(
    value: Any,
    filedata_positions: list[list[Any]],
    own_hosts: set[tuple[str, int | None]],
    file_route: str,
) -> tuple[Any, list[list[Any]]]:
    """Replace URLs of this server's uploads in MCP arguments by those files (Gradio file objects).

    Returns:
        The arguments (a copy when something was replaced) and the positions still to convert.
    """
    found = {}
    for index, position in enumerate(filedata_positions):
        node = _node_at(value, position)
        name = ".".join(str(key) for key in position)
        upload = _own_upload(name, node, own_hosts, file_route) if _is_url(node) else None
        if upload is not None:
            found[index] = upload
    if not found:
        return value, filedata_positions
    value = copy.deepcopy(value)
    for index, upload in found.items():
        *parents, last = filedata_positions[index]
        _node_at(value, parents)[last] = handle_file(str(upload))
    return value, [position for index, position in enumerate(filedata_positions) if index not in found]


def _node_at(value: Any, position: list[Any]) -> Any:
    """The item of ``value`` at ``position`` (keys and indices); None when there is none."""
    node = value
    for key in position:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def check_mcp_arguments(value: Any, filedata_positions: list[list[Any]], *, allow_url_inputs: bool) -> None:
    """Refuse file objects anywhere in MCP tool arguments, and file arguments that are not data: or URLs.

    Args:
        value: the tool's arguments.
        filedata_positions: where Gradio expects files (paths of keys and indices).
        allow_url_inputs: whether http(s) URLs are accepted.

    Raises:
        ValueError: with a sentence; the MCP server answers it as an error result.
    """
    if _holds_file_object(value):
        raise ValueError(
            "MCP tools take files as data: URIs (data:image/png;base64,...) or http(s) URLs, "
            "not as objects with a server path."
        )
    for position in filedata_positions:
        node = _node_at(value, position)
        if node is None:
            continue
        name = ".".join(str(key) for key in position)
        if isinstance(node, str) and node.startswith("data:"):
            continue
        if _is_url(node):
            if not allow_url_inputs:
                raise ValueError(f"Argument '{name}': {URL_INPUTS_OFF}")
            continue
        shown = excerpt(node) if isinstance(node, str) else _describe(node)
        raise ValueError(
            f"Argument '{name}' must be a file as a data: URI (data:image/png;base64,...)"
            f"{' or an http(s) URL' if allow_url_inputs else ''}, not {shown}."
        )


def _holds_file_object(value: Any) -> bool:
    """Whether ``value`` holds a Gradio file object, which Gradio's MCP client would upload from disk."""
    if isinstance(value, dict):
        if isinstance(value.get("path"), str) or isinstance(value.get("meta"), dict):
            return True
        return any(_holds_file_object(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_file_object(item) for item in value)
    return False


_JSON_TYPES = {
    "string": "text",
    "number": "a number",
    "integer": "a whole number",
    "boolean": "true or false",
    "object": "an object",
    "array": "a list",
    "null": "null",
}


def mcp_argument_problem(
    gradio_mcp: Any, tool: str, arguments: dict[str, Any], *, allow_url_inputs: bool = True
) -> str | None:
    """A sentence for the first way ``arguments`` do not fit ``tool``; None when they fit.

    Args:
        gradio_mcp: Gradio's MCP server object.
        tool: the tool's name.
        arguments: the arguments sent.
        allow_url_inputs: whether file arguments may be http(s) URLs.

    Returns:
        The sentence (with at most a short excerpt of a value), or None.
    """
    import jsonschema

    try:
        schema, filedata_positions = gradio_mcp.get_input_schema(tool)
    except (ValueError, KeyError, AssertionError):
        return f"There is no tool {excerpt(tool)}; the tools/list request names the tools."
    known = list(schema.get("properties", {}))
    unknown = next((name for name in arguments if name not in known), None)
    if unknown is not None:
        takes = ", ".join(f"'{name}'" for name in known) or "no arguments"
        return f"Tool '{tool}' has no argument {excerpt(unknown)}; it takes {takes}."
    try:
        check_mcp_arguments(arguments, filedata_positions, allow_url_inputs=allow_url_inputs)
    except ValueError as error:
        return str(error)
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
    if error is None:
        return None
    where = ".".join(str(part) for part in error.absolute_path)
    if error.validator == "required":
        missing = [name for name in error.validator_value if name not in (error.instance or {})]
        return f"Argument '{missing[0] if missing else where}' is required."
    wanted: Any = None
    if error.validator == "type":
        wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
    elif error.validator in ("anyOf", "oneOf") and all(
        isinstance(option, dict) and isinstance(option.get("type"), str) for option in error.validator_value
    ):
        wanted = [option["type"] for option in error.validator_value]
    if wanted:
        expected = " or ".join(_JSON_TYPES.get(str(kind), str(kind)) for kind in wanted)
        return f"Argument '{where}' must be {expected}, not {excerpt(error.instance)}."
    return (
        f"Argument '{where or 'arguments'}' does not fit the tool ({error.validator} "
        f"{excerpt(error.validator_value)}): {excerpt(error.instance)} was sent."
    )
