"""REST endpoints for one manager, for any FastAPI app; and Swagger UI served offline.

    app = FastAPI(docs_url=None, redoc_url=None)
    app.include_router(make_router(manager, access=ControlAccess(token)))
    install_offline_docs(app)
    install_method_guard(app)      # 405 + Allow even when something is mounted at "/"

=============================  ==============================================================
``GET  /gpu/status``           the status snapshot (DESIGN.md's schema); never waits
``POST /gpu/offload``          device -> host cache: done, deferred (in use) or nothing to do
``POST /gpu/release``          drop every copy: done, deferred or nothing to do
``POST /gpu/preheat``          load or restore now and keep it until the idle timeout
``POST /gpu/timeout``          form or JSON: ``timeout`` (idle seconds), ``release_timeout``,
                               ``offload_after_use``; all validated before any is applied
``GET  /health``               liveness: answers at once, loads nothing
``GET  /gpu/models``           with a pool: every model, the device budgets, the queue
``POST /gpu/models/{name}/…``  with a pool: ``offload``, ``release``, ``preheat`` and
                               ``timeout`` of one model, as above; 404 for an unknown name
=============================  ==============================================================

With ``make_router(manager, pool=pool)`` the ``/gpu/*`` routes above keep acting on
``manager`` (the default model) and the per-model routes of `gpu_control.rest_models` are added.

Reads are open. Every ``POST`` changes state and goes through ``access.authorize()`` before
anything else: 403 when the request comes from another site's page (a foreign ``Origin``,
with or without a token), 401 (``WWW-Authenticate: Bearer``) when the app has a control
token and the request has no ``Authorization: Bearer <token>``. A value that cannot be used
answers 422 with a sentence saying what to send instead (quoting at most a short excerpt of
it); a body over `MAX_BODY_BYTES` answers 413. The method guard and the body reading live in
`gpu_control.http_guard`; ``install_method_guard`` and ``MethodGuard`` are importable from here too.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal

from ._extras import missing_extra

try:
    from fastapi import APIRouter, FastAPI, HTTPException, Request, Security
    from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
    from fastapi.responses import HTMLResponse, JSONResponse
    from fastapi.security import HTTPBearer
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel
except ModuleNotFoundError as error:
    raise missing_extra("rest", "gpu_control.rest", error) from error

from .config import MAX_TIMEOUT_S, validate_bool, validate_release_timeout, validate_timeout
from .errors import ControlLocked, ForeignOrigin, GpuControlError, InvalidSetting, http_status
from .http_guard import BadRequest, MethodGuard, install_method_guard, read_body, read_form
from .manager import ActionResult, GPUResourceManager, Outcome
from .pool import GPUPool
from .security import ControlAccess, excerpt

__all__ = [
    "MAX_BODY_BYTES",
    "TIMEOUT_FIELDS",
    "MethodGuard",
    "apply_settings",
    "install_method_guard",
    "install_offline_docs",
    "make_router",
]

TIMEOUT_FIELDS = ("timeout", "release_timeout", "offload_after_use")
"""The fields ``POST /gpu/timeout`` understands."""

MAX_BODY_BYTES = 16 * 2**20
"""The largest request body a control endpoint reads (a timeout request needs a few bytes)."""

_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_SHOWN_NAMES = 3
_BODY_HINT = "send only timeout, release_timeout or offload_after_use"

_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="controlToken",
    description="The control token (GPU_CONTROL_TOKEN), needed for every POST when the app has one.",
)


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

TIMEOUT_BODY = {
    "required": True,
    "content": {
        media: {
            "schema": {
                "type": "object",
                "properties": {
                    "timeout": {
                        "type": "number",
                        "minimum": 0,
                        "maximum": MAX_TIMEOUT_S,
                        "description": "Idle seconds on the device before the model is offloaded "
                        "(0: as soon as idle; 'never' or 'inf': never; at most 30 days).",
                        "example": 300,
                    },
                    "release_timeout": {
                        "type": "number",
                        "minimum": 0,
                        "maximum": MAX_TIMEOUT_S,
                        "description": "Seconds in the host cache before the model is released "
                        "(0: never; at most 30 days).",
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
"""The OpenAPI request body of the timeout routes: the fields as a form, multipart or JSON."""

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorAnswer,
        "description": "The app has a control token and the request did not send it "
        "(`Authorization: Bearer <token>`); the answer has `WWW-Authenticate: Bearer`",
    },
    403: {
        "model": ErrorAnswer,
        "description": "The request came from another site's page (its `Origin` is not this app's); "
        "refused with or without a token",
    },
    422: {"model": ErrorAnswer, "description": "A value that cannot be used"},
    503: {"model": ErrorAnswer, "description": "Moving or loading the model failed"},
}


def make_router(
    manager: GPUResourceManager,
    *,
    prefix: str = "/gpu",
    tags: list[str] | None = None,
    access: ControlAccess | None = None,
    pool: GPUPool | None = None,
) -> APIRouter:
    """Build the REST endpoints of one manager.

    Args:
        manager: the manager the endpoints show and control.
        prefix: where the ``/status``, ``/offload``, ``/release``, ``/preheat`` and ``/timeout``
            endpoints live (``/health`` is always at the root).
        tags: OpenAPI tags (default ``["gpu"]``).
        access: who may change state (the control token and the same-origin rule); None:
            ``ControlAccess()`` (no token, same-origin only).
        pool: the pool ``manager`` belongs to (its default model); adds ``GET /models`` and
            ``POST /models/{name}/offload|release|preheat|timeout`` under ``prefix``.

    Returns:
        A router to pass to ``app.include_router()`` before anything is mounted at ``/``
        (then call `install_method_guard` so wrong methods answer 405, not the mount's 404).
    """
    router = APIRouter(tags=tags or ["gpu"])
    authorize = authorizer(ControlAccess() if access is None else access)

    def control(path: str, summary: str, **kwargs: Any) -> Callable[[Any], Any]:
        return control_route(router, authorize, f"{prefix}{path}", summary, **kwargs)

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

    for path, endpoint in (("/health", health), (f"{prefix}/status", gpu_status)):
        # uptime probes and `curl -I` ask with HEAD (this FastAPI does not answer HEAD for GET routes)
        router.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    @control("/offload", "Move the model to the host cache (deferred while a job runs)")
    def gpu_offload() -> JSONResponse:
        return action_answer(manager, manager.force_offload)

    @control("/release", "Drop the model from the device and the host cache (deferred while a job runs)")
    def gpu_release() -> JSONResponse:
        return action_answer(manager, manager.force_release)

    @control(
        "/preheat",
        "Load or restore the model now and keep it on the device until the idle timeout",
        responses={
            409: {"model": ErrorAnswer, "description": "No load function is known yet"},
            507: {"model": ErrorAnswer, "description": "In a pool: the model never fits a device's budget"},
        },
    )
    def gpu_preheat() -> JSONResponse:
        return action_answer(manager, manager.preheat)

    @control(
        "/timeout",
        "Change the idle timeout (form field `timeout`, as in `curl -F timeout=300`; JSON accepted)",
        responses={413: {"model": ErrorAnswer, "description": "The body is larger than a timeout request"}},
        openapi_extra={"requestBody": TIMEOUT_BODY},
    )
    async def gpu_timeout(request: Request) -> JSONResponse:
        return await timeout_answer(manager, request)

    if pool is not None:
        from .rest_models import make_model_router  # it builds on this module's helpers

        router.include_router(make_model_router(pool, prefix=prefix, tags=tags, access=access))
    return router


def control_route(
    router: APIRouter, authorize: Callable[..., Awaitable[None]], path: str, summary: str, **kwargs: Any
) -> Callable[[Any], Any]:
    """Register a state-changing endpoint on ``router``: POST, authorized before anything else runs."""
    responses = {**_ERRORS, **kwargs.pop("responses", {})}
    return router.post(
        path,
        summary=summary,
        response_model=ActionAnswer,
        responses=responses,
        dependencies=[Security(authorize)],
        **kwargs,
    )


async def timeout_answer(manager: GPUResourceManager, request: Request) -> JSONResponse:
    """Apply a timeout request's fields to ``manager``; its answer, or the refusal as a sentence."""
    try:
        fields = await _read_fields(request)
        result = _apply_timeouts(manager, fields)
    except BadRequest as error:
        return JSONResponse({"detail": str(error)}, status_code=error.status)
    except InvalidSetting as error:
        return JSONResponse({"detail": str(error)}, status_code=422)
    return JSONResponse({**result.to_dict(), "status": manager.get_status()})


def authorizer(access: ControlAccess) -> Callable[..., Awaitable[None]]:
    """A dependency that lets a request through `access` or answers 401/403 with the sentence."""

    async def authorize(request: Request, _credentials: Any = Security(_BEARER)) -> None:
        try:
            access.authorize(request.headers)
        except (ControlLocked, ForeignOrigin) as error:
            headers = {"WWW-Authenticate": "Bearer"} if isinstance(error, ControlLocked) else None
            raise HTTPException(http_status(error), detail=str(error), headers=headers) from None

    return authorize


def action_answer(manager: GPUResourceManager, action: Any) -> JSONResponse:
    """Run a control action; answer its result and the status, or the error as a sentence."""
    try:
        result: ActionResult = action()
    except GpuControlError as error:
        code = http_status(error)
        return JSONResponse({"detail": str(error)}, status_code=409 if code == 500 else code)
    return JSONResponse({**result.to_dict(), "status": manager.get_status()})


def _json_number(text: str) -> float | str:
    """A JSON number as a float; one too large for a float stays text (refused, not "never")."""
    number = float(text)
    return text if number in (float("inf"), float("-inf")) else number


async def _read_fields(request: Request) -> dict[str, Any]:
    """The request's fields: from a form, a JSON object, or the query string."""
    fields: dict[str, Any] = dict(request.query_params)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, limit=MAX_BODY_BYTES, hint=_BODY_HINT)
    if media in _FORM_TYPES:
        fields.update(await read_form(request, body, limit=MAX_BODY_BYTES, example="timeout=300"))
    elif media == "application/json" or media.endswith("+json"):
        try:
            parsed = (
                json.loads(body, parse_float=_json_number, parse_constant=str) if body.strip() else {}
            )
        except (ValueError, RecursionError):
            raise BadRequest('The body is not valid JSON; send e.g. {"timeout": 300}.') from None
        if not isinstance(parsed, dict):
            raise BadRequest('The JSON body must be an object, e.g. {"timeout": 300}.')
        fields.update(parsed)
    elif body.strip():
        raise BadRequest(
            "Send the values as a form (curl -F timeout=300) or as JSON "
            '(-H "Content-Type: application/json" -d \'{"timeout": 300}\').'
        )
    return fields


