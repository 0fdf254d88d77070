"""The measured host-cost model: the host time around each GPU batch, stored once as data.

A profile measures a CUDA-graph replay; a served request also pays host time. The model
(milliseconds; MB = the request's input size in 10^6 bytes) is linear:

* on the way in, ``request_ms + request_ms_per_mb x MB`` from the request's arrival to its
  worker's queue (router, socket transport, the worker's reader);
* in the worker's loop, a batch of ``n`` takes its GPU latency + ``batch_ms + n x (sample_ms +
  sample_ms_per_mb x MB)`` (copies into the pinned input, host-to-device, result back, graph
  launch and sync, the replies, the loop's turn to the next batch);
* on the way back, ``reply_ms`` from the batch's replies to the client's answer.

The numbers live in one file, ``stgs/data/host-costs.json`` (format ``stgs.host-costs/v1``):
one entry per host kind (named by the catalog SKU of its GPU) with its six terms, the
provenance of the fit (the command, the runs, their date and machine) and the fit's
diagnostics; ``default`` names the entry the planner, the daemon and the simulator start
from. ``python -m benchmarks.fit_host_costs RUN.npz ...`` writes an entry from the worker
trace of ``benchmarks/serve_gpu.py`` runs, through :func:`fit_trace` below.

Who reads what:

* the simulator (``partitioner.sim.config.HostCosts``) uses the six terms as they are, per
  model with that model's input size;
* the planner (``PlannerOptions.host_request_ms``, ``host_batch_ms``, ``host_item_ms``, and so
  the daemon's ``[planner]``) uses three deterministic numbers derived from the same terms at
  an image-sized input (:data:`PLANNER_INPUT_MB`, the registry's default 3x224x224 float32):
  the way in and back ``request_ms + request_ms_per_mb x MB + reply_ms`` (outside the duty
  cycle), ``batch_ms`` per batch and ``sample_ms + sample_ms_per_mb x MB`` per request in a
  batch (inside it). Smaller inputs (token ids) cost less than that, so the planner errs on the
  slow side for them; a config or scenario value still overrides each number.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from scipy.optimize import nnls

from stgs.errors import ConfigError
from stgs.registry import IMAGE

__all__ = [
    "FORMAT",
    "HOST_COSTS_ENV",
    "PLANNER_INPUT_MB",
    "ApiPoint",
    "ApiWay",
    "HostCostEntry",
    "HostCostFile",
    "HostCostTerms",
    "PlannerHostCosts",
    "Provenance",
    "TraceObservations",
    "api_request_ms",
    "default_host_costs_path",
    "fit_api_way",
    "fit_trace",
    "load_host_costs",
    "measured_host_costs",
    "measured_term",
    "planner_host_costs",
    "planner_term",
    "shipped_host_costs_path",
    "write_host_costs",
]

FORMAT = "stgs.host-costs/v1"

# The input size the planner's three numbers are derived at: the registry's default input (a
# torchvision image, 3x224x224 float32), the largest of the served zoo but for inception_v3.
PLANNER_INPUT_MB = math.prod(IMAGE) * np.dtype(np.float32).itemsize / 1e6


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HostCostTerms(_Strict):
    """The six terms of the host-cost model (milliseconds; see the module docstring)."""

    request_ms: float = Field(ge=0, description="arrival -> the worker's queue, per request")
    request_ms_per_mb: float = Field(ge=0, description="... and per MB of its input")
    batch_ms: float = Field(ge=0, description="the worker's loop, per batch")
    sample_ms: float = Field(ge=0, description="the worker's loop, per request in a batch")
    sample_ms_per_mb: float = Field(ge=0, description="... and per MB of its input")
    reply_ms: float = Field(ge=0, description="the batch's replies -> the client's answer")

    def way_in_ms(self, mb: float) -> float:
        """From a request's arrival to its worker's queue, for an input of ``mb`` MB."""
        return self.request_ms + self.request_ms_per_mb * mb

    def item_ms(self, mb: float) -> float:
        """The worker's time per request in a batch (input copy, its reply)."""
        return self.sample_ms + self.sample_ms_per_mb * mb

    def loop_ms(self, n: int, mb: float) -> float:
        """Host time a batch of ``n`` requests adds to the worker's loop (0 for no batch)."""
        return self.batch_ms + n * self.item_ms(mb) if n > 0 else 0.0

    def terms(self) -> HostCostTerms:
        """Just the six terms (a subclass, such as the simulator's, adds its own fields)."""
        return HostCostTerms(**self.model_dump(include=set(HostCostTerms.model_fields)))


