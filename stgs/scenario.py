"""Scenario files (YAML): the GPUs, the models with their SLOs and rates, and where profiles are.

    gpus: [{sku: H100-80GB, count: 2}, {sku: H200-141GB, count: 1, mig: false}]
    profiles: profiles.csv       # optional, relative to the YAML file; default: the shipped
                                 # measured profiles ($STGS_PROFILES overrides); `example`:
                                 # the shipped SYNTHETIC example set (every catalog SKU)
    interference: coloc.csv      # optional co-location measurements (see stgs.profiles)
    headroom: 0.1                # optional latency margin (fraction); default 0.1
    models: [{name: resnet50, slo_ms: 50, rate_rps: 800}]
    planner: {mps_shares: [12, 25, 37, 50, 62, 75, 87, 100], max_batch: 128}   # optional

Every key is checked (unknown keys are errors: a typo must not be ignored silently).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from stgs.catalog import get_sku
from stgs.errors import ConfigError, UnknownSkuError, validation_message
from stgs.hostcosts import planner_term
from stgs.profiles import example_interference_path, example_profiles_path
from stgs.types import GpuSpec, ModelSpec

DEFAULT_HEADROOM = 0.1
DEFAULT_MPS_SHARES = (12, 25, 37, 50, 62, 75, 87, 100)

FILL = "fill"
MAX_SPARE_FACTOR = 10.0  # the largest fixed spare_factor


def _spare_factor(v: object) -> object:
    """``spare_factor``: a number in [1, 10], or "fill" (any case, spaces stripped)."""
    if isinstance(v, str) and v.strip().lower() == FILL:
        return FILL
    try:
        f = float(v) if isinstance(v, int | float | str) and not isinstance(v, bool) else None
    except ValueError:
        f = None
    if f is None or not 1 <= f <= MAX_SPARE_FACTOR:
        raise ValueError(
            f"spare_factor must be a number from 1 to {MAX_SPARE_FACTOR:g} (1: the fewest GPUs)"
            f' or "fill" (the largest factor up to max_spare_factor on the fewest GPUs),'
            f" not {v!r}"
        )
    return f


# The spare capacity setting: a fixed factor, or "fill" (see PlannerOptions.spare_factor).
SpareFactor = Annotated[float | Literal["fill"], BeforeValidator(_spare_factor)]

FORBID = "forbid"
DEFAULT_EXTRAPOLATION_MARGIN = 1.1
MAX_EXTRAPOLATION_MARGIN = 10.0


def _extrapolation_margin(v: object) -> object:
    """``extrapolation_margin``: a factor in [1, 10], or "forbid" (any case, spaces stripped)."""
    if isinstance(v, str) and v.strip().lower() == FORBID:
        return FORBID
    try:
        f = float(v) if isinstance(v, int | float | str) and not isinstance(v, bool) else None
    except ValueError:
        f = None
    if f is None or not 1 <= f <= MAX_EXTRAPOLATION_MARGIN:
        raise ValueError(
            "extrapolation_margin must be a factor from 1 to"
            f" {MAX_EXTRAPOLATION_MARGIN:g} (latency below the smallest profiled partition is"
            f' assumed that much slower than extrapolated; 1: as extrapolated) or "forbid" (no'
            f" partition below the profiled range), not {v!r}"
        )
    return f


# Planning below the profiled range: a factor on the extrapolated latency, or "forbid".
ExtrapolationMargin = Annotated[float | Literal["forbid"], BeforeValidator(_extrapolation_margin)]


def _sku_name(v: str) -> str:
    try:
        return get_sku(v).name
    except UnknownSkuError as exc:
        raise ValueError(str(exc)) from exc


SkuName = Annotated[str, AfterValidator(_sku_name)]
"""A GPU SKU of the catalog, in its canonical name (an unknown one fails validation)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuEntry(_Strict):
    sku: SkuName
    count: int = Field(default=1, ge=1, le=4096)
    mig: bool | None = None  # None: MIG where the SKU supports it

    @model_validator(mode="after")
    def _mig_supported(self) -> GpuEntry:
        if self.mig and not get_sku(self.sku).supports_mig:
            raise ValueError(f"{self.sku} does not support MIG (mig: true)")
        return self


