"""Check the planner's latency predictions against a measured replay on a GPU.

Two steps (the first needs no GPU, the second no planner):

    # 1. plan a scenario that uses the shipped measured profiles (default: a built-in one)
    python -m benchmarks.profile_check plan [--scenario S.yaml] --plan-out plan.json
    # 2. on the GPU: replay each chosen (model, batch) at its chosen partition, compare
    python -m benchmarks.profile_check replay plan.json --profiles stgs/data/profiles.csv

The replay measures every (partition, model, batch) of the plan's GPUs of the profiled SKU with
``stgs profile``'s own machinery (CUDA graphs, an MPS client at the partition's share, a green
context for a MIG instance when no MIG instance exists: MIG latency is then the SM-curve
prediction, as the planner uses it), one at a time, and prints measured vs predicted:

* ``solo pred``: the latency function (stgs.latency) at the SM count the replay ran on; the
  target is |measured / predicted - 1| <= 10 %;
* ``plan ms``: the plan's batch latency, which adds the interference term of co-located MPS
  partitions (a solo replay should come in under it).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_SCENARIO = """\
# profile_check's default scenario: the shipped measured H100 profiles, a vision/language/speech mix
profiles: {profiles}
interference: {interference}
gpus:
  - {{sku: H100-80GB, count: 2}}
headroom: 0.1
models:
  - {{name: resnet50, slo_ms: 30, rate_rps: 1500}}
  - {{name: mobilenet_v3_large, slo_ms: 15, rate_rps: 800}}
  - {{name: efficientnet_b0, slo_ms: 20, rate_rps: 400}}
  - {{name: vit_b_16, slo_ms: 60, rate_rps: 600}}
  - {{name: bert_base, slo_ms: 80, rate_rps: 300}}
  - {{name: wav2vec2_base, slo_ms: 150, rate_rps: 120}}
  - {{name: densenet121, slo_ms: 40, rate_rps: 300}}
  - {{name: vgg16, slo_ms: 100, rate_rps: 200}}
