"""The inference path that both protocols share: KServe v2 over HTTP (:mod:`api.kserve`) and over
gRPC (:mod:`api.grpc_server`).

One place for what does not depend on the wire: a model's tensors (:class:`ModelIO`), the checks
of a request's input against them, the call into the service, and the status an error gets.
HTTP answers that status; gRPC maps it to its own code (:data:`GRPC_CODE_OF`), so a client sees
the same outcome on either protocol.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

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
)

if TYPE_CHECKING:
    from api.service import Service

OUTPUT_NAME = "output"
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
class ModelIO:
    """A served model's tensors: one input (batch first), one output named ``output``."""

    name: str
    input_name: str
    dtype: str  # numpy dtype name of the input; "" when any
    shape: tuple[int, ...] | None  # one sample's shape; None when any

    def metadata(self) -> dict[str, object]:
        """KServe v2 model metadata (the same on HTTP and gRPC)."""
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": "stgs",
            "inputs": [
                {
                    "name": self.input_name,
                    "datatype": KSERVE_OF.get(self.dtype, "FP32") if self.dtype else "FP32",
                    "shape": [-1, *(self.shape or [-1])],
                }
            ],
            "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, -1]}],
        }


def model_io(svc: Service, model: str, version: str = "") -> ModelIO:
    """The registered model's tensors; InferError(404) for an unknown model or version."""
    from stgs.runtime.models import model_entry

    rec = svc.store.get_model(model)
    if rec is None:
        raise InferError(404, f"unknown model {model!r}")
    if version not in ("", "1"):
        raise InferError(404, f"model {model!r} has no version {version!r} (versions: 1)")
    try:
        entry = model_entry(rec.name)
    except ConfigError as exc:
        raise InferError(404, str(exc)) from None
    inputs = rec.spec.get("inputs") or []
    name = inputs[0]["name"] if inputs else "input"
    return ModelIO(model, name, entry.input_dtype, entry.input_shape)


def check_input(io: ModelIO, name: str, datatype: str, shape: list[int]) -> tuple[str, int]:
    """Check one input's name, datatype and shape against the model; returns its numpy dtype
    and element count. InferError(400) says what is wrong."""
    if name != io.input_name:
        raise InferError(400, f"unknown input {name!r}; model {io.name!r} takes {io.input_name!r}")
    if datatype not in DTYPES:
        raise InferError(400, f"input {name!r}: datatype {datatype} is not supported")
    np_dtype = DTYPES[datatype]
    if io.dtype and np_dtype != io.dtype:
        raise InferError(
            400,
            f"input {name!r}: datatype {datatype}, the model takes {KSERVE_OF.get(io.dtype)}",
        )
    if not shape or any(d < 0 for d in shape) or shape[0] < 1:
        raise InferError(400, f"input {name!r}: shape {shape}: [batch >= 1, ...] expected")
    if shape[0] > MAX_BATCH:
        raise InferError(400, f"input {name!r}: batch {shape[0]} > {MAX_BATCH}")
    if io.shape is not None and tuple(shape[1:]) != io.shape:
        want = ", ".join(str(d) for d in io.shape)
        raise InferError(400, f"input {name!r}: shape {shape}, the model takes [-1, {want}]")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise InferError(400, f"input {name!r}: shape {shape} is too large")
    return np_dtype, count


def check_finite(name: str, arr: np.ndarray) -> None:
    """NaN or infinity in a float input is refused (400), however it was encoded."""
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise InferError(400, f"input {name!r}: data holds NaN or infinity")


async def infer(svc: Service, model: str, arr: np.ndarray, arrival_ns: int | None) -> np.ndarray:
    """Run a batch (first dimension: samples) through the model; its outputs stacked.

    Raises the service's :class:`~stgs.errors.ServingError`s (see :func:`status_of`)."""
    outs = await svc.infer_async(model, list(arr), arrival_ns=arrival_ns)
    return np.stack([np.asarray(o) for o in outs])


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
    then +Inf; not cumulative)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.models: dict[str, dict[str, Any]] = {}

    def _entry(self, model: str) -> dict[str, Any]:
        e = self.models.get(model)
        if e is None:
            e = dict.fromkeys(_COUNTS, 0)
            e.update(
                errors={}, duration_sum_s=0.0, duration_buckets=[0] * (len(LATENCY_BUCKETS) + 1)
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
            e["duration_buckets"][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            if error:
                e["errors"][error] = e["errors"].get(error, 0) + 1
                if error == "DeadlineExceededError":
                    e["shed"] += 1
                return
            e["ok"] += 1
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
