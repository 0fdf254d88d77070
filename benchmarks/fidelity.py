"""Simulator fidelity: the same plan and the same arrivals, on the GPU and in the simulator.

    python benchmarks/fidelity.py RUN.json [RUN2.json ...] [--seeds 3] [--host default|off|fit|F]
    python benchmarks/fidelity.py --fit RUN.json [RUN2.json ...] [--exclude MODEL]

Input: what `benchmarks/serve_gpu.py` wrote after a run on a lent GPU (its JSON summary and the
.npz of every request: scheduled arrival, send and answer times, model, status; newer runs also
the workers' per-batch trace). The simulator replays phase 1 of each run: plan 1, the very same
arrival times (warm-up included, not counted), with the latency functions and noise of the
shipped profiles, the runtime's router, executor and deadline rule, and the host-cost model
(``SimOptions.host``). Prints, per model and overall, p99 latency of the answered requests and
SLO attainment from both, their relative differences, and the largest one against issue #6's
target (10%).

Host costs (``--host``): ``default`` the simulator's defaults (measured, docs/simulator.md),
``off`` none, ``fit`` fitted on the runs given, or a JSON file of ``HostCosts`` fields.

``--fit`` measures the host costs from the runs' client-side record alone (no worker trace
needed) and prints them as JSON:

* in the worker's loop: batches are told apart by their answers (answers of one batch arrive
  within microseconds of each other, one model at a time); a batch whose requests were all sent
  before the partition's previous batch ended ran back to back, and its duration is the time
  between the two batches' answers. Its excess over the profile's GPU latency (bucket, partition
  and MPS interference as the simulator computes it), over every back-to-back batch of the
  fitted models, is fitted (least squares over the (model, n) medians, weighted by count) as
  ``batch_ms + n x sample_ms_per_mb x MB``;
* before and after the loop: for each model, the latency of single-request batches that found
  the worker idle minus the duration of back-to-back single-request batches (both measured, no
  profile involved) is the transport around one request; fitted over the input sizes as
  ``request_ms + request_ms_per_mb x MB``.

``--exclude MODEL`` leaves a model out of the loop fit (the 2026-11-22 runs served ``bert_base``
as a torch.nn encoder, not the transformers BertModel its profile measured).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from partitioner.policies import get_policy
from partitioner.problem import Problem
from partitioner.sim.config import HostCosts, SimOptions
from partitioner.sim.engine import Simulator
from partitioner.sim.run import fit_noise, simulate
from stgs.plan import Plan
from stgs.profiles import default_profiles_path
from stgs.scenario import scenario_from_mapping

TARGET = 0.10
_OK = 1  # serve_gpu.py's status code of an answered request
_GAP_S = 0.00015  # answers of one batch arrive closer than this


@dataclass
class Run:
    path: Path
    res: dict[str, Any]
    npz: dict[str, np.ndarray]
    names: list[str]
    lo: float
    hi: float
    problem: Problem
    plan: Plan
    rates: dict[str, float]

    def arrivals(self) -> dict[str, np.ndarray]:
        t, m = self.npz["t_sched"], self.npz["model"]
        return {
            n: np.sort(t[(m == i) & (t < self.hi)]).astype(np.float64)
            for i, n in enumerate(self.names)
        }


def load_run(summary: str | Path, npz: str | Path | None = None, sku: str = "H100-80GB") -> Run:
    path = Path(summary)
    res: dict[str, Any] = json.loads(path.read_text())
    with np.load(npz or path.with_suffix(".npz")) as z:
        arrays = {k: z[k] for k in z.files}
    models = res["models"]
    win = res["windows"]["phase1"]
    scale = float(res.get("load_scale") or 1.0)
    rates = {m["name"]: float(m["rate_rps"]) * scale for m in models}
    sc = scenario_from_mapping(
        {
            "gpus": [{"sku": sku, "count": 1, "mig": False}],
            "headroom": float(res.get("args", {}).get("headroom", 0.1)),
            "models": [
                {"name": m["name"], "slo_ms": m["slo_ms"], "rate_rps": rates[m["name"]]}
                for m in models
            ],
        }
    )
    return Run(
        path,
        res,
        arrays,
        [m["name"] for m in models],
        float(win["from_s"]),
        float(win["to_s"]),
        Problem.from_scenario(sc),
        Plan.from_dict(res["plan1"]),
        rates,
    )


# ---------------------------------------------------------------------- host-cost fit
def gpu_latency(run: Run) -> list[tuple[list[int], list[list[float]]]]:
    """Per partition of plan 1: model indices and the simulator's GPU batch latency by n."""
    opts = SimOptions(duration_s=1.0, noise="off", host=HostCosts(enabled=False))
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


