"""Planner benchmark: peak load factor k per policy against the fluid bound, gap to the exact
optimum on small instances, and solve times.

    python -m benchmarks.planner [--quick] [--json OUT.json] [--option KEY=VALUE ...]
        [--simulate SECONDS]
    python -m benchmarks.planner --margins [--quick] [--seed N] [--simulate SECONDS]
        [--routing worker|model] [--weights FILE] [--json OUT.json]

Scenarios: a mixed model zoo on 1 to 16 GPUs (MIG and non-MIG), rates 10 to 5000 rps, SLOs 10 to
200 ms, on the profiles shipped in the package. Prints tables; numbers are what this run measured.
``--option KEY=VALUE`` sets a planner option (``stgs.scenario.PlannerOptions``) on every
scenario, e.g. the host costs or ``extrapolation_margin`` of another day; ``--simulate S``
also simulates each scenario's stgs plan at its peak for S seconds (Poisson arrivals, the
profiles' noise, the simulator's host costs from the measured file, seed 0) and prints its
SLO attainment.

``--margins`` (issue 17): per scenario, the stgs peak with the former margins (``batch_margin:
z``, z = 1; every MPS neighbour weighing 1) and with the new ones (``batch_margin: slo``, the
neighbour weights of ``--weights``, default the shipped file), each as a fraction of the fluid
bound, and the simulator's SLO attainment at each peak (``--simulate`` seconds, default 10;
Poisson, seed 0; overall and the least model's, since the SLO is per model), with batches at
their predicted latency and at the planned one (x 1 + headroom: the headroom spent, a stress
test). ``--routing``: the simulator's routing (default the runtime's). ``--planner-inputs``:
every model simulated with the input size the planner's host costs assume (the simulator's
host costs are otherwise per model, with its own input size).
``--seed``: another draw of the scenarios (held-out mixes of the same shapes).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from benchmarks.lib.cases import (
    LOAD,
    SEED,
    geomean,
    measured_scenarios,
    scenarios,
    timing_case,
)
from partitioner.fluid import fluid_bound
from partitioner.peak import find_peak
from partitioner.policies import get_policy, policy_names
from partitioner.policies.optimal import exact_peak
from partitioner.problem import Problem
from partitioner.sim import SimOptions, WorkloadSpec, generate
from partitioner.sim.config import HostCosts
from partitioner.sim.run import noise_for, simulate
from stgs.errors import ConfigError, PlanningError
from stgs.hostcosts import PLANNER_INPUT_MB
from stgs.interference import WeightsFile, load_weights
from stgs.latency import InterferenceModel
from stgs.plan import Plan
from stgs.profiles import default_profiles_path
from stgs.scenario import PlannerOptions, scenario_from_mapping

HEURISTICS = ["stgs", "temporal", "mig-only", "mps-only"]
HOST_OPTIONS = ("host_request_ms", "host_batch_ms", "host_item_ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer scenarios, no large timing case")
    ap.add_argument("--json", help="also write the results as JSON here")
    ap.add_argument("--optimal-limit", type=float, default=60.0, help="MILP time limit (s)")
    ap.add_argument(
        "--set",
        choices=["measured", "synthetic"],
        default="measured",
        help="measured: scenarios on the GPU of the shipped measured profiles (default);"
        " synthetic: the example profiles' mix of L4, A100, H100, H200",
    )
    ap.add_argument("--sku", default="H100-80GB", help="GPU of the measured set")
    ap.add_argument("--profiles", help="profile CSV for the measured set (default: shipped)")
    ap.add_argument(
        "--host-costs",
        choices=["measured", "none"],
        default="measured",
        help="measured: the planner's default host costs (planner.host_*_ms, measured on the "
        "H100 host); none: all 0, the issue's validity rules exactly",
    )
    ap.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a planner option on every scenario (repeatable)",
    )
    ap.add_argument(
        "--simulate",
        type=float,
        default=0.0,
        metavar="S",
        help="simulate each stgs peak plan for S seconds and print its SLO attainment",
    )
    ap.add_argument(
        "--margins",
        action="store_true",
        help="the stgs peak with the former and the new batch margin and interference model",
    )
    ap.add_argument("--seed", type=int, default=SEED, help="the scenarios' draw (measured set)")
    ap.add_argument(
        "--routing",
        choices=["worker", "model"],
        default="worker",
        help="--margins: the simulator's routing (worker: the runtime's rule)",
    )
    ap.add_argument("--weights", help="--margins: neighbour weights file of the new model")
    ap.add_argument(
        "--planner-inputs",
        action="store_true",
        help="--margins: simulate every model with the input size the planner's host costs"
        " assume (an image), so that the simulator's host costs are the planner's",
    )
    args = ap.parse_args()
    if args.margins:
        if args.set != "measured" or args.option:
            ap.error("--margins plans the measured set with its own options")
        try:
            weights = load_weights(Path(args.weights) if args.weights else None)
        except ConfigError as exc:
            ap.error(str(exc))
        return margins(args, weights)
    if args.weights or args.routing != "worker" or args.planner_inputs:
        ap.error("--weights, --routing and --planner-inputs go with --margins")
    host: dict[str, object] = (
        {} if args.host_costs == "measured" else dict.fromkeys(HOST_OPTIONS, 0.0)
    )
    for kv in args.option:
        key, sep, value = kv.partition("=")
        if not sep or key not in PlannerOptions.model_fields:
            ap.error(f"--option {kv!r}: KEY=VALUE with KEY a planner option")
        host[key] = value
    try:
        checked = PlannerOptions(**host)  # type: ignore[arg-type]
    except ValueError as exc:
        ap.error(f"--option: {exc}")
    host = {k: getattr(checked, k) for k in host}  # validated values (with_options does not)

    print(
        f"# planner benchmark · {time.strftime('%Y-%m-%d')} · python {platform.python_version()}"
        f" · {platform.processor() or platform.machine()}"
    )
    pols = HEURISTICS + (["optimal"] if "optimal" in policy_names() else [])
    rows = []
    if args.set == "measured":
        cases = measured_scenarios(args.quick, args.sku, args.profiles, args.seed)
    else:
        cases = scenarios(args.quick)
        data_dir = default_profiles_path().parent
        for c in cases:
            c.data["profiles"] = str(data_dir / "example-profiles.csv")
            c.data["interference"] = str(data_dir / "example-interference.csv")
    print(f"# scenario set: {args.set}" + (f" ({args.sku})" if args.set == "measured" else ""))
    print(f"# host costs: {args.host_costs}")
    opts = checked
    print(
        f"# planner: host_request_ms {opts.host_request_ms:.4f}, host_batch_ms"
        f" {opts.host_batch_ms:.4f}, host_item_ms {opts.host_item_ms:.4f}, extrapolation_margin"
        f" {opts.extrapolation_margin}"
        + (f"; options {', '.join(args.option)}" if args.option else "")
    )
    for case in cases:
        sc = scenario_from_mapping(case.data)
        prob = Problem.from_scenario(sc)
        if host:
            prob = prob.with_options(**host)
        bound = fluid_bound(prob)
        row: dict[str, object] = {
            "bound_intf": fluid_bound(prob, interference=True),
            "bound_classic": fluid_bound(prob, rate_aware=False),
            "scenario": case.name,
            "gpus": len(prob.gpus),
            "models": len(prob.models),
            "bound": bound,
        }
        for pol in pols:
            if pol == "optimal" and not case.small:
                continue
            p2 = prob.with_options(time_limit_s=args.optimal_limit) if pol == "optimal" else prob
            t0 = time.perf_counter()
            if pol == "optimal":
                # one MILP solve at the fluid bound: the largest served fraction gives the peak
                k_opt, status = exact_peak(p2)
                row[pol] = k_opt
                row[f"{pol}_s"] = time.perf_counter() - t0
                row[f"{pol}_status"] = status
                continue
            try:
                pk = find_peak(p2, get_policy(pol))
            except PlanningError as exc:
                row[pol] = None
                row[f"{pol}_note"] = str(exc)
                continue
            row[pol] = pk.k
            row[f"{pol}_s"] = time.perf_counter() - t0
            if pol == "stgs" and args.simulate > 0 and pk.k > 0:
                row["sim_attainment"] = simulated_attainment(
                    p2, pk.k, pk.plan, args.simulate, sc.profiles or default_profiles_path()
                )
            solver = pk.plan.info.get("solver")
            if isinstance(solver, dict):
                row[f"{pol}_status"] = solver.get("status")
        rows.append(row)
        print(f"  done {case.name}", file=sys.stderr)

    hdr = [
        "scenario",
        "GPUs",
        "models",
        "fluid k*",
        "k* any batch",
        "k* intf",
        *[f"{p} k" for p in pols],
        "stgs/k*",
        "stgs/opt",
        "stgs/temporal",
        "stgs/best(mig,mps)",
    ]
    print("\n## Peak load factor k per policy (higher is better)\n")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    ratios: dict[str, list[float]] = {
        "bound": [],
        "bound_intf": [],
        "opt": [],
        "temporal": [],
        "single": [],
    }
    for r in rows:
        s = r.get("stgs")
        b = float(r["bound"])  # type: ignore[arg-type]
        bi = float(r["bound_intf"])  # type: ignore[arg-type]
        bc = float(r["bound_classic"])  # type: ignore[arg-type]
        cells = [str(r["scenario"]), str(r["gpus"]), str(r["models"])]
        cells += [f"{b:.3f}", f"{bc:.3f}", f"{bi:.3f}"]
        for p in pols:
            v = r.get(p)
            st = r.get(f"{p}_status")
            cells.append(
                "-" if v is None else f"{v:.3f}" + (f" ({st})" if st and st != "optimal" else "")
            )

        def ratio(num: object, den: object, key: str) -> str:
            if not isinstance(num, float) or not isinstance(den, float) or den <= 0:
                return "-"
            ratios[key].append(num / den)
            return f"{num / den:.3f}"

        cells.append(ratio(s, b, "bound"))
        ratio(s, bi, "bound_intf")
        cells.append(ratio(s, r.get("optimal"), "opt"))
        cells.append(ratio(s, r.get("temporal"), "temporal"))
        single = max(
            (x for x in (r.get("mig-only"), r.get("mps-only")) if isinstance(x, float)),
            default=None,
        )
        cells.append(ratio(s, single, "single"))
        print("| " + " | ".join(cells) + " |")
    if args.simulate > 0:
        print(f"\n## Simulated SLO attainment of the stgs plan at its peak ({args.simulate:g} s)\n")
        print("| scenario | stgs k | attainment |")
        print("|---|---|---|")
        for r in rows:
            att = r.get("sim_attainment")
            k = r.get("stgs")
            print(
                f"| {r['scenario']} | {k if k is None else f'{k:.3f}'} |"
                f" {'-' if att is None else f'{att:.4f}'} |"
            )
        atts = [float(r["sim_attainment"]) for r in rows if r.get("sim_attainment") is not None]  # type: ignore[arg-type]
        if atts:
            print(f"\nmin {min(atts):.4f}, mean {statistics.fmean(atts):.4f}")
    print("\n## Geometric means of stgs's ratios\n")
    print("| ratio | geomean | min | target |")
    print("|---|---|---|---|")
    for key, label, target in [
        ("bound", "stgs / fluid bound", ">= 0.9"),
        ("bound_intf", "stgs / fluid with interference (diagnostic)", "-"),
        ("opt", "stgs / optimal", ">= 0.95"),
        ("temporal", "stgs / temporal", ">= 1.3"),
        ("single", "stgs / best of mig-only, mps-only", ">= 1.15"),
    ]:
        xs = ratios[key]
        print(f"| {label} | {geomean(xs):.3f} | {min(xs) if xs else float('nan'):.3f} | {target} |")

    print(
        f"\n## Solve time of one `stgs` plan (median of 5; load at {LOAD} of the classic fluid"
        " bound)\n"
    )
    print("| models | GPUs | median ms | max ms |")
    print("|---|---|---|---|")
    sizes = [(10, 4), (50, 16)] + ([] if args.quick else [(500, 64)])
    timing = []
    for n_models, n_gpus in sizes:
        if args.set == "measured":
            prob = timing_case(n_models, n_gpus, n_models, args.sku, args.profiles)
        else:
            prob = timing_case(n_models, n_gpus, n_models)
        if host:
            prob = prob.with_options(**host)
        pol = get_policy("stgs")
        ts = []
        for _ in range(5 if n_models < 500 else 3):
            t0 = time.perf_counter()
            pol.plan(prob)
            ts.append((time.perf_counter() - t0) * 1000)
        timing.append(
            {
                "models": n_models,
                "gpus": n_gpus,
                "median_ms": statistics.median(ts),
                "max_ms": max(ts),
            }
        )
        print(f"| {n_models} | {n_gpus} | {statistics.median(ts):.1f} | {max(ts):.1f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"peak": rows, "timing": timing}, fh, indent=2, default=str)
    return 0


def simulated_attainment(
    prob: Problem, k: float, plan: Plan, seconds: float, profiles: Path
) -> float:
    """SLO attainment of ``plan`` (the stgs plan at load factor ``k``) in the simulator, with
    the noise of ``profiles``."""
    return simulated(prob, k, plan, seconds, profiles)[0]


def simulated(
    prob: Problem,
    k: float,
    plan: Plan,
    seconds: float,
    profiles: Path,
    routing: str = "worker",
    slower: float = 1.0,
    planner_inputs: bool = False,
) -> tuple[float, float, str]:
    """(SLO attainment, the least model's, that model) of ``plan`` (the stgs plan at load
    factor ``k``) in the simulator: Poisson, the noise of ``profiles``, seed 0; every batch
    ``slower`` times its predicted latency (``SimOptions.overrun``); ``planner_inputs``: every
    model's input of the size the planner's host costs assume (an image), so that the
    simulator's host costs are the planner's."""
    rates = {m.name: m.rate_rps * k for m in prob.models}
    over = {m.name: slower for m in prob.models} if slower != 1.0 else {}
    host = HostCosts(
        input_mb=dict.fromkeys({m.profile for m in prob.models}, PLANNER_INPUT_MB)
        if planner_inputs
        else {}
    )
    opts = SimOptions(duration_s=seconds, routing=routing, overrun=over, host=host)  # type: ignore[arg-type]
    arrivals = generate(WorkloadSpec(name="poisson"), rates, seconds, seed=0)
    noise = noise_for(opts, profiles)
    _, metrics = simulate(
        prob, get_policy("stgs"), arrivals, rates, opts, seed=0, noise=noise, plan=plan
    )
    per = {n: float(v["slo_attainment"]) for n, v in metrics.per_model.items() if v["requests"]}
    worst = min(per, key=lambda n: per[n]) if per else "-"
    return float(metrics.summary["slo_attainment"]), per.get(worst, float("nan")), worst


FORMER = {"batch_margin": "z", "batch_margin_z": 1.0}  # the margins before issue 17
NEW = {"batch_margin": "slo"}


def margins(args: argparse.Namespace, weights: WeightsFile) -> int:
    """``--margins``: see the module docstring."""
    seconds = args.simulate if args.simulate > 0 else 10.0
    print(
        f"# planner margins (issue 17) · {time.strftime('%Y-%m-%d')} · python"
        f" {platform.python_version()} · {platform.processor() or platform.machine()}"
    )
    print(
        f"# scenario set: measured ({args.sku}), seed {args.seed}; former: batch_margin z = 1,"
        " every MPS neighbour weighs 1; new: batch_margin slo (batch_margin_target"
        f" {PlannerOptions().batch_margin_target:g}), neighbour weights"
        f" {args.weights or 'shipped'} (GPUs measured: {', '.join(weights.gpus) or 'none'})"
    )
    print(
        f"# simulated {seconds:g} s at each peak, Poisson, seed 0, routing {args.routing},"
        f" inputs {'of the planner' if args.planner_inputs else 'per model'}; the"
        " least model's attainment with batches at their predicted latency, and at the latency"
        " planned (x 1 + headroom: the headroom spent, a stress test)"
    )
    none = WeightsFile(format="stgs.interference-weights/v1")
    rows: list[dict[str, object]] = []
    hdr = (
        "| scenario | fluid k* | former k | /k* | new k | /k* | new/former | former: attained"
        " (least model) | at planned latency | new: attained (least model) | at planned latency |"
    )
    print("\n" + hdr + "\n|" + "---|" * 11)
    profiles = Path(args.profiles) if args.profiles else default_profiles_path()
    for case in measured_scenarios(args.quick, args.sku, args.profiles, args.seed):
        base = Problem.from_scenario(scenario_from_mapping(case.data))
        bound = fluid_bound(base)
        row: dict[str, object] = {"scenario": case.name, "bound": bound}
        cells = [case.name, f"{bound:.3f}"]
        sims = []
        for label, opts, w in (("former", FORMER, none), ("new", NEW, weights)):
            im = InterferenceModel(base.interference.gammas, base.interference.default_gamma, w)
            prob = Problem(
                base.gpus, base.models, base.latency, im, base.headroom, base.options
            ).with_options(**opts)
            t0 = time.perf_counter()
            pk = find_peak(prob, get_policy("stgs"))
            row[f"{label}_s"] = time.perf_counter() - t0
            row[label] = pk.k
            cells += [f"{pk.k:.3f}", f"{pk.k / bound:.3f}"]
            if pk.k > 0:
                same = args.planner_inputs
                att, least, who = simulated(
                    prob, pk.k, pk.plan, seconds, profiles, args.routing, planner_inputs=same
                )
                row[f"{label}_attained"], row[f"{label}_least"] = att, least
                row[f"{label}_least_model"] = who
                sims.append(f"{att:.4f} ({least:.4f} {who})")
                _, least_p, who_p = simulated(
                    prob, pk.k, pk.plan, seconds, profiles, args.routing, 1.0 + base.headroom, same
                )
                row[f"{label}_least_planned"], row[f"{label}_least_planned_model"] = least_p, who_p
                sims.append(f"{least_p:.4f} {who_p}")
            else:
                sims += ["-", "-"]
        former, new = float(row["former"]), float(row["new"])  # type: ignore[arg-type]
        cells.append(f"{new / former:.3f}" if former > 0 else "-")
        print("| " + " | ".join(cells + sims) + " |", flush=True)
        rows.append(row)

    def col(key: str) -> list[float]:
        return [float(r[key]) for r in rows if key in r]  # type: ignore[arg-type]

    bound = col("bound")
    print("\n| | former | new |\n|---|---|---|")
    fb = [geomean([k / b for k, b in zip(col(x), bound, strict=True)]) for x in ("former", "new")]
    print(f"| stgs / fluid bound, geomean | {fb[0]:.3f} | {fb[1]:.3f} |")
    for key, what in (("least", "predicted"), ("least_planned", "planned")):
        least = [col(f"former_{key}"), col(f"new_{key}")]
        print(
            f"| least model's attainment, min ({what} latency) | {min(least[0]):.4f} |"
            f" {min(least[1]):.4f} |"
        )
        below = [f"{sum(x < 0.99 for x in v)} of {len(v)}" for v in least]
        print(f"| scenarios with a model below 0.99 ({what}) | {below[0]} | {below[1]} |")
    gain = geomean([n / f for f, n in zip(col("former"), col("new"), strict=True) if f > 0])
    print(f"\nnew / former peak, geomean over the scenarios: {gain:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"margins": rows}, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
