"""The batch runners that execute a worker's models; the models themselves are defined in
:mod:`stgs.registry` (one registry for the profiler, the workers, the API and the simulator).

:func:`model_entry`, :class:`ModelEntry` and :func:`build_module` are the registry's, re-exported
here for the callers that knew them from this module. Metadata never imports torch; the runners
(:func:`load_runner`) do, lazily, inside the worker process.

Runners take a list of samples and return one result per sample. A sample is one array for a
model of one input, a tuple of arrays (in the entry's input order) for a model of several; a
result is one array for a model of one output, a tuple for several (the entry's outputs; a
TorchScript file registered without outputs: its first). Each input is stacked into its own
batch, each output split back into rows. Outputs come back in their declared dtype (floats as
float32 where none is declared). On the CPU they run plain torch (inference mode). On a GPU
they capture one CUDA graph per batch-size bucket (powers of two up to the planned batch, and
the batch itself), with one static buffer per input and per output, and pad a batch to its
bucket on the GPU: the real rows are copied into the static inputs, the rest keep stale rows
whose outputs are dropped (its path of several inputs or outputs is not yet exercised on a
GPU). A worker replays its graphs one after another (time sharing), which is the safe way to
run graphs of several models in one process. ONNX files run in an onnxruntime session (CPU
provider, or CUDA where the worker runs on a GPU; see :mod:`stgs.registry` for why), without
the runtime's CUDA graphs. ``echo``, ``sleep:<ms>`` and ``fail`` run without torch.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from stgs.batching import batch_buckets
from stgs.errors import ConfigError
from stgs.registry import ModelEntry, build_module, model_entry, onnx_session
from stgs.runtime.transport import Tensors

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


class BatchRunner(ABC):
    """Runs one batch of samples of one model; a worker loads each model once."""

    entry: ModelEntry

    @abstractmethod
    def run(self, samples: list[Tensors]) -> Sequence[Tensors]:
        """One result per sample, in order. A sample is an array (a model of one input) or a
        tuple of arrays (several inputs, in the entry's order); a result likewise (a tuple when
        the model has several outputs)."""


class _Echo(BatchRunner):
    def __init__(self, entry: ModelEntry, sleep_s: float = 0.0, fail: bool = False) -> None:
        self.entry = entry
        self._sleep_s = sleep_s
        self._fail = fail

    def run(self, samples: list[Tensors]) -> Sequence[Tensors]:
        if self._fail:
            raise RuntimeError("the 'fail' model always fails")
        if self._sleep_s:
            time.sleep(self._sleep_s)
        return samples


def _columns(samples: list[Tensors], n_in: int) -> list[Array]:
    """Each input's batch: the samples' arrays of that input stacked."""
    if n_in == 1:
        return [np.stack(samples)]
    return [np.stack([s[k] for s in samples]) for k in range(n_in)]


def _rows(outs: list[Array], n: int) -> list[Tensors]:
    """Per sample, its row of every output: an array for one output, else a tuple."""
    if len(outs) == 1:
        return list(outs[0][:n])
    return list(zip(*(o[:n] for o in outs), strict=True))


def _out_dtype(entry: ModelEntry, k: int) -> str:
    """Output ``k``'s declared numpy dtype ("" : floats come back as float32)."""
    d = entry.outputs[k].dtype if k < len(entry.outputs) else ""
    return "" if d == "bfloat16" else d


def _host_np(arr: Array, dtype: str) -> Array:
    """An output as it travels back: its declared dtype, else float32 for floats."""
    if dtype:
        return arr.astype(dtype, copy=False)
    return arr.astype(np.float32, copy=False) if arr.dtype.kind == "f" else arr


def _outputs(out: Any, n_out: int) -> list[torch.Tensor]:
    """A module's first ``n_out`` outputs (a tensor, or a tuple or list of them)."""
    outs = list(out) if isinstance(out, tuple | list) else [out]
    if len(outs) < n_out:
        raise RuntimeError(f"the model returned {len(outs)} output(s), {n_out} expected")
    return outs[:n_out]


def _host_torch(t: torch.Tensor, dtype: str) -> Array:
    """An output tensor on the host as it travels back (see :func:`_host_np`)."""
    if t.is_floating_point():
        t = t.double() if dtype == "float64" else t.float()
    return _host_np(t.cpu().numpy(), dtype)


class _TorchCpu(BatchRunner):
    def __init__(self, entry: ModelEntry, module: torch.nn.Module) -> None:
        self.entry = entry
        self.module = module
        self.n_in = len(entry.inputs)
        self.n_out = max(1, len(entry.outputs))

    def run(self, samples: list[Tensors]) -> Sequence[Tensors]:
        import torch

        cols = _columns(samples, self.n_in)
        with torch.inference_mode():
            out = self.module(*(torch.from_numpy(c) for c in cols))
            outs = [
                _host_torch(t, _out_dtype(self.entry, k))
                for k, t in enumerate(_outputs(out, self.n_out))
            ]
        return _rows(outs, len(samples))


