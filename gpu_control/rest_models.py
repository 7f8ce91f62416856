"""REST endpoints per model of a `GPUPool`, added by ``make_router(manager, pool=pool)``.

==========================================  =================================================
``GET  /gpu/models``                        the pool's status: devices, host tier, every
                                            model, the waiting queue; never waits
``POST /gpu/models/{name}/offload``         as ``POST /gpu/offload``, for the model ``name``
``POST /gpu/models/{name}/release``         as ``POST /gpu/release``, for the model ``name``
``POST /gpu/models/{name}/preheat``         as ``POST /gpu/preheat`` (507: it can never fit;
                                            503: no room within the pool's wait timeout)
``POST /gpu/models/{name}/timeout``         as ``POST /gpu/timeout`` (same fields and checks)
==========================================  =================================================

The ``POST`` routes take the same bodies, give the same answers and follow the same control
token and ``Origin`` rules as the single-model routes of `gpu_control.rest`, whose helpers they
call; the request is authorized before the name is looked up. A name that is not in the pool
answers 404 with a sentence naming the known models (quoting at most a short excerpt of it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._extras import missing_extra

try:
    from fastapi import APIRouter, Path, Request
    from fastapi.responses import JSONResponse
except ModuleNotFoundError as error:
    raise missing_extra("rest", "gpu_control.rest_models", error) from error

from .manager import ActionResult, GPUResourceManager
from .pool import GPUPool
from .rest import TIMEOUT_BODY, ErrorAnswer, action_answer, authorizer, control_route, timeout_answer
from .security import ControlAccess

__all__ = ["make_model_router"]

_NAME = Path(
    description="The model's name, as `GET /gpu/models` lists them under `models`.",
    examples=["talking-portrait"],
)
_NOT_FOUND = {
    404: {
        "model": ErrorAnswer,
        "description": "No model of that name in the pool; the sentence names the known models",
    }
}
_POOL_EXAMPLE = {
    "devices": [
        {
            "device": "cuda:0",
            "budget_gb": 22.0,
            "used_gb": 18.1,
            "free_gb": 3.9,
            "models": ["talking-portrait"],
        }
    ],
    "host": {"budget_gb": 64.0, "used_gb": 14.1},
    "models": {
        "talking-portrait": {
            "name": "talking-portrait",
            "model_location": "gpu",
            "in_use": 1,
            "device": "cuda:0",
            "priority": 1,
            "working_gb": 4.0,
            "model_size_gb": 14.1,
        }
    },
    "waiting": [{"model": "lip-sync", "priority": 0, "device": "cuda:0", "needed_gb": 6.5, "waited_s": 2.4}],
}


def make_model_router(
    pool: GPUPool, *, prefix: str = "/gpu", tags: list[str] | None = None, access: ControlAccess | None = None
) -> APIRouter:
    """Build the per-model REST endpoints of a pool (the table above).

    Args:
        pool: the pool whose models the endpoints show and control.
        prefix: where ``/models`` lives.
        tags: OpenAPI tags (default ``["gpu"]``).
        access: who may change state; None: ``ControlAccess()`` (no token, same origin only).

    Returns:
        A router to include in the app; `gpu_control.rest.make_router` includes it when given a pool.
    """
    router = APIRouter(tags=tags or ["gpu"])
    authorize = authorizer(ControlAccess() if access is None else access)

    def control(action: str, summary: str, **kwargs: Any) -> Callable[[Any], Any]:
        responses = {**_NOT_FOUND, **kwargs.pop("responses", {})}
        path = f"{prefix}/models/{{name}}/{action}"
        return control_route(router, authorize, path, summary, responses=responses, **kwargs)

    @router.get(
        f"{prefix}/models",
        summary="Every model of the pool (where it is, device, priority), the device budgets and the queue",
        response_class=JSONResponse,
        responses={200: {"content": {"application/json": {"example": _POOL_EXAMPLE}}}},
    )
    async def gpu_models() -> JSONResponse:
        return JSONResponse(pool.get_status())

    router.add_api_route(f"{prefix}/models", gpu_models, methods=["HEAD"], include_in_schema=False)

    def act(name: str, action: Callable[[GPUResourceManager], ActionResult]) -> JSONResponse:
        manager = _model(pool, name)
        if isinstance(manager, JSONResponse):
            return manager
        return action_answer(manager, lambda: action(manager))

    @control("offload", "Move one model to the host cache (deferred while a job runs)")
    def model_offload(name: str = _NAME) -> JSONResponse:
        return act(name, GPUResourceManager.force_offload)

    @control("release", "Drop one model from its device and the host cache (deferred while a job runs)")
    def model_release(name: str = _NAME) -> JSONResponse:
        return act(name, GPUResourceManager.force_release)

    @control(
        "preheat",
        "Load or restore one model now (evicting idle models of equal or lower priority if needed)",
        responses={
            409: {"model": ErrorAnswer, "description": "No load function is known yet"},
            503: {
                "model": ErrorAnswer,
                "description": "Loading failed, or the pool found no room within its wait timeout "
                "(the sentence names what holds the device)",
            },
            507: {"model": ErrorAnswer, "description": "The model can never fit in a device's budget"},
        },
    )
    def model_preheat(name: str = _NAME) -> JSONResponse:
        return act(name, GPUResourceManager.preheat)

    @control(
        "timeout",
        "Change one model's idle timeout (form field `timeout`, as in `curl -F timeout=300`; JSON accepted)",
        responses={413: {"model": ErrorAnswer, "description": "The body is larger than a timeout request"}},
        openapi_extra={"requestBody": TIMEOUT_BODY},
    )
    async def model_timeout(request: Request, name: str = _NAME) -> JSONResponse:
        manager = _model(pool, name)
        if isinstance(manager, JSONResponse):
            return manager
        return await timeout_answer(manager, request)

    return router


def _model(pool: GPUPool, name: str) -> GPUResourceManager | JSONResponse:
    """The model's manager, or the 404 answer naming the known models (the pool's sentence)."""
    try:
        return pool[name]
    except KeyError as error:
        return JSONResponse({"detail": error.args[0]}, status_code=404)
