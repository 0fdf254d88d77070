"""A measuring process: ``python -m profiler.worker`` speaks JSON lines on stdin/stdout.

One worker holds one CUDA context (or runs on the CPU) in the environment it was started with
(plain, a green context of N SMs, an MPS client at a share, or one MIG device); the
orchestrator (:mod:`profiler.run`) keeps one per partition environment. Requests and
replies, one JSON object a line:

* ``{"op": "info"}`` -> device name, SM count, memory, torch version, compute capability;
* ``{"op": "load", "spec": {...}, "dtype": "fp16"}`` -> builds the model (replacing any other);
* ``{"op": "measure", "partition": "full|mps:P|mig:X|green:N", "batch": B, "timing": {...}}``
  -> median/p99 (ms), peak memory (MiB), graph kind, iterations, the SM count seen;
* ``{"op": "prepare", "partition": ..., "batch": B}`` then ``{"op": "run_for", "seconds": S}``
  -> back-to-back replays for co-location runs (median/p99 of that window);
* ``{"op": "quit"}``.

Every reply has ``ok``; a failed request has ``error`` and ``fatal`` (the worker exits after a
fatal one: a CUDA error leaves its context unusable). Anything else the process prints goes to
stderr, so stdout carries the protocol alone.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from typing import IO, Any

from profiler.errors import ModelLoadError
from profiler.measure import (
    Prepared,
    TimingOptions,
    measure_cpu,
    measure_cuda,
    prepare_cuda,
    run_for,
    summarise,
)
from profiler.models import ModelSpec, build_model
from stgs.lifeline import die_with_parent

DTYPES = ("fp16", "bf16", "fp32")
GREEN_ENV = "STGS_PROFILER_GREEN_SMS"
"""Set by the orchestrator: this worker runs inside a green context of that many SMs."""


def _torch_dtype(name: str) -> Any:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _is_fatal(exc: BaseException) -> bool:
    """CUDA errors other than out-of-memory poison the context: the worker must exit."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(exc, accel):
        return True
    text = str(exc)
    return "CUDA error" in text or "illegal memory access" in text or "CUBLAS_STATUS" in text


