"""Serving capacity through the front door: the highest open-loop rate with >= 99% within SLO.

Targets, each driven by the same open-loop Poisson client (``--clients`` processes of their own,
aiohttp for HTTP, grpc.aio for gRPC, KServe v2 binary tensors of ``tiny_mlp``'s [1, 64] FP32):

* ``http``: ``stgs serve`` (simulated node, CPU worker) serving inference in its control-plane
  process (``server.frontends = 0``), ``POST /v2/models/tiny_mlp/infer``;
* ``grpc``: the same daemon's KServe v2 gRPC ``ModelInfer``;
* ``dp-http``, ``dp-grpc``: a second daemon with the data plane (``server.frontends =
  --frontends``, default 2): frontend processes serve both protocols, straight to the worker;
* ``bare``: a bare one-process FastAPI KServe endpoint (``benchmarks/_bare_kserve.py``) that
  runs the same network in its own process: the yardstick a data plane must at least match.

With ``--overload R`` (R: a rate the target sustains), each target instead gets 3R for 30 s,
then R for 10 s: the p99 of every answer (200 or 429) during the overload against the SLO, the
requests served within SLO per second during it (at least R is the goal), the share within SLO
in the 10 s after, and the daemon's resident memory (control plane and frontends) before and
after.

For each target and rate (``--rates``), ``--seconds`` of load; a request counts within SLO when
it got a 200 within ``--slo-ms`` of when the client meant to send it (client lag included, so
a client that falls behind shows as misses, and its lag is reported). Prints one row per rate
and a summary: the highest rate whose share within SLO is >= 0.99.

    python -m benchmarks.api_load [--targets http,grpc,dp-http,dp-grpc,bare]
        [--rates 100,200,400,800] [--seconds 10] [--clients 2] [--frontends 2] [--json OUT]
        [--overload R] [--server-cpus 0,1]

``--server-cpus``: the servers run on these CPUs only and the clients on the others, so that on
a machine with more cores the server side is measured as on a small one and the client is
never its bottleneck (on the 2-core VM the clients share the cores with the server).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from api.launch import ONE_SIMULATED_GPU, LocalDaemon, free_port, wait_until
from benchmarks.lib import kserve_load
from benchmarks.lib.kserve_load import Row, Target, summarize

ROOT = Path(__file__).resolve().parent.parent


X = np.random.default_rng(0).standard_normal((1, 64), dtype=np.float32)  # tiny_mlp's input


def load(
    kind: str, addr: str, rate: float, seconds: float, clients: int, work: Path, cpus: Any = None
) -> list[Row]:
    """``rate`` req/s of ``tiny_mlp`` for ``seconds`` from ``clients`` processes."""
    return kserve_load.load(
        kind, addr, [Target("tiny_mlp", rate, X)], seconds, clients, work, cpus=cpus
    )


def _bare(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = (work / "bare.log").open("ab")
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "_bare_kserve.py"), "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    import httpx

    def up() -> bool:
        return httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200

    wait_until("the bare endpoint", up, 60, p)
    return p, f"127.0.0.1:{port}"


def _discard(lines: Any) -> None:
    while lines.readline():
        pass


def _rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _tree(root: int) -> list[int]:
    """``root`` and every process below it (workers, frontends)."""
    children: dict[int, list[int]] = {}
    for st in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = st.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(st.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _cpu_s(root: int) -> float:
    """CPU seconds (user + system) the process tree under ``root`` has used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in _tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def _daemon_pids(d: LocalDaemon) -> list[int]:
    with d.client() as c:
        fronts = c.get("/v1/status").json().get("frontends", [])
    return [d.procs[-1].pid, *(int(f["pid"]) for f in fronts)]


def overload(
    target: str,
    kind: str,
    addr: str,
    rate: float,
    args: argparse.Namespace,
    work: Path,
    pids: list[int],
    cpus: Any = None,
) -> dict[str, Any]:
    """3x ``rate`` for 30 s, then ``rate`` for 10 s; what the clients saw and the memory."""
    slo_s = args.slo_ms / 1e3
    rss0 = _rss_mib(pids)
    over = load(kind, addr, 3 * rate, 30.0, args.clients, work, cpus)
    after = load(kind, addr, rate, 10.0, args.clients, work, cpus)
    rss1 = _rss_mib(pids)
    s = summarize(over, slo_s)
    return {
        "target": target,
        "rate": rate,
        "overload_p99_ms": s["p99_ms"],
        "served_within_slo_per_s": s["within_slo"] * s["n"] / 30.0,
        "after_within_slo": summarize(after, slo_s)["within_slo"],
        "rss_before_mib": rss0,
        "rss_after_mib": rss1,
        "codes": s["codes"],
    }


