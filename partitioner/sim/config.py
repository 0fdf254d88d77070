"""Simulator options (they come from experiment YAML files, so pydantic, strict, frozen).

Reconfiguration costs are *assumed* defaults, stated here and in docs/simulator.md: the runtime
(``stgs/runtime``) does not yet report measured MIG/MPS/worker start times. Replace them with
measured values (``worker READY info load_s``, backend timings) once the runtime records them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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


class ControllerOptions(_Strict):
    """The controller's re-planning in virtual time (off: the first plan serves the whole run)."""

    enabled: bool = False
    interval_s: float = Field(default=1.0, gt=0)  # how often it measures rates
    ewma_alpha: float = Field(default=0.3, gt=0, le=1)  # weight of the newest interval
    band: float = Field(default=0.15, ge=0, le=10)  # hysteresis: re-plan outside +-band
    margin: float = Field(default=0.1, ge=0, le=10)  # plan for measured x (1 + margin)
    cooldown_s: float = Field(default=5.0, ge=0)  # at least this long between re-plans
    min_rate_rps: float = Field(default=1.0, ge=0)  # band floor for tiny rates


class SimOptions(_Strict):
    """How one simulated run behaves."""

    duration_s: float = Field(default=30.0, gt=0, le=1e6)  # arrivals in [0, duration)
    warmup_s: float = Field(default=0.0, ge=0)  # requests arriving earlier are not counted
    noise: Literal["profile", "off"] | float = "profile"  # lognormal sigma, or fitted
    default_sigma: float = Field(default=MEASURED_DEFAULT_SIGMA, ge=0, le=5)
    admission: bool = True  # drop requests predicted to miss (the runtime's default)
    timeseries_s: float = Field(default=1.0, gt=0)  # window of the attainment time series
    controller: ControllerOptions = ControllerOptions()
    reconfig: ReconfigCosts = ReconfigCosts()
