"""Where does an MPS control daemon fail to start? One GPU call, a row per setting.

Session 11 (2026-12-07, lent H100, driver 580.159.04): inside ``benchmarks/user_models_gpu.py``
the daemon's ``nvidia-cuda-mps-control -d`` exited 1 with nothing on stdout or stderr, its log
stopping after "To connect CUDA applications to this daemon ..." (a daemon that starts writes a
third line, the binary version), every time, so no MPS plan could start there. The same call
worked in a shell, from a thread, after torch had made a CUDA context in the calling process,
and from ``stgs serve`` on the NVML backend registering ``resnet50`` over REST (with and without
an empty ``--model-repository``). What differs in user_models_gpu: the repository holds model
files that the daemon profiles at start (its profiler asks for the node's MPS daemon at once),
and the benchmark process has run every model on the GPU (its references) before starting the
daemon. The device budget ran out before those two were told apart; this script does it:

1. ``shell``: ``nvidia-cuda-mps-control -d`` with private directories, from this process;
2. ``daemon``: ``stgs serve`` (NVML backend) on an empty repository, then ``resnet50`` over REST
   (the runtime starts the MPS daemon for its plan);
3. ``repo``: the same on user_models_gpu's repository (TorchScript + ONNX files, profiled at
   start: the profiler starts the MPS daemon first);
4. ``repo+refs``: as 3, after this process ran user_models_gpu's references on the GPU.

Each row: whether the MPS daemon started (and who started it), the registration's answer, the
control log's last lines, the MPS processes seen. Usage on the lent GPU::

    python -m benchmarks.mps_start_gpu [--cases shell,daemon,repo,repo+refs]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from api.launch import LocalDaemon, wait_until
from benchmarks.lib.node import daemon_sections, quit_mps

CASES = ("shell", "daemon", "repo", "repo+refs")


def _control_logs(root: Path) -> str:
    return " | ".join(
        " / ".join(f.read_text(errors="replace").strip().splitlines()[-4:])
        for f in sorted(root.glob("**/log/control.log"))
    )


def _mps_processes() -> str:
    out = subprocess.run(["ps", "-eo", "pid,ppid,stat,cmd"], capture_output=True, text=True)
    return "; ".join(line.strip() for line in out.stdout.splitlines() if "mps" in line.lower())


def shell_case(work: Path) -> dict[str, Any]:
    uuid = subprocess.run(
        ["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.split()[0]
    pipe, logd = work / "pipe", work / "log"
    pipe.mkdir(parents=True)
    logd.mkdir()
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": uuid,
        "CUDA_MPS_PIPE_DIRECTORY": str(pipe),
        "CUDA_MPS_LOG_DIRECTORY": str(logd),
    }
    r = subprocess.run(
        ["nvidia-cuda-mps-control", "-d"], input="", env=env, capture_output=True, text=True
    )
    time.sleep(0.5)
    row = {"started": r.returncode == 0, "exit": r.returncode, "log": _control_logs(work)}
    subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", env=env, capture_output=True)
    return row


def daemon_case(work: Path, files: bool, refs: bool) -> dict[str, Any]:
    import benchmarks.user_models_gpu as um

    repo = work / "repo"
    repo.mkdir(parents=True)
    if files:
        shutil.rmtree(repo)
        models, _ = um.build_repository(repo, False, um.torchvision_ok(), um.SLO_RATE_GPU)
        if refs:
            um.references(models, repo, "cuda", None)
    d = LocalDaemon(work / "daemon", daemon_sections(False))
    p = d.start(args=["--model-repository", str(repo)])
    row: dict[str, Any] = {}
    try:
        with d.client(timeout_s=120.0) as c:
            wait_until("the daemon", lambda: c.get("/v2/health/ready").status_code == 200, 120, p)
            time.sleep(2.0)  # the repository's models start profiling (and ask for MPS)
            row["mps_after_start"] = _mps_processes()
            r = c.post("/v1/models", json={"name": "resnet50", "slo_ms": 50, "rate_rps": 100})
            row["register"] = f"{r.status_code} {r.text[:300]}"
            row["started"] = r.status_code in (200, 201)
            events = c.get("/v1/events", params={"limit": 200}).json()
            row["events"] = [
                str(e.get("message", e))[:300]
                for e in events
                if "mps" in str(e).lower() or "profil" in str(e).lower()
            ][-6:]
            row["log"] = _control_logs(work / "daemon")
            row["mps_processes"] = _mps_processes()
    finally:
        p.terminate()
        p.wait(30)
        quit_mps(work / "daemon" / "run")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    ap.add_argument("--json", help="write the rows here (default: $OUT/mps_start_gpu.json)")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}")
    rows: dict[str, Any] = {}
    for case in cases:
        work = Path(tempfile.mkdtemp(prefix="stgs-mpsstart-"))
        t = time.monotonic()
        try:
            if case == "shell":
                rows[case] = shell_case(work)
            else:
                rows[case] = daemon_case(work, files=case != "daemon", refs=case == "repo+refs")
        except Exception as exc:  # a row says what failed; the next case still runs
            rows[case] = {"started": False, "error": f"{type(exc).__name__}: {exc}"}
        rows[case]["seconds"] = round(time.monotonic() - t, 1)
        print(f"{case:10s} started={rows[case].get('started')}  {json.dumps(rows[case])[:1500]}")
        shutil.rmtree(work, ignore_errors=True)
    out = args.json or os.path.join(os.environ.get("OUT", "."), "mps_start_gpu.json")
    Path(out).write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")
    return 0 if all(r.get("started") for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
