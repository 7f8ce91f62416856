"""HTTP hygiene for any FastAPI app: 405 for a wrong method, request bodies read within a limit.

    install_method_guard(app)      # 405 + Allow even when something is mounted at "/"

    body = await read_body(request, limit=2**20, hint="send only timeout")   # in an endpoint
    fields = await read_form(request, body, limit=2**20, example="timeout=300")

`MethodGuard` answers 405 with ``Allow`` for a path of the app's own routes asked with another
method, even when a catch-all app (Gradio) is mounted at ``/``. `read_body` refuses a body
over its limit (413) before reading the rest of it, and `read_form` parses a form body that
was already read, refusing file uploads; both raise `BadRequest`, whose message is one
sentence to answer as it is. Nothing here knows about the manager, and nothing imports Gradio.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._extras import missing_extra
from .security import excerpt

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.formparsers import MultiPartException
    from starlette.requests import ClientDisconnect
    from starlette.routing import BaseRoute, Match, Router
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ModuleNotFoundError as error:
    raise missing_extra("rest", "gpu_control.http_guard", error) from error

try:
    from fastapi.routing import iter_route_contexts
except ImportError:  # older FastAPI copies an included router's routes into the app's
    iter_route_contexts = None  # type: ignore[assignment]

__all__ = ["BadRequest", "MethodGuard", "install_method_guard", "read_body", "read_form"]


class BadRequest(Exception):
    """A request body that cannot be used: answered with ``status`` and the message.

    Args:
        message: one sentence saying what to send instead.
        status: the HTTP status to answer with (422 unless said otherwise).
    """

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


async def read_body(request: Request, *, limit: int, hint: str) -> bytes:
    """Read the request body, refusing it past ``limit`` bytes without reading the rest.

    Args:
        request: the request whose body to read.
        limit: the most bytes to accept.
        hint: what to send instead, ending the 413 sentence (e.g. ``"send only timeout"``).

    Returns:
        The whole body.

    Raises:
        BadRequest: 413 when the declared or streamed size is over ``limit``; 400 when the
            client closed the connection before the body was sent.
    """
    too_large = BadRequest(f"The body is larger than {limit // 2**20} MiB; {hint}.", status=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest("The client closed the connection before the body was sent.", status=400) from None
    return b"".join(chunks)


async def read_form(request: Request, body: bytes, *, limit: int, example: str) -> dict[str, Any]:
    """Parse the fields of a form body already read by `read_body`.

    Args:
        request: the request the body came with (its headers say how the form is encoded).
        body: the body's bytes.
        limit: the largest part to accept.
        example: a field to show in the message when the form cannot be parsed (``"timeout=300"``).

    Returns:
        Each field's name and text value (the last one wins for a repeated name).

    Raises:
        BadRequest: the form cannot be parsed, or a field is a file upload.
    """
    fields: dict[str, Any] = {}
    try:
        form = await Request(request.scope, _replay(body)).form(max_part_size=limit)
    except (StarletteHTTPException, MultiPartException) as error:
        detail = getattr(error, "detail", None) or getattr(error, "message", "")
        raise BadRequest(f"The form cannot be read ({detail.rstrip('.')}); send e.g. {example}.") from None
    try:
        for key, value in form.multi_items():
            if not isinstance(value, str):
                raise BadRequest(f"Field {excerpt(key)} must be a value, not a file upload.")
            fields[key] = value
    finally:
        await form.close()
    return fields


def _replay(body: bytes) -> Receive:
    """An ASGI ``receive`` that hands out ``body`` once (to parse a body already read)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def install_method_guard(app: FastAPI) -> None:
    """Answer 405 with ``Allow`` when one of ``app``'s own routes is asked with another method.

    Starlette answers 405 only when no later route matches the path; an app mounted at ``/``
    (Gradio) matches every path, so ``GET /gpu/offload`` would fall through to the mount's
    404. Call this once, before the app starts; it guards routes added later too.

    Args:
        app: the FastAPI (or Starlette) application whose routes to guard.
    """
    app.add_middleware(MethodGuard, router=app.router)


class MethodGuard:
    """ASGI middleware: 405 with ``Allow`` for a path of ``router`` asked with a method it lacks.

    Args:
        app: the next ASGI application.
        router: the router whose routes (not mounts) are guarded, read at each request.
    """

    def __init__(self, app: ASGIApp, router: Router) -> None:
        self.app = app
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            allowed = _allowed_methods(self.router.routes, scope)
            if allowed:
                path, methods = allowed
                answer = JSONResponse(
                    {"detail": f"{path} answers {' and '.join(methods)} only."},
                    status_code=405,
                    headers={"Allow": ", ".join(methods)},
                )
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _allowed_methods(routes: Iterable[BaseRoute], scope: Scope) -> tuple[str, list[str]] | None:
    """The path and methods of the routes matching only by path; None when one matches fully or none does."""
    path, methods = None, set()
    for route in _flat_routes(routes):
        if getattr(route, "methods", None) is None:
            continue  # mounts, websockets and method-less routes
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return None
        if match is Match.PARTIAL:
            path = path or getattr(route, "path", "")
            methods |= set(route.methods)
    return None if path is None else (path, sorted(methods))


def _flat_routes(routes: Iterable[BaseRoute]) -> Iterable[Any]:
    """Every route, those of included routers too (FastAPI >= 0.130 keeps an included router whole)."""
    if iter_route_contexts is None:
        return routes
    return iter_route_contexts(list(routes))
