"""The simulator's fidelity to a GPU run (``benchmarks/fidelity.py``): phase 1 of a
``serve_gpu.py`` run replayed in the simulator and compared, the host costs fitted (from the
workers' trace or the client's record), the interference check, the profiles calibrated on other
runs, and the runtime's latency factors fitted as the simulator's ``runtime_noise`` file.

The worker-trace fit itself is the product's (:func:`stgs.hostcosts.fit_trace`); this module
gathers its observations from a run (:func:`trace_observations`). ``python -m
benchmarks.fit_host_costs`` writes the result into ``stgs/data/host-costs.json``, the one file
the planner, the daemon and the simulator read their host costs from."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lib.runs import NOT_SENT, Run
from benchmarks.lib.runs import OK as _OK
from partitioner.policies import get_policy
from partitioner.sim.config import HostCosts, SimOptions
from partitioner.sim.engine import OK as SIM_OK
from partitioner.sim.engine import Simulator
from partitioner.sim.noise import FALLBACK, quantiles
from partitioner.sim.run import noise_for, simulate
from stgs.batching import batch_buckets
from stgs.hostcosts import TraceObservations, fit_trace, l1_line, nonneg_line
from stgs.plan import Partition
from stgs.profiles import default_profiles_path

TARGET = 0.10
_GAP_S = 0.00015  # answers of one batch arrive closer than this


# ---------------------------------------------------------------------- host-cost fit
def gpu_latency(run: Run) -> list[tuple[list[int], list[list[float]]]]:
    """Per partition of plan 1: model indices and the GPU batch latency by n (the plan's
    static MPS interference, as the client fit has always charged it)."""
    opts = SimOptions(
        duration_s=1.0, noise="off", host=HostCosts(enabled=False), interference="static"
    )
    sim = Simulator(run.problem, run.plan, {}, opts)
    sim.run()
    return [(list(p.model_idx), [list(x) for x in p.lat]) for p in sim.parts]


def client_batches(run: Run, models: list[int]) -> dict[str, np.ndarray]:
    """The batches of one partition (serving ``models``) from the answers' times."""
    z = run.npz
    t, m, st, sent, done = z["t_sched"], z["model"], z["status"], z["sent"], z["done"]
    sel = np.isin(m, models) & (st == _OK) & (t >= run.lo) & (t < run.hi)
    idx = np.flatnonzero(sel)
    idx = idx[np.argsort(done[idx], kind="stable")]
    d, mm = done[idx], m[idx]
    brk = np.r_[True, (np.diff(d) > _GAP_S) | (mm[1:] != mm[:-1])]
    starts = np.flatnonzero(brk)
    ends = np.r_[starts[1:], len(d)]
    bdone = d[ends - 1]
    sent_max = np.maximum.reduceat(sent[idx], starts)
    sent_min = np.minimum.reduceat(sent[idx], starts)
    prev_done = np.r_[-np.inf, bdone[:-1]]
    first = idx[starts]
    return {
        "model": mm[starts],
        "n": ends - starts,
        "dur_ms": (bdone - prev_done) * 1e3,
        "b2b": sent_max < prev_done,  # all queued before the previous batch ended
        "idle": sent_min > prev_done,  # the worker had nothing to do when they came
        "lat1_ms": (done[first] - t[first]) * 1e3,  # latency (of the first; n = 1: the only)
    }


def _median_points(
    runs: list[Run], exclude: set[str], min_count: int = 30
) -> tuple[list[tuple[float, float, float, int]], dict[str, list[float]]]:
    """(n x MB, n, excess ms, count) per (run, model, n); per model pre+post estimates."""
    host = HostCosts()
    loop_pts: list[tuple[float, float, float, int]] = []
    around: dict[str, list[float]] = {}
    for run in runs:
        for mids, lat in gpu_latency(run):
            b = client_batches(run, mids)
            for slot, mi in enumerate(mids):
                name = run.names[mi]
                prof = run.problem.models[mi].profile
                mb = host.mb(prof)
                mine = b["model"] == mi
                for n in range(1, len(lat[slot])):
                    k = mine & b["b2b"] & (b["n"] == n)
                    if k.sum() < min_count or name in exclude:
                        continue
                    excess = float(np.median(b["dur_ms"][k])) - lat[slot][n]
                    loop_pts.append((n * mb, float(n), excess, int(k.sum())))
                k1 = mine & (b["n"] == 1)
                idle, b2b = k1 & b["idle"], k1 & b["b2b"]
                if idle.sum() >= min_count and b2b.sum() >= min_count:
                    val = float(np.median(b["lat1_ms"][idle]) - np.median(b["dur_ms"][b2b]))
                    around.setdefault(prof, []).append(val)
    return loop_pts, around


