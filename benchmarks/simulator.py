"""Simulator speed: requests simulated per minute of wall time, on one core.

    .venv/bin/python -m benchmarks.simulator [--duration 60] [--loads 1 2 3]
        [--noise default|profile|runtime] [--runtime-noise FILE]

Plans the embedded example scenario (2x H100 + 1x H200, eight models) with each policy once,
then times ``Simulator.run`` alone (arrivals generated beforehand, planning not timed) under
Poisson arrivals at each load factor, and prints a table. Target (issue #6): >= 1,000,000
requests per minute. ``--noise``: ``default`` as this benchmark always ran (no noise model
given: the shipped sigmas are not drawn), ``profile`` the profiles' lognormal (one normal draw
per batch), ``runtime`` the runtime's measured factors of ``--runtime-noise`` (one uniform draw
per batch; default file: the session-4 H100 runs c and d).
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace
from datetime import date
from importlib.resources import files
from pathlib import Path

from partitioner.policies import get_policy
from partitioner.problem import Problem
from partitioner.sim import SimOptions, Simulator, WorkloadSpec, compute_metrics, generate
from partitioner.sim.run import noise_for
from stgs.profiles import default_profiles_path
from stgs.scenario import load_scenario

RUNTIME_NOISE = Path(str(files("stgs") / "data" / "runtime-noise-h100.json"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="simulated seconds per run")
    ap.add_argument("--loads", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    ap.add_argument("--policies", nargs="+", default=["stgs", "temporal", "mig-only", "mps-only"])
    ap.add_argument("--noise", choices=("default", "profile", "runtime"), default="default")
    ap.add_argument("--runtime-noise", default=str(RUNTIME_NOISE), help="factors (--noise runtime)")
    args = ap.parse_args()
    sc = load_scenario(Path(str(files("stgs") / "data" / "example-scenario.yaml")))
    prob = Problem.from_scenario(sc)
    if args.noise == "default":
        opts, noise = SimOptions(duration_s=args.duration), None
    else:
        rn = args.runtime_noise if args.noise == "runtime" else None
        opts = SimOptions(duration_s=args.duration, noise=args.noise, runtime_noise=rn)
        noise = noise_for(opts, sc.profiles or default_profiles_path())
    print(f"# simulator benchmark · {date.today()} · python {platform.python_version()} · 1 core")
    print(
        f"# example scenario, Poisson arrivals, {args.duration:g} simulated s per run, noise"
        f" {args.noise}" + (f" ({args.runtime_noise})" if args.noise == "runtime" else "") + "\n"
    )
    print("| policy | load | requests | SLO att. | wall s | requests/min |")
    print("|---|---|---|---|---|---|")
    tot_n, tot_s = 0, 0.0
    for pol in args.policies:
        policy = get_policy(pol)
        for load in args.loads:
            rates = {m.name: m.rate_rps * load for m in sc.models}
            p = prob.with_models([replace(m, rate_rps=rates[m.name]) for m in prob.models])
            plan = policy.plan(p)
            arr = generate(WorkloadSpec(name="poisson"), rates, args.duration, seed=0)
            sim = Simulator(p, plan, arr, opts, seed=0, noise=noise)
            t0 = time.perf_counter()
            res = sim.run()
            dt = time.perf_counter() - t0
            n = int(res.arrival_ms.size)
            att = compute_metrics(res).summary["slo_attainment"]
            tot_n += n
            tot_s += dt
            print(f"| {pol} | {load:g} | {n} | {att:.4f} | {dt:.3f} | {n / dt * 60:,.0f} |")
    print(f"| **all** | | {tot_n} | | {tot_s:.3f} | **{tot_n / tot_s * 60:,.0f}** |")


if __name__ == "__main__":
    main()
