"""The session-6 fidelity table from measure.sh's --json outputs (python table.py OUT_DIR)."""

import json
import sys
from pathlib import Path

RUNS = ["s1200c", "s1200d", "s1200n", "s1200a", "r1200"]
DESC = {
    "s1200c": "s4 c (call 3)",
    "s1200d": "s4 d (call 3, c's machine)",
    "s1200n": "s4 n (call 10, sixth machine)",
    "s1200a": "s4 a (call 1; client stalled)",
    "r1200": "s3 `r1200` (call 9; client stalled)",
}
SRC = {"none": "-", "others": "the other four", "s1200c": "s4 c", "s1200d": "s4 d"}
ORDER = ["none", "others", "s1200c", "s1200d"]

out = Path(sys.argv[1])
files = []
for f in out.glob("*.*.*.*.json"):
    x, src, by, noise = f.name[: -len(".json")].split(".")
    files.append(((RUNS.index(x), ORDER.index(src), by, noise), (x, src, by, noise), f))
print(
    "| run compared | calibrated from | by | noise | p99 all: GPU / sim ms |"
    " mean abs p99 diff (5 models) | largest p99 diff | largest attainment diff |"
)
print("|---|---|---|---|---|---|---|---|")
for _, (x, src, by, noise), f in sorted(files):
    (run,) = json.loads(f.read_text())["runs"].values()
    rows = run["rows"]
    a = next(q for q in rows if q["model"] == "all")
    mp = sum(abs(q["p99_diff"]) for q in rows if q["model"] != "all") / (len(rows) - 1)
    at = max(abs(q["attainment_diff"]) for q in rows)
    pm = max(rows, key=lambda q: abs(q["p99_diff"]))
    print(
        f"| {DESC[x]} | {SRC[src]} | {by} | {noise} | {a['gpu_p99_ms']:.2f} / "
        f"{a['sim_p99_ms']:.2f} | {mp:.1%} | {pm['p99_diff']:+.1%} ({pm['model']}) | {at:.2%} |"
    )
