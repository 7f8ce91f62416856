"""Mount a Gradio Blocks app on a FastAPI app with Gradio's file checks on and its inputs guarded.

    app.include_router(make_router(manager, access=access))   # REST first
    app = mount_demo(app, demo, path="/", mcp_server=True, output_dir=out, output_pattern="talking-*.mp4")

What `mount_demo` adds to ``gr.mount_gradio_app()`` (Gradio 6.31), for any Blocks:

- **Only uploaded files.** ``gr.mount_gradio_app()`` never marks the Blocks as launched, and
  Gradio skips its "only files the user uploaded" check for Blocks that have not launched: an
  API caller could name any server file (``/etc/passwd``) as a file input and download the
  copy. Marking the Blocks launched turns Gradio's own check back on (it resolves ``..`` and
  symlinks); nothing here replaces it. `gpu_control_gradio.input_guard` makes sure every file input reaches
  that check.
- **Only the files the app wrote from its output folder.** ``output_dir`` is served, but
  ``GET /gradio_api/file=<path>`` (and ``/file/<path>``) of anything that lies in it, by name or
  once links are resolved, answers 404 unless it is a regular file inside it whose path there
  matches ``output_pattern`` and has no part starting with ``.``: no ``.env``, token file or
  source file of a folder that happens to be the output folder. A link out of the folder stays
  refused (Gradio's own check).
- **No fetching on behalf of a caller.** ``GET /gradio_api/file=<url>`` (and ``/file/<url>``,
  URL-encoded or not) is refused before Gradio would fetch the URL itself. Gradio's MCP
  loopback client is pinned to this server, as ``launch()`` does, instead of to whatever host
  the first MCP request's headers name.
- **URL inputs** (``allow_url_inputs``, default True as in Gradio's MCP server): when allowed,
  Gradio downloads an http(s) file input after checking that its host is public (loopback,
  private and link-local addresses are refused). False refuses every URL file input, through
  the API and MCP alike, before any DNS lookup or connection.
- **Bad input is answered with a sentence** (`gpu_control_gradio.input_guard`). ``show_error`` defaults to
  False (as in ``launch()``), so the text of an unexpected exception never reaches a client
  (``gr.Error`` messages always do). A direct call (``POST /gradio_api/run/...``) the app
  refuses with a ``gr.Error`` answers 422, not Gradio's 500.
- ``/gradio_api/mcp`` (no trailing slash, as some MCP clients send it) is served like
  ``/gradio_api/mcp/`` instead of answering a redirect.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import gradio as gr
from fastapi import FastAPI

from gpu_control.security import excerpt

from .input_guard import guard_inputs

__all__ = [
    "FILE_URL_REFUSED",
    "OUTPUT_FILE_REFUSED",
    "GradioRouteGuard",
    "call_problem",
    "mount_demo",
    "names_a_url",
    "output_file_allowed",
    "stream_problem",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_URL_LIKE = re.compile(r"^\s*(?:[a-z][a-z0-9+.\-]*:)?[\\/]{2}", re.IGNORECASE)

FILE_URL_REFUSED = (
    "This route serves the app's own files, never URLs: download a remote file from its own address."
)
OUTPUT_FILE_REFUSED = (
    "This app serves only the files it wrote from its output folder, and this is not one of them."
)
UNEXPECTED = "The server could not complete this call; the details are in its log."


def mount_demo(
    app: FastAPI,
    demo: gr.Blocks,
    *,
    path: str = "/",
    allow_url_inputs: bool = True,
    output_dir: str | Path | None = None,
    output_pattern: str = "*.mp4",
    **kwargs: Any,
) -> FastAPI:
    """``gr.mount_gradio_app(app, demo, path, **kwargs)`` with Gradio's file checks on and inputs guarded.

    Args:
        app: the FastAPI app (register your own routes before mounting at ``/``; it must not
            have started yet).
        demo: the Blocks to mount.
        path: where to mount it.
        allow_url_inputs: whether file inputs may be http(s) URLs (Gradio fetches them and
            never from loopback, private or link-local addresses); False refuses them before
            any lookup or connection.
        output_dir: the folder the app writes its results to, served at
            ``/gradio_api/file=<path>`` (added to ``allowed_paths``), but only for the files
            that match ``output_pattern``; None: no output folder.
        output_pattern: a glob, relative to ``output_dir``, of the files served from it
            (``talking-*.mp4``: only those directly in it); a path with a part that starts with
            ``.`` is never served.
        **kwargs: passed to ``gr.mount_gradio_app`` (``mcp_server``, ``allowed_paths``, …);
            ``show_error`` defaults to False. Do not list ``output_dir`` (or a folder that
            holds it) in ``allowed_paths`` for it: that would serve all of it.

    Returns:
        The FastAPI app, ready for uvicorn.
    """
    kwargs.setdefault("show_error", False)
    output = None
    if output_dir is not None:
        output = Path(os.path.abspath(output_dir))
        kwargs["allowed_paths"] = [*(kwargs.get("allowed_paths") or []), str(output)]
    api_prefix = path.rstrip("/") + "/gradio_api/"
    app.add_middleware(
        GradioRouteGuard, api_prefix=api_prefix, demo=demo, output_dir=output, output_pattern=output_pattern
    )
    mounted = gr.mount_gradio_app(app, demo, path=path, **kwargs)
    demo.has_launched = True  # Gradio checks file inputs only for launched Blocks
    guard_inputs(demo, allow_url_inputs=allow_url_inputs, api_prefix=api_prefix)
    return mounted


# ------------------------------------------------------------------------------ HTTP guard


class GradioRouteGuard:
    """ASGI middleware in front of Gradio's API routes (see the module's docstring).

    Refuses ``/gradio_api/file=<url>`` and the files of the output folder the app did not
    write, answers a direct call refused with a ``gr.Error`` 422, serves ``/gradio_api/mcp``
    like ``/gradio_api/mcp/`` and pins Gradio's MCP loopback client.

    Args:
        app: the wrapped ASGI app.
        api_prefix: where Gradio's API lives, e.g. ``/gradio_api/``.
        demo: the mounted Blocks (for its MCP server).
        output_dir: the output folder (see `output_file_allowed`); None: no output folder.
        output_pattern: the glob of the files served from ``output_dir``.
    """

    def __init__(
        self,
        app: Any,
        *,
        api_prefix: str = "/gradio_api/",
        demo: gr.Blocks | None = None,
        output_dir: Path | None = None,
        output_pattern: str = "*.mp4",
    ) -> None:
        self.app = app
        self.api_prefix = api_prefix
        self.demo = demo
        self.output_dir = output_dir
        self.output_pattern = output_pattern

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _route_path(scope) if scope["type"] == "http" else ""
        if not path.startswith(self.api_prefix):
            await self.app(scope, receive, send)
            return
        rest = path[len(self.api_prefix) :]
        if rest.startswith("mcp"):
            self._pin_mcp_loopback(scope)
            if rest == "mcp":  # a client that drops the trailing slash gets the endpoint, not a redirect
                full = scope["path"] + "/"
                scope = {**scope, "path": full, "raw_path": full.encode()}
        if rest.startswith(("file=", "file/")):
            if names_a_url(rest[5:]):
                await _answer(send, 403, {"detail": FILE_URL_REFUSED})
                return
            if self.output_dir is not None and not output_file_allowed(
                rest[5:], self.output_dir, self.output_pattern
            ):
                await _answer(send, 404, {"detail": OUTPUT_FILE_REFUSED})
                return
        method = scope.get("method")
        if method == "GET" and (rest == "queue/data" or rest.startswith("call/")):
            problem = stream_problem(
                self.demo, rest, parse_qs(scope.get("query_string", b"").decode("latin-1"))
            )
            if problem is not None:
                await _answer(send, 404, {"detail": problem})
                return
        if method == "POST" and rest.startswith(_CALL_ROUTES):
            body, receive = await _read_body(receive)
            problem = None if body is None else call_problem(self.demo, rest, body)
            if problem is not None:
                await _answer(send, problem[0], {"detail": problem[1]})
                return
            if rest.startswith(("run/", "api/")):
                send = _DirectCallAnswer(send)
        await self.app(scope, receive, send)

    def _pin_mcp_loopback(self, scope: Scope) -> None:
        """Point Gradio's MCP loopback client at this server, as ``launch()`` does.

        Unpinned, Gradio builds that client (once, then keeps it) from the first MCP request's
        ``Host``/``X-Forwarded-Host``/``X-Gradio-Server`` headers, so a caller could make the
        server connect anywhere and send every later MCP call (and its headers) there.
        """
        server = getattr(self.demo, "mcp_server_obj", None)
        address = scope.get("server")
        if server is None or server.local_url is not None or not address or address[1] is None:
            return
        host, port = address[0], address[1]
        host = f"[{host}]" if ":" in host else host
        mount = self.api_prefix[: -len("gradio_api/")]
        server._local_url = f"http://{host}:{port}{mount}"


def output_file_allowed(target: str, output_dir: Path, pattern: str) -> bool:
    """Whether ``GET /gradio_api/file=<target>`` may go on to Gradio, as far as the output folder goes.

    ``target`` is taken as Gradio takes it (made absolute, ``..`` folded, links resolved). One
    that is in ``output_dir`` by name or once resolved may go on only when it resolves to a
    regular file inside the folder and both forms match ``pattern`` (relative to the folder)
    with no part starting with ``.``; one that is neither is left to Gradio's own checks.

    Args:
        target: the path after ``file=``, URL-decoded.
        output_dir: the output folder (an absolute path).
        pattern: the glob of the files served from it.

    Returns:
        False for a path in the output folder that is not to be served (or that cannot be
        resolved); True otherwise.
    """
    try:
        given = Path(os.path.abspath(target))
        real = given.resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a link loop: nothing to serve
        return False
    resolved = output_dir.resolve()
    inside = [
        place.relative_to(folder)
        for place in (given, real)
        for folder in {output_dir, resolved}
        if place.is_relative_to(folder)
    ]
    if not inside:
        return True
    if not real.is_relative_to(resolved):
        return False  # a link out of the output folder
    wanted = len(Path(pattern).parts)
    for relative in inside:
        parts = relative.parts
        if not parts or any(part.startswith(".") for part in parts):
            return False
        if len(parts) != wanted or not relative.match(pattern):
            return False
    try:
        return real.is_file()
    except OSError:
        return False


def names_a_url(text: str) -> bool:
    """Whether ``text`` (decoded up to three times) is a URL (``scheme://…`` or ``//host…``)."""
    for _ in range(3):
        if _URL_LIKE.match(text):
            return True
        decoded = unquote(text)
        if decoded == text:
            return False
        text = decoded
    return bool(_URL_LIKE.match(text))


_CALL_ROUTES = ("run/", "api/", "call/", "queue/join")
_CHECKED_BODY_BYTES = 32 * 2**20  # larger calls go to Gradio unchecked (they are uploads' data: URIs)


def call_problem(demo: gr.Blocks | None, rest: str, body: bytes) -> tuple[int, str] | None:
    """Why a call to one of Gradio's event routes cannot be run, as (status, sentence); None if it can.

    Gradio answers an unknown endpoint or event number, and an event that needs the data of a
    selection without it, with a 500 or a dropped connection.

    Args:
        demo: the mounted Blocks.
        rest: the path after ``/gradio_api/`` (``run/predict``, ``call/generate_video``, ``queue/join``).
        body: the request's body.
    """
    try:
        request = json.loads(body, parse_constant=_not_finite, parse_float=_finite_float)
    except _NotFinite:
        return 422, (
            "The body holds a number JSON cannot carry (NaN, Infinity, or one too large): "
            "send finite numbers."
        )
    except (ValueError, RecursionError):
        return None  # FastAPI answers 422
    if demo is None or not isinstance(request, dict):
        return None
    parts = [part for part in rest.split("/") if part]
    api_name = parts[-1] if parts[0] != "queue" and len(parts) > 1 else None
    fns = _session_fns(demo, request.get("session_hash"))
    fn_index = request.get("fn_index")
    if isinstance(fn_index, str) and fn_index.strip().lstrip("-").isdigit():
        fn_index = int(fn_index)
    if fn_index is not None:
        if not isinstance(fn_index, int) or isinstance(fn_index, bool):
            return None  # FastAPI answers 422
        fn = fns.get(fn_index)
        if fn is None:
            return (
                404,
                f"There is no event number {fn_index} in this app; the API page (?view=api) lists the endpoints.",
            )
    elif api_name is None:
        return 422, "A call to the queue names its event: send its fn_index."
    else:
        fn = next((f for f in fns.values() if f.api_name == api_name), None)
        if fn is None:
            return (
                404,
                f"There is no API endpoint {excerpt('/' + api_name)}; the API page (?view=api) lists them.",
            )
    if getattr(fn, "collects_event_data", False):
        data = request.get("event_data")
        selects = any(event == "select" for _, event in getattr(fn, "targets", []))
        if not isinstance(data, dict) or (selects and not {"index", "value"} <= data.keys()):
            return (
                422,
                "This event needs the data of the event that triggers it (event_data, e.g. the index and value selected).",
            )
    return None


class _NotFinite(ValueError):
    """A JSON body holds NaN, Infinity or a number too large for a float."""


def _not_finite(text: str) -> float:
    raise _NotFinite(text)


def _finite_float(text: str) -> float:
    """A JSON number as a float; Gradio would answer a non-finite one with a 500 (it cannot echo it)."""
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(text)
    return value


def stream_problem(demo: gr.Blocks | None, rest: str, query: dict[str, list[str]]) -> str | None:
    """Why a results stream cannot be opened (no such job or session), as a sentence; None if it can.

    Gradio would start the stream and then drop the connection.
    """
    queue = getattr(demo, "_queue", None)
    if queue is None:
        return None
    if rest == "queue/data":
        session = (query.get("session_hash") or [None])[0]
        if session is None or session in queue.pending_messages_per_session:
            return None  # FastAPI answers a missing session_hash 422
        return "No job of this session is waiting for its results; join the queue first (POST /gradio_api/queue/join)."
    parts = [part for part in rest.split("/") if part]
    if len(parts) < 3:
        return None
    event_id = parts[-1]
    event = queue.event_ids_to_events.get(event_id)
    session = (
        event.session_hash
        if event is not None
        else next((s for s, ids in queue.pending_event_ids_session.items() if event_id in ids), event_id)
    )
    if session in queue.pending_messages_per_session:
        return None
    return f"There is no job {excerpt(event_id)} waiting for its results; start one with POST /gradio_api/call/<endpoint>."


def _route_path(scope: Scope) -> str:
    """The request's path as Starlette routes it: without the app's ``root_path``."""
    path: str = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :]
    return path