def _daemon(work: Path, frontends: int, slo_ms: float, rate_rps: float) -> LocalDaemon:
    """``stgs serve`` with ``tiny_mlp`` registered and served."""
    d = LocalDaemon(work, ONE_SIMULATED_GPU, server_options=f"frontends = {frontends}\n")
    try:
        d.start_serving("tiny_mlp", slo_ms, rate_rps)
    except BaseException:
        d.stop()
        raise
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default="http,grpc,bare")
    ap.add_argument("--rates", default="100,200,400,800,1600")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--frontends", type=int, default=2, help="frontends of the dp-* daemon")
    ap.add_argument("--slo-ms", type=float, default=100.0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--overload", type=float, default=None, help="a sustainable rate R: 3R, R")
    ap.add_argument(
        "--server-cpus",
        default="",
        help="CPUs (e.g. 0,1) the servers (daemon, its workers and frontends; the bare endpoint)"
        " run on; the clients get the others. Default: all share every CPU",
    )
    args = ap.parse_args(argv)
    server_cpus = {int(c) for c in args.server_cpus.split(",") if c}
    client_cpus = sorted(os.sched_getaffinity(0) - server_cpus) if server_cpus else None
    if server_cpus and not client_cpus:
        ap.error("--server-cpus leaves no CPU for the clients")

    def pinned_start(start: Any) -> Any:
        """Start a server on the server CPUs (its children inherit them)."""
        if not server_cpus:
            return start()
        every = os.sched_getaffinity(0)
        os.sched_setaffinity(0, server_cpus)
        try:
            return start()
        finally:
            os.sched_setaffinity(0, every)

    rates = [float(r) for r in args.rates.split(",")]
    targets = args.targets.split(",")
    work = Path(tempfile.mkdtemp(prefix="stgs-apiload-"))
    results: list[dict[str, Any]] = []
    daemons: dict[int, LocalDaemon] = {}
    try:
        for target in targets:
            bare = None
            kind = "grpc" if target.endswith("grpc") else "http"
            if target == "bare":
                bare, addr = pinned_start(lambda: _bare(work))
            else:
                n = args.frontends if target.startswith("dp-") else 0
                if n not in daemons:
                    daemons[n] = pinned_start(
                        lambda n=n: _daemon(work / f"daemon{n}", n, args.slo_ms, max(rates))
                    )
                d = daemons[n]
                addr = f"127.0.0.1:{d.grpc_port if kind == 'grpc' else d.port}"
            try:
                load(kind, addr, 50.0, 2.0, 1, work, client_cpus)  # warm up connections and caches
                if args.overload is not None:
                    pids = [] if bare is not None else _daemon_pids(d)
                    o = overload(target, kind, addr, args.overload, args, work, pids, client_cpus)
                    results.append(o)
                    print(
                        f"{target:8} 3 x {o['rate']:.0f}/s for 30 s:"
                        f" p99 {o['overload_p99_ms']:.1f} ms"
                        f" (SLO {args.slo_ms:g}), {o['served_within_slo_per_s']:.0f}/s within SLO;"
                        f" then {o['rate']:.0f}/s: {o['after_within_slo']:.4f} within SLO;"
                        f" RSS {o['rss_before_mib']:.0f} -> {o['rss_after_mib']:.0f} MiB"
                        f"  {o['codes']}",
                        flush=True,
                    )
                    continue
                root = bare.pid if bare is not None else d.procs[-1].pid
                for rate in rates:
                    cpu0 = _cpu_s(root)
                    s = summarize(
                        load(kind, addr, rate, args.seconds, args.clients, work, client_cpus),
                        args.slo_ms / 1e3,
                    )
                    # the server's CPU (every process of it) per answer
                    s["server_cpu_us"] = (_cpu_s(root) - cpu0) / max(s["n"], 1) * 1e6
                    results.append({"target": target, "rate": rate, **s})
                    print(
                        f"{target:8} {rate:7.0f}/s  n={s['n']:6d}  within SLO {s['within_slo']:.4f}"
                        f"  p50 {s['p50_ms']:7.1f} ms  p99 {s['p99_ms']:8.1f} ms"
                        f"  client lag p99 {s['lag_p99_ms']:6.1f} ms"
                        f"  server CPU {s['server_cpu_us']:5.0f} us/req  {s['codes']}",
                        flush=True,
                    )
                    if s["within_slo"] < 0.5:
                        break  # far past capacity: higher rates only take longer
            finally:
                if bare is not None:
                    bare.send_signal(signal.SIGTERM)
                    bare.wait(10)
    finally:
        for d in daemons.values():
            d.stop()
    print(
        f"\nhighest open-loop rate with >= 99% within {args.slo_ms:g} ms"
        + (
            f" (servers on CPUs {sorted(server_cpus)}, clients on {len(client_cpus or [])} others):"
            if server_cpus
            else f" ({os.cpu_count()} CPUs, clients included):"
        )
    )
    for target in targets:
        good = [
            r["rate"] for r in results if r["target"] == target and r.get("within_slo", 0.0) >= 0.99
        ]
        print(f"  {target:8} {max(good, default=0):7.0f} req/s")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
