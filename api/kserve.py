"""The KServe v2 / Triton HTTP inference protocol, with the binary tensor data extension.

Endpoints: ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``,
``/v2/models/{m}`` (metadata), ``/v2/models/{m}/ready``, ``POST /v2/models/{m}/infer``.

A model has one input (named by its registration, default ``input``) and one output
(``output``). The first dimension of the input is the batch: each row is one sample, queued
and batched by the partition's worker. Binary tensor data: when the request carries the
``Inference-Header-Content-Length`` header, the body is that many bytes of JSON followed by the
raw tensors (little-endian, row major) of the inputs whose ``parameters.binary_data_size`` is
set, in the order of the inputs. Outputs come back as binary when the request asks for it
(``parameters.binary_data_output`` or an output's ``parameters.binary_data``); the response
then has the same header. Errors are ``{"error": "..."}`` with a 4xx status (503 while the
model has no ready worker), as Triton answers.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.inference import JsonInt
from stgs import __version__
from stgs.errors import ConfigError, InvalidRequestError

HEADER = "Inference-Header-Content-Length"
MAX_BATCH = 1024
OUTPUT_NAME = "output"
TOO_DEEP = "the request JSON is nested too deeply"

DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
KSERVE_OF = {v: k for k, v in DTYPES.items()}
Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
    "BF16",
]


class KServeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Base(BaseModel):
    """Strict: ``"3"`` is no shape dimension (the document, ``_INFER_SCHEMA``, says so too)."""

    model_config = ConfigDict(extra="allow", strict=True)


class InferInput(_Base):
    name: str = Field(max_length=256)
    shape: list[JsonInt] = Field(max_length=16)
    datatype: Datatype
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferOutput(_Base):
    name: str = Field(max_length=256)
    parameters: dict[str, Any] | None = None


class InferRequest(_Base):
    id: str | None = Field(None, max_length=1024)
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput] = Field(min_length=1, max_length=64)
    outputs: list[InferOutput] | None = Field(None, max_length=64)


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


def _one_line(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e["loc"])
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(parts)


def parse_request(body: bytes, header_len: str | None) -> tuple[InferRequest, bytes]:
    """The JSON header and the binary tail of an infer request; KServeError(400) if malformed."""
    tail = b""
    head = body
    if header_len is not None:
        try:
            n = int(header_len)
        except ValueError:
            raise KServeError(400, f"{HEADER}: not an integer: {header_len[:40]!r}") from None
        if not 0 < n <= len(body):
            raise KServeError(400, f"{HEADER} {n} is outside the body of {len(body)} bytes")
        head, tail = body[:n], body[n:]
    try:
        data = json.loads(head)
    except (UnicodeDecodeError, ValueError) as exc:
        raise KServeError(400, f"the request header is not valid JSON: {exc}") from None
    except RecursionError:  # [[[[... : the decoder's depth guard (the body size bounds the rest)
        raise KServeError(400, TOO_DEEP) from None
    if not isinstance(data, dict):
        raise KServeError(400, "the request must be a JSON object with 'inputs'")
    try:
        return InferRequest.model_validate(data), tail
    except ValidationError as exc:
        raise KServeError(400, f"invalid inference request: {_one_line(exc)}") from None
    except RecursionError:
        raise KServeError(400, TOO_DEEP) from None


def decode_input(
    inp: InferInput, tail: bytes, offset: int, want_dtype: str, want_shape: tuple[int, ...] | None
) -> tuple[np.ndarray, int]:
    """The input as an array [batch, *sample]; returns it and the new offset into ``tail``."""
    if inp.datatype not in DTYPES:
        raise KServeError(400, f"input {inp.name!r}: datatype {inp.datatype} is not supported")
    np_dtype = DTYPES[inp.datatype]
    if want_dtype and np_dtype != want_dtype:
        raise KServeError(
            400,
            f"input {inp.name!r}: datatype {inp.datatype}, the model takes "
            f"{KSERVE_OF.get(want_dtype, want_dtype)}",
        )
    shape = inp.shape
    if not shape or any(d < 0 for d in shape) or shape[0] < 1:
        raise KServeError(400, f"input {inp.name!r}: shape {shape}: [batch >= 1, ...] expected")
    if shape[0] > MAX_BATCH:
        raise KServeError(400, f"input {inp.name!r}: batch {shape[0]} > {MAX_BATCH}")
    if want_shape is not None and tuple(shape[1:]) != want_shape:
        raise KServeError(
            400,
            f"input {inp.name!r}: shape {shape}, the model takes [-1, "
            + ", ".join(str(d) for d in want_shape)
            + "]",
        )
    count = math.prod(shape)
    params = inp.parameters or {}
    size = params.get("binary_data_size")
    if size is not None:
        if inp.data is not None:
            raise KServeError(400, f"input {inp.name!r}: both data and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise KServeError(400, f"input {inp.name!r}: binary_data_size must be an integer")
        itemsize = np.dtype(np_dtype).itemsize
        if size != count * itemsize:
            raise KServeError(
                400,
                f"input {inp.name!r}: binary_data_size {size}, shape {shape} of "
                f"{inp.datatype} needs {count * itemsize} bytes",
            )
        if offset + size > len(tail):
            raise KServeError(400, f"input {inp.name!r}: the body ends before its binary data")
        raw = tail[offset : offset + size]
        arr = np.frombuffer(raw, dtype=np.dtype(np_dtype).newbyteorder("<")).astype(np_dtype)
        _finite(inp.name, arr)
        return arr.reshape(shape), offset + size
    if inp.data is None:
        raise KServeError(400, f"input {inp.name!r}: no data and no binary_data_size")
    try:
        arr = np.asarray(inp.data, dtype=np_dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise KServeError(400, f"input {inp.name!r}: data is not {inp.datatype}: {exc}") from None
    if arr.size != count:
        raise KServeError(
            400, f"input {inp.name!r}: {arr.size} values for shape {shape} ({count} needed)"
        )
    _finite(inp.name, arr)
    return arr.reshape(shape), offset


def _finite(name: str, arr: np.ndarray) -> None:
    """Refuse NaN and infinity in float inputs, JSON and binary alike: a model's output for them
    is meaningless, and both encodings of one tensor must get one answer."""
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise KServeError(400, f"input {name!r}: data holds NaN or infinity")


def _wants_binary(req: InferRequest) -> bool:
    if req.outputs:
        return any(bool((o.parameters or {}).get("binary_data")) for o in req.outputs)
    return bool((req.parameters or {}).get("binary_data_output"))


def encode_response(model: str, req_id: str | None, out: np.ndarray, binary: bool) -> Response:
    datatype = KSERVE_OF.get(str(out.dtype))
    if datatype is None:
        out = out.astype(np.float32)
        datatype = "FP32"
    entry: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": datatype, "shape": list(out.shape)}
    body: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": [entry]}
    if req_id is not None:
        body["id"] = req_id
    if not binary:
        entry["data"] = out.ravel().tolist()
        return JSONResponse(body)
    raw = np.ascontiguousarray(out, dtype=out.dtype.newbyteorder("<")).tobytes()
    entry["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps(body).encode()
    return Response(
        head + raw,
        media_type="application/octet-stream",
        headers={HEADER: str(len(head))},
    )


def binary_request(
    x: np.ndarray, input_name: str = "input", *, binary_output: bool = False
) -> tuple[bytes, dict[str, str]]:
    """A client's KServe v2 infer request carrying ``x`` as binary tensor data: (body, headers).
    For the benchmarks' and the tests' own clients (tritonclient builds the same bytes)."""
    head: dict[str, Any] = {
        "inputs": [
            {
                "name": input_name,
                "shape": list(x.shape),
                "datatype": KSERVE_OF[str(x.dtype)],
                "parameters": {"binary_data_size": x.nbytes},
            }
        ]
    }
    if binary_output:
        head["outputs"] = [{"name": OUTPUT_NAME, "parameters": {"binary_data": True}}]
    raw = json.dumps(head).encode()
    return raw + np.ascontiguousarray(x).tobytes(), {HEADER: str(len(raw))}


def router() -> APIRouter:
    r = APIRouter(tags=["inference (KServe v2)"])

    def svc(request: Request) -> Any:
        return request.app.state.service

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @r.get("/v2", summary="server metadata")
    async def server_metadata() -> ServerMetadata:
        return ServerMetadata(name="stgs", version=__version__, extensions=["binary_tensor_data"])

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

    def _record(request: Request, model: str) -> Any:
        rec = svc(request).store.get_model(model)
        if rec is None:
            raise KServeError(404, f"unknown model {model!r}")
        return rec

    def _io(rec: Any) -> tuple[str, str, tuple[int, ...] | None]:
        from stgs.runtime.models import model_entry

        entry = model_entry(rec.name)
        inputs = rec.spec.get("inputs") or []
        name = inputs[0]["name"] if inputs else "input"
        return name, entry.input_dtype, entry.input_shape

    @r.get(
        "/v2/models/{model}",
        summary="model metadata",
        responses={200: {"model": ModelMetadata}, **_errors(404, 422)},
    )
    async def model_metadata(model: str, request: Request) -> Response:
        try:
            rec = _record(request, model)
            in_name, dtype, shape = _io(rec)
        except KServeError as exc:
            return error(exc.status, exc.message)
        except ConfigError as exc:
            return error(404, str(exc))
        return JSONResponse(
            {
                "name": model,
                "versions": ["1"],
                "platform": "stgs",
                "inputs": [
                    {
                        "name": in_name,
                        "datatype": KSERVE_OF.get(dtype, "FP32") if dtype else "FP32",
                        "shape": [-1, *(shape or [-1])],
                    }
                ],
                "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, -1]}],
            }
        )

    @r.get(
        "/v2/models/{model}/ready",
        summary="the model has a ready worker",
        responses={
            200: {"model": ModelReady},
            400: {"model": ModelReady, "description": "registered, no ready worker"},
            **_errors(404, 422),
        },
    )
    async def model_ready(model: str, request: Request) -> Response:
        try:
            _record(request, model)
        except KServeError as exc:
            return error(exc.status, exc.message)
        ok = svc(request).model_ready(model)
        return JSONResponse({"name": model, "ready": ok}, status_code=200 if ok else 400)

    @r.post(
        "/v2/models/{model}/infer",
        summary="inference (JSON tensors, or the binary tensor data extension)",
        responses={
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
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": _INFER_SCHEMA, "example": _INFER_EXAMPLE}
                },
            }
        },
    )
    async def infer(model: str, request: Request) -> Response:
        try:
            body = await request.body()  # at most server.max_infer_body_bytes (api.limits)
            rec = _record(request, model)
            req, tail = parse_request(body, request.headers.get(HEADER))
            in_name, dtype, shape = _io(rec)
            if len(req.inputs) != 1:
                raise KServeError(400, f"model {model!r} takes one input, {in_name!r}")
            inp = req.inputs[0]
            if inp.name != in_name:
                raise KServeError(400, f"unknown input {inp.name!r}; the model takes {in_name!r}")
            for o in req.outputs or []:
                if o.name != OUTPUT_NAME:
                    raise KServeError(400, f"unknown output {o.name!r}; the model has 'output'")
            arr, _ = decode_input(inp, tail, 0, dtype, shape)
            samples = list(arr)
            arrival_ns = getattr(request.state, "arrival_ns", None)
            outs = await svc(request).infer_async(model, samples, arrival_ns=arrival_ns)
            out = np.stack([np.asarray(o) for o in outs])
            return encode_response(model, req.id, out, _wants_binary(req))
        except KServeError as exc:
            return error(exc.status, exc.message)
        except InvalidRequestError as exc:
            return error(400, str(exc))

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