def fit_host(runs: list[Run], exclude: set[str] | None = None) -> tuple[HostCosts, dict[str, Any]]:
    """Host costs from the runs' client-side records (see the module docstring)."""
    loop_pts, around = _median_points(runs, set(exclude or ()))
    if not loop_pts:
        raise SystemExit("no back-to-back batches to fit the loop's host cost on")
    arr = np.asarray(loop_pts, dtype=np.float64)
    batch_ms, per_mb = nonneg_line(arr[:, 0], arr[:, 2], arr[:, 3])
    host = HostCosts()
    pts = [(host.mb(p), v) for p, vs in around.items() for v in vs]
    if pts:
        xs = np.asarray([p[0] for p in pts])
        ys = np.asarray([p[1] for p in pts])
        req_ms, req_per_mb = nonneg_line(xs, ys, np.ones_like(xs))
    else:
        req_ms, req_per_mb = 0.0, 0.0
    fitted = HostCosts(
        request_ms=round(req_ms, 4),
        request_ms_per_mb=round(req_per_mb, 4),
        batch_ms=round(batch_ms, 4),
        sample_ms_per_mb=round(per_mb, 4),
    )
    info = {
        "loop_points": [
            {"n_x_mb": round(a, 4), "n": int(n), "excess_ms": round(e, 4), "count": c}
            for a, n, e, c in loop_pts
        ],
        "around_ms": {k: [round(v, 4) for v in vs] for k, vs in around.items()},
    }
    return fitted, info


# ---------------------------------------------------------------------- worker trace
_MATCH_NS = 50_000  # a trace row's arrival (deadline - SLO) lies this close to its request's


@dataclass
class Trace:
    """The workers' trace of a run joined to the client's record (``serve_gpu.py`` merges the
    workers' files into the .npz: ``wb`` batches, ``wr`` requests, worker index first).

    Requests carry no id to the worker; a trace row is joined to the client request of the same
    model whose scheduled arrival is nearest to the row's deadline - SLO (the deadline the client
    gave is scheduled arrival + SLO; they differ by the microseconds between the client's clock
    read and the runtime's), within 50 us and one to one; rows that do not pair stay unjoined.
    """

    t0_ns: int
    # worker, slot, taken, live, t_take, t_run, t_ran, t_replied (and, in traces of the
    # pipelined worker, t_launch, device_ns: stgs.workertrace)
    wb: np.ndarray
    wr: np.ndarray  # worker, slot, deadline, t_queued, batch (row in its worker's), ran
    parts: list[dict[str, Any]]
    row_model: np.ndarray  # per wr row: model index (-1: a model of no plan-1 worker)
    row_batch: np.ndarray  # per wr row: row in wb
    row_arrival_s: np.ndarray  # per wr row: deadline - SLO, s from t0
    req_row: np.ndarray  # per client request: its wr row, -1 when unjoined
    matched: int


def load_trace(run: Run) -> Trace | None:
    """The run's worker trace joined to its client record (None: no trace); made once per run,
    every later call gets the same object."""
    if run.trace is None:
        run.trace = _join_trace(run) or False  # False: the run has no trace
    return run.trace or None


def _join_trace(run: Run) -> Trace | None:
    z = run.npz
    if "wb" not in z or "wr" not in z or "t0_ns" not in z:
        return None
    t0 = int(z["t0_ns"])
    wb, wr = z["wb"].astype(np.int64), z["wr"].astype(np.int64)
    parts = json.loads(str(z["w_parts"]))
    slo = np.asarray([float(m["slo_ms"]) for m in run.res["models"]])
    row_model = np.full(len(wr), -1, dtype=np.int64)
    row_batch = np.full(len(wr), -1, dtype=np.int64)
    for pi, part in enumerate(parts):
        first = np.flatnonzero(wb[:, 0] == pi)
        mine = wr[:, 0] == pi
        row_batch[mine] = first[wr[mine, 4]] if len(first) else -1
        for slot, name in enumerate(part["models"]):
            if name in run.names:
                row_model[mine & (wr[:, 1] == slot)] = run.names.index(name)
    ok = row_model >= 0
    arrival_ns = np.where(ok, wr[:, 2] - (slo[np.maximum(row_model, 0)] * 1e6).astype(np.int64), 0)
    row_arrival_s = (arrival_ns - t0) / 1e9
    t, m, st = run.npz["t_sched"], run.npz["model"].astype(np.int64), run.npz["status"]
    req_row = np.full(len(t), -1, dtype=np.int64)
    for mi in range(len(run.names)):
        reqs = np.flatnonzero((m == mi) & (st != NOT_SENT))
        rows = np.flatnonzero(row_model == mi)
        if not len(reqs) or not len(rows):
            continue
        rows = rows[np.argsort(arrival_ns[rows], kind="stable")]
        sched_ns = t0 + np.round(t[reqs] * 1e9).astype(np.int64)
        pos = np.clip(np.searchsorted(arrival_ns[rows], sched_ns), 1, len(rows) - 1)
        left, right = rows[pos - 1], rows[pos]
        best = np.where(
            np.abs(arrival_ns[left] - sched_ns) <= np.abs(arrival_ns[right] - sched_ns),
            left,
            right,
        )
        good = np.abs(arrival_ns[best] - sched_ns) <= _MATCH_NS
        uniq, counts = np.unique(best[good], return_counts=True)
        good &= ~np.isin(best, uniq[counts > 1])  # one to one: ambiguous pairs stay unjoined
        req_row[reqs[good]] = best[good]
    return Trace(
        t0, wb, wr, parts, row_model, row_batch, row_arrival_s, req_row, int((req_row >= 0).sum())
    )