def _session_fns(demo: gr.Blocks, session_hash: Any) -> dict[int, Any]:
    """The event functions a session can call (a session's own when it rendered some)."""
    if isinstance(session_hash, str) and session_hash in demo.state_holder:
        return demo.state_holder[session_hash].blocks_config.fns
    return demo.fns


async def _read_body(receive: Receive) -> tuple[bytes | None, Receive]:
    """Read a request's body (None past `_CHECKED_BODY_BYTES`) and a ``receive`` that replays it."""
    messages: list[Message] = []
    size = 0
    while size <= _CHECKED_BODY_BYTES:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body"):
            break
        size += len(message.get("body", b""))
    complete = messages[-1]["type"] == "http.request" and not messages[-1].get("more_body")
    body = b"".join(m.get("body", b"") for m in messages) if complete else None

    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return body, replay


async def _answer(send: Send, status: int, payload: dict[str, Any]) -> None:
    """Send a small JSON response."""
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _DirectCallAnswer:
    """Wraps ``send`` for ``/run``: Gradio answers every failed call 500; a ``gr.Error`` becomes 422."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._start: Message | None = None
        self._body = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message.get("status") == 500:
            self._start = message
            return
        if self._start is None or message["type"] != "http.response.body":
            await self._send(message)
            return
        self._body += message.get("body", b"")
        if message.get("more_body"):
            return
        status, payload = _direct_call_error(self._body)
        body = json.dumps(payload).encode()
        headers = [
            (name, value)
            for name, value in self._start.get("headers", [])
            if name.lower() not in (b"content-length", b"content-type")
        ]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await self._send({**self._start, "status": status, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})


def _direct_call_error(body: bytes) -> tuple[int, dict[str, Any]]:
    """422 with Gradio's payload for an error the app raised on purpose; else 500 with a sentence."""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and "title" in payload and isinstance(payload.get("error"), str):
        return 422, payload  # gr.Error: a sentence written for the user
    return 500, {"error": UNEXPECTED}