def _nnls2(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Weighted least squares y ~ a + b x with a, b >= 0."""
    sw = np.sqrt(w)
    best: tuple[float, float, float] | None = None
    cands = []
    a_mat = np.c_[np.ones_like(x), x] * sw[:, None]
    sol, *_ = np.linalg.lstsq(a_mat, y * sw, rcond=None)
    cands.append((float(sol[0]), float(sol[1])))
    cands.append((float(np.average(y, weights=w)), 0.0))  # b = 0
    bx = float(np.sum(w * x * y) / np.sum(w * x * x)) if np.any(x) else 0.0
    cands.append((0.0, bx))  # a = 0
    for a, b in cands:
        if a < 0 or b < 0:
            continue
        err = float(np.sum(w * (y - a - b * x) ** 2))
        if best is None or err < best[2]:
            best = (a, b, err)
    return (best[0], best[1]) if best else (0.0, 0.0)


def fit_host(runs: list[Run], exclude: set[str] | None = None) -> tuple[HostCosts, dict[str, Any]]:
    """Host costs from the runs' client-side records (see the module docstring)."""
    loop_pts, around = _median_points(runs, set(exclude or ()))
    if not loop_pts:
        raise SystemExit("no back-to-back batches to fit the loop's host cost on")
    arr = np.asarray(loop_pts, dtype=np.float64)
    batch_ms, per_mb = _nnls2(arr[:, 0], arr[:, 2], arr[:, 3])
    host = HostCosts()
    pts = [(host.mb(p), v) for p, vs in around.items() for v in vs]
    if pts:
        xs = np.asarray([p[0] for p in pts])
        ys = np.asarray([p[1] for p in pts])
        req_ms, req_per_mb = _nnls2(xs, ys, np.ones_like(xs))
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
def trace_summary(run: Run) -> list[str]:
    """Medians from the workers' per-batch trace (serve_gpu.py runs that recorded one): the
    host time in the worker's loop measured directly (runner time - the profile's GPU latency,
    replies) and the time from arrival to the worker's queue."""
    z = run.npz
    if "wb" not in z or "t0_ns" not in z:
        return []
    t0 = int(z["t0_ns"])
    wb, wr = z["wb"], z["wr"]  # columns: worker, then TRACE_BATCH / TRACE_REQUEST
    parts = json.loads(str(z["w_parts"]))
    plan_parts = {tuple(run.names[i] for i in mids): lat for mids, lat in gpu_latency(run)}
    slo = {m["name"]: float(m["slo_ms"]) for m in run.res["models"]}
    out = [
        f"# worker trace, phase 1 ({run.path.name}; medians, ms)",
        "",
        "| model | batches | mean n | run - GPU profile | replies | arrival to queue |",
        "|---|---|---|---|---|---|",
    ]
    for pi, part in enumerate(parts):
        lat = plan_parts.get(tuple(part["models"]))
        if lat is None:  # a plan-2 worker, or stand-ins
            continue
        for slot, name in enumerate(part["models"]):
            b = wb[(wb[:, 0] == pi) & (wb[:, 1] == slot) & (wb[:, 3] > 0)]
            t_b = (b[:, 4] - t0) / 1e9
            b = b[(t_b >= run.lo) & (t_b < run.hi)]
            r = wr[(wr[:, 0] == pi) & (wr[:, 1] == slot)]
            arrival_ns = r[:, 2] - int(slo[name] * 1e6)
            t_r = (arrival_ns - t0) / 1e9
            r, arrival_ns = (
                r[(t_r >= run.lo) & (t_r < run.hi)],
                arrival_ns[(t_r >= run.lo) & (t_r < run.hi)],
            )
            if not len(b):
                continue
            gpu = np.asarray(lat[slot])[b[:, 3]]
            excess = np.median((b[:, 6] - b[:, 5]) / 1e6 - gpu)
            rep = np.median(b[:, 7] - b[:, 6]) / 1e6
            queued = np.median(r[:, 3] - arrival_ns) / 1e6 if len(r) else math.nan
            out.append(
                f"| {name} | {len(b)} | {np.mean(b[:, 3]):.2f} | {excess:+.3f} | {rep:.3f} |"
                f" {queued:.3f} |"
            )
    return [*out, ""]


# ---------------------------------------------------------------------- comparison
def _rel(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or a == 0:
        return None
    return (b - a) / a


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def compare(run: Run, host: HostCosts, seeds: int) -> tuple[list[dict[str, Any]], float]:
    """Per model and overall: GPU and simulated p99 (answered requests) and attainment."""
    opts = SimOptions(duration_s=run.hi, warmup_s=run.lo, host=host)
    noise = fit_noise(default_profiles_path(), opts.default_sigma)
    names = run.names
    per: dict[str, list[tuple[float, float]]] = {n: [] for n in [*names, "all"]}
    for seed in range(seeds):
        _, met = simulate(
            run.problem,
            get_policy("stgs"),
            run.arrivals(),
            run.rates,
            opts,
            seed=seed,
            noise=noise,
            plan=run.plan,
        )
        for n in names:
            pm = met.per_model[n]
            per[n].append((float(pm["p99_ms"]), float(pm["slo_attainment"])))
        per["all"].append((float(met.summary["p99_ms"]), float(met.summary["slo_attainment"])))
    rows_gpu = {r["model"]: r for r in run.res["windows"]["phase1"]["rows"]}
    rows = []
    worst = 0.0
    for n in [*names, "all"]:
        g = rows_gpu[n]
        gp99, gatt = g.get("p99_ok_ms"), g.get("attainment")
        sp99 = float(np.mean([x for x, _ in per[n]]))
        satt = float(np.mean([y for _, y in per[n]]))
        dp, da = _rel(gp99, sp99), _rel(gatt, satt)
        worst = max([worst, *(abs(x) for x in (dp, da) if x is not None)])
        rows.append(
            {
                "model": n,
                "gpu_p99_ms": gp99,
                "sim_p99_ms": round(sp99, 3),
                "p99_diff": dp,
                "gpu_attainment": gatt,
                "sim_attainment": round(satt, 5),
                "attainment_diff": da,
            }
        )
    return rows, worst


def print_table(run: Run, rows: list[dict[str, Any]], worst: float, seeds: int, how: str) -> None:
    print(f"# fidelity: {run.res.get('device')} run of {run.res.get('date')} vs the simulator")
    print(f"# {run.path}: phase 1 window {run.lo:g}-{run.hi:g} s, {seeds} simulator seeds (mean)")
    print(f"# host costs: {how}\n")
    print("| model | GPU p99 ms | sim p99 ms | diff | GPU attainment | sim attainment | diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['gpu_p99_ms']} | {r['sim_p99_ms']:.3f} | {_fmt(r['p99_diff'])}"
            f" | {r['gpu_attainment']} | {r['sim_attainment']:.5f} | {_fmt(r['attainment_diff'])} |"
        )
    verdict = "met" if worst <= TARGET else "NOT met"
    print(f"\nlargest relative difference: {worst:.1%} (target <= {TARGET:.0%}: {verdict})\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("summary", nargs="+", help="serve_gpu.py's JSON summaries")
    ap.add_argument("--npz", help="per-request arrays of a single run (default: beside the JSON)")
    ap.add_argument("--seeds", type=int, default=3, help="simulator noise seeds to average")
    ap.add_argument("--sku", default="H100-80GB", help="the GPU the plan was made for")
    ap.add_argument("--host", default="default", help="default | off | fit | HostCosts JSON file")
    ap.add_argument("--fit", action="store_true", help="only fit and print the host costs")
    ap.add_argument("--exclude", action="append", default=[], help="model left out of the fit")
    ap.add_argument("--json", help="write the comparison rows here")
    args = ap.parse_args(argv)
    if args.npz and len(args.summary) > 1:
        ap.error("--npz goes with a single run")
    runs = [load_run(s, args.npz, args.sku) for s in args.summary]
    if args.fit or args.host == "fit":
        host, info = fit_host(runs, set(args.exclude))
        if args.fit:
            print(json.dumps({"host": host.model_dump(exclude={"input_mb"}), **info}, indent=1))
            return 0
        how = f"fitted on these runs: {host.model_dump(exclude={'input_mb'})}"
    elif args.host == "default":
        host = HostCosts()
        how = f"simulator defaults {host.model_dump(exclude={'input_mb'})}"
    elif args.host == "off":
        host = HostCosts(enabled=False)
        how = "off"
    else:
        host = HostCosts(**json.loads(Path(args.host).read_text()))
        how = f"{args.host}: {host.model_dump(exclude={'input_mb'})}"
    out = {}
    worst_all = 0.0
    for run in runs:
        rows, worst = compare(run, host, args.seeds)
        print_table(run, rows, worst, args.seeds, how)
        for line in trace_summary(run):
            print(line)
        out[str(run.path)] = {"rows": rows, "largest_diff": worst}
        worst_all = max(worst_all, worst)
    if len(runs) > 1:
        verdict = "met" if worst_all <= TARGET else "NOT met"
        print(f"all runs: largest relative difference {worst_all:.1%} ({verdict})")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host.model_dump(), "runs": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
