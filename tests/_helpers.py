"""Helpers shared by test modules (``from _helpers import ...``; pytest puts tests/ on the path)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from stgs.plan import ModelAssignment, Partition

ROOT = Path(__file__).resolve().parents[1]


def run_python(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python ARGS...`` in the repository root, its output captured as text; asserts exit 0
    (the message: the tails of its stdout and stderr)."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# The GPU runs the fidelity tests replay: serve_gpu.py's JSON summaries and per-request .npz
# (6 to 12 MB each), out of the tree since this commit's successor (benchmarks/results/
# MANIFEST.md); restored from git history into a cache folder outside the tree.
RECORDED_COMMIT = "0abe881dd5124fe62d5ca2bf9e1874cfcce529d1"
RECORDED_RUNS = (
    "2026-11-22-h100/full",
    "2026-11-22-h100/half",
    "2026-11-22-h100-s3/full",
    "2026-11-22-h100-s3/half",
    "2026-11-22-h100-s4/s1200c",
    "2026-11-22-h100-s4/s1200d",
)


def recorded_runs() -> Path | None:
    """A folder with :data:`RECORDED_RUNS` (``SESSION/RUN.json`` and ``.npz``) as committed in
    :data:`RECORDED_COMMIT`, restored once per machine; None where git or that commit's objects
    are missing (a shallow clone, an sdist): the tests that replay them skip."""
    out = Path(tempfile.gettempdir()) / f"stgs-recorded-runs-{RECORDED_COMMIT[:12]}"
    if (out / "complete").is_file():
        return out
    try:
        for run in RECORDED_RUNS:
            for ext in (".json", ".npz"):
                dst = out / f"{run}{ext}"
                if dst.is_file():
                    continue
                blob = subprocess.run(
                    [
                        "git",
                        "-C",
                        str(ROOT),
                        "show",
                        f"{RECORDED_COMMIT}:benchmarks/results/{run}{ext}",
                    ],
                    capture_output=True,
                    timeout=120,
                    check=True,
                ).stdout
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
                tmp.write_bytes(blob)
                tmp.replace(dst)  # whole or absent, also with several pytest processes
    except (OSError, subprocess.SubprocessError):
        return None
    (out / "complete").touch()
    return out


def make_partition(
    models: list[tuple[str, int, float]],
    kind: str = "mps",
    mig: tuple[str, int] | None = None,
    mps: int | None = None,
    sm_count: int = 16,
) -> Partition:
    """A plan partition for transition tests: (name, batch, rate) per model, 1 ms batches."""
    return Partition(
        kind=kind,  # type: ignore[arg-type]
        sm_count=sm_count,
        memory_mib=1000.0,
        duty_cycle_ms=10.0,
        models=tuple(ModelAssignment(n, b, r, 1.0) for n, b, r in models),
        mig_profile=None if mig is None else mig[0],
        mig_start=None if mig is None else mig[1],
        mps_pct=mps,
    )
