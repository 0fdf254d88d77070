"""Solve time of spare capacity: one `stgs` plan lean (spare_factor 1), at 1.5x and "fill".

    python -m benchmarks.spare_time [--large] [--repeat N]

Cases: the shipped example scenario (stgs/data/example-scenario.yaml) at its rates,
examples/compare-zoo.yaml's scenario (2 H100s) at 1, 2 and 2.75x its rates, then
benchmarks/planner.py's measured (H100) scenarios (--quick) and its solve-time cases (10 models
on 4 GPUs, 50 on 16; --large adds 500 on 64), each scaled to planner.py's LOAD (0.5) x its
classic fluid bound (some stay infeasible: no spare capacity applies there).
Prints a markdown table of what this run measured (median of --repeat plans, curves cached by
a first plan, as in a daemon that re-plans): GPUs used, the factor each plan carries, ms; and
fill's incremental re-plan at 1.25x the rates (held: the current plan kept as it is, its
room allowing; else planned anew: fresh fill search, keep and repair).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import yaml

from benchmarks.lib.cases import LOAD, measured_scenarios, timing_case
from partitioner.fluid import fluid_bound
from partitioner.policies import get_policy
from partitioner.policies.stgs_policy import hold_plan
from partitioner.problem import Problem
from stgs.scenario import load_scenario, scenario_from_mapping

SKU = "H100-80GB"  # planner.py's default measured set
RISE = 1.25  # a re-plan's rates: x this (out of the controller's default band, 1 + 0.2)
MODES: tuple[float | str, ...] = (1.0, 1.5, "fill")


def _at_load(prob: Problem) -> Problem:
    k = LOAD * fluid_bound(prob, rate_aware=False)
    return prob.with_models([m.scaled(k) for m in prob.models])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true", help="also 500 models on 64 GPUs")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    cases: list[tuple[str, Problem]] = [
        (
            "example-scenario",
            Problem.from_scenario(load_scenario(root / "stgs/data/example-scenario.yaml")),
        )
    ]
    zoo = yaml.safe_load((root / "examples/compare-zoo.yaml").read_text(encoding="utf-8"))
    zoo_prob = Problem.from_scenario(scenario_from_mapping(zoo["scenario"]))
    for k in (1, 2, 2.75):
        cases.append(
            (f"compare-zoo x{k}", zoo_prob.with_models([m.scaled(k) for m in zoo_prob.models]))
        )
    for c in measured_scenarios(True, SKU, None):
        cases.append((c.name, _at_load(Problem.from_scenario(scenario_from_mapping(c.data)))))
    for n_models, n_gpus in [(10, 4), (50, 16)] + ([(500, 64)] if args.large else []):
        prob = timing_case(n_models, n_gpus, n_models, SKU)
        cases.append((f"timing-{n_models}m-{n_gpus}g", prob))
    print(f"python {platform.python_version()}, {platform.machine()}; median of {args.repeat}\n")
    heads = [f"spare {m}: GPUs, f, ms" for m in MODES] + [f"fill re-plan at {RISE}x: ms"]
    print("| case | models | GPUs | " + " | ".join(heads) + " |")
    print("|---|---|---|" + "---|" * len(heads))
    pol = get_policy("stgs")
    for name, prob in cases:
        cells = []
        for mode in MODES:
            p = prob.with_options(spare_factor=mode)
            plan = pol.plan(p)  # fills the curve cache
            ts = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                plan = pol.plan(p)
                ts.append((time.perf_counter() - t0) * 1000)
            f = plan.info.get("spare_factor", 1.0) if plan.feasible else "-"
            used = plan.gpus_used if plan.feasible else "infeasible"
            cells.append(f"{used}, {f}, {statistics.median(ts):.0f}")
            if mode == "fill":
                # the controller's re-plan after a rise out of its band (hysteresis 0.2)
                up = p.with_models([m.scaled(RISE) for m in p.models])
                ts = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    again = pol.plan(up, plan)
                    ts.append((time.perf_counter() - t0) * 1000)
                how = "held" if hold_plan(up, plan) is not None else "planned anew"
                how += "" if again.feasible else " (infeasible)"
                cells.append(f"{how}, {statistics.median(ts):.0f}" if plan.feasible else "-")
        print(f"| {name} | {len(prob.models)} | {len(prob.gpus)} | " + " | ".join(cells) + " |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