class ModelEntry(_Strict):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    slo_ms: float = Field(gt=0, le=600_000)
    rate_rps: float = Field(ge=0, le=10_000_000)
    profile: str | None = None


class PlannerOptions(_Strict):
    """Knobs of the planner; every policy reads the ones that concern it. The one declaration:
    a scenario's ``planner:`` section and the daemon's ``[planner]`` (which extends it) both
    read these fields, defaults and descriptions."""

    mps_shares: tuple[int, ...] = Field(
        default=DEFAULT_MPS_SHARES, description="MPS active-thread percentages a partition may get"
    )
    max_batch: int | None = Field(
        default=None, ge=1, le=4096, description="largest batch (none: the largest profiled)"
    )
    interference_gamma: float = Field(
        default=0.45, ge=0, le=10, description="slow-down per unit of co-located MPS load"
    )
    mps_in_mig: bool = Field(default=True, description="MPS shares inside MIG instances")
    max_models_per_partition: int = Field(
        default=8, ge=1, le=64, description="models one partition may time-share"
    )
    reconfig_cost: float = Field(
        default=0.05, ge=0, description="GPU-fractions one changed partition costs a re-plan"
    )
    time_limit_s: float = Field(default=30.0, gt=0, description="the exact solver's time limit")
    # The batch margin (docs/planner.md "Batch margin"): "slo" sizes each model's batch for
    # its Poisson arrivals per cycle of the partition, its SLO slack and batch_margin_target
    # (partitioner/margin.py); "z", the former fixed rule, b >= n + z sqrt(n) on the duty cycle.
    batch_margin: Literal["slo", "z"] = Field(
        default="slo",
        description='the batch margin: "slo", per model from its rate, batch, cycle and SLO'
        ' slack, for batch_margin_target of its requests in time; "z": b >= n + z sqrt(n) with'
        " z = batch_margin_z, n the requests a duty cycle expects",
    )
    batch_margin_target: float = Field(
        default=0.995,
        ge=0.5,
        le=0.9999,
        description='batch_margin "slo": the share of requests that Poisson bursts may not'
        " push past their SLO (0.995: half of a 99% SLO's 1% left to latency noise and"
        " admission)",
    )
    batch_margin_z: float = Field(
        default=1.0,
        ge=0,
        le=5,
        description='batch_margin "z": a cycle that expects n requests gets a batch of at least'
        " n + z sqrt(n) (0: b >= n)",
    )
    # Spare capacity (stgs policy): when > 1, plan the rates x this factor (or the largest of
    # x factor, x sqrt(factor) that fits) and serve the real rates on that plan, so that idle
    # GPUs become headroom for bursts and steps instead of staying empty. 1: fewest GPUs.
    # "fill": plan the fewest GPUs first, then the largest factor f in [1, max_spare_factor]
    # (bisection) whose plan needs no more GPUs of any type than that lean plan, and serve the
    # real rates on it: the GPUs the lean plan holds are filled, none is added.
    spare_factor: SpareFactor = Field(
        default=1.0,
        description="plan for the rates x this where the GPUs allow (headroom for bursts and"
        ' load steps on GPUs that would sit idle); 1: the fewest GPUs; "fill": the largest'
        " factor up to max_spare_factor that the fewest GPUs hold (fills them, adds none)",
    )
    max_spare_factor: float = Field(
        default=8.0, ge=1, le=64, description='spare_factor = "fill": the largest factor'
    )
    # No planning on unmeasured ground: a partition smaller than the smallest profiled one of
    # its kind (an MPS share below the smallest measured, an SM count below the measured green
    # contexts) has an extrapolated latency; it is multiplied by this factor, or with "forbid"
    # such partitions are not used (docs/planner.md "Extrapolation margin").
    extrapolation_margin: ExtrapolationMargin = Field(
        default=DEFAULT_EXTRAPOLATION_MARGIN,
        description="factor on the latency of partitions below the smallest profiled one (1: the"
        ' extrapolation as it is); "forbid": never use such partitions',
    )
    # Host time around the GPU batch, which the profiles do not contain: a request's way from
    # the router into the worker's queue and its answer back (per request, outside the cycle),
    # the worker's work per batch (taking it, launching the graph, replies) and per request in
    # a batch (the input copy into the pinned buffer). A batch of b then takes
    # L(b) + host_batch_ms + b host_item_ms of the cycle, and a request must see
    # d + that + host_request_ms <= slo. All 0: plan on GPU batch latency alone. Defaults: the
    # measured host-cost file (stgs/data/host-costs.json or $STGS_HOST_COSTS, stgs.hostcosts;
    # docs/planner.md "Host costs"), derived at an image-sized input; read at first use, so a
    # bad file is a ConfigError where options are made, not an import error.
    host_request_ms: float = Field(
        default_factory=planner_term("request_ms"),
        ge=0,
        le=1000,
        description="a request's host way to its worker and back (ms; default: from the"
        " measured host-cost file)",
    )
    host_batch_ms: float = Field(
        default_factory=planner_term("batch_ms"),
        ge=0,
        le=1000,
        description="worker host time per batch, beside the GPU (ms; default: from the measured"
        " host-cost file)",
    )
    host_item_ms: float = Field(
        default_factory=planner_term("item_ms"),
        ge=0,
        le=1000,
        description="worker host time per request in a batch (ms; default: from the measured"
        " host-cost file)",
    )

    def options(self) -> PlannerOptions:
        """Just the planner's options (a subclass, such as the daemon's config, adds its own
        settings)."""
        return PlannerOptions(**self.model_dump(include=set(PlannerOptions.model_fields)))

    @field_validator("mps_shares")
    @classmethod
    def _shares(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(not 1 <= s <= 100 for s in v):
            raise ValueError("mps_shares must be percentages in 1..100")
        return tuple(sorted(set(v)))


class ScenarioFile(_Strict):
    gpus: list[GpuEntry] = Field(min_length=1)
    models: list[ModelEntry] = Field(min_length=1)
    profiles: str | None = None
    interference: str | None = None
    headroom: float = Field(default=DEFAULT_HEADROOM, ge=0, lt=1)
    planner: PlannerOptions = PlannerOptions()

    @model_validator(mode="after")
    def _unique_names(self) -> ScenarioFile:
        seen: set[str] = set()
        for m in self.models:
            if m.name in seen:
                raise ValueError(f"model {m.name!r} is listed twice")
            seen.add(m.name)
        return self


@dataclass(frozen=True)
class Scenario:
    """A resolved scenario: one ``GpuSpec`` per physical GPU, models, and file paths."""

    gpus: tuple[GpuSpec, ...]
    models: tuple[ModelSpec, ...]
    headroom: float = DEFAULT_HEADROOM
    profiles: Path | None = None  # None: the shipped profiles
    interference: Path | None = None
    options: PlannerOptions = field(default_factory=PlannerOptions)

    def scaled(self, k: float) -> Scenario:
        return Scenario(
            self.gpus,
            tuple(m.scaled(k) for m in self.models),
            self.headroom,
            self.profiles,
            self.interference,
            self.options,
        )


def scenario_from_mapping(
    data: Any, base_dir: Path | None = None, source: str = "scenario"
) -> Scenario:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping with keys gpus and models")
    try:
        sf = ScenarioFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {validation_message(exc)}") from exc
    gpus: list[GpuSpec] = []
    for entry in sf.gpus:
        mig = get_sku(entry.sku).supports_mig if entry.mig is None else entry.mig
        gpus.extend(GpuSpec(entry.sku, mig) for _ in range(entry.count))
    models = tuple(ModelSpec(m.name, m.slo_ms, m.rate_rps, m.profile or m.name) for m in sf.models)

    def resolve(p: str | None) -> Path | None:
        if p is None:
            return None
        if p == "example":  # the shipped synthetic example set
            return example_profiles_path()
        path = Path(p)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise ConfigError(f"{source}: file not found: {path}")
        return path

    return Scenario(
        gpus=tuple(gpus),
        models=models,
        headroom=sf.headroom,
        profiles=resolve(sf.profiles),
        interference=(
            example_interference_path()
            if sf.profiles == "example" and sf.interference is None
            else resolve(sf.interference)
        ),
        options=sf.planner,
    )


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario YAML file; every problem is a one-line ``ConfigError``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read scenario {p}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise ConfigError(f"{p}: malformed YAML{where}: {problem}") from exc
    return scenario_from_mapping(data, base_dir=p.parent, source=str(p))
