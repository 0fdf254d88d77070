"""The KServe v2 / Triton HTTP inference protocol, with the binary tensor data extension.

Endpoints: ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``,
``/v2/models/{m}`` (metadata), ``/v2/models/{m}/ready``, ``POST /v2/models/{m}/infer``, and the
same three under ``/v2/models/{m}/versions/{v}`` for the served version (``1``; a repository
model's: the newest version its config's policy selects). Triton's model configuration,
statistics and repository API: :mod:`api.triton`.

A model has one or more named inputs and outputs (from its file, its registration or its
repository config; a built-in's default: ``input`` and ``output``); a request sends every input
by name and asks for every output or some. The first dimension of each input is the batch: each
row is one sample, queued and batched by the partition's worker. Binary tensor
data: when the request carries the ``Inference-Header-Content-Length`` header, the body is that
many bytes of JSON followed by the raw tensors (little-endian, row major) of the inputs whose
``parameters.binary_data_size`` is set, in the order of the inputs. Outputs come back as
binary when the request asks for it (``parameters.binary_data_output`` or an output's
``parameters.binary_data``); the response then has the same header. Errors are
``{"error": "..."}`` with a 4xx status (503 while the model has no ready worker), as Triton
answers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api.inference import (
    DTYPES,
    EXTENSIONS,
    HEADER,
    KSERVE_OF,
    InferError,
    ModelIO,
    answer_outputs,
    encode_infer,
    model_io,
    parse_infer,
)
from stgs import __version__
from stgs.errors import ConfigError, InvalidRequestError


class ErrorOut(BaseModel):
    """Every error answer, REST and KServe: ``{"error": "<message>"}``."""

    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = Field(None, description="absent when sent as binary")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size when binary")


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OutputTensor]


_WHY = {
    400: "malformed inference request, or one the model cannot take",
    404: "unknown model",
    413: "request body over server.max_infer_body_bytes (default 64 MiB)",
    422: "the model's registration is not servable",
    429: "shed: it could not meet its deadline",
    503: "the model has no ready worker",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorOut, "description": _WHY[c]} for c in codes}


def binary_request(
    x: np.ndarray | Mapping[str, np.ndarray],
    input_name: str = "input",
    *,
    binary_output: bool = False,
) -> tuple[bytes, dict[str, str]]:
    """A client's KServe v2 infer request carrying ``x`` as binary tensor data: (body, headers).
    ``x``: one array (the input ``input_name``), or arrays by input name (a model of several).
    ``binary_output``: every output comes back as binary data. For the benchmarks' and the
    tests' own clients (tritonclient builds the same bytes)."""
    named = list(x.items()) if isinstance(x, Mapping) else [(input_name, x)]
    head: dict[str, Any] = {
        "inputs": [
            {
                "name": name,
                "shape": list(arr.shape),
                "datatype": KSERVE_OF[str(arr.dtype)],
                "parameters": {"binary_data_size": arr.nbytes},
            }
            for name, arr in named
        ]
    }
    if binary_output:
        head["parameters"] = {"binary_data_output": True}
    raw = json.dumps(head).encode()
    tensors = b"".join(np.ascontiguousarray(arr).tobytes() for _, arr in named)
    return raw + tensors, {HEADER: str(len(raw))}


