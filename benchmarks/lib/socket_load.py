"""A load generator in a process of its own, on a worker's data connection
(``benchmarks/worker_pipeline_gpu.py``): one model, a closed or an open loop.

    python -m benchmarks.lib.socket_load SPEC.json OUT.npz

SPEC (JSON): ``socket`` (the worker's data socket), ``models`` (its slots' names, in order),
``model``, ``mode`` (``closed``: ``window`` requests outstanding, each answer sends the next, no
deadline; ``open``: Poisson arrivals at ``rate`` per second, ``seed``, each due ``slo_ms`` after
its scheduled arrival) and ``seconds``. Once connected, the client prints ``ready`` and reads
its start time from stdin (``time.monotonic()``, one clock for every process of the host), so
that every client of a phase starts at once however long its imports took. ``input``: a
``.npy`` file, the request sent every time. Writes per request
``t_sched`` (the scheduled arrival; the send for ``closed``), ``sent``, ``done`` (monotonic s,
NaN: not answered) and ``status`` (:data:`OK`, :data:`DEADLINE`, :data:`ERROR`; :data:`PENDING`
never answered). One process per model: a client's own Python (sending 600 KB images at
thousands per second) must not be what limits the worker.
"""

from __future__ import annotations

import functools
import json
import socket
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from stgs.errors import DeadlineExceededError
from stgs.runtime.transport import SocketTransport

PENDING, OK, DEADLINE, ERROR = 0, 1, 2, 3
DRAIN_S = 15.0  # how long the last answers may take


class _Record:
    def __init__(self, n: int) -> None:
        self.t_sched = np.full(n, np.nan)
        self.sent = np.full(n, np.nan)
        self.done = np.full(n, np.nan)
        self.status = np.full(n, PENDING, dtype=np.int8)
        self.n = 0

    def answered(self, k: int, fut: Future[Any]) -> None:
        self.done[k] = time.monotonic()
        exc = fut.exception()
        self.status[k] = (
            OK if exc is None else DEADLINE if isinstance(exc, DeadlineExceededError) else ERROR
        )


def closed(t: SocketTransport, spec: dict[str, Any], x: np.ndarray) -> _Record:
    window, start = int(spec["window"]), float(spec["start"])
    end = start + float(spec["seconds"])
    rec = _Record(int(50_000 * float(spec["seconds"])) + 1000)  # beyond any worker's rate
    sem = threading.BoundedSemaphore(window)

    def answered(k: int, fut: Future[Any]) -> None:
        rec.answered(k, fut)
        sem.release()

    time.sleep(max(0.0, start - time.monotonic()))
    name = spec["model"]
    while time.monotonic() < end and rec.n < len(rec.sent):
        if not sem.acquire(timeout=0.5):
            continue
        k = rec.n
        rec.n += 1
        rec.t_sched[k] = rec.sent[k] = time.monotonic()
        t.submit(name, x).add_done_callback(functools.partial(answered, k))
    for _ in range(window):  # the last answers (a stuck worker: give up)
        if not sem.acquire(timeout=DRAIN_S):
            break
    return rec


def open_loop(t: SocketTransport, spec: dict[str, Any], x: np.ndarray) -> _Record:
    start, seconds, rate = float(spec["start"]), float(spec["seconds"]), float(spec["rate"])
    rng = np.random.default_rng(int(spec.get("seed", 1)))
    n = int(rate * seconds + 10 * np.sqrt(rate * seconds) + 10)
    offs = np.cumsum(rng.exponential(1.0 / rate, size=n)) if rate > 0 else np.zeros(0)
    offs = offs[offs < seconds]
    rec = _Record(len(offs))
    rec.t_sched[:] = start + offs
    slo_ns = int(float(spec["slo_ms"]) * 1e6)
    name = spec["model"]
    sched = rec.t_sched.tolist()
    k = 0
    while k < len(sched):
        wait = sched[k] - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        now = time.monotonic()
        while k < len(sched) and sched[k] <= now:  # everything due: back to back
            rec.sent[k] = time.monotonic()
            deadline_ns = int(sched[k] * 1e9) + slo_ns
            fut = t.submit(name, x, deadline_ns=deadline_ns)
            fut.add_done_callback(functools.partial(rec.answered, k))
            k += 1
    rec.n = k
    end = time.monotonic() + DRAIN_S
    while (rec.status[:k] == PENDING).any() and time.monotonic() < end:
        time.sleep(0.02)
    return rec


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())
    x = np.load(spec["input"])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(spec["socket"])
    t = SocketTransport(sock, list(spec["models"]), name=f"load-{spec['model']}")
    print("ready", flush=True)  # the parent answers with the start time of every client
    line = sys.stdin.readline()
    if not line.strip():
        t.close()
        return 1
    spec["start"] = float(line)
    try:
        rec = closed(t, spec, x) if spec["mode"] == "closed" else open_loop(t, spec, x)
    finally:
        t.close()
    n = rec.n
    np.savez(
        args[1],
        t_sched=rec.t_sched[:n],
        sent=rec.sent[:n],
        done=rec.done[:n],
        status=rec.status[:n],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
