"""What a request body's size costs on the way into a frontend, with and without large buffers
kept in the heap (``stgs.hostmem``), side by side in one run.

    python -m benchmarks.http_body [--sizes 4096,602112,1204224] [--n 300] [--frontends 1]

Two daemons (simulated node, the data plane with ``--frontends`` processes), one started with
``STGS_KEEP_LARGE_BUFFERS=0`` (glibc's defaults: every block above 128 KiB is fresh ``mmap``'d
pages), one with the product's default. Each gets ``--n`` sequential ``POST
/v2/models/no_such_model/infer`` of each size from one keep-alive connection: the frontend reads
the whole body (limits, the KServe parser's way in) and answers 404, so the figure is the HTTP
way into a frontend, with no worker behind it. Prints the round trip's p50 and p99 and the
frontends' minor page faults per request.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from api.launch import ONE_SIMULATED_GPU, LocalDaemon
from stgs.hostmem import ENV


def _faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def measure(d: LocalDaemon, sizes: list[int], n: int) -> dict[int, tuple[float, float, float]]:
    """Per size: (p50 ms, p99 ms, page faults per request)."""
    with d.client() as c:
        pids = [int(f["pid"]) for f in c.get("/v1/status").json()["frontends"]]
    out: dict[int, tuple[float, float, float]] = {}
    url = f"{d.url}/v2/models/no_such_model/infer"
    with httpx.Client(timeout=30) as c:
        for size in sizes:
            body = bytes(size)
            for _ in range(20):  # warm
                c.post(url, content=body)
            before = sum(_faults(p) for p in pids)
            lat = []
            for _ in range(n):
                t0 = time.perf_counter()
                r = c.post(url, content=body)
                lat.append(time.perf_counter() - t0)
                if r.status_code != 404:
                    raise RuntimeError(f"{r.status_code}: {r.text[:200]}")
                time.sleep(0.002)
            faults = (sum(_faults(p) for p in pids) - before) / n
            ms = np.asarray(lat) * 1e3
            out[size] = (float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), faults)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="4096,602112,1204224")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--frontends", type=int, default=1)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="stgs-body-"))
    rows: dict[str, dict[int, tuple[float, float, float]]] = {}
    for label, env in (("glibc defaults", {ENV: "0"}), ("large buffers kept", {})):
        d = LocalDaemon(
            work / label.replace(" ", "-"),
            ONE_SIMULATED_GPU,
            server_options=f"frontends = {args.frontends}\n",
        )
        try:
            d.start_ready(env=env)
            rows[label] = measure(d, sizes, args.n)
        finally:
            d.stop()
    print(f"POST of a body, read whole by a frontend (404), {args.n} sequential requests:")
    print(f"  {'bytes':>9}  {'setting':18} {'p50 ms':>7} {'p99 ms':>7} {'faults/req':>10}")
    for size in sizes:
        for label, got in rows.items():
            p50, p99, faults = got[size]
            print(f"  {size:9d}  {label:18} {p50:7.3f} {p99:7.3f} {faults:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