def router() -> APIRouter:
    r = APIRouter(tags=["inference (KServe v2)"])

    def svc(request: Request) -> Any:
        return request.app.state.service

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @r.get("/v2", summary="server metadata")
    async def server_metadata() -> ServerMetadata:
        return ServerMetadata(name="stgs", version=__version__, extensions=list(EXTENSIONS))

    @r.get("/v2/health/live", summary="the daemon is alive")
    async def live() -> Live:
        return Live(live=True)

    @r.get(
        "/v2/health/ready",
        summary="the daemon restored its state and serves",
        responses={
            200: {"model": Ready},
            503: {"model": Ready, "description": "still restoring its state"},
        },
    )
    async def ready(request: Request) -> Response:
        ok = bool(svc(request).restored)
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    def _io(request: Request, model: str, version: str = "") -> ModelIO:
        """The model's tensors; InferError(404) for an unknown model or version."""
        try:
            return model_io(svc(request), model, version)
        except ConfigError as exc:
            raise InferError(404, str(exc)) from None

    async def metadata(request: Request, model: str, version: str) -> Response:
        try:
            io = _io(request, model, version)
        except InferError as exc:
            return error(exc.status, exc.message)
        return JSONResponse(io.metadata())

    @r.get(
        "/v2/models/{model}",
        summary="model metadata",
        responses={200: {"model": ModelMetadata}, **_errors(404, 422)},
    )
    async def model_metadata(model: str, request: Request) -> Response:
        return await metadata(request, model, "")

    @r.get(
        "/v2/models/{model}/versions/{version}",
        summary="model metadata of a version (the served one)",
        responses={200: {"model": ModelMetadata}, **_errors(404, 422)},
    )
    async def model_version_metadata(model: str, version: str, request: Request) -> Response:
        return await metadata(request, model, version)

    async def readiness(request: Request, model: str, version: str) -> Response:
        try:
            _io(request, model, version)
        except InferError as exc:
            return error(exc.status, exc.message)
        ok = svc(request).model_ready(model)
        return JSONResponse({"name": model, "ready": ok}, status_code=200 if ok else 400)

    ready_responses: dict[int | str, dict[str, Any]] = {
        200: {"model": ModelReady},
        400: {"model": ModelReady, "description": "registered, no ready worker"},
        **_errors(404, 422),
    }

    @r.get(
        "/v2/models/{model}/ready",
        summary="the model has a ready worker",
        responses=ready_responses,
    )
    async def model_ready(model: str, request: Request) -> Response:
        return await readiness(request, model, "")

    @r.get(
        "/v2/models/{model}/versions/{version}/ready",
        summary="the version (the served one) has a ready worker",
        responses=ready_responses,
    )
    async def model_version_ready(model: str, version: str, request: Request) -> Response:
        return await readiness(request, model, version)

    async def inference(request: Request, model: str, version: str) -> Response:
        try:
            body = await request.body()  # at most server.max_infer_body_bytes (api.limits)
            io = _io(request, model, version)
            call = parse_infer(body, request.headers.get(HEADER), io)
            arrival_ns = getattr(request.state, "arrival_ns", None)
            result = await svc(request).infer_arrays(model, call.arrays, arrival_ns)
            content, headers = encode_infer(
                model, call.request_id, answer_outputs(io, call, result), version=io.version
            )
            return Response(content, headers={k.decode(): v.decode() for k, v in headers})
        except InferError as exc:
            return error(exc.status, exc.message)
        except InvalidRequestError as exc:
            return error(400, str(exc))

    infer_doc: dict[str, Any] = {
        "summary": "inference (JSON tensors, or the binary tensor data extension)",
        "responses": {
            200: {
                "model": InferResponse,
                "content": {
                    "application/octet-stream": {
                        "schema": {"type": "string", "format": "binary"},
                    }
                },
                "description": f"JSON, or with {HEADER}: the JSON header then the raw tensors",
            },
            **_errors(400, 404, 413, 422, 429, 503),
        },
        "openapi_extra": {
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": _INFER_SCHEMA, "example": _INFER_EXAMPLE}
                },
            }
        },
    }

    @r.post("/v2/models/{model}/infer", **infer_doc)
    async def infer(model: str, request: Request) -> Response:
        return await inference(request, model, "")

    @r.post("/v2/models/{model}/versions/{version}/infer", **infer_doc)
    async def infer_version(model: str, version: str, request: Request) -> Response:
        return await inference(request, model, version)

    return r


_INFER_EXAMPLE: dict[str, Any] = {
    "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0.5, 1, 1.5, 2]}]
}
_INFER_SCHEMA: dict[str, Any] = {
    "description": "InferRequest, as parse_request validates it (the binary tensor data "
    "extension's raw tail is not JSON: see the module docstring)",
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": ["string", "null"], "maxLength": 1024},
        "parameters": {"type": ["object", "null"]},
        "inputs": {
            "type": "array",
            "minItems": 1,
            "maxItems": 64,
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype"],
                "properties": {
                    "name": {"type": "string", "maxLength": 256},
                    "shape": {"type": "array", "maxItems": 16, "items": {"type": "integer"}},
                    "datatype": {"type": "string", "enum": list(DTYPES)},
                    "parameters": {"type": ["object", "null"]},
                    "data": {"type": ["array", "null"]},
                },
            },
        },
        "outputs": {
            "type": ["array", "null"],
            "maxItems": 64,
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "maxLength": 256},
                    "parameters": {"type": ["object", "null"]},
                },
            },
        },
    },
}
