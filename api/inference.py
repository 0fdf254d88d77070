"""The inference path that both protocols share: KServe v2 over HTTP (:mod:`api.kserve`) and over
gRPC (:mod:`api.grpc_server`).

One place for what does not depend on the wire: a model's tensors (:class:`ModelIO`), the checks
of a request's input against them, the call into the service, and the status an error gets.
HTTP answers that status; gRPC maps it to its own code (:data:`GRPC_CODE_OF`), so a client sees
the same outcome on either protocol.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import math
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Protocol, TypeVar

import numpy as np
from pydantic import BeforeValidator

from stgs.errors import (
    ConfigError,
    DeadlineExceededError,
    InvalidRequestError,
    NoWorkerError,
    ServingError,
    StgsError,
    WorkerDiedError,
    WorkerError,
    WorkerTimeoutError,
)

if TYPE_CHECKING:
    from api.store import ModelRecord
    from stgs.registry import ModelEntry

T = TypeVar("T")

OUTPUT_NAME = "output"
# A request is answered by its deadline plus ANSWER_GRACE_S, whatever its worker does (a hung
# worker's requests get WorkerTimeoutError); a model without an SLO waits NO_SLO_TIMEOUT_S.
ANSWER_GRACE_S = 0.5
NO_SLO_TIMEOUT_S = 30.0
MAX_BATCH = 1024
MAX_ELEMENTS = 64 << 20  # per input tensor

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
"""KServe v2 datatype -> numpy dtype name (BYTES and BF16 are not served)."""
KSERVE_OF = {v: k for k, v in DTYPES.items()}


def whole(v: object) -> object:
    """JSON Schema's ``integer`` includes 3.0, so the API takes a whole float as the integer it
    is; a strict model still refuses "3", 3.5 and true."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


JsonInt = Annotated[int, BeforeValidator(whole)]
"""An integer field of a strict request model, as JSON Schema counts integers. With bounds, put
them first (``Annotated[int, Field(ge=1), BeforeValidator(whole)]``), or pydantic leaves them
out of the JSON schema."""


EXTENSIONS = ("binary_tensor_data", "model_repository", "model_configuration", "statistics")
"""Server metadata's extensions (Triton's names), the same on every serving process."""
_MUTATING = frozenset(("POST", "PUT", "PATCH", "DELETE"))


def token_required(method: str, path: str, auth_all: bool) -> bool:
    """Whether a call needs the bearer token (when one is set): off loopback (``auth_all``)
    every call; on loopback the calls that change the daemon's state: mutating ``/v1`` calls and
    loading or unloading a repository model (``POST /v2/repository/models/...``)."""
    if auth_all:
        return True
    return method.upper() in _MUTATING and (
        path.startswith("/v1/") or path.startswith("/v2/repository/models/")
    )


