"""The "concurrent streams" baseline's server: one process, every model, one CUDA stream each.

    python benchmarks/_baseline_server.py --fds 5,6,7 --specs '[WorkerSpec JSON, ...]'

Started by ``benchmarks/baselines_gpu.py`` through ``Backend.spawn_worker`` (so it is pinned to
the GPU exactly as a stgs worker is), with one inherited socket per model. Each model is served
by a stgs worker object (:class:`stgs.runtime.worker.Worker`) holding that one model: the same
transport frames, input checks, fp16 weights, one CUDA graph per batch bucket (powers of two up
to the max batch, a batch padded to its bucket), the same work-conserving dynamic batching (take
what is queued, up to the max batch, as soon as the model's previous batch finished; no delay)
and the same per-request deadline drop (and admission) as stgs's workers. What differs from stgs
is the placement: all models live in this one process and each has its own serving thread and
its own CUDA stream (the graph runner makes one per model), so their batches run concurrently on
the whole GPU, as Triton runs one instance of each model by default.

Models are loaded one after another in the main thread (graph capture never overlaps other CUDA
work of this process); then every connection says READY and the serving threads start. The
process ends when every connection is closed. Its GIL switch interval is 200 us (Python's
default is 5 ms): with a reader and a batcher thread per model, this favours the baseline.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence

from stgs.runtime.transport import READY, FrameSocket
from stgs.runtime.worker import SWITCH_INTERVAL_S, Worker, WorkerSpec
from stgs.runtime.worker import run as worker_run

ENV_FACTS = (
    "CUDA_VISIBLE_DEVICES",
    "CUDA_MPS_PIPE_DIRECTORY",
    "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
    "STGS_DEVICE",
)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="baseline-server")
    ap.add_argument("--fds", required=True, help="inherited sockets, one per model, in order")
    ap.add_argument("--specs", required=True, help="JSON list of WorkerSpec objects")
    args = ap.parse_args(argv)
    # Ten threads share this process's GIL (a reader and a batcher per model): switch often, as
    # the load generator does, so that no batcher waits out Python's default 5 ms interval.
    sys.setswitchinterval(SWITCH_INTERVAL_S)  # as the stgs worker
    fds = [int(x) for x in args.fds.split(",") if x]
    specs = [WorkerSpec.from_json(json.dumps(d)) for d in json.loads(args.specs)]
    if len(fds) != len(specs):
        print(f"baseline server: {len(fds)} sockets for {len(specs)} models", file=sys.stderr)
        return 2
    workers = [
        Worker(spec, FrameSocket(socket.socket(fileno=fd)))
        for spec, fd in zip(specs, fds, strict=True)
    ]
    t0 = time.monotonic()
    try:
        for w in workers:  # sequentially: no capture beside another model's CUDA work
            w.load()
    except Exception as exc:
        print(f"baseline server: loading failed: {exc!r}", file=sys.stderr)
        return 3
    gc.collect()
    gc.freeze()  # as the stgs worker: full GC passes over torch's objects would stall serving
    info = {
        "pid": os.getpid(),
        "device": workers[0].device if workers else None,
        "load_s": time.monotonic() - t0,
        "models": [s.models[0].name for s in specs],
        "env": {k: os.environ.get(k) for k in ENV_FACTS},
    }
    for w in workers:
        w.fs.send(READY, data=json.dumps(info).encode())
    threads = []
    for i, w in enumerate(workers):
        threads.append(threading.Thread(target=w.read, name=f"reader-{i}", daemon=True))
        threads.append(threading.Thread(target=w.serve, name=f"serve-{i}", daemon=True))
    for th in threads:
        th.start()
    for th in threads[1::2]:  # the serving threads end when their connection closes
        th.join()
    for w in workers:
        w.fs.close()
    return 0


def run() -> None:
    """No interpreter teardown (torch's thread pools can abort in it), as the stgs worker."""
    worker_run(main)


if __name__ == "__main__":
    run()
