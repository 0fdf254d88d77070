"""Worker faults under load, through the daemon's front door; prints a table per fault.

Starts ``stgs serve`` (simulated node, CPU workers), registers ``tiny_mlp`` over REST, drives an
open-loop Poisson client over HTTP (KServe v2 binary tensors) in its own process and probes
``/v2/health/live`` from another, then injects ``--kills`` SIGKILLs and ``--stops`` SIGSTOPs
into the partition's worker, one at a time, waiting for it to serve again in between.

Per fault: when the supervisor noticed it (its ``worker_failed`` event, against the signal's
wall time), how long the new worker took to start (``worker_restarted`` -> ``worker_ready``),
when the model served again, and what the clients saw in the gap (status codes, the slowest
answer) and the slowest ``/v2/health/live`` answer during the fault.

    python -m benchmarks.worker_faults [--rate 40] [--kills 3] [--stops 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from api.kserve import binary_request
from api.launch import ONE_SIMULATED_GPU, LocalDaemon, wait_until

SLO_MS = 250.0


async def _open_loop(url: str, rate: float, seconds: float, out: list[tuple[float, float, int]]):
    body, headers = binary_request(np.ones((1, 64), np.float32))
    rng = random.Random(1)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as c:

        async def one(t_wall: float) -> None:
            t0 = time.monotonic()
            try:
                r = await c.post("/v2/models/tiny_mlp/infer", content=body, headers=headers)
                code = r.status_code
            except httpx.HTTPError:
                code = -1
            out.append((t_wall, time.monotonic() - t0, code))

        tasks = []
        start = time.monotonic()
        t = 0.0
        while t < seconds:
            t += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, start + t - time.monotonic()))
            tasks.append(asyncio.create_task(one(time.time())))
        await asyncio.gather(*tasks)


def client_proc(url: str, rate: float, seconds: float, path: str) -> None:
    """The open-loop client (its own process): (wall time sent, seconds, status) per request."""
    out: list[tuple[float, float, int]] = []
    asyncio.run(_open_loop(url, rate, seconds, out))
    Path(path).write_text(json.dumps(out))


def live_proc(url: str, seconds: float, path: str) -> None:
    """``GET /v2/health/live`` every 20 ms: (wall time, seconds, status)."""
    out = []
    with httpx.Client(base_url=url, timeout=10.0) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t_wall, t0 = time.time(), time.monotonic()
            try:
                code = c.get("/v2/health/live").status_code
            except httpx.HTTPError:
                code = -1
            out.append((t_wall, time.monotonic() - t0, code))
            time.sleep(0.02)
    Path(path).write_text(json.dumps(out))


def _partition(c: httpx.Client) -> dict[str, Any] | None:
    parts = c.get("/v1/plan").json()["partitions"]
    return parts[0] if parts and parts[0]["state"] == "ready" else None


def _events(c: httpx.Client, kind: str) -> list[dict[str, Any]]:
    return list(c.get("/v1/events", params={"kind": kind, "limit": 1000}).json())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=40.0, help="requests/s, open loop")
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--stops", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="write the rows here too")
    args = ap.parse_args(argv)
    faults = ["SIGKILL"] * args.kills + ["SIGSTOP"] * args.stops
    seconds = 6.0 + 6.0 * len(faults)
    work = Path(tempfile.mkdtemp(prefix="stgs-faults-"))
    d = LocalDaemon(work, ONE_SIMULATED_GPU)
    rows: list[dict[str, Any]] = []
    try:
        p = d.start_serving("tiny_mlp", SLO_MS, 20)
        with d.client() as c:
            ctx = mp.get_context("spawn")
            loads = str(work / "load.json")
            lives = str(work / "live.json")
            procs = [
                ctx.Process(target=client_proc, args=(d.url, args.rate, seconds, loads)),
                ctx.Process(target=live_proc, args=(d.url, seconds, lives)),
            ]
            for q in procs:
                q.start()
            time.sleep(3.0)
            marks: list[tuple[str, int, float]] = []
            for sig in faults:
                part = wait_until("a ready worker", lambda: _partition(c), 60, p)
                pid = int(part["pid"])
                time.sleep(1.0)
                t_sig = time.time()
                os.kill(pid, getattr(signal, sig))
                marks.append((sig, pid, t_sig))
                wait_until(
                    "serving again",
                    lambda pid=pid: (q := _partition(c)) is not None and q["pid"] != pid,
                    60,
                    p,
                )
                if sig == "SIGSTOP" and Path(f"/proc/{pid}").exists():
                    os.kill(pid, signal.SIGKILL)
            for q in procs:
                q.join(seconds + 60)
            load = json.loads(Path(loads).read_text())
            live = json.loads(Path(lives).read_text())
            failed = _events(c, "worker_failed")
            restarted = _events(c, "worker_restarted")
            ready = _events(c, "worker_ready")
            for sig, pid, t_sig in marks:
                f = min((e for e in failed if e["ts"] >= t_sig), key=lambda e: e["ts"])
                rs = min((e for e in restarted if e["ts"] >= f["ts"]), key=lambda e: e["ts"])
                rd = min((e for e in ready if e["ts"] >= rs["ts"]), key=lambda e: e["ts"])
                gap = [x for x in load if t_sig <= x[0] <= rd["ts"]]
                window = [x for x in live if t_sig - 0.5 <= x[0] <= rd["ts"] + 0.5]
                codes: dict[int, int] = {}
                for _, _, code in gap:
                    codes[code] = codes.get(code, 0) + 1
                rows.append(
                    {
                        "fault": sig,
                        "pid": pid,
                        "detected_s": round(f["ts"] - t_sig, 3),
                        "start_s": round(rd["ts"] - rs["ts"], 3),
                        "serving_again_s": round(rd["ts"] - t_sig, 3),
                        "gap_requests": len(gap),
                        "gap_codes": codes,
                        "gap_slowest_ms": round(1e3 * max((x[1] for x in gap), default=0.0), 1),
                        "live_slowest_ms": round(1e3 * max((x[1] for x in window), default=0), 1),
                        "reason": f["message"].split(" failed: ", 1)[-1],
                    }
                )
            all_codes: dict[int, int] = {}
            for _, _, code in load:
                all_codes[code] = all_codes.get(code, 0) + 1
    finally:
        d.stop()
    print(f"{len(load)} requests at {args.rate:g}/s open loop, SLO {SLO_MS:g} ms: {all_codes}")
    print(
        f"{'fault':8} {'detected s':>10} {'start s':>8} {'serving s':>9} {'gap n':>6}"
        f" {'gap slowest ms':>14} {'live max ms':>11}  gap codes"
    )
    for r in rows:
        print(
            f"{r['fault']:8} {r['detected_s']:10.3f} {r['start_s']:8.3f}"
            f" {r['serving_again_s']:9.3f}"
            f" {r['gap_requests']:6d} {r['gap_slowest_ms']:14.1f} {r['live_slowest_ms']:11.1f}"
            f"  {r['gap_codes']}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "codes": all_codes}, indent=1))
    bad = [c for c in all_codes if c not in (200, 429, 503)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