class InferError(Exception):
    """A request the daemon refuses, with its HTTP status (gRPC: :data:`GRPC_CODE_OF`)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# HTTP status -> gRPC status code name (grpc.StatusCode), as Triton's frontends map them.
GRPC_CODE_OF: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    409: "FAILED_PRECONDITION",
    413: "RESOURCE_EXHAUSTED",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}


def status_of(exc: StgsError) -> int:
    """The HTTP status of a serving error (the REST layer maps its own errors before this)."""
    if isinstance(exc, ConfigError):
        return 422
    if isinstance(exc, InvalidRequestError | WorkerError):
        return 400
    if isinstance(exc, DeadlineExceededError):
        return 429
    if isinstance(exc, NoWorkerError | WorkerDiedError | ServingError):
        return 503
    return 409


@dataclass(frozen=True)
class TensorIO:
    """One input or output of a served model: ``dtype`` a numpy dtype name ("" : any; FP32 in
    the metadata), ``shape`` one sample's (None: any)."""

    name: str
    dtype: str = ""
    shape: tuple[int, ...] | None = None

    def metadata(self) -> dict[str, object]:
        return {
            "name": self.name,
            "datatype": KSERVE_OF.get(self.dtype, "FP32") if self.dtype else "FP32",
            "shape": [-1, *(self.shape if self.shape is not None else [-1])],
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": None if self.shape is None else list(self.shape),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], default_name: str) -> TensorIO:
        shape = d.get("shape")
        return cls(
            str(d.get("name") or default_name),
            str(d.get("dtype") or ""),
            None if shape is None else tuple(int(x) for x in shape),
        )


@dataclass(frozen=True)
class ModelIO:
    """A served model's tensors: its inputs (batch first, in the order the workers take them)
    and outputs (in the order they return them; ``output`` for a model of one whose name is not
    its own), the served version(s) and the largest batch a request carries."""

    name: str
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...] = (TensorIO(OUTPUT_NAME),)
    versions: tuple[str, ...] = ("1",)
    max_batch: int = MAX_BATCH
    platform: str = "stgs"

    # the first input and output (a model of one of each: its only ones)
    @property
    def input_name(self) -> str:
        return self.inputs[0].name

    @property
    def dtype(self) -> str:
        return self.inputs[0].dtype

    @property
    def shape(self) -> tuple[int, ...] | None:
        return self.inputs[0].shape

    @property
    def output_name(self) -> str:
        return self.outputs[0].name

    def input_index(self, name: str) -> int:
        """The position of the input ``name``; InferError(400) naming the model's inputs."""
        for k, t in enumerate(self.inputs):
            if t.name == name:
                return k
        raise InferError(400, f"unknown input {name!r}; model {self.name!r} takes {self._ins()}")

    def output_index(self, name: str) -> int:
        """The position of the output ``name``; InferError(400) naming the model's outputs."""
        for k, t in enumerate(self.outputs):
            if t.name == name:
                return k
        outs = ", ".join(repr(t.name) for t in self.outputs)
        raise InferError(400, f"unknown output {name!r}; the model has {outs}")

    def _ins(self) -> str:
        return ", ".join(repr(t.name) for t in self.inputs)

    @property
    def version(self) -> str:
        """The version an answer names: the served one."""
        return self.versions[-1]

    def check_version(self, version: str) -> None:
        """InferError(404) unless ``version`` ("" : the served one) is served."""
        if version not in ("", *self.versions):
            raise InferError(
                404,
                f"model {self.name!r} has no version {version!r} served"
                f" (versions: {', '.join(self.versions)})",
            )

    def metadata(self) -> dict[str, object]:
        """KServe v2 model metadata (the same on HTTP and gRPC)."""
        return {
            "name": self.name,
            "versions": list(self.versions),
            "platform": self.platform,
            "inputs": [t.metadata() for t in self.inputs],
            "outputs": [t.metadata() for t in self.outputs],
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (the data plane's routing snapshots); :meth:`from_dict` reads it back."""
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "versions": list(self.versions),
            "max_batch": self.max_batch,
            "platform": self.platform,
        }

    @classmethod
    def from_dict(cls, model: str, d: Mapping[str, Any]) -> ModelIO:
        """Also reads the form of one input (``name``, ``dtype``, ``shape``, ``output``)."""
        if "inputs" in d:
            ins = tuple(TensorIO.from_dict(t, "input") for t in d["inputs"])
            outs = tuple(TensorIO.from_dict(t, OUTPUT_NAME) for t in d.get("outputs") or ())
        else:
            ins = (TensorIO.from_dict(d, "input"),)
            outs = (TensorIO.from_dict(d.get("output") or {}, OUTPUT_NAME),)
        return cls(
            model,
            ins or (TensorIO("input"),),
            outs or (TensorIO(OUTPUT_NAME),),
            versions=tuple(str(v) for v in d.get("versions") or ("1",)),
            max_batch=int(d.get("max_batch") or MAX_BATCH),
            platform=str(d.get("platform") or "stgs"),
        )


def _io_of(t: Any) -> TensorIO:
    return TensorIO(t.name, t.dtype, t.shape)


class ModelLookup(Protocol):
    """The registered models, as :func:`model_io` reads them (the daemon's service)."""

    def record(self, name: str) -> ModelRecord | None:
        """The registration of ``name`` as stored now (None when there is none)."""

    def entry(self, rec: ModelRecord) -> ModelEntry:
        """Its registry entry; ConfigError when its file went away or changed."""


def model_io(svc: ModelLookup, model: str, version: str = "") -> ModelIO:
    """The registered model's tensors; InferError(404) for an unknown model or version."""
    rec = svc.record(model)
    if rec is None:
        raise InferError(404, f"unknown model {model!r}")
    try:
        entry = svc.entry(rec)
    except ConfigError as exc:
        raise InferError(404, str(exc)) from None
    source = str(rec.spec.get("source") or "")
    if source.startswith("repository:"):  # its config's names, version and batch
        io = ModelIO(
            model,
            tuple(_io_of(t) for t in entry.inputs),
            tuple(_io_of(t) for t in entry.outputs),
            versions=(source.rsplit("/", 1)[-1],),
            max_batch=min(MAX_BATCH, int(rec.spec.get("max_batch_size") or MAX_BATCH)),
            platform="onnxruntime_onnx" if entry.kind == "onnx" else "pytorch_libtorch",
        )
        io.check_version(version)
        return io
    given = rec.spec.get("inputs") or []
    if entry.is_file:  # a file: its own input names (TorchScript: the registration's)
        ins = tuple(_io_of(t) for t in entry.inputs)
    else:  # a built-in: "input", or the registration's name
        first = entry.inputs[0]
        ins = (TensorIO(str(given[0]["name"]) if given else "input", first.dtype, first.shape),)
    # a model of one output answers "output" (FP32 in the metadata), unless its registration
    # names its outputs; several outputs: their own names, dtypes and shapes
    if rec.spec.get("outputs") or len(entry.outputs) > 1:
        outs = tuple(_io_of(t) for t in entry.outputs)
    else:
        outs = (TensorIO(OUTPUT_NAME),)
    io = ModelIO(model, ins, outs)
    io.check_version(version)
    return io


def check_input(io: ModelIO, name: str, datatype: str, shape: list[int]) -> tuple[str, int]:
    """Check one input's name, datatype and shape against the model's input of that name;
    returns its numpy dtype and element count. InferError(400) says what is wrong."""
    spec = io.inputs[io.input_index(name)]
    if datatype not in DTYPES:
        raise InferError(400, f"input {name!r}: datatype {datatype} is not supported")
    np_dtype = DTYPES[datatype]
    if spec.dtype and np_dtype != spec.dtype:
        raise InferError(
            400,
            f"input {name!r}: datatype {datatype}, the model takes {KSERVE_OF.get(spec.dtype)}",
        )
    if not shape or any(d < 0 for d in shape) or shape[0] < 1:
        raise InferError(400, f"input {name!r}: shape {shape}: [batch >= 1, ...] expected")
    if shape[0] > io.max_batch:
        what = "max_batch_size" if io.max_batch < MAX_BATCH else "the largest batch"
        raise InferError(400, f"input {name!r}: batch {shape[0]} > {io.max_batch} ({what})")
    if spec.shape is not None and tuple(shape[1:]) != spec.shape:
        want = ", ".join(str(d) for d in spec.shape)
        raise InferError(400, f"input {name!r}: shape {shape}, the model takes [-1, {want}]")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise InferError(400, f"input {name!r}: shape {shape} is too large")
    return np_dtype, count


def order_inputs(io: ModelIO, named: Sequence[tuple[str, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """A request's decoded inputs (each already checked by :func:`check_input`), in the
    model's order; InferError(400) for a missing or repeated input, or batches that differ."""
    got: list[np.ndarray | None] = [None] * len(io.inputs)
    for name, arr in named:
        k = io.input_index(name)
        if got[k] is not None:
            raise InferError(400, f"input {name!r} is given twice")
        got[k] = arr
    missing = [t.name for t, a in zip(io.inputs, got, strict=True) if a is None]
    if missing:
        raise InferError(
            400,
            f"missing input {', '.join(repr(m) for m in missing)}; model {io.name!r} takes"
            f" {io._ins()}",
        )
    arrays = tuple(a for a in got if a is not None)
    for t, a in zip(io.inputs[1:], arrays[1:], strict=True):
        if len(a) != len(arrays[0]):
            raise InferError(
                400,
                f"input {t.name!r}: batch {len(a)}, input {io.inputs[0].name!r} has"
                f" {len(arrays[0])} (every input carries the same batch)",
            )
    return arrays


def select_outputs(
    io: ModelIO, requested: Sequence[tuple[str, bool | None]], default_binary: bool
) -> tuple[tuple[int, bool], ...]:
    """The outputs to answer as ``(index in io.outputs, binary)``: those requested (a None
    binary takes ``default_binary``), or every output; InferError(400) for an unknown or
    repeated name."""
    if not requested:
        return tuple((k, default_binary) for k in range(len(io.outputs)))
    out: list[tuple[int, bool]] = []
    seen: set[int] = set()
    for name, binary in requested:
        k = io.output_index(name)
        if k in seen:
            raise InferError(400, f"output {name!r} is requested twice")
        seen.add(k)
        out.append((k, default_binary if binary is None else binary))
    return tuple(out)


def rows_of(arrays: Sequence[np.ndarray]) -> list[Any]:
    """A batch's requests to the workers, one per row: an array for a model of one input, a
    tuple of arrays (one per input) for several."""
    if len(arrays) == 1:
        return list(arrays[0])
    return list(zip(*arrays, strict=True))


def stack_rows(outs: Sequence[Any]) -> tuple[np.ndarray, ...]:
    """The workers' answers, one per row (an array, or a tuple of one per output), as the
    batch's outputs, each stacked."""
    if outs and isinstance(outs[0], tuple):
        return tuple(np.stack(col) for col in zip(*outs, strict=True))
    return (np.stack([np.asarray(o) for o in outs]),)


def outputs_of(io: ModelIO, result: Sequence[np.ndarray]) -> Sequence[np.ndarray]:
    """The batch's outputs in the model's order; InferError(500) when the model returned fewer
    than it declares."""
    if len(result) < len(io.outputs):
        raise InferError(
            500,
            f"model {io.name!r} returned {len(result)} output(s), it declares {len(io.outputs)}",
        )
    return result


def check_finite(name: str, arr: np.ndarray) -> None:
    """NaN or infinity in a float input is refused (400), however it was encoded."""
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise InferError(400, f"input {name!r}: data holds NaN or infinity")


class InferenceBackend(Protocol):
    """What a KServe frontend serves from: the daemon's :class:`~api.service.Service`, or a
    frontend process's router (:class:`api.frontend.Router`). One gRPC servicer and one set of
    checks serve over either."""

    @property
    def restored(self) -> bool:
        """Ready to serve (``/v2/health/ready``)."""

    def model_io(self, model: str, version: str = "") -> ModelIO:
        """The model's tensors; InferError(404) for an unknown model or version."""

    def model_ready(self, model: str) -> bool:
        """Some ready worker serves the model."""

    async def infer_arrays(
        self, model: str, arrays: tuple[np.ndarray, ...], arrival_ns: int | None
    ) -> tuple[np.ndarray, ...]:
        """The batch through the model: ``arrays`` its inputs in the model's order (batch
        first, one request per row), the result its outputs in the model's order, each
        stacked; ServingError on failure, the SLO counted from ``arrival_ns`` (default: now)."""


async def await_answers(
    model: str, futs: Sequence[asyncio.Future[Any]], now_ns: int, deadline_ns: int
) -> None:
    """Wait for every answer until the deadline plus :data:`ANSWER_GRACE_S` (no deadline:
    :data:`NO_SLO_TIMEOUT_S`); late answers are dropped and WorkerTimeoutError raised. The
    daemon's and the frontends' routers both bound their requests here."""
    left_s = NO_SLO_TIMEOUT_S if not deadline_ns else (deadline_ns - now_ns) / 1e9
    _, pending = await asyncio.wait(futs, timeout=max(0.0, left_s) + ANSWER_GRACE_S)
    for f in pending:
        f.cancel()  # the worker's late answer is dropped
    for f in futs:
        if not f.cancelled():
            f.exception()  # retrieved: asyncio does not log it as lost
    if pending:
        raise WorkerTimeoutError(
            f"{model}: no answer from its worker by the deadline + {ANSWER_GRACE_S:g} s"
            " (the worker is not responding)"
        )


async def counted(
    serve: Awaitable[T],
    t0_ns: int,
    slo_ms: float | None,
    record: Callable[[float, bool, str], None],
) -> T:
    """Await ``serve`` and report its outcome as the client sees it: ``record(seconds since
    t0_ns, within SLO, error kind or "")``, failures included (never within SLO)."""
    ok = False
    kind = ""
    try:
        out = await serve
        ok = True
        return out
    except StgsError as exc:
        kind = type(exc).__name__
        raise
    finally:
        secs = (time.monotonic_ns() - t0_ns) / 1e9
        record(secs, ok and (slo_ms is None or secs * 1000.0 <= slo_ms), kind)


# ---------------------------------------------------------------- the lean HTTP request path
# The frontend (api.frontend) parses every infer request on its hot path: plain dict checks and
# one JSON decode, no pydantic model per request. The checks and messages are api.kserve's.

HEADER = "Inference-Header-Content-Length"
TOO_DEEP = "the request JSON is nested too deeply"
_KNOWN_DATATYPES = (*DTYPES, "BYTES", "BF16")

try:
    import orjson

    def _loads(raw: bytes) -> object:
        """orjson when it can; the standard decoder decides what orjson refuses (NaN literals,
        integers past 64 bits, deep nesting), so either decoder gives one answer."""
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return json.loads(raw)

    def _dumps(obj: object) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)

except ImportError:  # pragma: no cover - orjson is optional

    def _loads(raw: bytes) -> object:
        return json.loads(raw)

    def _dumps(obj: object) -> bytes:
        return json.dumps(obj).encode()


def dumps(obj: object) -> bytes:
    """JSON bytes (orjson when installed)."""
    return _dumps(obj)


@dataclass(frozen=True)
class InferCall:
    """A parsed infer request: its inputs in the model's order (each batch first), its id, and
    the outputs to answer: ``(index in the model's outputs, binary)``, in answer order."""

    arrays: tuple[np.ndarray, ...]
    request_id: str | None
    outputs: tuple[tuple[int, bool], ...]

    @property
    def array(self) -> np.ndarray:
        """The first input (a model of one input: its only one)."""
        return self.arrays[0]


def _bad(message: str) -> InferError:
    return InferError(400, f"invalid inference request: {message}")


def _int_list(v: object, where: str, max_len: int) -> list[int]:
    if not isinstance(v, list) or len(v) > max_len:
        raise _bad(f"{where}: a list of at most {max_len} integers expected")
    out = []
    for d in v:
        d = whole(d)
        if not isinstance(d, int) or isinstance(d, bool):
            raise _bad(f"{where}: integers expected")
        out.append(d)
    return out


def _opt_dict(v: object, where: str) -> dict[str, object]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _bad(f"{where}: an object expected")
    return v


def _name(v: object, where: str) -> str:
    if not isinstance(v, str) or len(v) > 256:
        raise _bad(f"{where}: a string of at most 256 characters expected")
    return v


def parse_infer(body: bytes, header_len: str | None, io: ModelIO) -> InferCall:
    """An HTTP infer request (JSON, or the binary tensor data extension) checked against the
    model; InferError(400) says what is wrong, as api.kserve answers."""
    tail = b""
    head = body
    if header_len is not None:
        try:
            n = int(header_len)
        except ValueError:
            raise InferError(400, f"{HEADER}: not an integer: {header_len[:40]!r}") from None
        if not 0 < n <= len(body):
            raise InferError(400, f"{HEADER} {n} is outside the body of {len(body)} bytes")
        head, tail = body[:n], body[n:]
    try:
        data = _loads(head)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InferError(400, f"the request header is not valid JSON: {exc}") from None
    except RecursionError:
        raise InferError(400, TOO_DEEP) from None
    if not isinstance(data, dict):
        raise InferError(400, "the request must be a JSON object with 'inputs'")
    request_id = data.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > 1024):
        raise _bad("id: a string of at most 1024 characters expected")
    params = _opt_dict(data.get("parameters"), "parameters")
    inputs = data.get("inputs")
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= 64:
        raise _bad("inputs: a list of 1 to 64 inputs expected")
    outputs = data.get("outputs")
    if outputs is not None and (not isinstance(outputs, list) or len(outputs) > 64):
        raise _bad("outputs: a list of at most 64 outputs expected")
    for k, inp in enumerate(inputs):
        if not isinstance(inp, dict):
            raise _bad(f"inputs.{k}: an object expected")
        _name(inp.get("name"), f"inputs.{k}.name")
        _int_list(inp.get("shape"), f"inputs.{k}.shape", 16)
        if inp.get("datatype") not in _KNOWN_DATATYPES:
            raise _bad(f"inputs.{k}.datatype: one of {', '.join(_KNOWN_DATATYPES)} expected")
        _opt_dict(inp.get("parameters"), f"inputs.{k}.parameters")
        if inp.get("data") is not None and not isinstance(inp["data"], list):
            raise _bad(f"inputs.{k}.data: a list expected")
    binary = bool(params.get("binary_data_output"))
    requested: list[tuple[str, bool | None]] = []
    for k, out in enumerate(outputs or []):
        if not isinstance(out, dict):
            raise _bad(f"outputs.{k}: an object expected")
        name = _name(out.get("name"), f"outputs.{k}.name")
        flag = _opt_dict(out.get("parameters"), f"outputs.{k}.parameters").get("binary_data")
        requested.append((name, None if flag is None else bool(flag)))
    if len(inputs) > len(io.inputs) and len(io.inputs) == 1:
        raise InferError(400, f"model {io.name!r} takes one input, {io.input_name!r}")
    for inp in inputs:
        io.input_index(inp["name"])
    selected = select_outputs(io, requested, binary)
    named: list[tuple[str, np.ndarray]] = []
    offset = 0  # binary inputs take the tail in the order they are listed
    for inp in inputs:
        arr, offset = _decode(io, inp, tail, offset)
        named.append((inp["name"], arr))
    return InferCall(order_inputs(io, named), request_id, selected)


def check_output(io: ModelIO, name: str) -> None:
    """A requested output must be the model's; InferError(400) otherwise."""
    io.output_index(name)


def _decode(io: ModelIO, inp: dict[str, Any], tail: bytes, offset: int) -> tuple[np.ndarray, int]:
    """One input as an array [batch, *sample], and where the tail's next binary input starts."""
    name, datatype = inp["name"], inp["datatype"]
    shape = [int(whole(d)) for d in inp["shape"]]  # type: ignore[call-overload]
    np_dtype, count = check_input(io, name, datatype, shape)
    size = (inp.get("parameters") or {}).get("binary_data_size")
    data = inp.get("data")
    if size is not None:
        if data is not None:
            raise InferError(400, f"input {name!r}: both data and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InferError(400, f"input {name!r}: binary_data_size must be an integer")
        itemsize = np.dtype(np_dtype).itemsize
        if size != count * itemsize:
            raise InferError(
                400,
                f"input {name!r}: binary_data_size {size}, shape {shape} of "
                f"{datatype} needs {count * itemsize} bytes",
            )
        if offset + size > len(tail):
            raise InferError(400, f"input {name!r}: the body ends before its binary data")
        le = np.dtype(np_dtype).newbyteorder("<")
        arr = np.frombuffer(tail, dtype=le, count=count, offset=offset).astype(np_dtype, copy=False)
        offset += size
    else:
        if data is None:
            raise InferError(400, f"input {name!r}: no data and no binary_data_size")
        try:
            arr = np.asarray(data, dtype=np_dtype)
        except (ValueError, TypeError, OverflowError) as exc:
            raise InferError(400, f"input {name!r}: data is not {datatype}: {exc}") from None
        if arr.size != count:
            raise InferError(
                400, f"input {name!r}: {arr.size} values for shape {shape} ({count} needed)"
            )
    check_finite(name, arr)
    return arr.reshape(shape), offset


def encode_infer(
    model: str,
    request_id: str | None,
    outputs: Sequence[tuple[str, np.ndarray, bool]],
    *,
    version: str = "1",
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """An infer response's body and headers: ``outputs`` ``(name, array, binary)`` in answer
    order; JSON, or (some output binary) the JSON header then the binary outputs' raw bytes in
    that order."""
    entries: list[dict[str, Any]] = []
    raws: list[bytes] = []
    for name, arr, binary in outputs:
        out = arr
        datatype = KSERVE_OF.get(str(out.dtype))
        if datatype is None:
            out = out.astype(np.float32)
            datatype = "FP32"
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(out.shape)}
        if binary:
            raw = np.ascontiguousarray(out, dtype=out.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            raws.append(raw)
        else:
            entry["data"] = out.ravel().tolist()
        entries.append(entry)
    body: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": entries}
    if request_id is not None:
        body["id"] = request_id
    if not raws:
        return _dumps(body), [(b"content-type", b"application/json")]
    head = _dumps(body)
    headers = [
        (b"content-type", b"application/octet-stream"),
        (HEADER.lower().encode(), str(len(head)).encode()),
    ]
    return b"".join((head, *raws)), headers


def answer_outputs(
    io: ModelIO, call: InferCall, result: Sequence[np.ndarray]
) -> list[tuple[str, np.ndarray, bool]]:
    """The outputs ``call`` asked for, from the batch's ``result`` (the model's order), as
    :func:`encode_infer` takes them."""
    outs = outputs_of(io, result)
    return [(io.outputs[k].name, outs[k], binary) for k, binary in call.outputs]


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the request-duration histogram; the last bucket is +Inf."""
_COUNTS = ("requests", "ok", "slo_met", "shed", "samples")


class InferenceStats:
    """Cumulative counts of answered inference requests per model, whichever process answered
    them (the control plane, or a frontend that sends :meth:`to_dict` as its ``stats``); the
    daemon's metrics export their sum.

    Per model: ``requests`` (every answer), ``ok``, ``slo_met`` (ok within SLO from arrival),
    ``shed`` (429: could not meet its deadline), ``samples``, ``errors`` by kind,
    ``duration_sum_s`` and ``duration_buckets`` (one count per :data:`LATENCY_BUCKETS` bound,
    then +Inf; not cumulative), ``ok_duration_sum_s`` (the successes' alone) and
    ``last_unix_ms`` (the last answer's wall-clock time; Triton's statistics show both)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.models: dict[str, dict[str, Any]] = {}

    def _entry(self, model: str) -> dict[str, Any]:
        e = self.models.get(model)
        if e is None:
            e = dict.fromkeys(_COUNTS, 0)
            e.update(
                errors={},
                duration_sum_s=0.0,
                duration_buckets=[0] * (len(LATENCY_BUCKETS) + 1),
                ok_duration_sum_s=0.0,
                last_unix_ms=0,
            )
            self.models[model] = e
        return e

    def record(
        self, model: str, samples: int, seconds: float, slo_met: bool, error: str = ""
    ) -> None:
        """One answered request (``error``: the failure's kind; empty when it succeeded)."""
        with self._lock:
            e = self._entry(model)
            e["requests"] += 1
            e["duration_sum_s"] += seconds
            e["last_unix_ms"] = int(time.time() * 1000)
            e["duration_buckets"][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            if error:
                e["errors"][error] = e["errors"].get(error, 0) + 1
                if error == "DeadlineExceededError":
                    e["shed"] += 1
                return
            e["ok"] += 1
            e["ok_duration_sum_s"] += seconds
            e["samples"] += samples
            if slo_met:
                e["slo_met"] += 1

    def add(self, other: Mapping[str, Mapping[str, Any]]) -> None:
        """Add another counter's :meth:`to_dict` (a frontend's stats; unknown keys ignored)."""
        with self._lock:
            for model, st in other.items():
                e = self._entry(model)
                for k in _COUNTS:
                    e[k] += int(st.get(k, 0))
                e["duration_sum_s"] += float(st.get("duration_sum_s", 0.0))
                e["ok_duration_sum_s"] += float(st.get("ok_duration_sum_s", 0.0))
                e["last_unix_ms"] = max(e["last_unix_ms"], int(st.get("last_unix_ms", 0)))
                for kind, n in dict(st.get("errors", {})).items():
                    e["errors"][kind] = e["errors"].get(kind, 0) + int(n)
                for i, n in enumerate(
                    list(st.get("duration_buckets", []))[: len(LATENCY_BUCKETS) + 1]
                ):
                    e["duration_buckets"][i] += int(n)

    def add_stats(self, other: InferenceStats) -> None:
        self.add(other.to_dict())

    def to_dict(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {
                m: {
                    **e,
                    "errors": dict(e["errors"]),
                    "duration_buckets": list(e["duration_buckets"]),
                }
                for m, e in self.models.items()
            }