def plan_parts(run: Run) -> dict[tuple[str, ...], Partition]:
    return {tuple(a.name for a in p.models): p for _, p in run.plan.partitions()}


def _busy_cover(wb: np.ndarray, worker: int) -> Callable[[np.ndarray], np.ndarray]:
    """Time (ns) the worker's runner was busy before each given instant."""
    b = wb[(wb[:, 0] == worker) & (wb[:, 3] > 0)]
    o = np.argsort(b[:, 5], kind="stable")
    rs, re_ = b[o, 5], b[o, 6]
    cum = np.r_[0, np.cumsum(re_ - rs)]

    def cover(x: np.ndarray) -> np.ndarray:
        k = np.searchsorted(rs, x, side="right")
        k1 = np.maximum(k - 1, 0)
        inside = np.minimum(x, re_[k1]) - rs[k1] if len(rs) else np.zeros_like(x)
        return np.where(k > 0, cum[k1] + inside, 0)

    return cover


def trace_batches(run: Run, tr: Trace) -> list[dict[str, Any]]:
    """Per plan-1 model: its phase-1 batches from the trace, with the profile's GPU latency of
    the batch (bucket, MPS share, no interference), gamma, the share of the MPS neighbours that
    were running during the batch (time-weighted) and the static share of the plan."""
    host = HostCosts()
    pp = plan_parts(run)
    workers = {
        pi: pp[tuple(p["models"])] for pi, p in enumerate(tr.parts) if tuple(p["models"]) in pp
    }
    covers = {pi: _busy_cover(tr.wb, pi) for pi in workers}
    out = []
    for pi, part in workers.items():
        b = tr.wb[(tr.wb[:, 0] == pi) & (tr.wb[:, 3] > 0)]
        tb = (b[:, 4] - tr.t0_ns) / 1e9
        b = b[(tb >= run.lo) & (tb < run.hi)]
        s, e = b[:, 5], b[:, 6]
        busy = np.zeros(len(b))
        for pj, q in workers.items():
            if pj != pi and q.kind == "mps" and part.kind == "mps":
                busy += (covers[pj](e) - covers[pj](s)) / np.maximum(e - s, 1) * (q.mps_pct or 0)
        static = sum(
            float(q.mps_pct or 0) for q in pp.values() if q is not part and q.kind == "mps"
        )
        for slot, a in enumerate(part.models):
            mi = run.names.index(a.name)
            prof = run.problem.models[mi].profile
            lm = run.problem.latency[(run.plan.gpus[0].sku, prof)]
            buckets = batch_buckets(a.batch)
            lat = lm.latency_curve(
                np.asarray(buckets, dtype=np.float64), part.sm_count, kind=part.kind
            )
            k = b[:, 1] == slot
            n = b[k, 3]
            out.append(
                {
                    "model": a.name,
                    "profile": prof,
                    "bucket": np.asarray(buckets, dtype=np.int64)[np.searchsorted(buckets, n)],
                    "mb": host.mb(prof),
                    "gamma": run.problem.interference.gamma(prof, run.plan.gpus[0].sku),
                    "static_pct": static if part.kind == "mps" else 0.0,
                    "n": n,
                    "solo_ms": lat[np.searchsorted(buckets, n)],
                    "busy_pct": busy[k],
                    "run_ms": (e[k] - s[k]) / 1e6,
                    "pre_ms": (b[k, 5] - b[k, 4]) / 1e6,
                    "reply_ms": (b[k, 7] - b[k, 6]) / 1e6,
                    "rows": b[k],
                }
            )
    return out


