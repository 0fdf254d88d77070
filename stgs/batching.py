"""How a worker batches, as rules the simulator replays: the batch sizes it captures a graph for
and the admission estimate's decay. The worker (:mod:`stgs.runtime`) runs them and the
simulator (:mod:`partitioner.sim`) models them; both import them from here, so the simulator
never reaches into the runtime."""

from __future__ import annotations

__all__ = ["ADMISSION_DECAY", "batch_buckets"]

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