"""


@dataclass(frozen=True)
class Check:
    gpu_index: int
    plan_partition: str  # as the plan says: "mps:37", "mig:3g.40gb", "full"
    replay_partition: str  # what is replayed: "mps:37", "green:64", "full"
    plan_sm_count: int
    model: str
    batch: int
    plan_latency_ms: float


def cmd_plan(args: argparse.Namespace) -> int:
    if args.scenario:
        scenario = Path(args.scenario)
    else:
        data = ROOT / "stgs" / "data"
        tmp = Path(tempfile.mkdtemp(prefix="stgs-check-"))
        scenario = tmp / "scenario.yaml"
        interference = data / "interference.csv"
        text = DEFAULT_SCENARIO.format(
            profiles=data / "profiles.csv",
            interference=interference if interference.is_file() else "null",
        )
        scenario.write_text(text.replace("interference: null\n", ""))
    r = subprocess.run(
        [sys.executable, "-m", "api.cli", "plan", str(scenario), "--json", "--policy", args.policy],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode not in (0, 1):
        print(r.stderr, file=sys.stderr)
        return r.returncode
    Path(args.plan_out).write_text(r.stdout)
    subprocess.run(
        [sys.executable, "-m", "api.cli", "plan", str(scenario), "--policy", args.policy],
        cwd=ROOT,
        check=False,
    )
    print(f"plan written to {args.plan_out} (scenario {scenario})")
    return 0


def plan_checks(plan: dict[str, object], sku: str) -> tuple[list[Check], list[str]]:
    checks: list[Check] = []
    notes: list[str] = []
    for g in plan["gpus"]:  # type: ignore[attr-defined]
        if g["sku"] != sku:
            notes.append(f"GPU {g['index']} is a {g['sku']}: not replayed on this {sku}")
            continue
        for p in g["partitions"]:
            kind, sms = p["kind"], int(p["sm_count"])
            if kind == "mps" and p.get("mig_profile"):
                notes.append(f"GPU {g['index']}: MPS inside MIG {p['mig_profile']} not replayed")
                continue
            if kind == "mps":
                label = replay = f"mps:{p['mps_pct']}"
            elif kind == "mig":
                label = f"mig:{p['mig_profile']}"
                replay = f"green:{max(8, round(sms / 8) * 8)}"
            else:
                label = replay = "full"
            for m in p["models"]:
                checks.append(
                    Check(
                        g["index"],
                        label,
                        replay,
                        sms,
                        m["name"],
                        int(m["batch"]),
                        float(m["latency_ms"]),
                    )
                )
    return checks, notes


def cmd_replay(args: argparse.Namespace) -> int:
    from profiler.grid import Point
    from profiler.models import resolve_spec
    from profiler.run import ProfileConfig, run_profile
    from stgs.latency import LatencyModel
    from stgs.profiles import read_profiles

    plan = json.loads(Path(args.plan).read_text())
    profiles = read_profiles(args.profiles)
    sku = args.gpu or profiles.gpus()[0]
    checks, notes = plan_checks(plan, sku)
    if not checks:
        print("nothing to replay", notes, file=sys.stderr)
        return 2
    names = list(dict.fromkeys(c.model for c in checks))
    out = Path(args.out)
    points = list(dict.fromkeys(Point(c.model, c.replay_partition, c.batch) for c in checks))
    cfg = ProfileConfig(
        models=tuple(resolve_spec(n) for n in names),
        out=out,
        device=args.device,
        partitions=tuple(dict.fromkeys(p.partition for p in points)),
        batches=tuple(sorted({p.batch for p in points})),
        quiet=args.quiet,
        gpu_label=sku,
    )
    s = run_profile(cfg, points=points)
    measured = {(r.model, r.partition, r.batch): r for r in read_profiles(out) if r.gpu == sku}
    rows, errs = [], []
    for c in checks:
        r = measured.get((c.model, c.replay_partition, c.batch))
        if r is None:
            rows.append((c, None, None, None))
            continue
        lm = LatencyModel.from_table(profiles, sku, c.model)
        pred = lm.latency_ms(c.batch, r.sm_count)
        err = r.latency_ms / pred - 1.0
        errs.append(abs(err))
        rows.append((c, r, pred, err))
    print(f"\nreplay of {args.plan} on {s.gpu} ({s.device_name}, driver {s.driver})")
    head = (
        "GPU",
        "plan partition",
        "replayed",
        "SMs",
        "model",
        "batch",
        "solo pred ms",
        "measured ms",
        "error",
        "plan ms",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for c, r, pred, err in rows:
        if r is None:
            print(
                f"| {c.gpu_index} | {c.plan_partition} | {c.replay_partition} | - | {c.model} "
                f"| {c.batch} | - | failed | - | {c.plan_latency_ms:.2f} |"
            )
            continue
        print(
            f"| {c.gpu_index} | {c.plan_partition} | {c.replay_partition} | {r.sm_count} | "
            f"{c.model} | {c.batch} | {pred:.2f} | {r.latency_ms:.2f} | {err:+.1%} | "
            f"{c.plan_latency_ms:.2f} |"
        )
    if errs:
        within = sum(e <= 0.10 for e in errs)
        print(
            f"\n|error|: median {statistics.median(errs):.1%}, max {max(errs):.1%}; "
            f"{within}/{len(errs)} within 10 %"
        )
    for n in notes + s.notes:
        print(f"note: {n}")
    if args.summary:
        with open(args.summary, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                [
                    "gpu_index",
                    "plan_partition",
                    "replay_partition",
                    "sm_count",
                    "model",
                    "batch",
                    "pred_ms",
                    "measured_ms",
                    "error",
                    "plan_ms",
                ]
            )
            for c, r, pred, err in rows:
                w.writerow(
                    [
                        c.gpu_index,
                        c.plan_partition,
                        c.replay_partition,
                        r.sm_count if r else "",
                        c.model,
                        c.batch,
                        f"{pred:.4f}" if pred else "",
                        f"{r.latency_ms:.4f}" if r else "",
                        f"{err:.4f}" if err is not None else "",
                        c.plan_latency_ms,
                    ]
                )
    return 0 if errs and max(errs) <= 0.10 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="plan a scenario that uses the shipped measured profiles")
    p.add_argument("--scenario", help="scenario YAML (default: the built-in one)")
    p.add_argument("--plan-out", default="profile-check-plan.json")
    p.add_argument("--policy", default="stgs", help="planning policy (default: stgs)")
    r = sub.add_parser("replay", help="replay a plan's batches at its partitions on the GPU")
    r.add_argument("plan")
    r.add_argument("--profiles", default=str(ROOT / "stgs" / "data" / "profiles.csv"))
    r.add_argument("--gpu", help="SKU to replay (default: the profiles' GPU)")
    r.add_argument("--device", default="0")
    r.add_argument("--out", default="profile-check-measured.csv")
    r.add_argument("--summary", help="write the comparison as CSV here")
    r.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    return cmd_plan(args) if args.cmd == "plan" else cmd_replay(args)


if __name__ == "__main__":
    sys.exit(main())