@dataclass(frozen=True)
class PlannerHostCosts:
    """The planner's three numbers (``PlannerOptions.host_*_ms``), derived from the terms."""

    request_ms: float  # a request's way to its worker and back, outside the duty cycle
    batch_ms: float  # the worker's time per batch, inside the cycle
    item_ms: float  # the worker's time per request in a batch, inside the cycle

    @classmethod
    def of(cls, t: HostCostTerms, mb: float = PLANNER_INPUT_MB) -> PlannerHostCosts:
        return cls(
            request_ms=t.way_in_ms(mb) + t.reply_ms, batch_ms=t.batch_ms, item_ms=t.item_ms(mb)
        )


class RunRef(_Strict):
    """One run a fit was made on: where it is and what its own summary says about it."""

    run: str  # SESSION/NAME under benchmarks/results (the .npz: benchmarks/results/MANIFEST.md)
    date: str = ""
    device: str = ""
    command: str = ""


class Provenance(_Strict):
    command: str = Field(description="the command that wrote this entry")
    fitted: str = Field(description="when the fit was made")
    machine: str = Field(description="the machine the runs were measured on")
    runs: list[RunRef] = Field(min_length=1)
    method: str = ""


class ApiWay(_Strict):
    """A request's host way through the daemon's data plane (its frontend processes), as its
    client sees it: the client's send to the worker's queue and the worker's replies back to
    the client's answer. ``request_ms + request_ms_per_mb x MB`` is what the frontends' side
    shows (the request's first byte at a frontend to the worker's queue); ``reply_ms`` is the
    rest of the way (the client's send and read, the sockets, the way back), which no trace on
    the server's side sees apart. It replaces the in-process way (``request_ms``,
    ``request_ms_per_mb``, ``reply_ms`` of the terms) for a daemon that serves through its
    frontends; the worker's loop terms are the same on both paths."""

    request_ms: float = Field(ge=0, description="a frontend's first byte -> the worker's queue")
    request_ms_per_mb: float = Field(ge=0, description="... and per MB of the input")
    reply_ms: float = Field(ge=0, description="the rest of the client's way, in and back")
    provenance: Provenance
    fit: dict[str, Any] = Field(default_factory=dict, description="the fit's diagnostics")

    def way_ms(self, mb: float) -> float:
        """The whole way in and back for an input of ``mb`` MB (outside the duty cycle)."""
        return self.request_ms + self.request_ms_per_mb * mb + self.reply_ms


class HostCostEntry(_Strict):
    terms: HostCostTerms
    provenance: Provenance
    fit: dict[str, Any] = Field(default_factory=dict, description="the fit's diagnostics")
    api: ApiWay | None = Field(
        None, description="the way through the daemon's frontends, when it was measured"
    )


class HostCostFile(_Strict):
    format: Literal["stgs.host-costs/v1"]
    about: str = ""
    default: str
    hosts: dict[str, HostCostEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _default_exists(self) -> HostCostFile:
        if self.default not in self.hosts:
            raise ValueError(
                f"default {self.default!r} is not one of the hosts: {', '.join(self.hosts)}"
            )
        return self

    def entry(self, host: str | None = None) -> HostCostEntry:
        key = self.default if host is None else host
        if key not in self.hosts:
            raise ConfigError(
                f"no measured host costs for {key!r} (measured: {', '.join(sorted(self.hosts))})"
            )
        return self.hosts[key]


HOST_COSTS_ENV = "STGS_HOST_COSTS"
"""Environment variable naming another host-cost file (a host of another kind, measured with
``benchmarks.fit_host_costs --out FILE``); read once, at the first use."""


def shipped_host_costs_path() -> Path:
    """The shipped file, ``stgs/data/host-costs.json``."""
    return Path(str(resources.files("stgs").joinpath("data", "host-costs.json")))


def default_host_costs_path() -> Path:
    """``$STGS_HOST_COSTS`` when set, else the shipped file."""
    env = os.environ.get(HOST_COSTS_ENV, "").strip()
    return Path(env) if env else shipped_host_costs_path()


def load_host_costs(path: Path | None = None) -> HostCostFile:
    """The host-cost file (default: :func:`default_host_costs_path`, read once); ConfigError
    when it is not a valid ``stgs.host-costs/v1`` file."""
    if path is None:
        return _default()
    return _read(Path(path))


@cache
def _default() -> HostCostFile:
    return _read(default_host_costs_path())


def _read(path: Path) -> HostCostFile:
    try:
        return HostCostFile.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, ValidationError) as exc:
        raise ConfigError(f"host-cost file {path}: {exc}") from None


def measured_host_costs(host: str | None = None) -> HostCostTerms:
    """The default file's terms for ``host`` (default: its ``default`` entry)."""
    return load_host_costs().entry(host).terms


def planner_host_costs(host: str | None = None) -> PlannerHostCosts:
    """The planner's three numbers from the default file (see the module docstring)."""
    return PlannerHostCosts.of(measured_host_costs(host))


