"""Triton's model API beside KServe v2 inference, on the control plane (the frontends proxy these
paths to it; their gRPC servicer calls them over the control socket).

* ``GET /v2/models/{m}[/versions/{v}]/config``: the model's configuration in Triton's JSON shape
  (``ModelConfig`` through ``MessageToDict(preserving_proto_field_name=True)``, every field, 64-bit
  integers as numbers, as Triton writes it): a repository model's ``config.pbtxt`` (its platform
  filled in); for any other model one made from its registration (its tensors, the batch stgs
  accepts, ``parameters`` slo_ms and rate_rps).
* ``GET /v2/models/stats``, ``/v2/models/{m}[/versions/{v}]/stats``: Triton's statistics
  extension (``ModelStatisticsResponse``). What stgs knows fills it, the rest is zero:
  ``inference_count`` (samples answered), ``last_inference`` (ms since the epoch),
  ``inference_stats.success`` and ``fail`` (requests and their time from arrival to answer, every
  serving process together), ``execution_count`` and ``inference_stats.compute_infer`` (the
  batches the model's workers ran and their run time, since those workers started). Zero:
  ``queue``, ``compute_input``, ``compute_output``, ``cache_hit``, ``cache_miss``; empty:
  ``batch_stats``, ``memory_usage``, ``response_stats``.
* ``POST /v2/repository/index``: ``[{name, version, state, reason}]``
  (:meth:`api.service.Service.repository_index`); body ``{"ready": true}``: ready ones only.
* ``POST /v2/repository/models/{m}/load`` and ``/unload``: registration
  (:meth:`~api.service.Service.load`: from the repository, or again) and its deletion. A load
  answers once the model serves (or its registration failed: 400 with the reason), profiling
  included, up to ``LOAD_WAIT_S``; parameters ``slo_ms`` and ``rate_rps`` set the SLO and rate.
  With a token both need it, as mutating ``/v1`` calls do.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from tritonclient.grpc import service_pb2 as pb

from api import repository
from api.inference import InferError, model_io
from api.kserve import ErrorOut
from api.service import (
    FAILED,
    PENDING,
    PROFILING,
    REFUSED,
    ConflictError,
    NotFoundError,
    UnavailableError,
)
from stgs.errors import ConfigError, StgsError

if TYPE_CHECKING:
    from api.app import AppContext

LOAD_WAIT_S = 600.0


class IndexIn(BaseModel):
    model_config = ConfigDict(strict=True)

    repository_name: str | None = Field(None, max_length=256, description="ignored (one)")
    ready: bool | None = Field(None, description="true: the models ready to serve only")


class IndexRow(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY, LOADING or UNAVAILABLE")
    reason: str


class LoadIn(BaseModel):
    model_config = ConfigDict(strict=True)

    parameters: dict[str, Any] | None = Field(
        None,
        description="slo_ms and rate_rps (numbers or strings): the SLO and rate to register it"
        " with (default: its config's parameters, else its registration's); unload takes"
        " unload_dependents (ignored)",
    )


_WHY = {
    400: "a body that is not valid, or a model that cannot be loaded (its config, its file,"
    " admission control): the reason",
    404: "no such model (or version)",
    409: "registered from another source under that name",
    503: "still loading, or nothing can serve it now",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorOut, "description": _WHY[c]} for c in codes}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _body(request: Request, model: type[BaseModel]) -> Any:
    """The request's JSON body as ``model`` (None when empty), whatever its Content-Type:
    tritonclient sends these bodies without one. ConfigError when it is not valid."""
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "body"
        raise _BadBody(f"invalid request: {where}: {err['msg']}") from None


class _BadBody(Exception):
    pass


def _doc(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody of a body read by :func:`_body` (optional JSON)."""
    return {
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def _param(params: dict[str, Any], key: str) -> float | None:
    v = params.get(key)
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"parameter {key}: {v!r} is not a number") from None
    if not (f == f and 0 <= f <= 1e6) or (key == "slo_ms" and f <= 0):
        raise ConfigError(f"parameter {key}: {v!r} is out of range")
    return f


