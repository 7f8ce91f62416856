"""REST endpoints for one manager, for any FastAPI app; and Swagger UI served offline.

    app = FastAPI(docs_url=None, redoc_url=None)
    app.include_router(make_router(manager))
    install_offline_docs(app)

=========================  ==========================================================
``GET  /gpu/status``       the status snapshot (DESIGN.md's schema); never waits
``POST /gpu/offload``      device -> host cache: done, deferred (in use) or nothing to do
``POST /gpu/release``      drop every copy: done, deferred or nothing to do
``POST /gpu/preheat``      load or restore now and keep it until the idle timeout
``POST /gpu/timeout``      form or JSON: ``timeout`` (idle seconds), ``release_timeout``,
                           ``offload_after_use``; all validated before any is applied
``GET  /health``           liveness: answers at once, loads nothing
=========================  ==========================================================

A value that cannot be used answers 422 with a sentence saying what to send instead.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from .config import validate_bool, validate_timeout
from .errors import GpuControlError, InvalidSetting, http_status
from .manager import ActionResult, GPUResourceManager, Outcome
from .security import ControlAccess

__all__ = ["TIMEOUT_FIELDS", "apply_settings", "install_offline_docs", "make_router"]

TIMEOUT_FIELDS = ("timeout", "release_timeout", "offload_after_use")
"""The fields ``POST /gpu/timeout`` understands."""

_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class ActionAnswer(BaseModel):
    """What a control request did, and the status right after it."""

    action: str
    outcome: Literal["done", "deferred", "nothing_to_do"]
    message: str
    status: dict[str, Any]


class ErrorAnswer(BaseModel):
    """A request that could not be carried out: one sentence saying why."""

    detail: str


_STATUS_EXAMPLE = {
    "name": "talking-portrait",
    "model_location": "cpu",
    "transition": None,
    "in_use": 0,
    "pending": [],
    "idle_time": 12.4,
    "idle_timeout": 60.0,
    "release_timeout": 0.0,
    "offload_after_use": True,
    "auto_offload_in": None,
    "auto_release_in": None,
    "device": "cuda:0",
    "gpu_memory_allocated_gb": 0.0,
    "model_size_gb": 14.1,
    "cpu_cache_gb": 14.1,
    "counts": {"loads": 1, "restores": 3, "offloads": 4, "releases": 0, "uses": 4},
}

_TIMEOUT_BODY = {
    "required": True,
    "content": {
        media: {
            "schema": {
                "type": "object",
                "properties": {
                    "timeout": {
                        "type": "number",
                        "minimum": 0,
                        "description": "Idle seconds on the device before the model is offloaded "
                        "(0: as soon as idle; 'inf': never).",
                        "example": 300,
                    },
                    "release_timeout": {
                        "type": "number",
                        "minimum": 0,
                        "description": "Seconds in the host cache before the model is released (0: never).",
                    },
                    "offload_after_use": {
                        "type": "boolean",
                        "description": "Offload as soon as the last job ends.",
                    },
                },
            }
        }
        for media in ("application/x-www-form-urlencoded", "multipart/form-data", "application/json")
    },
}

_ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorAnswer, "description": "A value that cannot be used"},
    503: {"model": ErrorAnswer, "description": "Moving or loading the model failed"},
}


class _BadRequest(Exception):
    """A request body that cannot be used (answered with 422)."""


def make_router(
    manager: GPUResourceManager,
    *,
    prefix: str = "/gpu",
    tags: list[str] | None = None,
    access: ControlAccess | None = None,
) -> APIRouter:
    """Build the REST endpoints of one manager.

    Args:
        manager: the manager the endpoints show and control.
        prefix: where the ``/status``, ``/offload``, ``/release``, ``/preheat`` and ``/timeout``
            endpoints live (``/health`` is always at the root).
        tags: OpenAPI tags (default ``["gpu"]``).
        access: who may change state (the control token and the same-origin rule); None:
            ``ControlAccess()`` (no token, same-origin only).

    Returns:
        A router to pass to ``app.include_router()`` before anything is mounted at ``/``.
    """
    router = APIRouter(tags=tags or ["gpu"])

    @router.get("/health", summary="Liveness: answers at once, loads nothing")
    async def health() -> dict[str, Any]:
        transition = manager.transition
        return {
            "status": "ok",
            "name": manager.name,
            "model_location": manager.location.value,
            "transition": None if transition is None else transition.value,
        }

    @router.get(
        f"{prefix}/status",
        summary="Where the model is, memory, timeouts and counters",
        response_class=JSONResponse,
        responses={200: {"content": {"application/json": {"example": _STATUS_EXAMPLE}}}},
    )
    async def gpu_status() -> JSONResponse:
        return JSONResponse(manager.get_status())

    @router.post(
        f"{prefix}/offload",
        summary="Move the model to the host cache (deferred while a job runs)",
        response_model=ActionAnswer,
        responses=_ERRORS,
    )
    def gpu_offload() -> JSONResponse:
        return _act(manager, manager.force_offload)

    @router.post(
        f"{prefix}/release",
        summary="Drop the model from the device and the host cache (deferred while a job runs)",
        response_model=ActionAnswer,
        responses=_ERRORS,
    )
    def gpu_release() -> JSONResponse:
        return _act(manager, manager.force_release)

    @router.post(
        f"{prefix}/preheat",
        summary="Load or restore the model now and keep it on the device until the idle timeout",
        response_model=ActionAnswer,
        responses={**_ERRORS, 409: {"model": ErrorAnswer, "description": "No load function is known yet"}},
    )
    def gpu_preheat() -> JSONResponse:
        return _act(manager, manager.preheat)

    @router.post(
        f"{prefix}/timeout",
        summary="Change the idle timeout (form field `timeout`, as in `curl -F timeout=300`; JSON accepted)",
        response_model=ActionAnswer,
        responses=_ERRORS,
        openapi_extra={"requestBody": _TIMEOUT_BODY},
    )
    async def gpu_timeout(request: Request) -> JSONResponse:
        try:
            fields = await _read_fields(request)
            result = _apply_timeouts(manager, fields)
        except (_BadRequest, InvalidSetting) as error:
            return JSONResponse({"detail": str(error)}, status_code=422)
        return JSONResponse({**result.to_dict(), "status": manager.get_status()})

    return router


def _act(manager: GPUResourceManager, action: Any) -> JSONResponse:
    """Run a control action; answer its result and the status, or the error as a sentence."""
    try:
        result: ActionResult = action()
    except GpuControlError as error:
        code = http_status(error)
        return JSONResponse({"detail": str(error)}, status_code=409 if code == 500 else code)
    return JSONResponse({**result.to_dict(), "status": manager.get_status()})


async def _read_fields(request: Request) -> dict[str, Any]:
    """The request's fields: from a form, a JSON object, or the query string."""
    fields: dict[str, Any] = dict(request.query_params)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media in _FORM_TYPES:
        form = await request.form()
        for key, value in form.multi_items():
            if not isinstance(value, str):
                raise _BadRequest(f"Field {key!r} must be a value, not a file upload.")
            fields[key] = value
    elif media == "application/json" or media.endswith("+json"):
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError):
            raise _BadRequest('The body is not valid JSON; send e.g. {"timeout": 300}.') from None
        if not isinstance(body, dict):
            raise _BadRequest('The JSON body must be an object, e.g. {"timeout": 300}.')
        fields.update(body)
    elif (await request.body()).strip():
        raise _BadRequest(
            "Send the values as a form (curl -F timeout=300) or as JSON "
            '(-H "Content-Type: application/json" -d \'{"timeout": 300}\').'
        )
    return fields


