"""The worker trace (``STGS_WORKER_TRACE``): its columns, and the host time on the GPU's
critical path computed from it.

A worker started with ``STGS_WORKER_TRACE=DIR`` writes ``DIR/<pid>.npz`` when it exits normally
(:mod:`stgs.runtime.worker`): ``batches`` (one row per take, :data:`TRACE_BATCH`), ``requests``
(one row per request taken, :data:`TRACE_REQUEST`), ``models`` and ``name``. Times are
``time.monotonic_ns()``, one clock for every process of the host. Per batch:

* ``slot``: the model's index in the worker's spec; ``taken``, ``live``: requests taken, and of
  them those that ran (the others were answered "deadline exceeded", or their client was gone);
* ``t_take``: taken from the queue; ``t_run``: the runner started gathering it (``stage``);
  ``t_ran``: its results on the host (``collect`` returned); ``t_replied``: its replies sent;
* ``t_launch``: its work queued on the device (``launch`` called); ``device_ns``: its time on
  the device (on a GPU, CUDA events around its input copy, graph and output copy; on the CPU,
  the computation's host time). A row that ran nothing has every time equal to ``t_take``.

Per request: ``slot``, its ``deadline``, ``t_queued`` (the reader queued it), ``batch`` (its
batch's row) and ``ran`` (1, or 0: answered without running).

Files written before the pipelined worker have the first seven batch columns only (the readers
index columns by position, so they read both); :func:`host_gaps` reads them too, with what they
allow (below).

**The host time on the GPU's critical path** (:func:`host_gaps`): for two consecutive batches of
one worker that ran, ``p`` then ``k``, where a request of ``k`` was already queued when ``p``
ended on the device, the gap from ``p``'s end on the device to ``k``'s launch (0 when ``k`` was
launched before ``p`` ended): the time the device had nothing of this worker to run while work
was waiting, spent on the host (replies, the loop's turn, taking and gathering the batch). The
device end of a batch is not stamped on the host clock; it is chained from the launches and the
device times: ``end(k) = min(t_ran(k), max(t_launch(k), end(p)) + device_ns(k))`` (a batch
starts when it is launched or when the one before it ends, whichever is later; and it ended
before its results were seen). The launch latency (microseconds) counts as host time.
For old files (no ``t_launch``, no ``device_ns``): ``end(p) = t_ran(p)`` and the launch is
``t_run(k)``, so the gap leaves out the copies inside the old runner's call: a lower bound.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "LEGACY_BATCH_COLUMNS",
    "TRACE_BATCH",
    "TRACE_ENV",
    "TRACE_REQUEST",
    "HostGaps",
    "device_ns",
    "gap_summary",
    "host_gaps",
    "per_worker",
]

TRACE_ENV = "STGS_WORKER_TRACE"
TRACE_BATCH = (
    "slot",
    "taken",
    "live",
    "t_take",
    "t_run",
    "t_ran",
    "t_replied",
    "t_launch",
    "device_ns",
)
TRACE_REQUEST = ("slot", "deadline", "t_queued", "batch", "ran")
LEGACY_BATCH_COLUMNS = 7  # files written before t_launch and device_ns
_B = {c: k for k, c in enumerate(TRACE_BATCH)}
_R = {c: k for k, c in enumerate(TRACE_REQUEST)}

IntArray = npt.NDArray[np.int64]


def _legacy(batches: np.ndarray) -> bool:
    if batches.ndim != 2 or batches.shape[1] not in (LEGACY_BATCH_COLUMNS, len(TRACE_BATCH)):
        raise ValueError(
            f"a worker's batch trace has {len(TRACE_BATCH)} columns ({LEGACY_BATCH_COLUMNS} in"
            f" old files); got shape {batches.shape}"
        )
    return bool(batches.shape[1] == LEGACY_BATCH_COLUMNS)


def device_ns(batches: np.ndarray) -> IntArray:
    """Per batch row, its time on the device (old files: ``t_ran - t_run``, the runner's call)."""
    b = np.asarray(batches, dtype=np.int64)
    if _legacy(b):
        return np.asarray(b[:, _B["t_ran"]] - b[:, _B["t_run"]], dtype=np.int64)
    return np.asarray(b[:, _B["device_ns"]], dtype=np.int64)


@dataclass(frozen=True)
class HostGaps:
    """One worker's host time on the critical path (module docstring)."""

    batch: IntArray  # the row of the batch each gap precedes (``k``)
    gap_ns: IntArray  # the gap before it, >= 0
    device_end_ns: IntArray  # per batch row: its estimated end on the device (0: ran nothing)
    legacy: bool  # an old file: gaps are lower bounds


def host_gaps(batches: np.ndarray, requests: np.ndarray) -> HostGaps:
    """The host time on the critical path before each batch of one worker's trace (rows as the
    worker wrote them: ``batches`` :data:`TRACE_BATCH`, ``requests`` :data:`TRACE_REQUEST`)."""
    b = np.asarray(batches, dtype=np.int64)
    r = np.asarray(requests, dtype=np.int64).reshape(-1, len(TRACE_REQUEST))
    legacy = _legacy(b)
    ran = np.flatnonzero(b[:, _B["live"]] > 0)
    t_ran = b[:, _B["t_ran"]]
    end = np.zeros(len(b), dtype=np.int64)
    if legacy:
        launch = b[:, _B["t_run"]]
        end[ran] = t_ran[ran]
    else:
        launch = b[:, _B["t_launch"]]
        dev = b[:, _B["device_ns"]]
        prev = 0
        for row, t_l, d, t_r in zip(
            ran.tolist(), launch[ran].tolist(), dev[ran].tolist(), t_ran[ran].tolist(), strict=True
        ):
            prev = min(t_r, max(t_l, prev) + d)
            end[row] = prev
    # when the first request of each batch was queued
    first_q = np.full(len(b), np.iinfo(np.int64).max, dtype=np.int64)
    if len(r):
        np.minimum.at(first_q, r[:, _R["batch"]], r[:, _R["t_queued"]])
    p, k = ran[:-1], ran[1:]
    waited = first_q[k] <= end[p]
    p, k = p[waited], k[waited]
    gap = np.maximum(launch[k] - end[p], 0)
    return HostGaps(k.astype(np.int64), gap.astype(np.int64), end, legacy)


def per_worker(wb: np.ndarray, wr: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Merged traces (``benchmarks.lib.probes.collect_traces``: the worker's index first in
    every row) split back: (worker, its batch rows, its request rows), columns as written."""
    for w in np.unique(wb[:, 0]).tolist():
        yield int(w), wb[wb[:, 0] == w, 1:], wr[wr[:, 0] == w, 1:]


def gap_summary(gap_ns: np.ndarray) -> dict[str, Any]:
    """Count, p50, p99 and mean (ms) of host gaps."""
    g = np.asarray(gap_ns, dtype=np.float64) / 1e6
    if not len(g):
        return {"n": 0, "p50_ms": None, "p99_ms": None, "mean_ms": None}
    return {
        "n": len(g),
        "p50_ms": round(float(np.percentile(g, 50)), 4),
        "p99_ms": round(float(np.percentile(g, 99)), 4),
        "mean_ms": round(float(g.mean()), 4),
    }
