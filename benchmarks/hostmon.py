"""What the host's CPUs did during a GPU benchmark: busy, steal, cgroup throttling, per process.

A load generator that falls behind its schedule (``sender lag``) loses requests that the system
under test never saw. This samples, every ``--interval-s`` until killed (SIGTERM / SIGINT) or
``--duration-s``:

- ``/proc/stat``: the whole machine's user, system, idle, iowait, irq and **steal** time (steal:
  the hypervisor ran someone else on our virtual CPUs);
- the cgroup (v2) of this process: ``cpu.max`` (the CPU quota) and ``cpu.stat``
  (``nr_throttled``, ``throttled_usec``: the quota ran out and every thread of the cgroup
  waited for the next period);
- pressure stall information (``/proc/pressure/{cpu,memory,io}``: time some or all tasks
  waited for a CPU, for memory, for I/O) and the cgroup's ``memory.events`` (v2);
- per matched process, the time its threads waited on a run queue for a CPU (schedstat);
- ``/proc/vmstat`` events that stall the thread that faults (NUMA hinting faults, compaction,
  direct reclaim) and the kernel's NUMA-balancing and transparent-huge-page settings;
- every process whose command line contains one of ``--match`` (default ``python``): CPU
  seconds used in each interval (``utime + stime`` from ``/proc/PID/stat``).

It writes the samples as JSON (``--out``) and prints a summary: mean and max busy and steal per
interval in cores, intervals with throttling, and the processes' mean and max CPU in cores.

    python3 -m benchmarks.hostmon --out $OUT/host.json &  MON=$!
    ... benchmark ...
    kill $MON; wait $MON
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.lib.hostmon import (
    cgroup_dir,
    cpu_quota,
    kernel_settings,
    pressure,
    proc_cpu,
    proc_stat,
    read_kv,
    runq_delta_ms,
    runq_waits,
    summarize,
    vmstat,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hostmon", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file for the samples and summary")
    ap.add_argument("--interval-s", type=float, default=0.5)
    ap.add_argument("--duration-s", type=float, default=0.0, help="0: until SIGTERM/SIGINT")
    ap.add_argument("--match", default="python", help="comma-separated command-line parts")
    args = ap.parse_args(argv)
    if args.interval_s <= 0:
        ap.error("--interval-s must be > 0")
    match = tuple(m for m in args.match.split(",") if m)
    stop = False

    def _stop(_sig: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    cg = cgroup_dir()
    cpu_max = cpu_quota(cg)
    ncpu = os.cpu_count() or 1
    samples: list[dict[str, Any]] = []
    prev_t, prev_s = time.monotonic(), proc_stat()
    prev_c = read_kv(cg / "cpu.stat") if cg else {}
    prev_p = proc_cpu(match)
    prev_v = vmstat()
    prev_psi = pressure(cg)
    prev_w: dict[int, dict[str, int]] = {}
    t_start = prev_t
    while not stop and (args.duration_s <= 0 or prev_t - t_start < args.duration_s):
        time.sleep(args.interval_s)
        t, s = time.monotonic(), proc_stat()
        c = read_kv(cg / "cpu.stat") if cg else {}
        p = proc_cpu(match)
        v = vmstat()
        psi = pressure(cg)
        dt = max(t - prev_t, 1e-9)
        d = {k: s[k] - prev_s[k] for k in s}
        procs = {}
        waits = {}
        for pid, (cmd, sec) in p.items():
            w = runq_waits(pid)
            if pid in prev_p:
                procs[f"{pid} {cmd}"] = round((sec - prev_p[pid][1]) / dt, 3)
                waits[f"{pid} {cmd}"] = round(runq_delta_ms(w, prev_w.get(pid, {})), 2)
            prev_w[pid] = w
        samples.append(
            {
                "t": round(t - t_start, 3),
                "busy_cores": round(
                    sum(v for k, v in d.items() if k not in ("idle", "iowait")) / dt, 3
                ),
                "steal_cores": round(d.get("steal", 0.0) / dt, 4),
                "throttled": c.get("nr_throttled", 0) - prev_c.get("nr_throttled", 0),
                "throttled_ms": (c.get("throttled_usec", 0) - prev_c.get("throttled_usec", 0))
                / 1e3,
                "procs": procs,
                "runq_wait_ms": waits,
                "vmstat": {k: n - prev_v.get(k, 0) for k, n in v.items() if n != prev_v.get(k, 0)},
                "pressure": {
                    k: n - prev_psi.get(k, 0) for k, n in psi.items() if n != prev_psi.get(k, 0)
                },
            }
        )
        prev_t, prev_s, prev_c, prev_p, prev_v, prev_psi = t, s, c, p, v, psi
    summary = summarize(samples, ncpu)
    summary["cpu_max"] = cpu_max
    summary["cgroup"] = str(cg) if cg else None
    summary["kernel"] = kernel_settings()
    Path(args.out).write_text(json.dumps({"summary": summary, "samples": samples}))
    json.dump(summary, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
