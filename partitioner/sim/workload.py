"""Workloads: request arrival times per model, generated up front (numpy, vectorised).

Every generator takes the models' base rates (request/s, the scenario's ``rate_rps`` times the
experiment's load factor), a duration and a seed, and returns, per model, a sorted float64 array
of arrival times in seconds in ``[0, duration_s)``.

Kinds (``WorkloadSpec.kind``):

* ``poisson``: homogeneous Poisson at the base rate.
* ``gamma``: renewal process with gamma inter-arrival times of mean ``1 / rate`` and coefficient
  of variation ``cv`` (``cv = 1`` is Poisson; ``cv > 1`` is bursty).
* ``mmpp``: a two-state Markov-modulated Poisson process: a burst state at ``burst_factor`` x
  the low state's rate, entered for exponential sojourns of mean ``burst_s`` and left for
  sojourns of mean ``calm_s``; the low rate is chosen so that the long-run mean is the base rate.
* ``diurnal``: non-homogeneous Poisson, rate ``base * (1 - amplitude * cos(2 pi t / period_s))``:
  it starts at its trough, peaks at ``period_s / 2``; mean = base over whole periods.
* ``step``: Poisson at the base rate until ``at_s``, then at ``factor`` x the base rate.
* ``trace``: replay of a CSV trace with columns ``time_s,model`` (one row per request; a model
  column value must be a scenario model). The load factor compresses time: the trace's rates are
  multiplied by ``load`` (timestamps divided by it); rows past the duration are dropped.

Seeds: each model's stream comes from ``numpy.random.SeedSequence([seed, crc32(model name),
kind tag])``: the same seed gives the same arrivals bit for bit, independent of the order models
are listed in, of dict order, of the wall clock and of which process runs it.
"""

from __future__ import annotations

import csv
import math
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from stgs.errors import ConfigError

FloatArray = npt.NDArray[np.float64]

WorkloadKind = Literal["poisson", "gamma", "mmpp", "diurnal", "step", "trace"]


class WorkloadSpec(BaseModel):
    """One workload of an experiment (YAML); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    kind: WorkloadKind = "poisson"
    cv: float = Field(default=2.0, gt=0, le=100)  # gamma
    burst_factor: float = Field(default=4.0, ge=1, le=1000)  # mmpp
    burst_s: float = Field(default=2.0, gt=0)  # mmpp
    calm_s: float = Field(default=8.0, gt=0)  # mmpp
    period_s: float = Field(default=60.0, gt=0)  # diurnal
    amplitude: float = Field(default=0.5, ge=0, le=1)  # diurnal
    at_s: float = Field(default=10.0, ge=0)  # step
    factor: float = Field(default=2.0, ge=0, le=1000)  # step
    path: str | None = None  # trace
    controller: bool | None = None  # re-planning on/off for this workload (None: simulator's)

    @model_validator(mode="after")
    def _trace_path(self) -> WorkloadSpec:
        if self.kind == "trace" and not self.path:
            raise ValueError(f"workload {self.name!r}: kind trace needs a path")
        return self

    def rate_at(self, base_rps: float, t_s: FloatArray) -> FloatArray:
        """The workload's intended rate at times ``t_s`` (request/s), for plots and checks."""
        if self.kind == "diurnal":
            return base_rps * (1.0 - self.amplitude * np.cos(2 * math.pi * t_s / self.period_s))
        if self.kind == "step":
            return np.where(t_s < self.at_s, base_rps, base_rps * self.factor)
        return np.full_like(t_s, base_rps)


_KIND_TAG = {"poisson": 1, "gamma": 2, "mmpp": 3, "diurnal": 4, "step": 5, "trace": 6}


def model_rng(seed: int, model: str, stream: int) -> np.random.Generator:
    """The random stream of one (run seed, model, purpose): stable across processes and orders."""
    return np.random.default_rng(
        np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(model.encode()), stream])
    )


def _poisson(rng: np.random.Generator, rate: float, t0: float, t1: float) -> FloatArray:
    if rate <= 0 or t1 <= t0:
        return np.empty(0, dtype=np.float64)
    n = int(rng.poisson(rate * (t1 - t0)))
    return np.sort(rng.uniform(t0, t1, n))


def _gamma(rng: np.random.Generator, rate: float, cv: float, duration: float) -> FloatArray:
    if rate <= 0:
        return np.empty(0, dtype=np.float64)
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    # The first arrival of a stationary renewal process: start at a uniform point of one gap.
    chunks: list[FloatArray] = []
    t = -float(rng.gamma(shape, scale)) * float(rng.uniform())
    expect = rate * duration
    while t < duration:
        n = int(expect + 5 * math.sqrt(expect) + 16)
        gaps = rng.gamma(shape, scale, n)
        ts = t + np.cumsum(gaps)
        chunks.append(ts)
        t = float(ts[-1])
    out = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.float64)
    return out[(out >= 0) & (out < duration)]