class WorkerState:
    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.cuda = device != "cpu"
        if self.cuda and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available in this worker")
        self.device = torch.device(device)
        if self.cuda:
            torch.cuda.set_device(self.device)
        self.model: Any = None
        self.make_input: Any = None
        self.model_name: str | None = None
        # an ONNX model runs in onnxruntime through host arrays, as the runtime serves it: no
        # CUDA graph (a capture would fail at the first copy to the host)
        self.use_graph = True
        self.weights_mib = 0.0
        self.prepared: Prepared | None = None
        # A green-context worker makes its context current once, for its whole life: streams,
        # library handles and cuDNN's cached plans are then all made inside it.
        self.green_sms: int | None = None
        self._stream: Any = None
        self._green: Any = None
        green = os.environ.get(GREEN_ENV)
        if green and self.cuda:
            from torch.cuda.green_contexts import GreenContext

            self.green_sms = int(green)
            ctx: Any = GreenContext.create(num_sms=self.green_sms, device_id=0)
            ctx.set_context()
            self._green = ctx
            stream = ctx.Stream() if hasattr(ctx, "Stream") else None
            self._stream = stream if stream is not None else torch.cuda.current_stream()

    # --- requests ---------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        torch = self.torch
        out: dict[str, Any] = {"torch": torch.__version__, "device": str(self.device)}
        if self.cuda:
            p = torch.cuda.get_device_properties(self.device)
            out.update(
                name=p.name,
                sm_count=p.multi_processor_count,
                memory_mib=p.total_memory / 2**20,
                capability=f"{p.major}.{p.minor}",
                cuda=torch.version.cuda,
                green_contexts=hasattr(torch.cuda, "green_contexts"),
            )
        else:
            out.update(name="cpu", sm_count=max(1, torch.get_num_threads()), memory_mib=0.0)
        return out

    def load(self, spec: dict[str, Any], dtype: str) -> dict[str, Any]:
        self.unload()
        ms = ModelSpec(
            name=spec["name"],
            kind=spec["kind"],
            target=spec["target"],
            input_shape=tuple(spec["input_shape"]) if spec.get("input_shape") else None,
            entry=spec.get("entry"),
        )
        t0 = time.perf_counter()
        dt = _torch_dtype(dtype) if self.cuda else self.torch.float32
        before = self.torch.cuda.memory_allocated(self.device) if self.cuda else 0
        self.model, self.make_input = build_model(ms, self.device, dt)
        self.use_graph = ms.kind != "onnx"
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.weights_mib = (self.torch.cuda.memory_allocated(self.device) - before) / 2**20
        self.model_name = ms.name
        return {"name": ms.name, "seconds": time.perf_counter() - t0}

    def unload(self) -> dict[str, Any]:
        self.prepared = None
        self.weights_mib = 0.0
        self.model = self.make_input = self.model_name = None
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.empty_cache()
        return {}

    def _stream_for(self, partition: str) -> tuple[Any, int]:
        """(stream, SM count) for a partition; it must be this worker's own."""
        torch = self.torch
        kind, _, arg = partition.partition(":")
        if kind == "green":
            if self.green_sms != int(arg):
                raise RuntimeError(f"{partition} asked of a worker for green:{self.green_sms}")
            return self._stream, self.green_sms
        if self.green_sms is not None:
            raise RuntimeError(f"{partition} asked of a green-context worker")
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream, torch.cuda.get_device_properties(self.device).multi_processor_count

    def measure(self, partition: str, batch: int, timing: dict[str, Any]) -> dict[str, Any]:
        if self.model is None:
            raise RuntimeError("no model loaded")
        opts = TimingOptions(**timing)
        t0 = time.perf_counter()
        if not self.cuda:
            if partition != "full":
                raise RuntimeError(f"partition {partition} needs a GPU")
            m = measure_cpu(self.model, self.make_input, batch, opts)
            sms = max(1, self.torch.get_num_threads())
        else:
            stream, sms = self._stream_for(partition)
            m = measure_cuda(
                self.model, self.make_input, batch, opts, stream, use_graph=self.use_graph
            )
        out = asdict(m)
        out["memory_mib"] += self.weights_mib
        out.pop("samples_ms")
        out.update(sm_count=sms, seconds=time.perf_counter() - t0)
        return out

    def warm(self, partition: str, batches: list[int]) -> dict[str, Any]:
        """Run the model once per batch, untimed, so that per-shape library set-up (cuDNN plans,
        cuBLAS heuristics) is done before the timed points. A batch that runs out of memory is
        skipped (its point will fail and say so)."""
        if self.model is None:
            raise RuntimeError("no model loaded")
        torch = self.torch
        t0 = time.perf_counter()
        skipped = []
        with torch.inference_mode():
            if not self.cuda:
                for b in batches:
                    self.model(self.make_input(b))
                return {"seconds": time.perf_counter() - t0, "skipped": []}
            stream, _ = self._stream_for(partition)
            with torch.cuda.stream(stream):
                for b in batches:
                    try:
                        self.model(self.make_input(b))
                        stream.synchronize()
                    except torch.cuda.OutOfMemoryError:
                        skipped.append(b)
                        torch.cuda.empty_cache()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        return {"seconds": time.perf_counter() - t0, "skipped": skipped}

    def prepare(self, partition: str, batch: int, timing: dict[str, Any]) -> dict[str, Any]:
        if self.model is None or not self.cuda:
            raise RuntimeError("prepare needs a loaded model on a GPU")
        self.prepared = None
        stream, sms = self._stream_for(partition)
        self.prepared = prepare_cuda(
            self.model,
            self.make_input,
            batch,
            TimingOptions(**timing),
            stream,
            use_graph=self.use_graph,
        )
        return {"graph": self.prepared.kind, "sm_count": sms}

    def run_for(self, seconds: float) -> dict[str, Any]:
        if self.prepared is None:
            raise RuntimeError("nothing prepared")
        with self.torch.inference_mode():
            samples = run_for(self.prepared.run, self.prepared.stream, seconds)
        med, p99 = summarise(samples)
        return {"median_ms": med, "p99_ms": p99, "iters": len(samples)}


def serve(device: str, inp: IO[str], out: IO[str]) -> int:
    """The request loop; returns the exit status."""

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    try:
        state = WorkerState(device)
    except Exception as exc:
        reply({"ok": False, "error": f"{type(exc).__name__}: {exc}", "fatal": True})
        return 1
    reply({"ok": True, "ready": True})
    for line in inp:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req.get("op")
        try:
            if op == "quit":
                reply({"ok": True})
                return 0
            if op == "info":
                res = state.info()
            elif op == "load":
                res = state.load(req["spec"], req.get("dtype", "fp32"))
            elif op == "unload":
                res = state.unload()
            elif op == "measure":
                res = state.measure(req["partition"], int(req["batch"]), req.get("timing", {}))
            elif op == "warm":
                res = state.warm(req["partition"], [int(b) for b in req["batches"]])
            elif op == "prepare":
                res = state.prepare(req["partition"], int(req["batch"]), req.get("timing", {}))
            elif op == "run_for":
                res = state.run_for(float(req["seconds"]))
            else:
                raise ValueError(f"unknown op {op!r}")
        except ModelLoadError as exc:
            reply({"ok": False, "error": str(exc), "fatal": False, "load_error": True})
            continue
        except Exception as exc:
            fatal = _is_fatal(exc)
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}", "fatal": fatal})
            if fatal:
                return 1
            if state.cuda and isinstance(exc, state.torch.cuda.OutOfMemoryError):
                state.torch.cuda.empty_cache()
            continue
        reply({"ok": True, **res})
    return 0


def main() -> int:
    die_with_parent()  # a daemon killed while this measures must not leave it running
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda:0"
    # stdout carries the protocol alone: keep a private handle, send fd 1 to stderr
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return serve(device, sys.stdin, proto)


if __name__ == "__main__":
    sys.exit(main())