def _torch_dtype(dtype: str) -> torch.dtype:
    import torch

    got = getattr(torch, dtype or "int64", None)
    if not isinstance(got, torch.dtype):
        raise ConfigError(f"dtype {dtype!r} has no torch equivalent")
    return got


class _TorchCudaGraphs(BatchRunner):
    """One CUDA graph per batch bucket, fp16 weights, one static buffer per input (on the GPU,
    and a pinned one on the host) and per output. Float inputs run in the weights' dtype,
    others in their own."""

    def __init__(
        self, entry: ModelEntry, module: torch.nn.Module, max_batch: int, dtype: str
    ) -> None:
        import torch

        self.entry = entry
        self.n_out = max(1, len(entry.outputs))
        self.buckets = batch_buckets(max_batch)
        dev = torch.device("cuda")
        wdtype = getattr(torch, dtype)
        self.module = module.to(device=dev, dtype=wdtype)
        top = self.buckets[-1]
        self.static_in: list[torch.Tensor] = []
        self.host_in: list[torch.Tensor] = []
        for spec in entry.inputs:
            shape = spec.shape or (1,)
            if spec.dtype.startswith("float") or spec.dtype == "bfloat16":
                dev_dtype, host_dtype = wdtype, torch.float32
            else:
                dev_dtype = host_dtype = _torch_dtype(spec.dtype)
            self.static_in.append(torch.zeros((top, *shape), dtype=dev_dtype, device=dev))
            self.host_in.append(torch.zeros((top, *shape), dtype=host_dtype).pin_memory())
        self.stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]] = {}
        with torch.inference_mode():
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):  # warm up (cuDNN autotune, lazy init)
                for b in self.buckets:
                    for _ in range(3):
                        self._forward(b)
            torch.cuda.current_stream().wait_stream(self.stream)
            torch.cuda.synchronize()
            pool = None
            for b in reversed(self.buckets):  # largest first: smaller graphs reuse its pool
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=self.stream):
                    outs = self._forward(b)
                pool = g.pool()
                self.graphs[b] = (g, outs)
        torch.cuda.synchronize()

    def _forward(self, b: int) -> list[torch.Tensor]:
        """The module on the first ``b`` rows of every static input: its static outputs."""
        return _outputs(self.module(*(x[:b] for x in self.static_in)), self.n_out)

    def run(self, samples: list[Tensors]) -> Sequence[Tensors]:
        import torch

        n = len(samples)
        bucket = next(b for b in self.buckets if b >= n)
        hosts = [h.numpy() for h in self.host_in]  # pinned: one copy per sample, no np.stack
        if len(hosts) == 1:
            host = hosts[0]
            for k, sample in enumerate(samples):
                host[k] = sample
        else:
            for k, sample in enumerate(samples):
                for h, x in zip(hosts, sample, strict=True):
                    h[k] = x
        with torch.cuda.stream(self.stream):
            # Pad on the GPU: only the n real rows move; rows n..bucket keep stale inputs.
            for static, pinned in zip(self.static_in, self.host_in, strict=True):
                static[:n].copy_(pinned[:n], non_blocking=True)
            graph, outs = self.graphs[bucket]
            graph.replay()
            # the first copy to the host synchronises the stream
            result = [_host_torch(o[:n], _out_dtype(self.entry, k)) for k, o in enumerate(outs)]
        return _rows(result, n)


class _Onnx(BatchRunner):
    """An onnxruntime session: every input of the entry (by name), its outputs."""

    def __init__(self, entry: ModelEntry, device: str) -> None:
        threads = 0
        if device == "cpu":
            import torch

            threads = torch.get_num_threads()  # the worker's cpu_threads
        self.entry = entry
        self.sess = onnx_session(entry, device, threads)
        first = self.sess.get_inputs()[0]
        self.per_row = isinstance(first.shape[0], int)  # a fixed batch of 1
        self.in_names = [t.name for t in entry.inputs]
        self.in_dtypes = [t.dtype or "float32" for t in entry.inputs]
        graph_outs = [o.name for o in self.sess.get_outputs()]
        declared = [t.name for t in entry.outputs if t.name in graph_outs]
        self.out_names = declared if declared else graph_outs[:1]

    def run(self, samples: list[Tensors]) -> Sequence[Tensors]:
        cols = [
            c.astype(d, copy=False)
            for c, d in zip(_columns(samples, len(self.in_names)), self.in_dtypes, strict=True)
        ]
        feeds = dict(zip(self.in_names, cols, strict=True))
        if self.per_row:
            runs = [
                self.sess.run(self.out_names, {k: v[r : r + 1] for k, v in feeds.items()})
                for r in range(len(samples))
            ]
            outs = [np.concatenate([run[j] for run in runs]) for j in range(len(self.out_names))]
        else:
            outs = list(self.sess.run(self.out_names, feeds))
        return _rows(
            [_host_np(np.asarray(o), _out_dtype(self.entry, k)) for k, o in enumerate(outs)],
            len(samples),
        )


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