def _mmpp(rng: np.random.Generator, rate: float, spec: WorkloadSpec, duration: float) -> FloatArray:
    if rate <= 0:
        return np.empty(0, dtype=np.float64)
    p_burst = spec.burst_s / (spec.burst_s + spec.calm_s)
    low = rate / (1.0 + (spec.burst_factor - 1.0) * p_burst)
    high = low * spec.burst_factor
    parts: list[FloatArray] = []
    t = 0.0
    burst = bool(rng.uniform() < p_burst)  # the stationary state at t = 0
    while t < duration:
        mean = spec.burst_s if burst else spec.calm_s
        end = min(duration, t + float(rng.exponential(mean)))
        parts.append(_poisson(rng, high if burst else low, t, end))
        t, burst = end, not burst
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.float64)


def _thinned(
    rng: np.random.Generator, spec: WorkloadSpec, base: float, peak: float, duration: float
) -> FloatArray:
    """Non-homogeneous Poisson by thinning a homogeneous one at the peak rate."""
    cand = _poisson(rng, peak, 0.0, duration)
    if cand.size == 0:
        return cand
    keep = rng.uniform(0.0, peak, cand.size) < spec.rate_at(base, cand)
    return cand[keep]


def read_trace(path: Path) -> dict[str, FloatArray]:
    """A CSV trace ``time_s,model`` (header required; extra columns ignored) -> sorted times."""
    per: dict[str, list[float]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = [h.strip() for h in reader.fieldnames or []]
            if "time_s" not in fields or "model" not in fields:
                raise ConfigError(f"{path}:1: a trace needs the columns time_s,model")
            for row in reader:
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                try:
                    t = float(row["time_s"])
                except ValueError:
                    raise ConfigError(
                        f"{path}:{reader.line_num}: time_s {row['time_s']!r} is not a number"
                    ) from None
                if not math.isfinite(t) or t < 0:
                    raise ConfigError(f"{path}:{reader.line_num}: time_s must be >= 0")
                per.setdefault(row["model"], []).append(t)
    except OSError as exc:
        raise ConfigError(f"cannot read trace {path}: {exc.strerror or exc}") from exc
    return {m: np.sort(np.asarray(v, dtype=np.float64)) for m, v in per.items()}


def generate(
    spec: WorkloadSpec,
    rates_rps: Mapping[str, float],
    duration_s: float,
    seed: int,
    *,
    load: float = 1.0,
    base_dir: Path | None = None,
) -> dict[str, FloatArray]:
    """Arrival times (s) per model, in the order of ``rates_rps``.

    ``rates_rps`` are the base rates already multiplied by ``load``; ``load`` itself is only
    used by ``trace`` (time compression).
    """
    tag = _KIND_TAG[spec.kind]
    out: dict[str, FloatArray] = {}
    if spec.kind == "trace":
        assert spec.path is not None
        p = Path(spec.path)
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        trace = read_trace(p)
        unknown = sorted(set(trace) - set(rates_rps))
        if unknown:
            raise ConfigError(f"trace {p}: models not in the scenario: {', '.join(unknown)}")
        for m in rates_rps:
            ts = trace.get(m, np.empty(0, dtype=np.float64)) / max(load, 1e-12)
            out[m] = ts[ts < duration_s]
        return out
    for m, rate in rates_rps.items():
        rng = model_rng(seed, m, tag)
        if spec.kind == "poisson":
            out[m] = _poisson(rng, rate, 0.0, duration_s)
        elif spec.kind == "gamma":
            out[m] = _gamma(rng, rate, spec.cv, duration_s)
        elif spec.kind == "mmpp":
            out[m] = _mmpp(rng, rate, spec, duration_s)
        elif spec.kind == "diurnal":
            out[m] = _thinned(rng, spec, rate, rate * (1.0 + spec.amplitude), duration_s)
        else:  # step
            out[m] = _thinned(rng, spec, rate, rate * max(1.0, spec.factor), duration_s)
    return out


def trace_rates(
    spec: WorkloadSpec, models: Sequence[str], base_dir: Path | None
) -> dict[str, float]:
    """Mean rate (request/s) of each model over a trace's span (for load factor 1)."""
    assert spec.path is not None
    p = Path(spec.path)
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    trace = read_trace(p)
    span = max((float(ts[-1]) for ts in trace.values() if ts.size), default=0.0)
    return {m: (trace[m].size / span if span > 0 and m in trace else 0.0) for m in models}
