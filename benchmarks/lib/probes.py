"""Probes of the client side of a run (``serve_gpu.py``): stalls of the load generator's
process, GC passes and CPU use while it runs, and the workers' trace merged after it."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from stgs.runtime.stalls import StallProbe

# ---------------------------------------------------------------------- diagnostics
STALL_FRAMES_MS = 8.0


def _frames() -> dict[str, str]:
    """thread name -> its innermost three frames (``file:line function``), this one left out."""
    names = {th.ident: th.name for th in threading.enumerate()}
    me = threading.get_ident()
    out = {}
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        stack = []
        f: Any = frame
        while f is not None and len(stack) < 3:
            co = f.f_code
            stack.append(f"{os.path.basename(co.co_filename)}:{f.f_lineno} {co.co_name}")
            f = f.f_back
        out[names.get(ident, str(ident))] = " < ".join(stack)
    return out


class Probe:
    """Where time goes on the client side: stalls of this process, GC passes, CPU use."""

    def __init__(self, t0: float, pid_source: Callable[[], dict[str, list[int]]]) -> None:
        self.stalls: list[tuple[float, float]] = []  # (time, ms late) of a 1 ms sleeper
        # where every thread was right after a stall > STALL_FRAMES_MS (the first 200): the
        # thread that held the GIL through the stall has just let go of it, so its frame is
        # at (or just after) what took so long
        self.stall_frames: list[dict[str, Any]] = []
        self.gcs: list[tuple[float, int, float]] = []  # (time, generation, ms)
        self.cpu: list[dict[str, float]] = []
        self.pid_source = pid_source
        self._stop = threading.Event()
        self._gc_t0 = 0.0
        self.t0 = t0
        self._sleeper = StallProbe(self._on_wake, interval_s=0.001)

    def start(self) -> None:
        gc.callbacks.append(self._on_gc)
        self._sleeper.start()
        threading.Thread(target=self._cpu_loop, daemon=True, name="_cpu_loop").start()

    def stop(self) -> None:
        self._stop.set()
        self._sleeper.stop()
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_t0 = time.monotonic()
            return
        ms = (time.monotonic() - self._gc_t0) * 1e3
        if ms > 1.0:
            self.gcs.append((self._gc_t0 - self.t0, info.get("generation", -1), ms))

    def _on_wake(self, late_s: float) -> None:
        late = late_s * 1e3
        if late > 3.0:
            a = time.monotonic() - late_s - self._sleeper.interval_s  # when the sleep began
            self.stalls.append((a - self.t0, late))
            if late > STALL_FRAMES_MS and len(self.stall_frames) < 200:
                self.stall_frames.append(
                    {"t": round(a - self.t0, 4), "late_ms": round(late, 2), **_frames()}
                )

    def _cpu_loop(self) -> None:
        tick = float(os.sysconf("SC_CLK_TCK"))
        prev: dict[tuple[str, int], float] = {}
        prev_t = time.monotonic()
        while not self._stop.wait(0.5):
            now = time.monotonic()
            groups = {"system": [0], "main": [os.getpid()], **self.pid_source()}
            cur = {
                (g, pid): _proc_system_busy(tick) if g == "system" else _proc_cpu(pid, tick)
                for g, pids in groups.items()
                for pid in pids
            }
            cur = {k: v for k, v in cur.items() if v > 0}  # 0: the process is gone
            if prev:
                dt = now - prev_t
                row = {"t": round(now - self.t0, 2)}
                for g in ("system", "main", "workers", "mps"):
                    busy = sum(v - prev[k] for k, v in cur.items() if k[0] == g and k in prev)
                    row[g] = round(100 * busy / dt, 1)
                self.cpu.append(row)
            prev, prev_t = cur, now

    def summary(self, lo: float, hi: float) -> dict[str, Any]:
        st = [ms for t, ms in self.stalls if lo <= t < hi]
        gcs = [ms for t, _, ms in self.gcs if lo <= t < hi]
        cpu = [c for c in self.cpu if lo <= c["t"] < hi]

        def mean(key: str) -> float | None:
            return round(float(np.mean([c[key] for c in cpu])), 1) if cpu else None

        return {
            "stalls_over_3ms": len(st),
            "stall_max_ms": round(max(st), 1) if st else 0.0,
            "stall_total_ms": round(sum(st), 1),
            "gc_passes_over_1ms": len(gcs),
            "gc_max_ms": round(max(gcs), 1) if gcs else 0.0,
            "cpu_pct_mean": {k: mean(k) for k in ("system", "main", "workers", "mps")},
            "cpu_pct_max_system": max((c["system"] for c in cpu), default=None),
        }


def _proc_cpu(pid: int, tick: float) -> float:
    """CPU seconds (user + system) of a process, 0 when it is gone or /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / tick


def _proc_system_busy(tick: float) -> float:
    """Busy CPU seconds of the whole machine (all cores) from /proc/stat."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    return (sum(v) - v[3] - (v[4] if len(v) > 4 else 0)) / tick


def mps_pids() -> list[int]:
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if (d / "comm").read_text().strip().startswith("nvidia-cuda-mps"):
                out.append(int(d.name))
    return out


# ---------------------------------------------------------------------- worker trace
def collect_traces(trace_dir: Path) -> dict[str, np.ndarray]:
    """The workers' trace files merged: ``wb`` (batches) and ``wr`` (requests) with the
    worker's index prepended, ``w_parts`` (JSON: per worker its name, models and pid)."""
    parts: list[dict[str, Any]] = []
    wb, wr = [], []
    for f in sorted(trace_dir.glob("*.npz")):
        try:
            with np.load(f) as z:
                b, r = z["batches"], z["requests"]
                k = len(parts)
                parts.append(
                    {"name": str(z["name"]), "models": [str(m) for m in z["models"]], "pid": f.stem}
                )
        except (OSError, KeyError, ValueError) as exc:
            print(f"trace {f} not read: {exc}")
            continue
        wb.append(np.c_[np.full(len(b), k, dtype=np.int64), b])
        wr.append(np.c_[np.full(len(r), k, dtype=np.int64), r])
    if not parts:
        return {}
    return {
        "wb": np.concatenate(wb),
        "wr": np.concatenate(wr),
        "w_parts": np.asarray(json.dumps(parts)),
    }
