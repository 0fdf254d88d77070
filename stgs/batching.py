"""How a worker batches, as rules the simulator replays: the batch sizes it captures a graph for
and the admission estimate's decay. The worker (:mod:`stgs.runtime`) runs them and the
simulator (:mod:`partitioner.sim`) models them; both import them from here, so the simulator
never reaches into the runtime."""

from __future__ import annotations

__all__ = ["ADMISSION_DECAY", "batch_buckets", "route_load"]

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