def router(ctx: AppContext) -> APIRouter:
    r = APIRouter(tags=["Triton model API"])
    svc = ctx.service

    # ------------------------------------------------------------------ config
    def config_of(model: str, version: str) -> dict[str, Any]:
        io = model_io(svc, model, version)  # InferError 404: unknown model or version
        rec = svc.get(model)
        source = str(rec.spec.get("source") or "")
        if repository.is_repository_source(source) and svc.repository is not None:
            name, ver = repository.parse_source(source)
            return svc.repository.config_json(svc.repository.inspect(name, ver))
        return repository.io_config(io, rec.spec)

    async def config(model: str, version: str) -> JSONResponse:
        try:
            return JSONResponse(await run_in_threadpool(config_of, model, version))
        except InferError as exc:
            return _error(exc.status, exc.message)
        except ConfigError as exc:  # the repository changed under a served model
            return _error(404, str(exc))

    @r.get(
        "/v2/models/{model}/config",
        summary="the model's configuration (Triton's ModelConfig as JSON)",
        responses={200: {"content": {"application/json": {}}}, **_errors(404)},
    )
    async def model_config(model: str) -> JSONResponse:
        return await config(model, "")

    @r.get(
        "/v2/models/{model}/versions/{version}/config",
        summary="a version's configuration (the served version only)",
        responses={200: {"content": {"application/json": {}}}, **_errors(404)},
    )
    async def model_version_config(model: str, version: str) -> JSONResponse:
        return await config(model, version)

    # ------------------------------------------------------------------ statistics
    def stats_of(model: str, version: str) -> dict[str, Any]:
        names = [model] if model else [rec.name for rec in svc.models()]
        totals = ctx.metrics.inference_totals().to_dict()
        batches = svc.batch_totals()
        out = []
        for name in names:
            try:
                io = model_io(svc, name, version)
            except InferError:
                if model:
                    raise
                continue  # every model: one whose file went away is left out
            st = totals.get(name, {})
            ok = int(st.get("ok", 0))
            ok_ns = int(float(st.get("ok_duration_sum_s", 0.0)) * 1e9)
            all_ns = int(float(st.get("duration_sum_s", 0.0)) * 1e9)
            execs, run_ns = batches.get(name, (0, 0))
            d = pb.StatisticDuration
            out.append(
                pb.ModelStatistics(
                    name=name,
                    version=io.version,
                    last_inference=int(st.get("last_unix_ms", 0)),
                    inference_count=int(st.get("samples", 0)),
                    execution_count=execs,
                    inference_stats=pb.InferStatistics(
                        success=d(count=ok, ns=ok_ns),
                        fail=d(count=int(st.get("requests", 0)) - ok, ns=max(0, all_ns - ok_ns)),
                        queue=d(),
                        compute_input=d(),
                        compute_infer=d(count=execs, ns=run_ns),
                        compute_output=d(),
                        cache_hit=d(),
                        cache_miss=d(),
                    ),
                )
            )
        return repository.config_dict(pb.ModelStatisticsResponse(model_stats=out))

    async def stats(model: str, version: str) -> JSONResponse:
        try:
            return JSONResponse(await run_in_threadpool(stats_of, model, version))
        except InferError as exc:
            return _error(exc.status, exc.message)

    stats_responses: dict[int | str, dict[str, Any]] = {
        200: {"content": {"application/json": {}}},
        **_errors(404),
    }

    @r.get("/v2/models/stats", summary="every model's statistics", responses=stats_responses)
    async def all_stats() -> JSONResponse:
        return await stats("", "")

    @r.get("/v2/models/{model}/stats", summary="statistics", responses=stats_responses)
    async def model_stats(model: str) -> JSONResponse:
        return await stats(model, "")

    @r.get(
        "/v2/models/{model}/versions/{version}/stats",
        summary="a version's statistics",
        responses=stats_responses,
    )
    async def model_version_stats(model: str, version: str) -> JSONResponse:
        return await stats(model, version)

    # ------------------------------------------------------------------ repository
    @r.post(
        "/v2/repository/index",
        summary="the models of the repository, and their state",
        responses={200: {"model": list[IndexRow]}, **_errors(400)},
        openapi_extra=_doc(IndexIn),
    )
    async def index(request: Request) -> JSONResponse:
        try:
            req = await _body(request, IndexIn)
        except _BadBody as exc:
            return _error(400, str(exc))
        ready = bool(req is not None and req.ready)
        rows = await run_in_threadpool(svc.repository_index, ready)
        return JSONResponse(rows)

    @r.post(
        "/v2/repository/models/{name}/load",
        summary="register the model (from the repository), or register it again",
        responses={200: {"content": {"application/json": {}}}, **_errors(400, 404, 409, 503)},
        openapi_extra=_doc(LoadIn),
    )
    async def load(name: str, request: Request) -> JSONResponse:
        model = name
        try:
            req = await _body(request, LoadIn)
        except _BadBody as exc:
            return _error(400, str(exc))
        params = dict((req.parameters if req is not None else None) or {})
        try:
            extra = sorted(k for k in params if k not in ("slo_ms", "rate_rps"))
            if extra:
                raise ConfigError(
                    f"load parameters {', '.join(extra)} are not supported (stgs takes slo_ms"
                    " and rate_rps; edit config.pbtxt for the rest)"
                )
            slo, rate = _param(params, "slo_ms"), _param(params, "rate_rps")
            rec = await run_in_threadpool(svc.load, model, slo, rate)
            end = time.monotonic() + LOAD_WAIT_S
            while rec.status in (PROFILING, PENDING) and time.monotonic() < end:
                await asyncio.sleep(0.2)
                got = svc.record(model)
                if got is None:
                    return _error(409, f"model {model!r} was unloaded while it loaded")
                rec = got
        except NotFoundError as exc:
            return _error(404, str(exc))
        except ConflictError as exc:
            return _error(409, str(exc))
        except UnavailableError as exc:
            return _error(503, f"failed to load {model!r}: {exc}")
        except StgsError as exc:  # config, file, admission control
            return _error(400, f"failed to load {model!r}: {exc}")
        if rec.status in (REFUSED, FAILED):
            return _error(400, f"failed to load {model!r}: {rec.status}: {rec.detail}")
        if rec.status != "ready":
            return _error(503, f"model {model!r} is still loading ({rec.status}: {rec.detail})")
        return JSONResponse({})

    @r.post(
        "/v2/repository/models/{name}/unload",
        summary="remove the model's registration",
        responses={200: {"content": {"application/json": {}}}, **_errors(400, 404, 409, 503)},
        openapi_extra=_doc(LoadIn),
    )
    async def unload(name: str, request: Request) -> JSONResponse:
        model = name
        try:
            await _body(request, LoadIn)
        except _BadBody as exc:
            return _error(400, str(exc))
        try:
            await run_in_threadpool(svc.unload, model)
        except NotFoundError as exc:
            return _error(404, str(exc))
        except ConflictError as exc:
            return _error(409, str(exc))
        except StgsError as exc:
            return _error(503, str(exc))
        return JSONResponse({})

    return r
