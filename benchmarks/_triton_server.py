"""The Triton yardstick's server: NVIDIA Triton Inference Server, through ``nvidia-pytriton``,
serving stgs's own model code with dynamic batching.

    python benchmarks/_triton_server.py --spec JSON

Started by ``benchmarks/triton_gpu.py`` through ``Backend.spawn_worker`` (pinned to the GPU as a
stgs worker is; ``STGS_DEVICE`` says cuda or, on the simulated node, cpu), in an interpreter
whose site has ``nvidia-pytriton`` and numpy < 2 (``benchmarks.triton_gpu.triton_python``).
The spec (JSON): ``models`` (each ``name``, ``max_batch``, ``queue_delay_us``, ``timeout_us``),
``http_port``, ``grpc_port``, ``metrics_port``, ``access_token`` (the restricted APIs':
statistics), ``log`` (this process's stdout and stderr, and so Triton's, go there).

Each model is loaded once with stgs's runner (:func:`stgs.runtime.models.load_runner`: the
registry's module and weights, fp16, one CUDA graph per power-of-two batch bucket up to its max
batch on a stream of its own, a batch padded to its bucket on the GPU, pinned host buffers):
the model code is the stgs worker's. Models load one after another in the main thread (no graph
capture beside another model's CUDA work). Then each is bound to Triton as a Triton user binds
a Python callable: one model instance (Triton's default), the callable taking the batch Triton's
dynamic batcher formed (``max_batch_size``, ``max_queue_delay_microseconds``), a default queue
policy that rejects a request still queued after ``timeout_us`` (its SLO: it can only miss),
strict input and output tensors (the registry entry's dtypes and shapes, named ``input`` and
``output`` as stgs's API names a built-in's, so that one request serves both). The callables of
different models run in their own threads, so their batches run concurrently on the GPU, each on
its own stream.
HTTP, gRPC and metrics listen on 127.0.0.1 only.

This process's GIL switch interval is 200 us, as the stgs worker's and the ``streams``
baseline's (Python's default is 5 ms; several models' threads share one interpreter here).
It stops on SIGTERM or SIGINT (Triton stops, then the process exits); it dies with its parent
(:mod:`stgs.lifeline`) and leads a process group of its own, so that the benchmark can end
``tritonserver`` and its Python backend stubs with it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from stgs.lifeline import die_with_parent
from stgs.runtime.models import BatchRunner, load_runner, model_entry
from stgs.runtime.worker import SWITCH_INTERVAL_S
from stgs.runtime.worker import run as worker_run

# The tensors' names: those stgs's API gives a built-in model of one input and one output
# (api.inference), so that the client sends every system the same request.
INPUT, OUTPUT = "input", "output"


def _infer_fn(runner: BatchRunner, in_name: str, out_name: str) -> Callable[..., Any]:
    """The callable Triton runs for one model: its batch, as rows, through the stgs runner."""
    from pytriton.decorators import batch

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        x = inputs[in_name]
        out = runner.run(list(x))
        return {out_name: np.stack(out)}

    return infer


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="triton-server")
    ap.add_argument("--spec", required=True, help="JSON: models, ports, log")
    args = ap.parse_args(argv)
    spec = json.loads(args.spec)
    die_with_parent()
    os.setpgrp()  # tritonserver and its stubs join this group: the benchmark ends them all
    log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    device = os.environ.get("STGS_DEVICE", "cuda")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor
    from pytriton.model_config.common import TimeoutAction
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    t0 = time.monotonic()
    runners = []
    for m in spec["models"]:
        if device == "cpu":
            import torch

            torch.set_num_threads(1)  # as the stgs worker's cpu_threads default
        runners.append(load_runner(m["name"], device, int(m["max_batch"])))
    load_s = time.monotonic() - t0
    cfg = TritonConfig(
        http_address="127.0.0.1",
        http_port=int(spec["http_port"]),
        grpc_address="127.0.0.1",
        grpc_port=int(spec["grpc_port"]),
        metrics_address="127.0.0.1",
        metrics_port=int(spec["metrics_port"]),
    )
    # pytriton's default restricts the model-control and statistics APIs to a token: ours
    security = TritonSecurityConfig(access_token=spec["access_token"])
    with Triton(config=cfg, security_config=security) as triton:
        for m, runner in zip(spec["models"], runners, strict=True):
            entry = model_entry(m["name"])
            inp, out = entry.inputs[0], entry.outputs[0]
            triton.bind(
                model_name=m["name"],
                infer_func=_infer_fn(runner, INPUT, OUTPUT),
                inputs=[Tensor(name=INPUT, dtype=np.dtype(inp.dtype), shape=inp.shape)],
                outputs=[Tensor(name=OUTPUT, dtype=np.dtype(out.dtype), shape=out.shape)],
                config=ModelConfig(
                    max_batch_size=int(m["max_batch"]),
                    batcher=DynamicBatcher(
                        max_queue_delay_microseconds=int(m["queue_delay_us"]),
                        default_queue_policy=QueuePolicy(
                            timeout_action=TimeoutAction.REJECT,
                            default_timeout_microseconds=int(m["timeout_us"]),
                        ),
                    ),
                ),
                strict=True,
            )
        triton.run()
        print(
            "triton server ready: "
            + json.dumps({"pid": os.getpid(), "device": device, "load_s": round(load_s, 2)}),
            flush=True,
        )
        stop.wait()
    return 0


if __name__ == "__main__":
    worker_run(main)
