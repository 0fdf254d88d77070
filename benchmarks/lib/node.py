"""The node a GPU benchmark serves on: the backend (NVML, or the simulated node with CPU
workers), its label, and quitting the MPS daemons stgs started."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from benchmarks.lib.loadgen import PLAN_SKU
from stgs.backend.base import Backend
from stgs.errors import StgsError


def daemon_sections(simulated: bool, gpus: int = 1, controller: str | None = None) -> str:
    """``LocalDaemon`` sections of a GPU benchmark's daemon: the NVML backend, never changing MIG
    (or the simulated node: ``gpus`` H100s without MIG, CPU workers), and a controller that does
    not re-plan on its own (the plan stays the one measured), or ``controller``'s lines of
    ``[controller]`` (TOML) for one that does."""
    kind = "simulated" if simulated else "nvml"
    return f"""[backend]
kind = "{kind}"
simulated_gpus = [{{ sku = "H100-80GB", count = {gpus}, mig = false }}]
allow_mig_changes = false
[controller]
{controller if controller is not None else "interval_s = 3600.0"}
"""


def open_backend(simulated: bool, runtime_dir: Path) -> tuple[Backend, str] | None:
    """The node to serve on (the simulated node with CPU workers, or NVML) and its label;
    None, after saying why, when GPU 0 is in MIG mode (these benchmarks never change it)."""
    backend: Backend
    if simulated:
        from stgs.backend import SimulatedNode

        backend = SimulatedNode(PLAN_SKU, mig_enabled=False, runtime_dir=runtime_dir)
        label = f"simulated {PLAN_SKU} (CPU workers, sleep stand-ins)"
    else:
        from stgs.backend.nvml import NvmlBackend

        backend = NvmlBackend(runtime_dir)
        label = gpu_label()
    if backend.gpus()[0].mig_enabled:
        print("GPU 0 is in MIG mode; this benchmark needs MIG off (it never changes it)")
        return None
    return backend, label


def _gpu_rows(fields: str) -> list[str]:
    """nvidia-smi's CSV rows of ``fields`` per GPU (none without it, or when it fails)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def gpu_label() -> str:
    """The first GPU's ``name, driver`` ("unknown" without nvidia-smi)."""
    rows = _gpu_rows("name,driver_version")
    return rows[0] if rows else "unknown"


def gpu_names() -> list[str]:
    """Every GPU's ``index, name, driver`` as nvidia-smi gives them (none without it)."""
    return _gpu_rows("index,name,driver_version")


def stop_daemons(backend: Backend, timeout_s: float = 15.0) -> list[str]:
    """Quit every MPS daemon stgs started (waits for the killed clients to detach)."""
    notes = []
    end = time.monotonic() + timeout_s
    for d in backend.mps_daemons():
        while True:
            try:
                backend.stop_mps(d.ref)
                notes.append(f"MPS daemon on {d.ref} quit")
                break
            except StgsError as exc:
                if time.monotonic() > end:
                    notes.append(f"MPS daemon on {d.ref} NOT stopped: {exc}")
                    break
                time.sleep(0.2)
    return notes


def quit_mps(run_dir: Path) -> None:
    """Quit the MPS control daemons a stopped (or killed) ``stgs serve`` left behind: their
    pipe directories are under its runtime directory."""
    for pipe in run_dir.glob("**/pipe"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["nvidia-cuda-mps-control"],
                input=b"quit\n",
                env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe)},
                timeout=15,
                check=False,
            )
