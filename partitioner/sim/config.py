"""Simulator options (they come from experiment YAML files, so pydantic, strict, frozen).

Reconfiguration costs are *assumed* defaults, stated here and in docs/simulator.md: the runtime
(``stgs/runtime``) does not yet report measured MIG/MPS/worker start times. Replace them with
measured values (``worker READY info load_s``, backend timings) once the runtime records them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from partitioner.control import MIN_RATE_RPS, ControlRules
from stgs.hostcosts import HostCostTerms, measured_term
from stgs.registry import sample_bytes

# Median spread of batch latency measured on an H100 with CUDA graphs (the 344 rows of
# stgs/data/profiles.csv: ln(p99_ms / latency_ms) / 2.326, median 0.0023,
# p90 0.0060, max 0.0127). Used for (gpu, model) pairs whose profile has no p99_ms column.
MEASURED_DEFAULT_SIGMA = 0.0025


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReconfigCosts(_Strict):
    """Seconds each reconfiguration step takes (assumed defaults; see the module docstring)."""

    mig_create_s: float = Field(default=1.0, ge=0)  # per GPU instance + compute instance
    mig_destroy_s: float = Field(default=0.5, ge=0)  # per instance
    mig_mode_change_s: float = Field(default=2.0, ge=0)  # per GPU (Hopper: no reset needed)
    mps_start_s: float = Field(default=0.5, ge=0)  # per MPS control daemon
    worker_start_s: float = Field(default=2.0, ge=0)  # process, CUDA context, imports
    model_load_s: float = Field(default=1.0, ge=0)  # per model in the worker
    graph_capture_s: float = Field(default=0.05, ge=0)  # per captured batch bucket


class HostCosts(HostCostTerms):
    """Host-side time around each GPU batch, as the runtime spends it (milliseconds): the
    measured host-cost model of :mod:`stgs.hostcosts`, per model with its input size.

    A request is queued in the worker ``request_ms + request_ms_per_mb x MB`` after it arrives
    (sender, router, socket transport of its input); a batch of n occupies the worker for the
    GPU batch latency + ``batch_ms`` + n x (``sample_ms`` + ``sample_ms_per_mb`` x MB) (copy
    into the pinned input, host-to-device copy, result copy back, one reply per request); each
    answer reaches the client ``reply_ms`` after its batch ends. MB: the request's input size
    in MB (10^6 bytes), ``input_mb`` per model or the registry's sample size
    (:func:`stgs.registry.sample_bytes`: a 3x224x224 float32 image for names it does not
    know). Defaults: the default entry of ``stgs/data/host-costs.json`` (the same terms the
    planner's three numbers are derived from; docs/simulator.md); a key set here overrides it.
    """

    enabled: bool = True
    request_ms: float = Field(default_factory=measured_term("request_ms"), ge=0)
    request_ms_per_mb: float = Field(default_factory=measured_term("request_ms_per_mb"), ge=0)
    batch_ms: float = Field(default_factory=measured_term("batch_ms"), ge=0)
    sample_ms: float = Field(default_factory=measured_term("sample_ms"), ge=0)
    sample_ms_per_mb: float = Field(default_factory=measured_term("sample_ms_per_mb"), ge=0)
    reply_ms: float = Field(default_factory=measured_term("reply_ms"), ge=0)
    input_mb: dict[str, float] = Field(default_factory=dict)

    def mb(self, model: str) -> float:
        if model in self.input_mb:
            return float(self.input_mb[model])
        return sample_bytes(model) / 1e6

    def request_delay_ms(self, model: str) -> float:
        """From arrival to the worker's queue."""
        return self.way_in_ms(self.mb(model)) if self.enabled else 0.0

    def batch_extra_ms(self, model: str, n: int) -> float:
        """Host time a batch of ``n`` requests adds to the worker's loop."""
        return self.loop_ms(n, self.mb(model)) if self.enabled else 0.0

    def reply_delay_ms(self) -> float:
        """From the end of the batch to the client's answer."""
        return self.reply_ms if self.enabled else 0.0


# Keys of the simulator's former controller (its own rules until 2026-11-22) and what replaced
# them: an experiment that still sets one is an error, never silently ignored.
RETIRED_CONTROLLER_KEYS = {
    "ewma_alpha": "rate_halflife_s (the EWMA half-life of measured rates, seconds)",
    "band": "hysteresis (re-plan when a rate leaves [planned/(1+h), planned*(1+h)])",
    "margin": "no key: re-plans use the measured rates (spare room is the policy's"
    " spare_factor, e.g. stgs-spare; an SLO miss asks for planned*(1+hysteresis))",
    "cooldown_s": "hold_s (how long a model stays out of band before a re-plan)",
    "min_rate_rps": f"no key: the floor is {MIN_RATE_RPS:g} req/s, as in the daemon",
}


class ControllerOptions(ControlRules):
    """The controller's re-planning in virtual time (off: the first plan serves the whole run).

    The daemon's parameters and defaults (:class:`partitioner.control.ControlRules`, the
    daemon's ``[controller]``) and the same rules (:class:`partitioner.control.ControlLoop`).
    """

    enabled: bool = False

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            old = [k for k in RETIRED_CONTROLLER_KEYS if k in data]
            if old:
                raise ValueError(
                    "the simulator's controller has the daemon's rules and parameters"
                    " (interval_s, rate_halflife_s, hysteresis, hold_s, min_attainment); "
                    + "; ".join(f"{k!r} is gone, use {RETIRED_CONTROLLER_KEYS[k]}" for k in old)
                )
        return data


class SimOptions(_Strict):
    """How one simulated run behaves."""

    duration_s: float = Field(default=30.0, gt=0, le=1e6)  # arrivals in [0, duration)
    warmup_s: float = Field(default=0.0, ge=0)  # requests arriving earlier are not counted
    # "profile": lognormal, sigma fitted from the profile's p99_ms; "runtime": factors drawn
    # from the runtime's measured ones (``runtime_noise``, partitioner/sim/noise.py); "off";
    # or a lognormal sigma
    noise: Literal["profile", "runtime", "off"] | float = "profile"
    runtime_noise: str | None = None  # the factors' JSON file (relative: to the experiment)
    default_sigma: float = Field(default=MEASURED_DEFAULT_SIGMA, ge=0, le=5)
    admission: bool = True  # drop requests predicted to miss (the runtime's default)
    timeseries_s: float = Field(default=1.0, gt=0)  # window of the attainment time series
    controller: ControllerOptions = ControllerOptions()
    reconfig: ReconfigCosts = ReconfigCosts()
    host: HostCosts = HostCosts()
    # MPS interference: "busy" slows a batch by the neighbours running when it starts (gamma x
    # their shares); "static" by every neighbour of the plan, busy or not (docs/simulator.md)
    interference: Literal["busy", "static"] = "busy"
    # Routing among the partitions of a model: the least (in flight + 1) / planned rate
    # (stgs.batching.route_load), with that model's own requests in flight ("model": the
    # runtime's and the frontends' rule; each partition gets about its planned share of the
    # model's rate), or the worker's, all models ("worker": their former rule, which starves a
    # shared partition of a model split over partitions: docs/simulator.md)
    routing: Literal["worker", "model"] = "model"
    # model name -> factor: its batches run that much slower (or faster, < 1) than its profile
    # says, unknown to the planner and the controller: a model that overruns its profile
    # (DeepRT's case; a driver, clock or input that differs from the profiled one)
    overrun: dict[str, float] = Field(default_factory=dict)

    @field_validator("overrun")
    @classmethod
    def _overrun(cls, v: dict[str, float]) -> dict[str, float]:
        for name, f in v.items():
            if not (math.isfinite(f) and 0.1 <= f <= 10):
                raise ValueError(f"overrun[{name!r}] must be a factor in [0.1, 10], not {f}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SimOptions:
        if self.warmup_s >= self.duration_s:
            raise ValueError(
                f"warmup_s ({self.warmup_s:g}) must be shorter than duration_s"
                f" ({self.duration_s:g}): only requests after the warm-up are counted"
            )
        if self.noise == "runtime" and not self.runtime_noise:
            raise ValueError("noise: runtime needs runtime_noise: FILE (fidelity.py --fit-noise)")
        if self.runtime_noise and self.noise != "runtime":
            raise ValueError(
                f"runtime_noise is only read with noise: runtime (noise is {self.noise!r})"
            )
        return self
