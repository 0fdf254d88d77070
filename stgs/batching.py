"""How a worker batches, as rules the simulator replays: the batch sizes it captures a graph for
and the admission estimate's decay. The worker (:mod:`stgs.runtime`) runs them and the
simulator (:mod:`partitioner.sim`) models them; both import them from here, so the simulator
never reaches into the runtime."""

from __future__ import annotations

import os
from collections.abc import Mapping

from stgs.errors import ConfigError

__all__ = ["ADMISSION_DECAY", "PIPELINE_ENV", "batch_buckets", "pipeline_setting", "route_load"]

PIPELINE_ENV = "STGS_WORKER_PIPELINE"


def pipeline_setting(environ: Mapping[str, str] | None = None) -> bool:
    """Whether workers pipeline their batches: ``STGS_WORKER_PIPELINE`` unset or ``1`` (the
    default), or ``0`` (one batch at a time: take, run, reply, as before the pipeline; for
    before/after measurements). ConfigError for any other value. The workers read it at start,
    and the planner's default (``PlannerOptions.worker_pipeline``) is what they read."""
    raw = (os.environ if environ is None else environ).get(PIPELINE_ENV, "")
    value = raw.strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{PIPELINE_ENV}={raw!r}: 1 (pipelined, the default) or 0 (sequential)")


# When a take runs nothing and some request was refused on the predicted batch latency, the
# estimate shrinks by this factor, so that a model whose estimate exceeds its SLO (nothing
# runs, so nothing re-measures it) runs again after a few refused takes.
ADMISSION_DECAY = 0.8


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes with a captured graph: powers of two below ``max_batch``, and it."""
    if max_batch < 1:
        raise ValueError(f"batch must be >= 1, got {max_batch}")
    out = []
    b = 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return tuple(out)


def route_load(in_flight: int, planned_rate: float) -> float:
    """A partition's load for one model, as every router (the runtime's, the frontends', the
    simulator's) weighs it: that model's requests in flight there, the one to route included,
    over the rate the plan gives the model there; the least loaded partition gets the request.
    Per model, not the worker's total: a model planned on a partition of its own and on a
    shared one would otherwise be pushed onto its own (the shared worker's requests of other
    models counting against it) and the shared one's planned share would go unused."""
    return (in_flight + 1) / max(planned_rate, 1e-6)