def api_request_ms(host: str | None = None) -> float | None:
    """The planner's ``host_request_ms`` for a daemon that serves through its frontends: the
    measured API way (:class:`ApiWay`) at the planner's input size; None when the file has
    none for ``host``."""
    api = load_host_costs().entry(host).api
    return None if api is None else round(api.way_ms(PLANNER_INPUT_MB), 4)


def measured_term(name: str) -> Callable[[], float]:
    """A default factory: the default file's term ``name`` (read at first use)."""
    return lambda: float(getattr(measured_host_costs(), name))


def planner_term(name: str) -> Callable[[], float]:
    """A default factory: the planner's number ``name`` (``request_ms``, ``batch_ms``,
    ``item_ms``) from the default file (read at first use)."""
    return lambda: float(getattr(planner_host_costs(), name))


def write_host_costs(path: Path, key: str, entry: HostCostEntry, *, default: bool) -> None:
    """Add or replace ``key``'s entry in the file at ``path`` (created when absent); make it
    the default when ``default`` or when the file had none."""
    old = _read(path) if path.is_file() else None
    hosts = {**(old.hosts if old else {}), key: entry}
    doc = HostCostFile(
        format=FORMAT,
        about=old.about if old else "",
        default=key if default or old is None else old.default,
        hosts=dict(sorted(hosts.items())),
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc.model_dump(), indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------------- the fit
FloatArray = npt.NDArray[np.float64]


@dataclass
class TraceObservations:
    """What the fit needs from a worker trace (``STGS_WORKER_TRACE``) joined to the client's
    record of the same requests; one row per batch or per request, runs concatenated.

    Per batch: ``n`` requests of ``mb`` MB each, the runner's measured time less the profile's
    GPU latency (with the interference of the neighbours that ran meanwhile) in
    ``runner_excess_ms``, and the loop's time outside the runner (taking the batch, deadline
    check, replies) in ``loop_ms``. ``turn_ms``: the gap between two batches of a worker that
    had work waiting. Per request: ``way_in_ms[mb]`` (the send to the worker's queue) and
    ``way_back_ms`` (the batch's replies to the client's answer)."""

    n: FloatArray = field(default_factory=lambda: np.zeros(0))
    mb: FloatArray = field(default_factory=lambda: np.zeros(0))
    runner_excess_ms: FloatArray = field(default_factory=lambda: np.zeros(0))
    loop_ms: FloatArray = field(default_factory=lambda: np.zeros(0))
    turn_ms: FloatArray = field(default_factory=lambda: np.zeros(0))
    way_in_ms: dict[float, FloatArray] = field(default_factory=dict)
    way_back_ms: FloatArray = field(default_factory=lambda: np.zeros(0))

    def add_batches(
        self, n: npt.ArrayLike, mb: float, runner_excess_ms: npt.ArrayLike, loop_ms: npt.ArrayLike
    ) -> None:
        n_ = np.asarray(n, dtype=np.float64)
        self.n = np.r_[self.n, n_]
        self.mb = np.r_[self.mb, np.full(len(n_), float(mb))]
        self.runner_excess_ms = np.r_[self.runner_excess_ms, np.asarray(runner_excess_ms, float)]
        self.loop_ms = np.r_[self.loop_ms, np.asarray(loop_ms, dtype=np.float64)]

    def add_way_in(self, mb: float, ms: npt.ArrayLike) -> None:
        self.way_in_ms[mb] = np.r_[self.way_in_ms.get(mb, np.zeros(0)), np.asarray(ms, float)]


def l1_line(x: FloatArray, y: FloatArray) -> FloatArray:
    """Least absolute deviations ``y ~ x @ c`` (iteratively reweighted least squares): robust
    to the few batches that a stall of the host made long."""
    w = np.ones(len(y))
    sol: FloatArray = np.zeros(x.shape[1])
    for _ in range(50):
        sw = np.sqrt(w)
        sol = np.asarray(np.linalg.lstsq(x * sw[:, None], y * sw, rcond=None)[0], np.float64)
        w = 1.0 / np.maximum(np.abs(y - x @ sol), 1e-3)
    return sol


def nonneg_line(x: FloatArray, y: FloatArray, w: FloatArray | None = None) -> tuple[float, float]:
    """Weighted least squares ``y ~ a + b x`` with ``a, b >= 0`` (scipy's NNLS)."""
    sw = np.sqrt(np.ones_like(x) if w is None else np.asarray(w, dtype=np.float64))
    sol, _ = nnls(np.c_[np.ones_like(x), x] * sw[:, None], y * sw)
    return float(sol[0]), float(sol[1])


def fit_trace(obs: TraceObservations) -> tuple[HostCostTerms, dict[str, Any]]:
    """The six terms from a worker trace (:class:`TraceObservations`), one set for every
    model, and the fit's parts:

    * the runner's excess over the GPU, least absolute deviations ``a + b x n x MB`` (copies);
    * the loop outside the runner, least absolute deviations ``c + d x n`` (replies);
    * ``batch_ms = a + c`` + the median turn; ``sample_ms = d``; ``sample_ms_per_mb = b``;
    * the way in: the median per input size, then ``request_ms + request_ms_per_mb x MB``
      (non-negative least squares over the sizes); ``reply_ms``: the median way back.
    """
    if not len(obs.n):
        raise ValueError("no batches in the worker trace to fit the host costs on")
    if not obs.way_in_ms or not len(obs.way_back_ms):
        raise ValueError("no requests joined to the client's record to fit the way in and back")
    ones = np.ones(len(obs.n))
    a, b = l1_line(np.c_[ones, obs.n * obs.mb], obs.runner_excess_ms)
    c, d = l1_line(np.c_[ones, obs.n], obs.loop_ms)
    turn = float(np.median(obs.turn_ms)) if len(obs.turn_ms) else 0.0
    mbs = sorted(obs.way_in_ms)
    med = np.asarray([float(np.median(obs.way_in_ms[x])) for x in mbs])
    q0, q1 = nonneg_line(np.asarray(mbs), med) if len(mbs) > 1 else (float(med[0]), 0.0)
    reply = float(np.median(obs.way_back_ms))
    terms = HostCostTerms(
        request_ms=round(q0, 4),
        request_ms_per_mb=round(q1, 4),
        batch_ms=round(max(a, 0.0) + max(c, 0.0) + turn, 4),
        sample_ms=round(max(d, 0.0), 4),
        sample_ms_per_mb=round(max(b, 0.0), 4),
        reply_ms=round(reply, 4),
    )
    info = {
        "batches": len(obs.n),
        "runner_copy_ms": {"per_batch": round(float(a), 4), "per_mb": round(float(b), 4)},
        "loop_ms": {"per_batch": round(float(c), 4), "per_request": round(float(d), 4)},
        "turn_between_batches_ms": round(turn, 4),
        "sent_to_queued_median_ms": {
            f"{x:.4f} MB": round(float(v), 4) for x, v in zip(mbs, med, strict=True)
        },
        "requests_way_in": int(sum(len(v) for v in obs.way_in_ms.values())),
        "reply_median_ms": round(reply, 4),
    }
    return terms, info


@dataclass(frozen=True)
class ApiPoint:
    """One model's way through the API at one load (medians, ms): ``in_ms`` a frontend's first
    byte -> the worker's queue, ``way_ms`` the client's latency less the request's stay in the
    worker (queued -> replies sent), for an input of ``mb`` MB."""

    mb: float
    in_ms: float
    way_ms: float
    label: str = ""  # the model and load it was measured at (diagnostics)


def fit_api_way(points: Sequence[ApiPoint]) -> tuple[dict[str, float], dict[str, Any]]:
    """:class:`ApiWay`'s three terms from per-model medians: ``request_ms + request_ms_per_mb
    x MB`` fitted on ``in_ms`` (non-negative least squares over the input sizes), ``reply_ms``
    the median of what is left of ``way_ms``; and the fit's diagnostics."""
    if not points:
        raise ValueError("no API measurements to fit the API way on")
    mb = np.asarray([p.mb for p in points], dtype=np.float64)
    way_in = np.asarray([p.in_ms for p in points], dtype=np.float64)
    way = np.asarray([p.way_ms for p in points], dtype=np.float64)
    if len(np.unique(mb)) > 1:
        q0, q1 = nonneg_line(mb, way_in)
    else:
        q0, q1 = float(np.median(way_in)), 0.0
    rest = way - (q0 + q1 * mb)
    reply = max(float(np.median(rest)), 0.0)
    terms = {
        "request_ms": round(q0, 4),
        "request_ms_per_mb": round(q1, 4),
        "reply_ms": round(reply, 4),
    }
    info = {
        "points": {
            p.label or str(k): {"mb": round(p.mb, 4), "in_ms": p.in_ms, "way_ms": p.way_ms}
            for k, p in enumerate(points)
        },
    }
    return terms, info


def entry_from_fit(
    terms: HostCostTerms,
    info: Mapping[str, Any],
    *,
    command: str,
    fitted: str,
    machine: str,
    runs: Sequence[RunRef],
    method: str = "",
) -> HostCostEntry:
    """A file entry: the fitted terms with their provenance and diagnostics."""
    return HostCostEntry(
        terms=terms,
        provenance=Provenance(
            command=command, fitted=fitted, machine=machine, runs=list(runs), method=method
        ),
        fit=dict(info),
    )
