"""The usual ways to share a GPU, as placements the daemon can serve: the baselines of
``docs/baselines.md`` behind stgs's own HTTP frontend (``benchmarks/triton_gpu.py``).

Each model gets one partition of its own, spread over the GPUs without MIG in turn (model ``i``
on the ``i % G``-th), and one stgs worker there (the runtime starts one per partition):

``TimeSlice`` (``partitioner.policies.sharing:TimeSlice``)
    a whole-GPU partition per model, no MPS: one CUDA context per model, which the GPU
    time-slices.
``EqualMps`` (``partitioner.policies.sharing:EqualMps``)
    an MPS client per model at an equal share, ``100 // n`` percent of its GPU's SMs
    (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``) for the ``n`` models on that GPU.
``Concurrent`` (``partitioner.policies.sharing:Concurrent``)
    an MPS client per model at 100 %: every model's kernels run concurrently on the whole GPU.
    The closest a plan comes to the ``streams`` baseline of ``benchmarks/baselines_gpu.py`` (one
    process, a CUDA stream per model), which a plan cannot express: one process per partition
    is the runtime's unit, and the GPU's MPS server merges the clients' work as one context's
    streams would be; unlike that baseline, the models do not share one interpreter's GIL.

A model's batch: the largest power of two whose latency on its partition, alone (the planner's
latency model from the measured profiles, without headroom, host costs or interference), is at
most SLO / 2 (:func:`sharing_max_batch`): with a work-conserving batcher a request may wait for
the batch in progress and then run in the next, so two batches must fit in the SLO. A model
whose batch 1 already misses gets 1.

What the plan claims it serves (its rates and ``feasible``), with the planner's own latencies
(headroom and host costs included): a model alone serves at most ``1000 b / L(b)`` req/s;
the models that share a GPU's time (``TimeSlice``, ``Concurrent``) together at most its whole
time: ``sum rate x L(b) / b <= 1000`` ms per second. Above that the rates are scaled down to
what fits and the rest is listed as unserved (``feasible`` false), which the daemon's admission
refuses, as it refuses a stgs plan that cannot serve a model.

These policies are not in the registry (``stgs policies``), and the plan checker, the simulator
and ``stgs compare`` never see them: they break the planner's rules on purpose (several
whole-GPU partitions on one GPU, MPS shares that sum past 100 %), which is what the baselines
are. The daemon serves one when its config names it by dotted path
(``[planner] policy = "partitioner.policies.sharing:TimeSlice"``).
"""

from __future__ import annotations

from typing import ClassVar

from partitioner.policies import Policy
from partitioner.problem import Curve, Problem, Shape
from stgs.errors import ProfileError
from stgs.plan import GpuPlan, ModelAssignment, Partition, Plan, Unserved
from stgs.types import GpuSpec, ModelSpec

__all__ = [
    "SHARING",
    "Concurrent",
    "EqualMps",
    "TimeSlice",
    "sharing_batches",
    "sharing_max_batch",
    "sharing_shape",
]


def sharing_shape(gpu: GpuSpec, mps_pct: int | None) -> Shape:
    """The shape of a whole GPU (``mps_pct`` None) or of an MPS client at ``mps_pct`` percent
    of its SMs (100 included: a client without a limit)."""
    sku = gpu.info
    if mps_pct is None:
        return Shape("full", sku.sm_count, float(sku.memory_mib), 1.0)
    if not 0 < mps_pct <= 100:
        raise ValueError(f"MPS share must be in (0, 100], got {mps_pct}")
    return Shape(
        "mps",
        sku.mps_sm_count(mps_pct),
        sku.memory_mib * mps_pct / 100.0,
        mps_pct / 100.0,
        mps_pct,
    )


def sharing_max_batch(curve: Curve) -> int:
    """The largest power-of-two batch whose latency alone on the curve's shape (``raw_solo``:
    no headroom, host costs or interference) is <= SLO / 2; 1 when none is."""
    fits = [
        int(b)
        for b, lat in zip(curve.buckets, curve.raw_solo, strict=True)
        if int(b) & (int(b) - 1) == 0 and lat <= curve.model.slo_ms / 2.0
    ]
    return max(fits, default=1)


def sharing_batches(problem: Problem, mps_pct: int | None) -> dict[str, tuple[int, float]]:
    """Per model of ``problem``: its batch by :func:`sharing_max_batch` on the first GPU, whole
    (``mps_pct`` None) or at an MPS share, and that batch's latency alone (ms). ProfileError
    for a model without a profile there."""
    gpu = problem.gpus[0]
    shape = sharing_shape(gpu, mps_pct)
    out: dict[str, tuple[int, float]] = {}
    for m in problem.models:
        curve = problem.curve(m, gpu, shape)
        if curve is None:
            raise ProfileError(f"no profile of {m.name} on {gpu.sku} ({shape.label})")
        b = sharing_max_batch(curve)
        out[m.name] = (b, float(curve.raw_solo[int(curve.buckets.searchsorted(b))]))
    return out


