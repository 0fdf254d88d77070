"""Host probes (``benchmarks/hostmon.py``): the machine's CPU time, the cgroup's quota and
throttling, pressure stall information, run-queue waits, vmstat events and per-process CPU, read
from ``/proc`` and ``/sys``. The standard library only: it runs beside a benchmark on a bare
``python3``."""

from __future__ import annotations

import contextlib
import os
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


def throttled_ms(c: dict[str, int]) -> float:
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


def runq_delta_ms(cur: dict[str, int], prev: dict[str, int]) -> float:
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


def kernel_settings() -> dict[str, str]:
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
