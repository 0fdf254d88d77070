"""benchmarks/profile_ratio.py: ratios over the points both GPUs measured, exit 2 otherwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from _helpers import ROOT, run_python

HEADER = "gpu,model,partition,sm_count,batch,latency_ms,memory_mib\n"


def test_ratio_over_common_points(tmp_path: Path) -> None:
    csv = tmp_path / "p.csv"
    csv.write_text(
        HEADER
        + "H100-80GB,m,full,132,1,2.0,10\nH200-141GB,m,full,132,1,1.5,10\n"
        + "H100-80GB,m,mps:50,66,1,4.0,10\nH200-141GB,m,mps:50,66,1,4.4,10\n"
        + "H200-141GB,m,mps:25,32,1,9.9,10\n"  # nothing to compare it with: left out
    )
    out = run_python("-m", "benchmarks.profile_ratio", str(csv), timeout=60).stdout
    assert "| m | 0.750 (0.75-0.75) [1] | 1.100 (1.10-1.10) [1] |" in out
    assert "all 2 points: median 0.925, range 0.750-1.100" in out


def test_shipped_h200_rows_against_h100() -> None:
    out = run_python("-m", "benchmarks.profile_ratio", timeout=60).stdout
    assert "all 600 points" in out
    for model in ("resnet50", "vit_b_16", "bert_base", "mobilenet_v3_large", "efficientnet_b0"):
        assert f"| {model} |" in out


def test_no_common_point_is_exit_2() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_ratio", "--gpu", "L4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2 and "no point measured on both L4 and H100-80GB" in r.stderr


def test_reference_compares_the_shipped_h200_rows_with_gpu_facts() -> None:
    out = run_python("-m", "benchmarks.profile_ratio", "--reference", timeout=60).stdout
    assert "| resnet50 | mps:50 | 1.20 / 1.21 (-0.6%) |" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and "ours / ref" not in ln]
    assert len(rows) == 5 and all(ln.count("%") == 4 for ln in rows)  # every reference point
