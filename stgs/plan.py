"""Plans: plain, frozen, versioned data (format ``stgs.plan/v1``, schema in docs/plan.schema.json).

A plan says, per GPU, its mode and partitions; per partition, the models it time-shares, each
with its batch size and assigned rate, and the partition's duty cycle. Partitions that share one
MIG instance under MPS carry the same ``mig_start``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from stgs.errors import ConfigError

PLAN_FORMAT = "stgs.plan/v1"

PartitionKind = Literal["full", "mps", "mig"]
GpuMode = Literal["idle", "whole", "mps", "mig", "mig+mps"]


@dataclass(frozen=True)
class ModelAssignment:
    """One model's share of a partition: its batch, the rate it serves there, its batch latency.

    ``latency_ms`` is the predicted latency of one batch on this partition, interference with
    co-located partitions included, headroom not included.
    """

    name: str
    batch: int
    rate_rps: float
    latency_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "batch": self.batch,
            "rate_rps": round(self.rate_rps, 6),
            "latency_ms": round(self.latency_ms, 4),
        }


@dataclass(frozen=True)
class Partition:
    """A spatial partition: a whole GPU, an MPS share, a MIG instance, or MPS inside MIG."""

    kind: PartitionKind
    sm_count: int
    memory_mib: float
    duty_cycle_ms: float
    models: tuple[ModelAssignment, ...]
    mig_profile: str | None = None
    mig_start: int | None = None
    mps_pct: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "mig_profile": self.mig_profile,
            "mig_start": self.mig_start,
            "mps_pct": self.mps_pct,
            "sm_count": self.sm_count,
            "memory_mib": round(self.memory_mib, 1),
            "duty_cycle_ms": round(self.duty_cycle_ms, 4),
            "models": [m.to_dict() for m in self.models],
        }


@dataclass(frozen=True)
class GpuPlan:
    index: int
    sku: str
    mig: bool  # MIG mode on this GPU in the plan
    partitions: tuple[Partition, ...] = ()

    @property
    def mode(self) -> GpuMode:
        kinds = {p.kind for p in self.partitions}
        if not kinds:
            return "idle"
        if self.mig:
            return "mig+mps" if "mps" in kinds else "mig"
        return "mps" if "mps" in kinds else "whole"

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "sku": self.sku,
            "mig": self.mig,
            "mode": self.mode,
            "partitions": [p.to_dict() for p in self.partitions],
        }


@dataclass(frozen=True)
class Unserved:
    name: str
    rate_rps: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rate_rps": round(self.rate_rps, 6), "reason": self.reason}


@dataclass(frozen=True)
class Plan:
    policy: str
    feasible: bool
    gpus: tuple[GpuPlan, ...]
    unserved: tuple[Unserved, ...] = ()
    k: float | None = None
    # Free-form facts about how the plan was made: solver status, solve time, changes made.
    info: Mapping[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------- queries
    @property
    def gpus_used(self) -> int:
        return sum(1 for g in self.gpus if g.partitions)

    def served_rate(self, model: str) -> float:
        return sum(
            m.rate_rps for g in self.gpus for p in g.partitions for m in p.models if m.name == model
        )

    def partitions(self) -> list[tuple[GpuPlan, Partition]]:
        return [(g, p) for g in self.gpus for p in g.partitions]

    def with_info(self, **info: Any) -> Plan:
        return replace(self, info={**self.info, **info})

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": PLAN_FORMAT,
            "policy": self.policy,
            "feasible": self.feasible,
        }
        if self.k is not None:
            out["k"] = round(self.k, 6)
        out["gpus_used"] = self.gpus_used
        out["gpus"] = [g.to_dict() for g in self.gpus]
        out["unserved"] = [u.to_dict() for u in self.unserved]
        if self.info:
            out["info"] = dict(self.info)
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        if data.get("format") != PLAN_FORMAT:
            raise ConfigError(
                f"not a plan of format {PLAN_FORMAT!r}: format={data.get('format')!r}"
            )
        try:
            gpus = tuple(
                GpuPlan(
                    index=int(g["index"]),
                    sku=str(g["sku"]),
                    mig=bool(g["mig"]),
                    partitions=tuple(_partition_from(p) for p in g.get("partitions", [])),
                )
                for g in data["gpus"]
            )
            unserved = tuple(
                Unserved(str(u["name"]), float(u["rate_rps"]), str(u["reason"]))
                for u in data.get("unserved", [])
            )
            k = data.get("k")
            return cls(
                policy=str(data["policy"]),
                feasible=bool(data["feasible"]),
                gpus=gpus,
                unserved=unserved,
                k=None if k is None else float(k),
                info=dict(data.get("info", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed plan: {exc!r}") from exc

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"plan is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def _partition_from(p: Mapping[str, Any]) -> Partition:
    def opt_int(v: Any) -> int | None:
        return None if v is None else int(v)

    kind = str(p["kind"])
    if kind not in ("full", "mps", "mig"):
        raise ValueError(f"unknown partition kind {kind!r}")
    return Partition(
        kind=kind,  # type: ignore[arg-type]
        sm_count=int(p["sm_count"]),
        memory_mib=float(p["memory_mib"]),
        duty_cycle_ms=float(p["duty_cycle_ms"]),
        models=tuple(
            ModelAssignment(
                str(m["name"]), int(m["batch"]), float(m["rate_rps"]), float(m["latency_ms"])
            )
            for m in p["models"]
        ),
        mig_profile=p.get("mig_profile"),
        mig_start=opt_int(p.get("mig_start")),
        mps_pct=opt_int(p.get("mps_pct")),
    )


def empty_plan(policy: str, gpus: Sequence[tuple[str, bool]]) -> Plan:
    """A plan with every GPU idle (``gpus``: (sku, mig) per GPU index)."""
    return Plan(
        policy=policy,
        feasible=True,
        gpus=tuple(GpuPlan(i, sku, mig) for i, (sku, mig) in enumerate(gpus)),
    )
