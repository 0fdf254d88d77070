"""How fast can serve_gpu.py's load generator push requests? (no GPU needed)

    python -m benchmarks.loadgen_bench --rate 2400 --seconds 5 [--models 5] [--input small]

Starts ``--models`` stgs worker processes on the simulated node, each serving ``echo`` (or
``--model sleep:<ms>``), connects them as baselines_gpu.py does (``DirectRouter``, one socket per
model), and drives serve_gpu.py's ``LoadGen`` (both in ``benchmarks.lib.loadgen``) with open-loop
Poisson load at ``--rate`` req/s spread evenly over the models. Reports the sender lag behind
the schedule (p50/p99/max), the share answered within ``--slo-ms`` counted from the scheduled
arrival, and the CPU the load generator's process spent per request (user + system, every
thread), with the CPU of each of its threads (senders, transport readers, ...).
``--loadgen-from FILE`` takes ``LoadGen`` from another file (a copy of
``benchmarks/lib/loadgen.py``, or of serve_gpu.py before it moved: to compare versions).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lib.loadgen import NOT_SENT, OK, DirectRouter, poisson_arrivals
from stgs.backend import SimulatedNode
from stgs.backend.base import DeviceRef
from stgs.runtime.process import WorkerProcess
from stgs.runtime.worker import ModelSlot, WorkerSpec


def _thread_cpu() -> dict[int, float]:
    """CPU seconds per native thread id of this process."""
    tick = float(os.sysconf("SC_CLK_TCK"))
    out = {}
    for d in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(d.name)] = (int(f[11]) + int(f[12])) / tick
    return out


def _load_loadgen(path: str | None) -> Any:
    if path is None:
        from benchmarks.lib.loadgen import LoadGen

        return LoadGen
    spec = importlib.util.spec_from_file_location("serve_gpu_alt", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod.LoadGen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rate", type=float, default=2400.0, help="req/s, all models together")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--models", type=int, default=5, help="worker processes (one model each)")
    ap.add_argument("--model", default="echo", help="what each worker serves")
    ap.add_argument("--input", choices=("small", "image"), default="small")
    ap.add_argument("--slo-ms", type=float, default=10.0)
    ap.add_argument("--senders", type=int, default=2)
    ap.add_argument("--switch-interval-us", type=float, default=200.0)
    ap.add_argument("--loadgen-from", default=None, help="a file to take LoadGen from")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    sys.setswitchinterval(args.switch_interval_us / 1e6)
    LoadGen = _load_loadgen(args.loadgen_from)

    shape = (16,) if args.input == "small" else (3, 224, 224)
    x = np.zeros(shape, np.float32)
    node = SimulatedNode("H100-80GB", runtime_dir=Path(tempfile.mkdtemp(prefix="lgb-")))
    procs: list[WorkerProcess] = []
    try:
        for i in range(args.models):
            spec = WorkerSpec(name=f"w{i}", models=(ModelSlot(args.model, 64),))
            procs.append(WorkerProcess(node, DeviceRef(0), None, spec))
        for p in procs:
            assert p.wait_ready(60), p.exit_reason()
        # one distinct name per connection: the router maps a model to its worker
        names = [f"m{i}" for i in range(args.models)]
        router = DirectRouter({nm: p.transport for nm, p in zip(names, procs, strict=True)})
        for nm, p in zip(names, procs, strict=True):
            p.transport._index = {nm: 0}  # the worker serves it as model #0
        rates = [args.rate / args.models] * args.models
        t_sched, m_idx = poisson_arrivals(rates, args.seconds, args.seed)
        lg = LoadGen(
            router, names, [args.slo_ms] * args.models, [x] * args.models, t_sched, m_idx,
            args.senders,
        )  # fmt: skip
        gc.collect()
        gc.freeze()
        cpu0, th0, w0 = time.process_time(), _thread_cpu(), time.monotonic()
        t0 = time.monotonic() + 0.1
        lg.start(t0)
        th1: dict[int, float] = {}
        names_by_tid: dict[int | None, str] = {}
        while True:  # sample per-thread CPU while the threads live (they exit at the end)
            names_by_tid.update({t.native_id: t.name for t in threading.enumerate()})
            th1.update(_thread_cpu())
            if not lg.pending() and not any(t.is_alive() for t in lg.threads):
                break
            if time.monotonic() > t0 + args.seconds + 5.0:
                break
            time.sleep(0.05)
        th1.update(_thread_cpu())
        lg.join()
        cpu, wall = time.process_time() - cpu0, time.monotonic() - w0
        per_thread: dict[str, float] = {}
        for tid, v in th1.items():
            name = names_by_tid.get(tid, "main" if tid == os.getpid() else "gone")
            group = name.rsplit("-", 1)[0] if name[-1:].isdigit() else name
            per_thread[group] = per_thread.get(group, 0.0) + v - th0.get(tid, 0.0)
        sent = lg.status != NOT_SENT
        n = int(sent.sum())
        lag = (lg.sent - (lg.t0 + lg.t))[sent] * 1e3
        lat = (lg.done - (lg.t0 + lg.t))[sent] * 1e3
        within = float(((lg.status[sent] == OK) & (lat <= args.slo_ms)).mean()) if n else 0.0
        res = {
            "loadgen": args.loadgen_from or "serve_gpu.py",
            "rate": args.rate,
            "input": args.input,
            "models": args.models,
            "senders": args.senders,
            "sent": n,
            "pushed_rps": round(n / args.seconds, 1),
            "lag_ms": {q: round(float(np.percentile(lag, int(q[1:]))), 3) for q in ("p50", "p99")},
            "lag_max_ms": round(float(lag.max()), 3),
            "within_slo": round(within, 5),
            "unanswered": int((lg.status == 0).sum()),
            "cpu_s": round(cpu, 3),
            "cpu_pct": round(100 * cpu / wall, 1),
            "cpu_us_per_req": round(1e6 * cpu / max(n, 1), 1),
            "cpu_s_by_thread": {
                k: round(v, 3) for k, v in sorted(per_thread.items(), key=lambda kv: -kv[1])
            },
        }
        print(json.dumps(res))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                p.kill()
        node.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
