"""Requests/s through a worker's data connection vs through its control connection.

    .venv/bin/python -m benchmarks.data_connections [--n 5000] [--depth 32]

One worker process on the simulated node serves ``echo`` (no compute, 256 B inputs) and listens
for data connections (``WorkerSpec.listen``). Closed loop (``depth`` requests in flight, a new
one sent as the oldest is answered) through: the control connection (the daemon's
:class:`~stgs.runtime.transport.SocketTransport` on the supervisor's socketpair), one data
connection (the same client class on a socket connected to the worker's path), and two data
connections at once from two client processes (forked: a client's own Python must not be what
limits; requests of both share the worker's batches). Also the time per request with one in
flight (depth 1) on the first two paths.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import tempfile
import time
from collections import deque
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from stgs.backend import DeviceRef, SimulatedNode
from stgs.runtime.process import WorkerProcess
from stgs.runtime.transport import SocketTransport
from stgs.runtime.worker import ModelSlot, WorkerSpec

X = np.ones(64, np.float32)


def _closed_loop(submit: Any, n: int, depth: int) -> float:
    """Requests/s with ``depth`` in flight."""
    for _ in range(200):  # warm up
        submit("echo", X).result(10)
    inflight: deque[Future[Any]] = deque()
    t0 = time.perf_counter()
    for _ in range(n):
        inflight.append(submit("echo", X))
        if len(inflight) >= depth:
            inflight.popleft().result(10)
    for f in inflight:
        f.result(10)
    return n / (time.perf_counter() - t0)


def _client_process(path: str, n: int, depth: int, out: Connection) -> None:
    c = _data_client(path)
    out.send(_closed_loop(c.submit, n, depth))
    c.close()


def _parallel(path: str, clients: int, n: int, depth: int) -> float:
    """Aggregate requests/s of one closed loop per client process, all at once (the sum of
    their rates: they start together and run about as long)."""
    ctx = mp.get_context("fork")
    pipes = [ctx.Pipe(duplex=False) for _ in range(clients)]
    procs = [ctx.Process(target=_client_process, args=(path, n, depth, w)) for _, w in pipes]
    for p in procs:
        p.start()
    rates = [r.recv() for r, _ in pipes]
    for p in procs:
        p.join()
    return float(sum(rates))


def _data_client(path: str) -> SocketTransport:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return SocketTransport(sock, ["echo"], name="data")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="requests per measurement")
    ap.add_argument("--depth", type=int, default=32, help="requests in flight per client")
    args = ap.parse_args()
    node = SimulatedNode("L4")
    with tempfile.TemporaryDirectory(prefix="stgs-") as d:
        path = str(Path(d) / "w.sock")
        spec = WorkerSpec("bench", (ModelSlot("echo", 32),), listen=path)
        w = WorkerProcess(node, DeviceRef(0), None, spec)
        try:
            if not w.wait_ready(30):
                raise SystemExit(f"worker did not start: {w.exit_reason()}")
            data = _data_client(path)
            rows = []
            for label, submit in (("control", w.transport.submit), ("data", data.submit)):
                one = 1.0 / _closed_loop(submit, max(1, args.n // 5), 1)
                rows.append((label, _closed_loop(submit, args.n, args.depth), one * 1e6))
            data.close()
            both = _parallel(path, 2, args.n, args.depth)
            w.stop()
        finally:
            w.kill()
            node.close()
    print(f"{'path':<22} {f'req/s @{args.depth}':>12} {'us/req @1':>10}")
    for label, rps, us in rows:
        print(f"{label:<22} {rps:12.0f} {us:10.1f}")
    print(f"{'2 data conns, 2 procs':<22} {both:12.0f} {'':>10}")


if __name__ == "__main__":
    main()