def _names_text(names: Iterable[str]) -> str:
    """A few field names, each cut to an excerpt, and how many more there are."""
    names = list(names)
    shown = ", ".join(excerpt(name, 40) for name in names[:_SHOWN_NAMES])
    more = len(names) - _SHOWN_NAMES
    return f"{shown} and {more} more" if more > 0 else shown


def _apply_timeouts(manager: GPUResourceManager, fields: dict[str, Any]) -> ActionResult:
    """Check the request's field names, then apply the values that were given."""
    unknown = sorted(set(fields) - set(TIMEOUT_FIELDS))
    if unknown:
        raise BadRequest(
            f"Unknown field(s) {_names_text(unknown)}; use timeout, release_timeout or offload_after_use."
        )
    nulls = [name for name, value in fields.items() if value is None]
    if nulls:
        raise InvalidSetting(f"{nulls[0]} needs a value, not null; leave it out to keep it as it is.")
    given = {name: value for name, value in fields.items() if value != ""}
    if not given:
        raise BadRequest(
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
        release_timeout: seconds in the host cache before releasing (0 or ``"never"``: never), or None.
        offload_after_use: offload as soon as the last job ends (bool or true/false text), or None.
        names: what the three settings are called where the user typed them (for messages).

    Returns:
        done, with one sentence per change.

    Raises:
        InvalidSetting: a value cannot be used (the message names it); nothing was changed.
    """
    idle = None if timeout is None else validate_timeout(names[0], timeout)
    release = None if release_timeout is None else validate_release_timeout(names[1], release_timeout)
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
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ModuleNotFoundError as error:
        raise missing_extra("rest", "The offline /docs page", error) from error

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
