"""Session 6's table: stgs, stgs-spare (1.5x) and stgs-fill side by side from `stgs compare`
results (examples/spare-fill.yaml, examples/spare-fill-zoo.yaml), and the verdict.

    python -m benchmarks.spare_table OUT_DIR [OUT_DIR ...]

Per cell (GPU set, workload, load), means over the seeds: SLO attainment, p99 (ms), GPUs used
(time average), reconfigurations, and controller re-plans / controller passes (passes do not
run while a transition is under way, so a policy that reconfigures gets fewer of them). The
verdict lists every cell where stgs-fill is worse than stgs-spare on attainment, GPUs or
reconfigurations (and on re-plans per controller pass).
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

POLICIES = ("stgs", "stgs-spare", "stgs-fill")
KEYS = ("slo_attainment", "p99_ms", "gpus_used_mean", "reconfigurations", "replans")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    worse: list[str] = []
    print("| GPUs | workload | load | " + " | ".join(POLICIES) + " |")
    print("|---|---|---|" + "---|" * len(POLICIES))
    for out in argv:
        cells: dict[tuple[str, str, str], dict[str, list[dict[str, str]]]] = defaultdict(
            lambda: defaultdict(list)
        )
        with open(Path(out) / "results.csv", encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                cells[(r["gpu_set"], r["workload"], r["load"])][r["policy"]].append(r)
        for (gpus, wl, load), by in cells.items():
            m: dict[str, dict[str, float]] = {}
            for pol in POLICIES:
                rows = by[pol]
                m[pol] = {k: sum(float(r[k]) for r in rows) / len(rows) for k in KEYS}
                m[pol]["passes"] = sum(float(r["controller_passes"]) for r in rows) / len(rows)
            txt = [
                f"{v['slo_attainment']:.4f}, {v['p99_ms']:.1f} ms, {v['gpus_used_mean']:.2f} GPU,"
                f" {v['reconfigurations']:.1f} reconf, {v['replans']:.1f}/{v['passes']:.1f}"
                for v in (m[p] for p in POLICIES)
            ]
            print(f"| {gpus} | {wl} | {load} | " + " | ".join(txt) + " |")
            s, f = m["stgs-spare"], m["stgs-fill"]
            where = f"{gpus} {wl} {load}"
            if f["slo_attainment"] < s["slo_attainment"] - 1e-9:
                worse.append(f"{where}: attainment")
            if f["gpus_used_mean"] > s["gpus_used_mean"] + 1e-9:
                worse.append(f"{where}: GPUs")
            if f["reconfigurations"] > s["reconfigurations"] + 1e-9:
                worse.append(f"{where}: reconfigurations")
            rate = {p: m[p]["replans"] / m[p]["passes"] if m[p]["passes"] else 0.0 for p in m}
            if rate["stgs-fill"] > rate["stgs-spare"] + 0.05:
                worse.append(f"{where}: re-plans per pass {rate['stgs-fill']:.2f} vs "
                             f"{rate['stgs-spare']:.2f}")  # fmt: skip
    print("\nstgs-fill worse than stgs-spare: " + ("; ".join(worse) if worse else "nowhere"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
