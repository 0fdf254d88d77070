"""The FastAPI app: the REST API (``/v1``), KServe v2 inference (``/v2``), ``/metrics``.

``create_app(ctx)`` builds it around an :class:`AppContext` (service, controller, metrics, token);
the daemon (:mod:`api.daemon`) and the tests are its two callers. OpenAPI at ``/openapi.json``,
Swagger UI at ``/docs``.

Errors: every one is ``{"error": "<message>"}`` with the right status: 400 malformed inference
request, 401 missing or wrong token, 404 unknown model, 408 request too slow and 413 body too
large (:mod:`api.limits`), 409 conflict with the daemon's state, 422 invalid registration or
refused by admission control (rates above the node's capacity bound too), 429 request shed (it
could not meet its deadline), 503 nothing can serve it now (or planning ran past
``planner.time_budget_s``). Security: with a token, every mutating ``/v1``
call needs ``Authorization: Bearer <token>``; bound off loopback, every call does.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Body, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from api import kserve, triton
from api.controller import Controller
from api.inference import status_of, token_required, whole
from api.kserve import ErrorOut
from api.limits import BodyLimits
from api.metrics import CONTENT_TYPE, Metrics
from api.service import (
    ConflictError,
    NotFoundError,
    RefusedError,
    Service,
    UnavailableError,
)
from api.store import ModelRecord
from stgs import __version__
from stgs.errors import (
    ConfigError,
    StgsError,
)

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
ModelName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=128)]


@dataclass
class AppContext:
    service: Service
    controller: Controller | None
    metrics: Metrics
    token: str | None = None
    auth_all: bool = False  # bound off loopback: every call needs the token
    backend_kind: str = "simulated"
    dataplane: Any = None  # api.dataplane.DataPlane when frontends serve inference


# ---------------------------------------------------------------------- REST schemas
class _In(BaseModel):
    """Strict, like the document: no ``"5"`` for a number, no ``true`` for a rate."""

    model_config = ConfigDict(extra="forbid", strict=True)


class TensorSpec(_In):
    name: str = Field("input", pattern=NAME_PATTERN, max_length=64)
    datatype: Literal["FP32", "FP16", "INT64", "INT32", "UINT8"] = "FP32"
    shape: list[Annotated[int, Field(ge=1, le=1 << 20), BeforeValidator(whole)]] = Field(
        min_length=1, max_length=8, description="one sample's shape (no batch dimension)"
    )


class ModelIn(_In):
    """A model to register."""

    name: str = Field(pattern=NAME_PATTERN, max_length=128, examples=["tiny_mlp"])
    source: str | None = Field(
        None,
        max_length=1024,
        pattern=r"^(builtin|file|repository):.+$",
        description="builtin:<name> (default: builtin:<name>), file:<path in model_dir>"
        " (.pt TorchScript, .pt2 torch.export, .onnx ONNX), or repository:<name>: the model of"
        " the model repository (models.repository) of that name, its newest version by its"
        " config's version_policy, its tensors from its config.pbtxt",
    )
    slo_ms: float = Field(gt=0, le=600_000, allow_inf_nan=False, description="latency SLO")
    rate_rps: float = Field(ge=0, le=1_000_000, allow_inf_nan=False, description="expected rate")
    dtype: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="compute dtype on GPUs")
    inputs: list[TensorSpec] = Field(
        default_factory=list,
        max_length=8,
        description="the model's inputs (a TorchScript file needs them, in its argument order;"
        " other files and the built-ins describe their own, which these must match)",
    )
    outputs: list[TensorSpec] = Field(
        default_factory=list,
        max_length=8,
        description="a TorchScript file's outputs, in the order its module returns them"
        " (default: one, 'output', FP32); other models describe their own",
    )


class ModelOut(BaseModel):
    name: str
    status: str
    detail: str
    spec: dict[str, Any]
    ready: bool
    planned_rate_rps: float
    created_at: float
    updated_at: float


def _policy_enum(schema: dict[str, Any]) -> None:
    """The document lists the policies ``_allowed_policy`` accepts (read when it is built)."""
    from partitioner.policies import policy_names

    for alt in schema.get("anyOf", []):
        if alt.get("type") == "string":
            alt["enum"] = policy_names()


class PlanRequest(_In):
    policy: str | None = Field(
        None,
        max_length=64,
        description="a registered policy name",
        json_schema_extra=_policy_enum,
    )
    rates: (
        dict[
            Annotated[str, Field(max_length=128)],
            Annotated[float, Field(ge=0, le=1_000_000, allow_inf_nan=False)],
        ]
        | None
    ) = Field(None, description="model -> rate_rps to plan for (default: current)")


class DeletedOut(BaseModel):
    deleted: str


class PartitionOut(BaseModel):
    partition: str
    id: str = Field("", description="the partition's id in the metrics (label partition)")
    state: str
    pid: int | None
    restarts: int
    last_error: str | None
    restart_in_s: float | None = Field(None, description="a failed partition's next restart")
    socket: str | None = Field(None, description="the worker's data socket (data plane)")


class TransitionOut(BaseModel):
    policy: str
    state: str
    reason: str | None
    started: list[str]
    stopped: list[str]
    kept: list[str]


class PlanView(BaseModel):
    """The current plan (``Plan.to_dict``), every partition's state, the last transition."""

    plan: dict[str, Any] | None
    partitions: list[PartitionOut]
    last_transition: TransitionOut | None
    controller: dict[str, Any] | None