def _apply_timeouts(manager: GPUResourceManager, fields: dict[str, Any]) -> ActionResult:
    """Check the request's field names, then apply the values that were given."""
    unknown = sorted(set(fields) - set(TIMEOUT_FIELDS))
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        raise _BadRequest(f"Unknown field(s) {names}; use timeout, release_timeout or offload_after_use.")
    given = {name: value for name, value in fields.items() if value is not None and value != ""}
    if not given:
        raise _BadRequest(
            "Give at least one of timeout, release_timeout or offload_after_use (e.g. timeout=300)."
        )
    return apply_settings(
        manager,
        timeout=given.get("timeout"),
        release_timeout=given.get("release_timeout"),
        offload_after_use=given.get("offload_after_use"),
    )


def apply_settings(
    manager: GPUResourceManager,
    *,
    timeout: Any = None,
    release_timeout: Any = None,
    offload_after_use: Any = None,
    names: tuple[str, str, str] = TIMEOUT_FIELDS,
) -> ActionResult:
    """Validate every given setting first, then apply them: all or nothing.

    Args:
        manager: the manager to change.
        timeout: idle seconds on the device before offloading (``"inf"``: never), or None.
        release_timeout: seconds in the host cache before releasing (0: never), or None.
        offload_after_use: offload as soon as the last job ends (bool or true/false text), or None.
        names: what the three settings are called where the user typed them (for messages).

    Returns:
        done, with one sentence per change.

    Raises:
        InvalidSetting: a value cannot be used (the message names it); nothing was changed.
    """
    idle = None if timeout is None else validate_timeout(names[0], timeout)
    release = (
        None if release_timeout is None else validate_timeout(names[1], release_timeout, allow_inf=False)
    )
    after_use = None if offload_after_use is None else validate_bool(names[2], offload_after_use)
    messages = []
    if idle is not None:
        messages.append(manager.update_timeout(idle).message)
    if release is not None:
        messages.append(manager.update_release_timeout(release).message)
    if after_use is not None:
        messages.append(manager.set_offload_after_use(after_use).message)
    if not messages:
        return ActionResult("timeout", Outcome.NOTHING_TO_DO, "Nothing to change: no setting was given.")
    return ActionResult("timeout", Outcome.DONE, " ".join(messages))


def install_offline_docs(app: FastAPI, *, docs_url: str = "/docs", title: str | None = None) -> None:
    """Serve Swagger UI at ``docs_url`` from the assets of the ``swagger-ui-bundle`` package.

    FastAPI's own ``/docs`` loads Swagger UI from a CDN and renders blank without internet
    access; this one needs nothing outside the server. Create the app with ``docs_url=None``
    and call this before mounting anything at ``/``. The bundled Swagger UI (4.x) reads
    OpenAPI 3.0, so the app's schema is declared as 3.0.3.

    Args:
        app: the FastAPI application.
        docs_url: where the documentation page is served.
        title: the page title (default: the app's title).
    """
    from swagger_ui_bundle import swagger_ui_path

    static_url = f"{docs_url}/static"
    oauth_url = f"{docs_url}/oauth2-redirect"
    page_title = f"{title or app.title} - API docs"
    app.openapi_version = "3.0.3"
    app.mount(static_url, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui-static")

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=page_title,
            swagger_js_url=f"{root}{static_url}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{static_url}/swagger-ui.css",
            swagger_favicon_url=f"{root}{static_url}/favicon-32x32.png",
            oauth2_redirect_url=f"{root}{oauth_url}",
        )

    @app.get(oauth_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
