"""The batch runners that execute a worker's models; the models themselves are defined in
:mod:`stgs.registry` (one registry for the profiler, the workers, the API and the simulator).

:func:`model_entry`, :class:`ModelEntry` and :func:`build_module` are the registry's, re-exported
here for the callers that knew them from this module. Metadata never imports torch; the runners
(:func:`load_runner`) do, lazily, inside the worker process.

Runners take a list of single-sample arrays and return one output array per sample (the model's
first input and first output: the transport passes one array). On the CPU they run plain torch
(inference mode, batches stacked). On a GPU they capture one CUDA graph per batch-size bucket
(powers of two up to the planned batch, and the batch itself) and pad a batch to its bucket on
the GPU: the real rows are copied into the static input, the rest keep stale rows whose outputs
are dropped. A worker replays its graphs one after another (time sharing), which is the safe way
to run graphs of several models in one process. ONNX files run in an onnxruntime session (CPU
provider, or CUDA where the worker runs on a GPU; see :mod:`stgs.registry` for why), without
the runtime's CUDA graphs. ``echo``, ``sleep:<ms>`` and ``fail`` run without torch.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from stgs.errors import ConfigError
from stgs.registry import ModelEntry, build_module, model_entry, onnx_session

if TYPE_CHECKING:
    import torch

__all__ = [
    "BatchRunner",
    "ModelEntry",
    "batch_buckets",
    "build_module",
    "load_runner",
    "model_entry",
]

Array = npt.NDArray[Any]


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes with a captured graph: powers of two below ``max_batch``, and it."""
    if max_batch < 1:
        raise ValueError(f"batch must be >= 1, got {max_batch}")
    out = []
    b = 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return tuple(out)


class BatchRunner(ABC):
    """Runs one batch of samples of one model; a worker loads each model once."""

    entry: ModelEntry

    @abstractmethod
    def run(self, samples: list[Array]) -> list[Array]:
        """One output per sample, in order."""


class _Echo(BatchRunner):
    def __init__(self, entry: ModelEntry, sleep_s: float = 0.0, fail: bool = False) -> None:
        self.entry = entry
        self._sleep_s = sleep_s
        self._fail = fail

    def run(self, samples: list[Array]) -> list[Array]:
        if self._fail:
            raise RuntimeError("the 'fail' model always fails")
        if self._sleep_s:
            time.sleep(self._sleep_s)
        return samples


class _TorchCpu(BatchRunner):
    def __init__(self, entry: ModelEntry, module: torch.nn.Module) -> None:
        self.entry = entry
        self.module = module

    def run(self, samples: list[Array]) -> list[Array]:
        import torch

        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.stack(samples)))
            if isinstance(out, tuple | list):
                out = out[0]
            result = out.float().numpy()
        return list(result)


class _TorchCudaGraphs(BatchRunner):
    """One CUDA graph per batch bucket, static input and output buffers, fp16 weights."""

    def __init__(
        self, entry: ModelEntry, module: torch.nn.Module, max_batch: int, dtype: str
    ) -> None:
        import torch

        self.entry = entry
        self.buckets = batch_buckets(max_batch)
        dev = torch.device("cuda")
        float_in = entry.input_dtype.startswith("float")
        wdtype = getattr(torch, dtype)
        self.module = module.to(device=dev, dtype=wdtype)
        in_dtype = wdtype if float_in else torch.int64
        shape = entry.input_shape or (1,)
        top = self.buckets[-1]
        self.static_in = torch.zeros((top, *shape), dtype=in_dtype, device=dev)
        host_dtype = torch.float32 if float_in else torch.int64
        self.host_in = torch.zeros((top, *shape), dtype=host_dtype).pin_memory()
        self.stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        with torch.inference_mode():
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):  # warm up (cuDNN autotune, lazy init)
                for b in self.buckets:
                    for _ in range(3):
                        self._forward(self.static_in[:b])
            torch.cuda.current_stream().wait_stream(self.stream)
            torch.cuda.synchronize()
            pool = None
            for b in reversed(self.buckets):  # largest first: smaller graphs reuse its pool
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=self.stream):
                    out = self._forward(self.static_in[:b])
                pool = g.pool()
                self.graphs[b] = (g, out)
        torch.cuda.synchronize()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        out = self.module(x)
        if isinstance(out, tuple | list):
            out = out[0]
        assert isinstance(out, torch.Tensor)
        return out

    def run(self, samples: list[Array]) -> list[Array]:
        import torch

        n = len(samples)
        bucket = next(b for b in self.buckets if b >= n)
        host = self.host_in.numpy()  # the pinned buffer: one copy per sample, no np.stack
        for k, sample in enumerate(samples):
            host[k] = sample
        with torch.cuda.stream(self.stream):
            # Pad on the GPU: only the n real rows move; rows n..bucket keep stale inputs.
            self.static_in[:n].copy_(self.host_in[:n], non_blocking=True)
            graph, out = self.graphs[bucket]
            graph.replay()
            result = out[:n].float().cpu()  # synchronises the stream
        return list(result.numpy())


class _Onnx(BatchRunner):
    """An onnxruntime session; the first input and output (the transport passes one array)."""

    def __init__(self, entry: ModelEntry, device: str) -> None:
        threads = 0
        if device == "cpu":
            import torch

            threads = torch.get_num_threads()  # the worker's cpu_threads
        self.entry = entry
        self.sess = onnx_session(entry, device, threads)
        first = self.sess.get_inputs()[0]
        self.in_name = first.name
        self.per_row = isinstance(first.shape[0], int)  # a fixed batch of 1
        self.out_name = self.sess.get_outputs()[0].name
        self.dtype = entry.input_dtype or "float32"

    def run(self, samples: list[Array]) -> list[Array]:
        x = np.stack(samples).astype(self.dtype, copy=False)
        if self.per_row:
            rows = [
                self.sess.run([self.out_name], {self.in_name: x[k : k + 1]})[0]
                for k in range(len(x))
            ]
            out = np.concatenate(rows)
        else:
            (out,) = self.sess.run([self.out_name], {self.in_name: x})
        return list(np.asarray(out, dtype=np.float32))


def load_runner(
    model: ModelEntry | str, device: str, max_batch: int, *, dtype: str = "float16"
) -> BatchRunner:
    """Load ``model`` (a registry entry, or a built-in name) once for ``device`` (``cpu`` or
    ``cuda``) and return its runner."""
    entry = model if isinstance(model, ModelEntry) else model_entry(model)
    name = entry.target
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}: cpu or cuda")
    if entry.kind == "test":
        if name == "fail":
            return _Echo(entry, fail=True)
        if name.startswith("sleep:"):
            return _Echo(entry, sleep_s=float(name.split(":", 1)[1]) / 1000.0)
        return _Echo(entry)
    if entry.kind == "onnx":
        return _Onnx(entry, device)
    module = build_module(entry)
    if device == "cpu":
        return _TorchCpu(entry, module)
    return _TorchCudaGraphs(entry, module, max_batch, dtype)
