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

    python3 benchmarks/hostmon.py --out $OUT/host.json &  MON=$!
    ... benchmark ...
    kill $MON; wait $MON
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def proc_stat() -> dict[str, float]:
    """Seconds of each kind, summed over CPUs (the first ``cpu`` line)."""
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        parts = f.readline().split()
    return {k: int(v) / hz for k, v in zip(FIELDS, parts[1 : 1 + len(FIELDS)], strict=False)}


def cgroup_dir() -> Path | None:
    """The directory with this process's ``cpu.stat``: cgroup v2, else v1's ``cpu`` controller."""
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            d = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
            if (d / "cpu.stat").exists():
                return d
    for d in (
        Path("/sys/fs/cgroup"),
        Path("/sys/fs/cgroup/cpu"),
        Path("/sys/fs/cgroup/cpu,cpuacct"),
    ):
        if (d / "cpu.stat").exists():
            return d
    return None


def cpu_quota(cg: Path | None) -> str | None:
    """``cpu.max`` (v2) or ``cfs_quota_us cfs_period_us`` (v1); ``max ...``/``-1``: none."""
    if cg is None:
        return None
    for names in (("cpu.max",), ("cpu.cfs_quota_us", "cpu.cfs_period_us")):
        try:
            return " ".join((cg / n).read_text().strip() for n in names)
        except OSError:
            continue
    return None


def read_kv(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (ln.split() for ln in path.read_text().splitlines())}
    except (OSError, ValueError):
        return {}


VMSTAT = (
    "numa_hint_faults",
    "numa_pages_migrated",
    "compact_stall",
    "thp_fault_alloc",
    "pgmajfault",
    "allocstall_normal",
    "allocstall_movable",
)


def vmstat() -> dict[str, int]:
    """Kernel memory events that stall a faulting thread (NUMA hinting faults, compaction)."""
    return {k: v for k, v in read_kv(Path("/proc/vmstat")).items() if k in VMSTAT}


def pressure(cg: Path | None) -> dict[str, int]:
    """Pressure stall information, total us: the machine's (``/proc/pressure``) and the
    cgroup's memory events (v2 ``memory.events``: ``high`` = throttled over memory.high)."""
    out: dict[str, int] = {}
    for res in ("cpu", "memory", "io"):
        try:
            for line in Path(f"/proc/pressure/{res}").read_text().splitlines():
                kind, *fields = line.split()
                total = dict(f.split("=") for f in fields).get("total")
                if total is not None:
                    out[f"{res}_{kind}_us"] = int(total)
        except (OSError, ValueError):
            continue
    if cg is not None:
        for k, v in read_kv(cg / "memory.events").items():
            out[f"memcg_{k}"] = v
    return out


def _throttled_ms(c: dict[str, int]) -> float:
    if "throttled_usec" in c:  # v2
        return c["throttled_usec"] / 1e3
    return c.get("throttled_time", 0) / 1e6  # v1: ns


def runq_waits(pid: int) -> dict[str, int]:
    """Per thread of the process: ns it has waited on a run queue for a CPU (schedstat)."""
    out: dict[str, int] = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                out[tid] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1])
    except OSError:
        pass
    return out


def _runq_delta_ms(cur: dict[str, int], prev: dict[str, int]) -> float:
    """Run-queue wait in the interval, over the threads alive at both ends (a thread that
    exits takes its total with it)."""
    return sum(cur[t] - prev[t] for t in cur.keys() & prev.keys()) / 1e6


def proc_cpu(match: tuple[str, ...]) -> dict[int, tuple[str, float]]:
    """pid -> (short command, CPU seconds so far) for processes matching ``match``."""
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            if not cmd or not any(m in cmd for m in match):
                continue
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2 :].split()
        out[int(d)] = (cmd[:120], (int(rest[11]) + int(rest[12])) / hz)
    return out


def summarize(samples: list[dict[str, Any]], ncpu: int) -> dict[str, Any]:
    if not samples:
        return {}
    busy = [s["busy_cores"] for s in samples]
    steal = [s["steal_cores"] for s in samples]
    thr = [s["throttled"] for s in samples]
    procs: dict[str, list[float]] = {}
    for s in samples:
        for key, cores in s["procs"].items():
            procs.setdefault(key, []).append(cores)
    return {
        "cpus": ncpu,
        "intervals": len(samples),
        "busy_cores_mean": round(sum(busy) / len(busy), 3),
        "busy_cores_max": round(max(busy), 3),
        "steal_cores_mean": round(sum(steal) / len(steal), 4),
        "steal_cores_max": round(max(steal), 4),
        "throttled_intervals": sum(1 for t in thr if t > 0),
        "throttled_periods": sum(thr),
        "vmstat": {k: sum(s["vmstat"].get(k, 0) for s in samples) for k in VMSTAT},
        "pressure": {
            k: sum(s["pressure"].get(k, 0) for s in samples)
            for k in sorted({k for s in samples for k in s["pressure"]})
        },
        "pressure_max_interval": {
            k: max(s["pressure"].get(k, 0) for s in samples)
            for k in sorted({k for s in samples for k in s["pressure"]})
        },
        "procs": {
            k: {
                "mean_cores": round(sum(v) / len(samples), 3),
                "max_cores": round(max(v), 3),
                "runq_wait_ms_max_interval": max(
                    (s["runq_wait_ms"].get(k, 0.0) for s in samples), default=0.0
                ),
                "runq_wait_ms_total": round(sum(s["runq_wait_ms"].get(k, 0.0) for s in samples), 1),
            }
            for k, v in sorted(procs.items(), key=lambda kv: -sum(kv[1]))[:12]
        },
    }


def _kernel_settings() -> dict[str, str]:
    out = {}
    for name, path in (
        ("numa_balancing", "/proc/sys/kernel/numa_balancing"),
        ("thp_enabled", "/sys/kernel/mm/transparent_hugepage/enabled"),
        ("thp_defrag", "/sys/kernel/mm/transparent_hugepage/defrag"),
    ):
        with contextlib.suppress(OSError):
            out[name] = Path(path).read_text().strip()
    out["numa_nodes"] = str(len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))))
    return out


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
                waits[f"{pid} {cmd}"] = round(_runq_delta_ms(w, prev_w.get(pid, {})), 2)
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
    summary["kernel"] = _kernel_settings()
    Path(args.out).write_text(json.dumps({"summary": summary, "samples": samples}))
    json.dump(summary, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
