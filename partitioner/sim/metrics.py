"""Metrics of one simulated run, from the per-request outcomes (numpy, vectorised).

Counted: requests arriving in ``[warmup_s, duration_s)``. A request *attains* its SLO when it
completes with ``finish - arrival <= slo_ms``; it is *dropped* when the executor answered
"deadline exceeded" or no ready partition served its model. Latency percentiles are over
completed requests (dropped ones have no latency).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from partitioner.sim.engine import DEADLINE, NO_WORKER, OK, SimResult


@dataclass(frozen=True)
class RunMetrics:
    summary: dict[str, float | int]
    per_model: dict[str, dict[str, float | int]]
    timeseries: dict[str, list[float]]

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary, "per_model": self.per_model, "timeseries": self.timeseries}


def _pct(x: np.ndarray[Any, np.dtype[np.float64]], q: float) -> float:
    return float(np.percentile(x, q)) if x.size else float("nan")


def _time_avg(points: list[tuple[float, float]], t0: float, t1: float) -> float:
    """Time average over [t0, t1] of a step function given as (time, value) change points."""
    if t1 <= t0 or not points:
        return float(points[-1][1]) if points else 0.0
    total = 0.0
    for i, (t, v) in enumerate(points):
        end = points[i + 1][0] if i + 1 < len(points) else t1
        lo, hi = max(t, t0), min(end, t1)
        if hi > lo:
            total += (hi - lo) * v
    return total / (t1 - t0)


def compute_metrics(res: SimResult, window_s: float = 1.0) -> RunMetrics:
    """Summary, per-model metrics and a time series in windows of ``window_s``."""
    t0_ms, t1_ms = res.warmup_s * 1000.0, res.duration_s * 1000.0
    sel = (res.arrival_ms >= t0_ms) & (res.arrival_ms < t1_ms)
    status = res.status[sel]
    model = res.model[sel]
    lat = res.finish_ms[sel] - res.arrival_ms[sel]
    slo = res.slo_ms[model]
    done = status == OK
    ontime = done & (lat <= slo + 1e-9)
    n = int(sel.sum())
    span_s = max(res.duration_s - res.warmup_s, 1e-9)
    done_lat = lat[done]
    gpus = [(t, float(p.gpus_used)) for t, p in res.plans]
    parts = [(t, float(len(p.partitions()))) for t, p in res.plans]
    reconf = res.reconfigurations
    summary: dict[str, float | int] = {
        "requests": n,
        "completed": int(done.sum()),
        "attained": int(ontime.sum()),
        "slo_attainment": float(ontime.sum() / n) if n else float("nan"),
        "goodput_rps": float(ontime.sum() / span_s),
        "offered_rps": float(n / span_s),
        "p50_ms": _pct(done_lat, 50),
        "p99_ms": _pct(done_lat, 99),
        "dropped": int((status != OK).sum()),
        "dropped_deadline": int((status == DEADLINE).sum()),
        "dropped_no_worker": int((status == NO_WORKER).sum()),
        "late": int((done & ~ontime).sum()),
        "gpus_used": res.plans[0][1].gpus_used,
        "gpus_used_mean": _time_avg(gpus, res.warmup_s, res.duration_s),
        "gpus_used_max": int(max(v for _, v in gpus)),
        "partitions": len(res.plans[0][1].partitions()),
        "partitions_mean": _time_avg(parts, res.warmup_s, res.duration_s),
        "utilisation": (
            res.busy_weighted_ms / res.alive_weighted_ms if res.alive_weighted_ms > 0 else 0.0
        ),
        "batches": res.batches,
        "mean_batch": float(done.sum() / res.batches) if res.batches else 0.0,
        "replans": res.replans,
        "controller_passes": int(res.info.get("controller_passes", 0)),
        "reconfigurations": len(reconf),
        "reconfig_s": float(sum(r.done_s - r.start_s for r in reconf)),
        "reconfig_ready_s": float(sum(r.ready_s - r.start_s for r in reconf)),
        "partitions_started": int(sum(r.partitions_started for r in reconf)),
        "partitions_stopped": int(sum(r.partitions_stopped for r in reconf)),
        "plan_feasible": int(res.plans[0][1].feasible),
    }
    per_model: dict[str, dict[str, float | int]] = {}
    for i, name in enumerate(res.models):
        mm = model == i
        k = int(mm.sum())
        dl = lat[mm & done]
        per_model[name] = {
            "requests": k,
            "slo_attainment": float(ontime[mm].sum() / k) if k else float("nan"),
            "goodput_rps": float(ontime[mm].sum() / span_s),
            "p50_ms": _pct(dl, 50),
            "p99_ms": _pct(dl, 99),
            "dropped": int((status[mm] != OK).sum()),
        }
    # time series over the whole run (warm-up included), by arrival time
    w_ms = 1000.0 * max(min(res.duration_s / 2, window_s), 1e-3)
    nbin = int(np.ceil(t1_ms / w_ms))
    all_sel = res.arrival_ms < t1_ms
    b = np.minimum((res.arrival_ms[all_sel] / w_ms).astype(np.int64), nbin - 1)
    all_lat = res.finish_ms[all_sel] - res.arrival_ms[all_sel]
    ok_all = (res.status[all_sel] == OK) & (all_lat <= res.slo_ms[res.model[all_sel]] + 1e-9)
    arrivals = np.bincount(b, minlength=nbin).astype(np.float64)
    good = np.bincount(b, weights=ok_all.astype(np.float64), minlength=nbin)
    t_mid = (np.arange(nbin) + 0.5) * w_ms / 1000.0
    with np.errstate(invalid="ignore", divide="ignore"):
        att = np.where(arrivals > 0, good / np.maximum(arrivals, 1), np.nan)
    gpus_t = [_time_avg(gpus, float(t - w_ms / 2000), float(t + w_ms / 2000)) for t in t_mid]
    timeseries = {
        "t_s": [round(float(x), 6) for x in t_mid],
        "offered_rps": [float(x) for x in arrivals / (w_ms / 1000.0)],
        "slo_attainment": [float(x) for x in att],
        "gpus_used": gpus_t,
        "reconfig_start_s": [r.start_s for r in reconf],
        "reconfig_done_s": [r.done_s for r in reconf],
    }
    return RunMetrics(summary, per_model, timeseries)
