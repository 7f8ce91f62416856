"""Guards on a mounted Blocks app's MCP server: tool arguments checked, file arguments as data.

`guard_mcp` (installed by `gpu_control_gradio.input_guard.guard_inputs` when the app has an MCP server) wraps
Gradio's MCP server so that arguments that do not fit a tool's schema (an unknown name
included) get a sentence with a short excerpt (`mcp_argument_problem`), and file arguments are
data: URIs or http(s) URLs (when allowed), never objects with a server path, which Gradio's MCP
client would upload from the server's own disk (`check_mcp_arguments`). A URL of this server's
own ``/gradio_api/file=<path>`` route naming a file in Gradio's upload folder (what Gradio's
``upload_file_to_gradio`` tool returns) is taken as that uploaded file, without a connection;
the tool descriptions say how to pass files.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from gradio import utils as gradio_utils
from gradio_client import handle_file

from gpu_control.security import excerpt

from .input_values import URL_INPUTS_OFF, describe_value, is_url

__all__ = ["check_mcp_arguments", "guard_mcp", "mcp_argument_problem"]

logger = logging.getLogger(__name__)

_FILES_SENTENCE = {
    True: (
        " Pass each file as a data: URI (data:<mime type>;base64,...) or as an http(s) URL of a public"
        " file; to pass a local file, upload it to this app with the upload_file_to_gradio tool,"
        " if present, and pass the URL that tool returns."
    ),
    False: (
        " Pass each file as a data: URI (data:<mime type>;base64,...); this server does not take file URLs."
    ),
}
"""What the tool descriptions say about files, instead of Gradio's sentence (by ``allow_url_inputs``)."""


def guard_mcp(gradio_mcp: Any, *, allow_url_inputs: bool, file_route: str = "/gradio_api/file=") -> None:
    """Check MCP tool arguments before the MCP SDK and Gradio's MCP server see them.

    The SDK's own answer to a value of the wrong type echoes the whole value (a 10 MB string
    included), Gradio echoes an unknown tool's or argument's name whole, and Gradio's MCP
    client uploads the server's own file for an argument shaped like a Gradio file object.
    Gradio's description of file-taking tools asks for "the returned path" of its upload tool,
    which is a URL of this server that its URL check refuses as a local address: such a URL is
    taken as the uploaded file instead, and the description says what is accepted.

    Args:
        gradio_mcp: Gradio's MCP server object (``demo.mcp_server_obj``), changed in place.
        allow_url_inputs: whether file arguments may be http(s) URLs.
        file_route: where this server serves files, for recognising the URLs of its own uploads.
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
                "A file argument could not be decoded: send it as "
                "data:<mime type>;base64,<the file's bytes in base64>."
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
    """(host, port) pairs naming this server: the MCP request's Host and X-Forwarded-Host, loopback."""
    try:
        request = gradio_mcp.mcp_server.request_context.request
    except LookupError:
        request = None
    headers = getattr(request, "headers", None) or {}
    named = [headers.get("host", ""), headers.get("x-forwarded-host", "").split(",")[0]]
    if gradio_mcp.local_url:  # pinned by `gpu_control_gradio.mount`: http://<address>:<port>/
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
        upload = _own_upload(name, node, own_hosts, file_route) if is_url(node) else None
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
        if is_url(node):
            if not allow_url_inputs:
                raise ValueError(f"Argument '{name}': {URL_INPUTS_OFF}")
            continue
        shown = excerpt(node) if isinstance(node, str) else describe_value(node)
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