def trace_observations(runs: list[Run]) -> TraceObservations:
    """What the host-cost fit (:func:`stgs.hostcosts.fit_trace`) needs, from the runs' worker
    traces joined to their client records (phase 1): per batch the runner's time less the
    profile's GPU latency x the interference of the busy neighbours, and the loop's time
    outside the runner; the turns between batches with work waiting; per request the way in
    (sent -> queued in the worker) and back (batch replied -> the client's answer)."""
    obs = TraceObservations()
    host = HostCosts()
    for run in runs:
        tr = load_trace(run)
        if tr is None:
            raise SystemExit(f"{run.path}: no worker trace to fit on")
        z = run.npz
        for d in trace_batches(run, tr):
            # runner = copies (a + b x n x MB) + GPU latency x interference of the busy neighbours
            gpu = d["solo_ms"] * (1.0 + d["gamma"] * d["busy_pct"] / 100.0)
            obs.add_batches(d["n"], d["mb"], d["run_ms"] - gpu, d["pre_ms"] + d["reply_ms"])
        # the loop's turn between two batches of a worker that had work waiting
        sel = np.flatnonzero(tr.req_row >= 0)
        t = z["t_sched"]
        sel = sel[(t[sel] >= run.lo) & (t[sel] < run.hi)]
        rows = tr.req_row[sel]
        q_ns = tr.wr[rows, 3]
        brow = tr.row_batch[rows]
        for w in range(len(tr.parts)):
            b_idx = np.flatnonzero(tr.wb[:, 0] == w)
            if len(b_idx) < 2:
                continue
            last_q = np.full(len(tr.wb), np.iinfo(np.int64).min)
            np.maximum.at(last_q, brow, q_ns)
            prev, nxt = b_idx[:-1], b_idx[1:]
            ok = (tr.wb[prev, 3] > 0) & (last_q[nxt] > 0) & (last_q[nxt] < tr.wb[prev, 7])
            obs.turn_ms = np.r_[obs.turn_ms, (tr.wb[nxt[ok], 4] - tr.wb[prev[ok], 7]) / 1e6]
        # on the way in (sent -> queued) and back (batch replied -> client answer)
        sent_ns = tr.t0_ns + np.round(z["sent"][sel] * 1e9)
        for mi in range(len(run.names)):
            k = z["model"][sel] == mi
            if k.sum() >= 100:
                mb = host.mb(run.problem.models[mi].profile)
                obs.add_way_in(mb, (q_ns[k] - sent_ns[k]) / 1e6)
        okr = z["status"][sel] == _OK
        done_ns = tr.t0_ns + np.round(z["done"][sel][okr] * 1e9)
        obs.way_back_ms = np.r_[obs.way_back_ms, (done_ns - tr.wb[brow[okr], 7]) / 1e6]
    return obs


def fit_host_trace(runs: list[Run]) -> tuple[HostCosts, dict[str, Any]]:
    """Host costs measured on the workers' trace, one set for every model: the product's fit
    (:func:`stgs.hostcosts.fit_trace`) on :func:`trace_observations`."""
    terms, info = fit_trace(trace_observations(runs))
    return HostCosts(**terms.model_dump()), info