class PreviewOut(BaseModel):
    plan: dict[str, Any]
    changes: dict[str, Any]


class EventOut(BaseModel):
    id: int
    ts: float
    kind: str
    message: str
    data: dict[str, Any]


class StatusOut(BaseModel):
    version: str
    backend: str
    restored: bool
    models: dict[str, int]
    gpus_used: int
    partitions: dict[str, int]
    policy: str
    controller: dict[str, Any] | None
    last_error: str | None
    state_schema: int = Field(description="the state database's schema version")
    frontends: list[dict[str, Any]] = Field(
        default_factory=list, description="the data plane's frontend processes (if any)"
    )


class GpusOut(BaseModel):
    """The backend's view; ``error``/``mps_error`` only when a read failed."""

    backend: str
    gpus: list[dict[str, Any]]
    mps_daemons: list[dict[str, Any]]
    error: str | None = None
    mps_error: str | None = None


_WHY: dict[int, str] = {
    400: "malformed request (a body that is not JSON)",
    401: "missing or wrong bearer token",
    404: "unknown model",
    409: "conflicts with the daemon's state",
    413: "request body too large",
    422: "invalid request, or refused by admission control",
    429: "shed: it could not meet its deadline",
    503: "nothing can serve it now",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses a route can answer, all ``ErrorOut``."""
    return {c: {"model": ErrorOut, "description": _WHY[c]} for c in codes}


def needs_token(ctx: AppContext, method: str, path: str) -> bool:
    """Whether a call must carry the bearer token (the auth middleware and the OpenAPI
    document's ``security`` both ask this, so the document says what the daemon enforces)."""
    if ctx.token is None:
        return False
    return token_required(method, path, ctx.auth_all)


# ---------------------------------------------------------------------- helpers
def _status_of(exc: StgsError) -> int:
    """The REST errors' statuses; a serving error's is the one both protocols use."""
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, ConflictError):
        return 409
    if isinstance(exc, RefusedError):
        return 422
    if isinstance(exc, UnavailableError):
        return 503
    return status_of(exc)


def _model_out(svc: Service, rec: ModelRecord) -> ModelOut:
    plan = svc.current_plan()
    return ModelOut(
        name=rec.name,
        status=rec.status,
        detail=rec.detail,
        spec=rec.spec,
        ready=svc.model_ready(rec.name),
        planned_rate_rps=0.0 if plan is None else round(plan.served_rate(rec.name), 6),
        created_at=rec.created_at,
        updated_at=rec.updated_at,
    )


def _allowed_policy(name: str | None) -> str | None:
    if name is None:
        return None
    from partitioner.policies import policy_names

    known = policy_names()
    if name not in known:  # no dotted paths over HTTP: they would import arbitrary modules
        raise ConfigError(f"unknown policy {name!r}; known: {', '.join(known)}")
    return name


def create_app(
    ctx: AppContext,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
) -> FastAPI:
    app = FastAPI(
        title="stgs",
        version=__version__,
        description="Spatial-temporal GPU partitioning daemon: models, plans, KServe v2 inference.",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    app.state.service = ctx.service
    svc = ctx.service

    # ------------------------------------------------------------------ errors
    @app.exception_handler(StgsError)
    async def _stgs_error(_req: Request, exc: StgsError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=_status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()))
            parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        return JSONResponse({"error": "invalid request: " + "; ".join(parts)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette lists the first matching route's methods only
            headers["Allow"] = ", ".join(allowed_methods(app, req))
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=headers
        )

    # ------------------------------------------------------------------ auth
    @app.middleware("http")
    async def _auth(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        token = ctx.token
        if token is not None and needs_token(ctx, request.method, request.url.path):
            got = request.headers.get("authorization", "")
            scheme, _, value = got.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                value.strip().encode(), token.encode()
            ):
                return JSONResponse(
                    {"error": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await call_next(request)

    # added last, so the outermost of the app's middlewares: a body is bounded before auth
    limits = svc.cfg.server
    app.add_middleware(
        BodyLimits,
        max_body_bytes=limits.max_body_bytes,
        max_infer_body_bytes=limits.max_infer_body_bytes,
        body_timeout_s=limits.body_timeout_s,
        idle_body_timeout_s=limits.idle_body_timeout_s,
    )

    # ------------------------------------------------------------------ models
    @app.post(
        "/v1/models",
        status_code=201,
        responses={
            200: {"model": ModelOut, "description": "the same registration was already stored"},
            202: {"model": ModelOut, "description": "registered; profiling in the background"},
            **errors(400, 409, 422, 503),
        },
        tags=["models"],
    )
    async def register(model: ModelIn, response: Response) -> ModelOut:
        """Register a model: validate, profile when needed (202, in the background), admission
        control (422 with the planner's reason), plan and apply (201 when it serves). The same
        request again answers 200 with the stored registration (a retry after a lost reply); a
        different one for a registered name, 409."""
        spec = model.model_dump()
        if not spec["outputs"]:  # the registrations of before: the same stored spec
            del spec["outputs"]
        spec["source"] = spec["source"] or f"builtin:{model.name}"
        if spec["source"].startswith("repository:"):
            if spec["source"] != f"repository:{model.name}" or spec["inputs"]:
                raise ConfigError(
                    f"source {spec['source']!r}: a repository model registers as"
                    f" repository:{model.name}, under its own name, without inputs (its"
                    " config.pbtxt has them; the version is the newest its policy selects)"
                )
            try:
                spec = await run_in_threadpool(
                    svc.repository_spec, model.name, model.slo_ms, model.rate_rps
                )
            except NotFoundError as exc:  # not a resource of this call: an invalid source
                raise ConfigError(str(exc)) from exc
        same = await run_in_threadpool(svc.registered_as, spec)
        if same is not None:
            response.status_code = 200
            return _model_out(svc, same)
        rec, _ = await run_in_threadpool(svc.register, spec)
        if rec.status == "refused":  # profiled inline, then refused
            raise RefusedError(f"model {rec.name!r} refused: {rec.detail}")
        if rec.status == "profiling":
            response.status_code = 202
        return _model_out(svc, rec)

    @app.get("/v1/models", tags=["models"])
    def list_models() -> list[ModelOut]:
        return [_model_out(svc, r) for r in svc.models()]

    @app.get("/v1/models/{name}", responses=errors(404, 422), tags=["models"])
    def get_model(name: ModelName) -> ModelOut:
        return _model_out(svc, svc.get(name))

    @app.delete("/v1/models/{name}", responses=errors(404, 409, 422, 503), tags=["models"])
    async def delete_model(name: ModelName) -> DeletedOut:
        await run_in_threadpool(svc.delete, name)
        return DeletedOut(deleted=name)

    # ------------------------------------------------------------------ plans
    def _plan_view() -> PlanView:
        plan = svc.current_plan()
        hist = svc.last_transition()
        return PlanView(
            plan=None if plan is None else plan.to_dict(),
            partitions=[PartitionOut(**p) for p in svc.partitions()],
            last_transition=None
            if hist is None
            else TransitionOut(
                policy=hist.policy,
                state=hist.state.value,
                reason=hist.reason,
                started=hist.started,
                stopped=hist.stopped,
                kept=hist.kept,
            ),
            controller=None if ctx.controller is None else ctx.controller.status(),
        )

    @app.get("/v1/plan", tags=["plans"])
    def get_plan() -> PlanView:
        """The current plan, with the state of every partition."""
        return _plan_view()

    @app.post("/v1/plan/preview", responses=errors(400, 404, 409, 422), tags=["plans"])
    async def preview(req: Annotated[PlanRequest | None, Body()] = None) -> PreviewOut:
        """Dry run: the plan a policy would choose now, and the changes it would make."""
        r = req or PlanRequest()
        policy = _allowed_policy(r.policy)
        plan, changes = await run_in_threadpool(svc.preview, r.rates, policy)
        return PreviewOut(plan=plan.to_dict(), changes=changes)

    @app.post("/v1/plan/apply", responses=errors(400, 404, 409, 422, 503), tags=["plans"])
    async def apply(req: Annotated[PlanRequest | None, Body()] = None) -> PlanView:
        """Re-plan now (optionally with another policy or rates) and apply."""
        r = req or PlanRequest()
        policy = _allowed_policy(r.policy)
        await run_in_threadpool(
            lambda: svc.replan(r.rates, reason="api: plan/apply", policy=policy)
        )
        return _plan_view()

    # ------------------------------------------------------------------ node
    @app.get("/v1/gpus", tags=["node"], response_model_exclude_unset=True)
    def gpus() -> GpusOut:
        """The backend's view: GPUs, MIG mode and layout, MPS daemons, partitions."""
        return GpusOut(**svc.node_view(ctx.backend_kind))

    @app.get("/v1/events", responses=errors(422), tags=["node"])
    def events(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        kind: Annotated[str | None, Query(max_length=64)] = None,
    ) -> list[EventOut]:
        return [
            EventOut(id=e.id, ts=e.ts, kind=e.kind, message=e.message, data=e.data)
            for e in svc.events(limit=limit, kind=kind)
        ]

    @app.get("/v1/status", tags=["node"])
    def status() -> StatusOut:
        counts: dict[str, int] = {}
        for r in svc.models():
            counts[r.status] = counts.get(r.status, 0) + 1
        plan = svc.current_plan()
        parts = svc.partitions()
        return StatusOut(
            version=__version__,
            backend=ctx.backend_kind,
            restored=svc.restored,
            models=counts,
            gpus_used=0 if plan is None else plan.gpus_used,
            partitions={
                s: sum(1 for p in parts if p["state"] == s)
                for s in ("starting", "ready", "draining", "failed")
            },
            policy=svc.cfg.planner.policy,
            controller=None if ctx.controller is None else ctx.controller.status(),
            last_error=svc.last_error,
            state_schema=svc.state_schema(),
            frontends=[] if ctx.dataplane is None else ctx.dataplane.describe(),
        )

    @app.get(
        "/metrics",
        tags=["node"],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}},
    )
    def metrics() -> Response:
        ctx.metrics.refresh(svc, ctx.controller)
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    @app.get(
        "/metrics/triton",
        tags=["node"],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}},
        summary="Triton's nv_inference_* and nv_gpu_* series, named as Triton names them",
    )
    def metrics_triton() -> Response:
        ctx.metrics.refresh(svc, ctx.controller)
        return Response(ctx.metrics.render_triton(), media_type=CONTENT_TYPE)

    app.include_router(triton.router(ctx))  # before kserve's: /v2/models/stats
    app.include_router(kserve.router())
    document_auth(app, ctx)
    app.add_middleware(ArrivalStamp)  # added last: the outermost layer
    return app


def allowed_methods(app: FastAPI, req: Request) -> list[str]:
    """Every method some route serves at the request's path (the ``Allow`` of a 405)."""
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, Route) and route.matches(req.scope)[0] is not Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


def document_auth(app: FastAPI, ctx: AppContext) -> None:
    """The OpenAPI document says which operations need the bearer token (and answer 401),
    with the same rule the auth middleware enforces."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build()
        if ctx.token is None:
            return doc
        doc["components"].setdefault("securitySchemes", {})["bearer"] = {
            "type": "http",
            "scheme": "bearer",
        }
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                if needs_token(ctx, method, path):
                    op["security"] = [{"bearer": []}]
                    op["responses"]["401"] = {
                        "description": _WHY[401],
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ErrorOut"}
                            }
                        },
                    }
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


class ArrivalStamp:
    """Pure ASGI middleware: stamps ``request.state.arrival_ns`` (``time.monotonic_ns()``) when
    a request enters the app, before auth and before its body is read; a stamp set earlier (by
    the HTTP protocol, when the headers were parsed) is kept. The SLO clock starts there."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {}).setdefault("arrival_ns", time.monotonic_ns())
        await self.app(scope, receive, send)
