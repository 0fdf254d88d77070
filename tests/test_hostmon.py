"""benchmarks/hostmon.py: it sees a busy process, and its counters never go negative."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _helpers import ROOT


def test_hostmon_sees_a_busy_process(tmp_path: Path) -> None:
    marker = "hostmon_test_marker_busy"
    busy = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time, threading  # {marker}\n"
            "def spin():\n"
            "    t = time.time()\n"
            "    while time.time() - t < 0.3: pass\n"
            "end = time.time() + 2.5\n"
            "while time.time() < end:\n"  # threads come and go: their totals must not be lost
            "    th = [threading.Thread(target=spin) for _ in range(2)]\n"
            "    [x.start() for x in th]; [x.join() for x in th]\n",
        ]
    )
    try:
        out = tmp_path / "mon.json"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.hostmon",
                "--out",
                str(out),
                "--duration-s",
                "1.5",
                "--interval-s",
                "0.25",
                "--match",
                marker,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    finally:
        busy.kill()
        busy.wait()
    res = json.loads(out.read_text())
    summary = res["summary"]
    assert json.loads(proc.stdout)["intervals"] == summary["intervals"] >= 4
    mine = [v for k, v in summary["procs"].items() if k.startswith(f"{busy.pid} ")]
    assert len(mine) == 1 and mine[0]["mean_cores"] > 0.05
    assert all(w >= 0 for s in res["samples"] for w in s["runq_wait_ms"].values()), (
        "run-queue wait per interval must not go negative when threads exit"
    )
    assert summary["busy_cores_mean"] >= 0 and summary["throttled_periods"] >= 0
    assert {"vmstat", "pressure", "kernel", "cpu_max"} <= summary.keys()