def interference_check(runs: list[Run]) -> tuple[list[str], dict[str, float]]:
    """Runner time per batch vs the two interference models, MPS partitions of the runs.

    For each model of interference (``static``: every MPS neighbour of the plan, always;
    ``busy``: the neighbours' shares weighted by how long each ran during the batch) the copy
    cost ``a + b x n x MB`` is fitted (least absolute deviations over every batch) and the
    predicted runner time ``copies + GPU latency x (1 + gamma x share / 100)`` compared."""
    data = []
    for run in runs:
        tr = load_trace(run)
        if tr is not None:
            data += [(run.path.stem, d) for d in trace_batches(run, tr)]
    if not data:
        return [], {}
    mae: dict[str, float] = {}
    pred: dict[str, list[np.ndarray]] = {}
    for mode in ("static", "busy"):
        xs, ys, gpus = [], [], []
        for _, d in data:
            pct = d["busy_pct"] if mode == "busy" else np.full(len(d["n"]), d["static_pct"])
            gpu = d["solo_ms"] * (1.0 + d["gamma"] * pct / 100.0)
            xs.append(np.c_[np.ones(len(gpu)), d["n"] * d["mb"]])
            ys.append(d["run_ms"] - gpu)
            gpus.append(gpu)
        c = l1_line(np.concatenate(xs), np.concatenate(ys))
        pred[mode] = [x @ c + g for x, g in zip(xs, gpus, strict=True)]
        err = np.concatenate([p - d["run_ms"] for p, (_, d) in zip(pred[mode], data, strict=True)])
        mae[mode] = float(np.mean(np.abs(err)))
    out = [
        "# MPS interference: runner time per batch (medians, ms) vs the two models",
        "",
        "| run | model | gamma | batches | neighbours busy % (plan %) | measured | static | busy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, (name, d) in enumerate(data):
        meas = float(np.median(d["run_ms"]))
        st, bu = (float(np.median(pred[m][i])) for m in ("static", "busy"))
        out.append(
            f"| {name} | {d['model']} | {d['gamma']:.2f} | {len(d['n'])} |"
            f" {np.mean(d['busy_pct']):.1f} ({d['static_pct']:g}) | {meas:.3f} |"
            f" {st:.3f} ({(st - meas) / meas:+.1%}) | {bu:.3f} ({(bu - meas) / meas:+.1%}) |"
        )
    out += [
        "",
        f"mean absolute error per batch: static {mae['static']:.3f} ms, busy {mae['busy']:.3f} ms",
        "",
    ]
    return out, mae


def decomposition(run: Run, tr: Trace) -> list[str]:
    """Where phase-1 latency went, per segment (trace joined to the client's record)."""
    z = run.npz
    t, m, st = z["t_sched"], z["model"].astype(np.int64), z["status"]
    slo = np.asarray([float(x["slo_ms"]) for x in run.res["models"]])
    win = (t >= run.lo) & (t < run.hi) & (st != NOT_SENT)
    j = win & (tr.req_row >= 0)
    rows = tr.req_row[j]
    b = tr.wb[tr.row_batch[rows]]
    t0 = tr.t0_ns
    sched = t0 + np.round(t[j] * 1e9)
    sent = t0 + np.round(z["sent"][j] * 1e9)
    done = t0 + np.round(z["done"][j] * 1e9)
    q = tr.wr[rows, 3]
    within = (st[j] == _OK) & ((z["done"][j] - t[j]) * 1e3 <= slo[m[j]])
    segs = {
        "scheduled -> sent (load generator)": (sent - sched) / 1e6,
        "sent -> queued in the worker": (q - sent) / 1e6,
        "queued -> taken": (b[:, 4] - q) / 1e6,
        "taken -> runner": (b[:, 5] - b[:, 4]) / 1e6,
        "runner": (b[:, 6] - b[:, 5]) / 1e6,
        "runner -> replies sent": (b[:, 7] - b[:, 6]) / 1e6,
        "replies sent -> client answer": (done - b[:, 7]) / 1e6,
    }
    ran = tr.wr[rows, 5] == 1
    miss = ~within
    out = [
        f"# latency decomposition, phase 1 ({run.path.name}; worker trace joined to "
        f"{int(j.sum())} of {int(win.sum())} requests; ms)",
        "",
        "| segment | p50 | p99 | misses: p50 | misses: p99 |",
        "|---|---|---|---|---|",
    ]
    for name, v in segs.items():
        sel = ran if "runner" in name or "answer" in name else np.ones(len(v), bool)
        a, mm = v[sel], v[sel & miss]
        fm = f"{np.percentile(mm, 50):.2f} | {np.percentile(mm, 99):.2f}" if len(mm) else "- | -"
        out.append(f"| {name} | {np.percentile(a, 50):.2f} | {np.percentile(a, 99):.2f} | {fm} |")
    lag_miss = (sent - sched)[miss] / 1e6
    slo_miss = slo[m[j]][miss]
    out += [
        "",
        f"misses {int(miss.sum())} of {len(miss)} joined; of them"
        f" {int((lag_miss >= slo_miss).sum())}"
        f" reached the runtime with their deadline already past (lag >= SLO) and"
        f" {int((lag_miss >= 0.5 * slo_miss).sum())} with lag >= SLO / 2",
        "",
    ]
    return out


# ---------------------------------------------------------------------- comparison
MODES = ("auto", "scheduled", "sent", "queued")


def resolve_mode(run: Run, mode: str) -> str:
    """``auto``: ``queued`` when the run recorded the workers' trace, else ``scheduled``."""
    if mode == "auto":
        return "queued" if load_trace(run) is not None else "scheduled"
    return mode


def _rel(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or a == 0:
        return None
    return (b - a) / a


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def _stats(
    names: list[str], model: np.ndarray, lat_ms: np.ndarray, ok: np.ndarray, slo: np.ndarray
) -> dict[str, tuple[float, float, int]]:
    """Per model and overall: p99 of the answered requests' latency (serve_gpu.py's
    percentile), attainment, requests."""
    within = ok & (lat_ms <= slo[model])
    out = {}
    for i, n in enumerate([*names, "all"]):
        k = model == i if n != "all" else np.ones(len(model), bool)
        good = k & ok
        p99 = (
            float(np.percentile(lat_ms[good], 99, method="inverted_cdf"))
            if good.any()
            else math.nan
        )
        out[n] = (p99, float(within[k].mean()) if k.any() else math.nan, int(k.sum()))
    return out


def replay_input(run: Run, mode: str, host: HostCosts, tail_s: float = 0.25) -> dict[str, Any]:
    """The requests of a replay, one row each: model, where latency counts from (``start``,
    s), deadline (s), the GPU's answer (s, NaN when none) and whether it was OK, whether the
    simulator is fed it (everything sent before the end of the phase-1 window + ``tail_s``:
    those compete with the window's last requests) and whether it counts (phase 1).

    ``scheduled``: at its scheduled arrival, deadline arrival + SLO, answer at the client (the
    end-to-end view: the load generator's lag is not modelled). ``sent``: from the time the
    load generator called ``Runtime.submit``, with the deadline the runtime was given
    (scheduled arrival + SLO), answer at the client. ``queued`` (needs the workers' trace;
    one row per request a worker queued): from its time of queueing in the worker less the
    modelled transport (``HostCosts.request_delay_ms``: the simulator queues it at the
    measured time), with the deadline the worker had, answered when its batch's replies were
    sent + the modelled ``reply_ms``; no client process on either side."""
    z = run.npz
    slo = np.asarray([float(x["slo_ms"]) for x in run.res["models"]])
    if mode == "queued":
        tr = load_trace(run)
        if tr is None:
            raise SystemExit(f"{run.path}: --arrivals queued needs the workers' trace")
        keep = tr.row_model >= 0
        m = tr.row_model[keep]
        wr = tr.wr[keep]
        pre = np.asarray([host.request_delay_ms(p.profile) for p in run.problem.models])
        start = (wr[:, 3] - tr.t0_ns) / 1e9 - pre[m] / 1e3
        deadline = (wr[:, 2] - tr.t0_ns) / 1e9
        b = tr.wb[tr.row_batch[keep]]
        ok = (wr[:, 5] == 1) & (b[:, 3] > 0)
        end = np.where(ok, (b[:, 7] - tr.t0_ns) / 1e9 + host.reply_delay_ms() / 1e3, np.nan)
        sched = tr.row_arrival_s[keep]
        not_sent = int(((z["t_sched"] >= run.lo) & (z["t_sched"] < run.hi)).sum()) - int(
            ((sched >= run.lo) & (sched < run.hi)).sum()
        )
    else:
        t, m, st = z["t_sched"], z["model"].astype(np.int64), z["status"]
        sent = st != NOT_SENT
        t, m, st = t[sent], m[sent], st[sent]
        sched = t
        start = z["sent"][sent] if mode == "sent" else t
        deadline = t + slo[m] / 1e3
        ok = st == _OK
        end = z["done"][sent]
        not_sent = int(((z["t_sched"] >= run.lo) & (z["t_sched"] < run.hi) & ~sent).sum())
    counted = (sched >= run.lo) & (sched < run.hi)
    fed = sched < run.hi + tail_s
    return {
        "model": m,
        "start": start,
        "deadline": deadline,
        "end": end,
        "ok": ok,
        "fed": fed,
        "counted": counted,
        "slo": slo,
        "not_sent": not_sent,
        "expired": int((counted & (deadline <= start)).sum()) if mode != "scheduled" else 0,
    }


def gpu_stats(
    run: Run, mode: str, host: HostCosts, inp: dict[str, Any] | None = None
) -> dict[str, tuple[float, float, int]]:
    """The GPU side of a comparison: per model and ``all``, (p99 ms of the answered requests,
    SLO attainment, requests) of the phase-1 requests, latency counted from ``mode``'s point
    (:func:`replay_input`; ``inp``: its result when already made)."""
    inp = inp if inp is not None else replay_input(run, mode, host)
    m, c = inp["model"], inp["counted"]
    lat_gpu = (inp["end"] - inp["start"]) * 1e3
    return _stats(run.names, m[c], lat_gpu[c], inp["ok"][c], inp["slo"])


def compare(
    run: Run,
    host: HostCosts,
    seeds: int,
    mode: str = "scheduled",
    interference: str = "busy",
    runtime_noise: str | Path | None = None,
) -> tuple[list[dict[str, Any]], float, dict[str, Any]]:
    """Per model and overall: GPU and simulated p99 (answered requests) and attainment, both
    with latency counted from the same point (``mode``, see :func:`replay_input`). Noise:
    the profile's lognormal, or with ``runtime_noise`` (a file of
    :func:`fit_runtime_noise`'s factors) the runtime's measured factors."""
    inp = replay_input(run, mode, host)
    names, slo = run.names, inp["slo"]
    m, c = inp["model"], inp["counted"]
    gpu = gpu_stats(run, mode, host, inp)
    arrivals, deadlines, index = {}, {}, {}
    for i, n in enumerate(names):
        idx = np.flatnonzero(inp["fed"] & (m == i))
        idx = idx[np.argsort(inp["start"][idx], kind="stable")]
        arrivals[n] = inp["start"][idx].astype(np.float64)
        deadlines[n] = inp["deadline"][idx].astype(np.float64)
        index[n] = idx
    last = max(float(a.max()) for a in arrivals.values() if len(a))
    opts = SimOptions(
        duration_s=last + 1e-3,
        warmup_s=0.0,
        host=host,
        interference=interference,
        noise="runtime" if runtime_noise else "profile",
        runtime_noise=str(runtime_noise) if runtime_noise else None,
    )
    noise = noise_for(opts, default_profiles_path())
    per: dict[str, list[tuple[float, float]]] = {n: [] for n in [*names, "all"]}
    for seed in range(seeds):
        res, _ = simulate(
            run.problem,
            get_policy("stgs"),
            arrivals,
            run.rates,
            opts,
            seed=seed,
            noise=noise,
            plan=run.plan,
            deadlines=None if mode == "scheduled" else deadlines,
        )
        # back to the replay's rows: model + position in that model's input
        row = np.empty(len(res.model), dtype=np.int64)
        for i, n in enumerate(names):
            k = res.model == i
            row[k] = index[n][res.source_index[k]]
        keep = c[row]
        st = _stats(
            names,
            res.model[keep],
            (res.finish_ms - res.arrival_ms)[keep],
            res.status[keep] == SIM_OK,
            slo,
        )
        for n in per:
            per[n].append(st[n][:2])
    rows = []
    worst = 0.0
    for n in [*names, "all"]:
        gp99, gatt, cnt = gpu[n]
        sp99 = float(np.mean([x for x, _ in per[n]]))
        satt = float(np.mean([y for _, y in per[n]]))
        dp, da = _rel(gp99, sp99), _rel(gatt, satt)
        worst = max([worst, *(abs(x) for x in (dp, da) if x is not None)])
        rows.append(
            {
                "model": n,
                "requests": cnt,
                "gpu_p99_ms": round(gp99, 3),
                "sim_p99_ms": round(sp99, 3),
                "p99_diff": dp,
                "gpu_attainment": round(gatt, 5),
                "sim_attainment": round(satt, 5),
                "attainment_diff": da,
            }
        )
    info = {
        "mode": mode,
        "noise": f"runtime ({runtime_noise})" if runtime_noise else "profile",
        "requests": int(c.sum()),
        "not_sent": inp["not_sent"],
        "expired_on_arrival": inp["expired"],
    }
    return rows, worst, info


def print_table(
    run: Run, rows: list[dict[str, Any]], worst: float, seeds: int, how: str, info: dict[str, Any]
) -> None:
    z = run.npz
    t, st = z["t_sched"], z["status"]
    win = (t >= run.lo) & (t < run.hi) & (st != NOT_SENT)
    lag = (z["sent"][win] - t[win]) * 1e3
    frm = {
        "scheduled": "scheduled arrival to the client's answer (end to end: the load"
        " generator's lag included)",
        "sent": "the send (Runtime.submit) to the client's answer; the runtime's deadlines",
        "queued": "the worker's queue less the modelled transport to the batch's replies +"
        " the modelled reply; the worker's deadlines",
    }[info["mode"]]
    print(f"# fidelity: {run.res.get('device')} run of {run.res.get('date')} vs the simulator")
    print(f"# {run.path}: phase 1 window {run.lo:g}-{run.hi:g} s, {seeds} simulator seeds (mean)")
    print(f"# latency counted from {frm}")
    print(
        f"# load generator lag (sent - scheduled) p50 {np.percentile(lag, 50):.2f} ms, p99 "
        f"{np.percentile(lag, 99):.2f} ms; requests counted {info['requests']}, never sent"
        f" (or, queued: never queued in a worker) {info['not_sent']}"
        + (
            f"; reached the runtime with the deadline already past: {info['expired_on_arrival']}"
            f" ({info['expired_on_arrival'] / max(info['requests'], 1):.2%}, misses on both"
            " sides)"
            if info["mode"] != "scheduled"
            else ""
        )
    )
    tr = load_trace(run)
    if tr is not None:
        rows_w = tr.row_arrival_s
        in_win = (rows_w >= run.lo) & (rows_w < run.hi) & (tr.row_model >= 0)
        print(
            f"# worker trace: {int(in_win.sum())} requests of the window queued in a worker, "
            f"{int(win.sum())} sent (the rest never reached a worker queue)"
        )
    print(f"# host costs: {how}; noise {info.get('noise', 'profile')}\n")
    print("| model | GPU p99 ms | sim p99 ms | diff | GPU attainment | sim attainment | diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['gpu_p99_ms']:.3f} | {r['sim_p99_ms']:.3f} |"
            f" {_fmt(r['p99_diff'])} | {r['gpu_attainment']:.5f} | {r['sim_attainment']:.5f} |"
            f" {_fmt(r['attainment_diff'])} |"
        )
    verdict = "met" if worst <= TARGET else "NOT met"
    print(f"\nlargest relative difference: {worst:.1%} (target <= {TARGET:.0%}: {verdict})\n")


# ---------------------------------------------------------------------- calibration
class _ScaledLatency:
    """A latency function whose curves on some partitions are scaled (the calibration): per
    (partition kind, SMs, bucket) where it was measured, else per (kind, SMs), else 1."""

    def __init__(self, inner: Any, scales: dict[tuple[Any, ...], float]) -> None:
        self._inner = inner
        self._scales = scales  # (kind, SMs) or (kind, SMs, bucket) -> factor

    def latency_curve(self, batches: Any, sm_count: float, **kw: Any) -> np.ndarray:
        out = np.asarray(self._inner.latency_curve(batches, sm_count, **kw), dtype=np.float64)
        kind, sms = str(kw.get("kind")), round(sm_count)
        f = self._scales.get((kind, sms), 1.0)
        bs = np.atleast_1d(np.asarray(batches, dtype=np.float64))
        fs = np.asarray([self._scales.get((kind, sms, round(x)), f) for x in bs])
        return out * (fs if np.ndim(out) else fs[0])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


CALIBRATE_BY = ("partition", "bucket")
CAL_MIN = 50  # batches behind a factor


def batch_ratios(runs: list[Run]) -> list[dict[str, Any]]:
    """Per (run, model, partition) of the runs' traces, per phase-1 batch: the runtime's GPU
    time over the profile's prediction, ``(runner - copies) / (profile x interference)``, the
    copies ``a + b x n x MB`` fitted on the same traces (:func:`fit_host_trace`); with the
    batch's captured bucket."""
    _, info = fit_host_trace(runs)
    a = float(info["runner_copy_ms"]["per_batch"])
    b = float(info["runner_copy_ms"]["per_mb"])
    out = []
    for run in runs:
        tr = load_trace(run)
        assert tr is not None  # fit_host_trace raised otherwise
        by_model = {m.name: part for part in plan_parts(run).values() for m in part.models}
        for d in trace_batches(run, tr):
            part = by_model[d["model"]]
            gpu = d["solo_ms"] * (1.0 + d["gamma"] * d["busy_pct"] / 100.0)
            r = (d["run_ms"] - (a + b * d["n"] * d["mb"])) / gpu
            ok = np.isfinite(r)
            out.append(
                {
                    "run": run.path.stem,
                    "model": str(d["model"]),
                    "profile": str(d["profile"]),
                    "kind": str(part.kind),
                    "sms": int(part.sm_count),
                    "bucket": d["bucket"][ok],
                    "ratio": r[ok],
                }
            )
    return out


def calibration(runs: list[Run], by: str = "partition") -> dict[tuple[Any, ...], tuple[float, int]]:
    """Per (model, partition kind, SMs) seen in the runs' traces: the factor that makes the
    profile's GPU latency match the runtime's, the median of :func:`batch_ratios` over the
    phase-1 batches, and the number of batches behind it; ``by="bucket"`` adds a factor per
    (model, kind, SMs, captured bucket) with at least 50 batches (the others keep their
    partition's).

    The profiles were measured by the profiler, alone, on one machine; the runtime runs the
    same graphs inside its worker, maybe on another machine of the same kind. A simulator
    calibrated on one GPU run predicts another run of the same partitions."""
    if by not in CALIBRATE_BY:
        raise ValueError(f"calibrate by {by!r}: one of {', '.join(CALIBRATE_BY)}")
    ratios: dict[tuple[Any, ...], list[np.ndarray]] = {}
    for d in batch_ratios(runs):
        key = (d["model"], d["kind"], d["sms"])
        ratios.setdefault(key, []).append(d["ratio"])
        if by == "bucket":
            for bk in np.unique(d["bucket"]):
                ratios.setdefault((*key, int(bk)), []).append(d["ratio"][d["bucket"] == bk])
    out: dict[tuple[Any, ...], tuple[float, int]] = {}
    for key, rs in ratios.items():
        r = np.concatenate(rs)
        if len(r) >= CAL_MIN:
            out[key] = (float(np.median(r)), len(r))
    return out


def apply_calibration(run: Run, cal: dict[tuple[Any, ...], tuple[float, int]]) -> int:
    """Scale ``run``'s latency functions by ``cal`` (its problem's curve cache is new: nothing
    was planned on it). Returns how many (model, partition[, bucket]) factors applied."""
    by_profile: dict[str, dict[tuple[Any, ...], float]] = {}
    for (model, *where), (f, _) in cal.items():
        if model in run.names:
            prof = run.problem.models[run.names.index(model)].profile
            by_profile.setdefault(prof, {})[tuple(where)] = f
    sku = run.plan.gpus[0].sku
    latency = run.problem.latency
    for prof, scales in by_profile.items():
        latency[(sku, prof)] = _ScaledLatency(latency[(sku, prof)], scales)  # type: ignore[assignment]
    return sum(len(v) for v in by_profile.values())


# ---------------------------------------------------------------------- runtime noise
NOISE_GROUP_MIN = 20  # batches of a (model, partition, bucket) for its own median


def fit_runtime_noise(
    runs: list[Run], k: int = 1000
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """The runtime's per-batch latency factors (partitioner/sim/noise.py), per profile and
    pooled (``"*"``): :func:`batch_ratios`, each (run, model, partition, bucket) group with at
    least 20 batches divided by its median (the rest: by their partition's), as ``k``
    quantiles. Also, per profile, the spread (p99 / median and p90 / median of the factors)
    and the batches behind it."""
    per: dict[str, list[np.ndarray]] = {}
    for d in batch_ratios(runs):
        r, bk = d["ratio"], d["bucket"]
        if not len(r):
            continue
        norm = np.empty_like(r)
        med_all = float(np.median(r))
        for b in np.unique(bk):
            k_ = bk == b
            norm[k_] = r[k_] / (float(np.median(r[k_])) if k_.sum() >= NOISE_GROUP_MIN else med_all)
        per.setdefault(d["profile"], []).append(norm[norm > 0])
    if not per:
        raise SystemExit("no batches in the runs' traces to fit the runtime noise on")
    pooled = {p: np.concatenate(v) for p, v in per.items()}
    pooled[FALLBACK] = np.concatenate(list(pooled.values()))
    factors = {p: quantiles(v.tolist(), k) for p, v in pooled.items()}
    info = {
        p: {
            "batches": len(v),
            "p90_over_median": round(float(np.percentile(v, 90) / np.median(v)), 4),
            "p99_over_median": round(float(np.percentile(v, 99) / np.median(v)), 4),
        }
        for p, v in pooled.items()
    }
    return factors, info