class _OnePartitionPerModel(Policy):
    """One partition per model; subclasses say its MPS share (None: a whole GPU)."""

    shares_time: ClassVar[bool]  # whether the models of one GPU share its time

    def mps_pct(self, n_models: int) -> int | None:
        raise NotImplementedError

    def plan(self, problem: Problem, current: Plan | None = None) -> Plan:
        gpus = [(i, g) for i, g in enumerate(problem.gpus) if not g.mig]
        on: dict[int, list[ModelSpec]] = {i: [] for i, _ in gpus}
        unserved: list[Unserved] = []
        if not gpus:
            unserved = [
                Unserved(m.name, m.rate_rps, f"{self.name} places models on GPUs without MIG")
                for m in problem.models
            ]
        for k, m in enumerate(problem.models if gpus else ()):
            on[gpus[k % len(gpus)][0]].append(m)
        plans: list[GpuPlan] = []
        for i, g in enumerate(problem.gpus):
            models = on.get(i, [])
            parts, lost = self._gpu(problem, g, models) if models else ([], [])
            unserved += lost
            plans.append(GpuPlan(i, g.sku, g.mig, tuple(parts)))
        return Plan(
            policy=self.name,
            feasible=not unserved,
            gpus=tuple(plans),
            unserved=tuple(unserved),
        )

    def _gpu(
        self, problem: Problem, gpu: GpuSpec, models: list[ModelSpec]
    ) -> tuple[list[Partition], list[Unserved]]:
        shape = sharing_shape(gpu, self.mps_pct(len(models)))
        placed: list[tuple[ModelSpec, int, float, float, float]] = []  # m, b, raw, lat, served
        lost: list[Unserved] = []
        for m in models:
            curve = problem.curve(m, gpu, shape)
            if curve is None:
                lost.append(Unserved(m.name, m.rate_rps, f"no profile on {shape.label}"))
                continue
            b = sharing_max_batch(curve)
            k = int(curve.buckets.searchsorted(b))
            lat = float(curve.lat[k])
            cap = 1000.0 * b / lat
            placed.append(
                (m, b, float(curve.raw_solo[k] * curve.slowdown), lat, min(m.rate_rps, cap))
            )
            if m.rate_rps > cap:
                lost.append(
                    Unserved(
                        m.name,
                        m.rate_rps - cap,
                        f"batch {b} on {shape.label} serves at most {cap:.1f} req/s",
                    )
                )
        busy = sum(served * lat / b for _, b, _, lat, served in placed) / 1000.0
        scale = 1.0 / busy if self.shares_time and busy > 1.0 else 1.0
        parts = []
        for m, b, raw, lat, served in placed:
            if scale < 1.0:
                lost.append(
                    Unserved(
                        m.name,
                        served * (1.0 - scale),
                        f"the models sharing GPU time on {gpu.sku} need {busy:.2f} of it",
                    )
                )
            parts.append(
                Partition(
                    kind=shape.kind,  # type: ignore[arg-type]
                    sm_count=shape.sm_count,
                    memory_mib=shape.memory_mib,
                    duty_cycle_ms=lat,
                    models=(ModelAssignment(m.name, b, served * scale, raw),),
                    mps_pct=shape.mps_pct,
                )
            )
        return parts, lost


class TimeSlice(_OnePartitionPerModel):
    name = "timeslice"
    description = "a whole-GPU process per model, no MPS: the GPU time-slices (a baseline)"
    shares_time = True

    def mps_pct(self, n_models: int) -> int | None:
        return None


class EqualMps(_OnePartitionPerModel):
    name = "equal-mps"
    description = "an MPS client per model at an equal share, 100 // n percent (a baseline)"
    shares_time = False

    def mps_pct(self, n_models: int) -> int | None:
        return max(1, 100 // n_models)


class Concurrent(_OnePartitionPerModel):
    name = "concurrent"
    description = "an MPS client per model at 100 %: every model on the whole GPU (a baseline)"
    shares_time = True

    def mps_pct(self, n_models: int) -> int | None:
        return 100


SHARING: dict[str, str] = {
    cls.name: f"{__name__}:{cls.__name__}" for cls in (TimeSlice, EqualMps, Concurrent)
}
"""Each sharing policy's name -> the dotted path the daemon's ``[planner] policy`` takes."""
