"""The runtime against itself: repeats of one serve_gpu.py run, counted as fidelity.py counts
the GPU side.

    python -m benchmarks.repeatability RUN.json[:NPZ] RUN2.json[:NPZ] ... [--arrivals auto|...]

The runs must be repeats: the same plan 1 (GPUs, partitions, their models, batches and rates;
how it was solved aside) and the same scheduled arrivals (every request's model and scheduled
time, the same phase-1 window); otherwise it exits 2 with a one-line reason, as it does for a
run file it cannot read (the file and why). Per model and overall, per run: p99 latency of the
answered phase-1 requests and SLO attainment (``fidelity.gpu_stats``: the same counting as the
GPU side of ``fidelity.py``, latency from ``--arrivals``' point), then the spread over the runs
(p99: (max - min) / min; attainment: max - min, in points) and the largest one. That spread is
how close any simulator can come to "the" GPU run: one run of the runtime predicts another
this well.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lib import fitting
from benchmarks.lib.runs import Run, RunError, read_run
from partitioner.sim.config import HostCosts
from stgs.plan import Plan


def plan_shape(plan: Plan) -> list[Any]:
    """What a repeat must share of plan 1: per GPU its kind and partitions (kind, SMs, MIG
    profile and place, MPS share, models with batch and rate), not how the plan was solved."""
    return [
        (
            g.sku,
            g.mig,
            [
                (
                    p.kind,
                    p.sm_count,
                    p.mig_profile,
                    p.mig_start,
                    p.mps_pct,
                    [(a.name, a.batch, round(a.rate_rps, 6)) for a in p.models],
                )
                for p in g.partitions
            ],
        )
        for g in plan.gpus
    ]


def not_repeats(a: Run, b: Run) -> str | None:
    """Why ``b`` is not a repeat of ``a`` (None: it is)."""
    if a.names != b.names:
        return f"models differ ({', '.join(a.names)} vs {', '.join(b.names)})"
    if plan_shape(a.plan) != plan_shape(b.plan):
        return "plan 1 differs (partitions, models, batches or rates)"
    if (a.lo, a.hi) != (b.lo, b.hi):
        return f"phase-1 windows differ ({a.lo:g}-{a.hi:g} s vs {b.lo:g}-{b.hi:g} s)"
    ta, tb = a.npz["t_sched"], b.npz["t_sched"]
    if len(ta) != len(tb):
        return f"scheduled arrivals differ ({len(ta)} vs {len(tb)} requests)"
    diff = np.flatnonzero((ta != tb) | (a.npz["model"] != b.npz["model"]))
    if len(diff):
        i = int(diff[0])
        return (
            f"scheduled arrivals differ at {len(diff)} requests (first: #{i}, model"
            f" {int(a.npz['model'][i])} at {float(ta[i]):.6f} s vs model"
            f" {int(b.npz['model'][i])} at {float(tb[i]):.6f} s)"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "runs", nargs="+", help="serve_gpu.py JSON summaries (JSON:NPZ for another npz)"
    )
    ap.add_argument(
        "--arrivals",
        choices=fitting.MODES,
        default="auto",
        help="where latency counts from, as fidelity.py (auto: queued when every run has a"
        " worker trace, else scheduled)",
    )
    ap.add_argument("--sku", default="H100-80GB")
    ap.add_argument("--json", help="write the per-run figures and spreads here")
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        print("repeatability.py: give at least two runs", file=sys.stderr)
        return 2
    runs = []
    for spec in args.runs:
        path, _, npz = spec.partition(":")
        try:
            runs.append(read_run(path, npz or None, args.sku))
        except RunError as exc:
            print(f"repeatability.py: {exc}", file=sys.stderr)
            return 2
    for r in runs[1:]:
        why = not_repeats(runs[0], r)
        if why:
            print(
                f"repeatability.py: {r.path.name} is not a repeat of {runs[0].path.name}: {why}",
                file=sys.stderr,
            )
            return 2
    mode = args.arrivals
    if mode == "auto":
        mode = "queued" if all(fitting.load_trace(r) is not None for r in runs) else "scheduled"
    if mode == "queued" and any(fitting.load_trace(r) is None for r in runs):
        print("repeatability.py: --arrivals queued needs every run's worker trace", file=sys.stderr)
        return 2
    host = HostCosts()
    stats = [fitting.gpu_stats(r, mode, host) for r in runs]
    names = [*runs[0].names, "all"]
    labels = [r.path.stem for r in runs]
    print(f"# repeatability: {len(runs)} runs of one plan and one schedule ({', '.join(labels)})")
    lo, hi = runs[0].lo, runs[0].hi
    print(f"# phase 1 {lo:g}-{hi:g} s; latency counted as fidelity.py --arrivals {mode}\n")
    print(
        "| model | "
        + " | ".join(f"{x} p99 ms" for x in labels)
        + " | p99 spread | "
        + " | ".join(f"{x} attainment" for x in labels)
        + " | attainment spread (points) |"
    )
    print("|---" * (2 * len(runs) + 3) + "|")
    out: dict[str, Any] = {"mode": mode, "runs": [str(r.path) for r in runs], "models": {}}
    worst_p99, worst_att = (0.0, ""), (0.0, "")
    for n in names:
        p99 = [s[n][0] for s in stats]
        att = [s[n][1] for s in stats]
        sp = (max(p99) - min(p99)) / min(p99)
        sa = max(att) - min(att)
        if sp > worst_p99[0]:
            worst_p99 = (sp, n)
        if sa > worst_att[0]:
            worst_att = (sa, n)
        print(
            f"| {n} | "
            + " | ".join(f"{x:.3f}" for x in p99)
            + f" | {sp:.1%} | "
            + " | ".join(f"{x:.5f}" for x in att)
            + f" | {sa * 100:.2f} |"
        )
        out["models"][n] = {
            "p99_ms": p99,
            "attainment": att,
            "p99_spread": sp,
            "attainment_spread": sa,
        }
    print(
        f"\nlargest spread: p99 {worst_p99[0]:.1%} ({worst_p99[1]}), attainment"
        f" {worst_att[0] * 100:.2f} points ({worst_att[1]})"
    )
    out["largest"] = {"p99_spread": worst_p99, "attainment_spread": worst_att}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
