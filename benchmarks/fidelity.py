"""Simulator fidelity: the same plan and the same arrivals, on the GPU and in the simulator.

    python benchmarks/fidelity.py SERVE_GPU.json [--npz SERVE_GPU.npz] [--seeds 3]

Input: what `benchmarks/serve_gpu.py` wrote after a run on a lent GPU (its JSON summary and the
.npz of every request: scheduled arrival time and model). The simulator replays phase 1 of that
run: plan 1, the very same arrival times (warm-up included, not counted), with the latency
functions and noise of the shipped profiles, the runtime's router, executor and deadline rule.
Prints, per model, p99 latency of the answered requests and SLO attainment from both, and the
relative differences (issue #6's target: within 10%).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from partitioner.policies import get_policy
from partitioner.problem import Problem
from partitioner.sim.config import SimOptions
from partitioner.sim.run import fit_noise, simulate
from stgs.plan import Plan
from stgs.profiles import default_profiles_path
from stgs.scenario import scenario_from_mapping


def _rel(a: float | None, b: float | None) -> str:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or a == 0:
        return "-"
    return f"{(b - a) / a:+.1%}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("summary", help="serve_gpu.py's JSON summary")
    ap.add_argument("--npz", help="its per-request arrays (default: beside the JSON)")
    ap.add_argument("--seeds", type=int, default=3, help="simulator noise seeds to average")
    ap.add_argument("--sku", default="H100-80GB", help="the GPU the plan was made for")
    args = ap.parse_args()

    res: dict[str, Any] = json.loads(Path(args.summary).read_text())
    npz = np.load(args.npz or Path(args.summary).with_suffix(".npz"))
    models = res["models"]
    win = res["windows"]["phase1"]
    lo, hi = float(win["from_s"]), float(win["to_s"])
    names = [m["name"] for m in models]
    t_sched, m_idx = npz["t_sched"], npz["model"]
    arrivals = {
        n: np.sort(t_sched[(m_idx == i) & (t_sched < hi)]).astype(np.float64)
        for i, n in enumerate(names)
    }
    scale = float(res.get("load_scale") or 1.0)
    rates = {m["name"]: float(m["rate_rps"]) * scale for m in models}
    headroom = float(res.get("args", {}).get("headroom", 0.1))
    sc = scenario_from_mapping(
        {
            "gpus": [{"sku": args.sku, "count": 1, "mig": False}],
            "headroom": headroom,
            "models": [
                {"name": m["name"], "slo_ms": m["slo_ms"], "rate_rps": rates[m["name"]]}
                for m in models
            ],
        }
    )
    prob = Problem.from_scenario(sc)
    plan = Plan.from_dict(res["plan1"])
    opts = SimOptions(duration_s=hi, warmup_s=lo)
    noise = fit_noise(default_profiles_path(), opts.default_sigma)
    per: dict[str, list[tuple[float, float]]] = {n: [] for n in [*names, "all"]}
    for seed in range(args.seeds):
        _, met = simulate(
            prob, get_policy("stgs"), arrivals, rates, opts, seed=seed, noise=noise, plan=plan
        )
        for n in names:
            pm = met.per_model[n]
            per[n].append((float(pm["p99_ms"]), float(pm["slo_attainment"])))
        per["all"].append((float(met.summary["p99_ms"]), float(met.summary["slo_attainment"])))

    print(f"# fidelity: {res.get('device')} run of {res.get('date')} vs the simulator")
    print(f"# phase 1 window {lo:g}-{hi:g} s, {args.seeds} simulator seeds (mean)\n")
    print("| model | GPU p99 ms | sim p99 ms | diff | GPU attainment | sim attainment | diff |")
    print("|---|---|---|---|---|---|---|")
    rows = {r["model"]: r for r in win["rows"]}
    worst = 0.0
    for n in [*names, "all"]:
        r = rows[n]
        gp99 = r.get("p99_ok_ms")
        gatt = r.get("attainment")
        sp99 = float(np.mean([x for x, _ in per[n]]))
        satt = float(np.mean([y for _, y in per[n]]))
        if gp99:
            worst = max(worst, abs(sp99 - gp99) / gp99)
        if gatt:
            worst = max(worst, abs(satt - gatt) / gatt)
        print(
            f"| {n} | {gp99} | {sp99:.3f} | {_rel(gp99, sp99)} | {gatt} | {satt:.5f} |"
            f" {_rel(gatt, satt)} |"
        )
    print(f"\nlargest relative difference: {worst:.1%} (target <= 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
