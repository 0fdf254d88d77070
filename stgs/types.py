"""Domain types that cross package boundaries: models to serve, GPUs to serve them on."""

from __future__ import annotations

from dataclasses import dataclass, replace

from stgs.catalog import GpuSku, get_sku


@dataclass(frozen=True)
class ModelSpec:
    """A model to serve: its name, latency SLO and expected request rate.

    ``profile`` names the model in the profile table (defaults to ``name``), so that two
    deployments of one network (e.g. two SLO classes) share one profile.
    """

    name: str
    slo_ms: float
    rate_rps: float
    profile: str = ""

    def __post_init__(self) -> None:
        if not self.profile:
            object.__setattr__(self, "profile", self.name)

    def scaled(self, k: float) -> ModelSpec:
        return replace(self, rate_rps=self.rate_rps * k)


@dataclass(frozen=True)
class GpuSpec:
    """One physical GPU: its SKU and whether the planner may use MIG on it."""

    sku: str
    mig: bool

    @property
    def info(self) -> GpuSku:
        return get_sku(self.sku)
