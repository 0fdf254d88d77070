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

A batch goes through a runner in three steps, so that the worker can overlap its host work
with the device (:mod:`stgs.runtime.worker`, "Pipelining"): :meth:`BatchRunner.stage` gathers
the samples (on a GPU into pinned host buffers) and returns a :class:`Staged` handle;
:meth:`BatchRunner.launch` queues the batch on the device and returns; :meth:`BatchRunner.collect`
waits for its results and returns them with the batch's time on the device
(``Staged.device_ns``). ``run`` does the three at once. On a GPU the three steps are
asynchronous: every runner of a worker queues its batches on the process's one CUDA stream (so
graphs of several models never run concurrently), in order: the host-to-device copy, the
graph, the device-to-host copy into pinned output buffers, between two CUDA events whose
elapsed time is the batch's device time. A runner holds two sets of buffers (pinned inputs,
pinned outputs, the two events), so two of its batches can be in flight: the next one is
gathered while the previous one runs, and its results do not overwrite the previous one's.
The CPU runners (torch, ONNX, ``echo``, ``fail``) are synchronous (:class:`SyncRunner`): their
``launch`` computes, and ``device_ns`` is the host time it took. ``sleep:<ms>``, the GPU
stand-in of the simulated node, behaves like a device: ``launch`` queues ``ms`` on the
process's stand-in device timeline (one batch after another, as on a stream) and returns,
``collect`` sleeps until the batch's end.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar

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
    "Staged",
    "SyncRunner",
    "batch_buckets",
    "build_module",
    "load_runner",
    "model_entry",
]

Array = npt.NDArray[Any]


@dataclass(eq=False, slots=True)
class Staged:
    """A batch between :meth:`BatchRunner.stage` and :meth:`BatchRunner.collect`."""

    n: int  # its samples
    samples: list[Tensors] | None = None  # runners that keep the samples until launch
    buf: int = -1  # the runner's buffer set it holds (a GPU runner)
    outs: Sequence[Tensors] | None = None  # a synchronous runner's results, from launch
    device_ns: int = 0  # its time on the device (set by launch or collect)
    ready_ns: int = 0  # the stand-in device: when its results exist (time.monotonic_ns)


class BatchRunner(ABC):
    """Runs batches of samples of one model; a worker loads each model once.

    A sample is an array (a model of one input) or a tuple of arrays (several inputs, in the
    entry's order); a result likewise (a tuple when the model has several outputs). A batch is
    staged, launched, then collected, in that order; at most two
    batches of one runner are between stage and collect at once, and they are collected in the
    order they were staged. ``asynchronous``: launch returns before the results exist (the
    device works on while the host goes on)."""

    entry: ModelEntry
    asynchronous: ClassVar[bool] = False

    @abstractmethod
    def stage(self, samples: list[Tensors]) -> Staged:
        """Gather a batch's samples for the device (nothing runs yet)."""

    @abstractmethod
    def launch(self, staged: Staged) -> None:
        """Queue the staged batch on the device (a synchronous runner computes it here)."""

    @abstractmethod
    def collect(self, staged: Staged) -> Sequence[Tensors]:
        """Wait for a launched batch: one result per sample, in order, and its time on the
        device in ``staged.device_ns``. The results may be views of the runner's output
        buffers, valid until the runner stages its batch after next: send them before."""

    def done(self, staged: Staged) -> bool:
        """Whether a launched batch's results exist (collect would not wait); never waits."""
        return True

    def run(self, samples: list[Tensors]) -> Sequence[Tensors]:
        """One batch, start to end: :meth:`stage`, :meth:`launch`, :meth:`collect`."""
        staged = self.stage(samples)
        self.launch(staged)
        return self.collect(staged)


class SyncRunner(BatchRunner):
    """A runner that computes in :meth:`launch` (the CPU runners): staging keeps the samples,
    collect hands back what launch computed; ``device_ns``: the host time of the computation."""

    def stage(self, samples: list[Tensors]) -> Staged:
        return Staged(len(samples), samples)

    def launch(self, staged: Staged) -> None:
        samples, staged.samples = staged.samples, None
        if samples is None:
            raise RuntimeError("batch launched twice")
        t0 = time.monotonic_ns()
        staged.outs = self.compute(samples)
        staged.device_ns = time.monotonic_ns() - t0

    def collect(self, staged: Staged) -> Sequence[Tensors]:
        outs, staged.outs = staged.outs, None
        if outs is None:
            raise RuntimeError("batch collected before it was launched")
        return outs

    @abstractmethod
    def compute(self, samples: list[Tensors]) -> Sequence[Tensors]:
        """One result per sample, in order."""


class _Echo(SyncRunner):
    def __init__(self, entry: ModelEntry, fail: bool = False) -> None:
        self.entry = entry
        self._fail = fail

    def compute(self, samples: list[Tensors]) -> Sequence[Tensors]:
        if self._fail:
            raise RuntimeError("the 'fail' model always fails")
        return samples


class _StandInDevice:
    """The simulated node's stand-in for a worker's GPU stream: ``sleep:<ms>`` batches run on
    it one after another, whichever model they belong to."""

    free_ns = 0  # when its last queued batch ends (time.monotonic_ns)


_STAND_IN = _StandInDevice()


class _Sleep(BatchRunner):
    """``sleep:<ms>``: echo after ``ms`` on the stand-in device (asynchronous, like a GPU)."""

    asynchronous = True

    def __init__(self, entry: ModelEntry, sleep_s: float) -> None:
        self.entry = entry
        self._ns = int(sleep_s * 1e9)

    def stage(self, samples: list[Tensors]) -> Staged:
        return Staged(len(samples), samples)

    def launch(self, staged: Staged) -> None:
        start = max(time.monotonic_ns(), _STAND_IN.free_ns)
        staged.ready_ns = _STAND_IN.free_ns = start + self._ns
        staged.device_ns = self._ns

    def done(self, staged: Staged) -> bool:
        return time.monotonic_ns() >= staged.ready_ns

    def collect(self, staged: Staged) -> Sequence[Tensors]:
        samples, staged.samples = staged.samples, None
        if samples is None or not staged.ready_ns:
            raise RuntimeError("batch collected before it was launched")
        wait = staged.ready_ns - time.monotonic_ns()
        if wait > 0:
            time.sleep(wait / 1e9)
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


def _host_dtype(t: torch.dtype, dtype: str) -> torch.dtype:
    """The host dtype of an output of torch dtype ``t`` declared ``dtype`` (``_host_torch``'s)."""
    import torch

    if t.is_floating_point:
        return torch.float64 if dtype == "float64" else torch.float32
    return t


def _host_torch(t: torch.Tensor, dtype: str) -> Array:
    """An output tensor on the host as it travels back (see :func:`_host_np`)."""
    if t.is_floating_point():
        t = t.double() if dtype == "float64" else t.float()
    return _host_np(t.cpu().numpy(), dtype)


class _TorchCpu(SyncRunner):
    def __init__(self, entry: ModelEntry, module: torch.nn.Module) -> None:
        self.entry = entry
        self.module = module
        self.n_in = len(entry.inputs)
        self.n_out = max(1, len(entry.outputs))

    def compute(self, samples: list[Tensors]) -> Sequence[Tensors]:
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


# Batches of one GPU runner in flight at once (staged, not yet collected): the worker's
# pipeline stages the next batch while the previous one runs, and no more.
_DEPTH = 2


@cache
def _stream() -> torch.cuda.Stream:
    """The worker process's one CUDA stream: every runner's batches (and graph captures) go on
    it, so batches of several models run one after another, in the order they were launched."""
    import torch

    return torch.cuda.Stream()  # type: ignore[no-untyped-call]


class _Buffers:
    """One in-flight batch's host side: pinned inputs and outputs, the events around it."""

    __slots__ = ("busy", "end", "host_in", "host_out", "np_in", "np_out", "start")

    def __init__(self, host_in: list[torch.Tensor], host_out: list[torch.Tensor]) -> None:
        import torch

        self.host_in = host_in
        self.host_out = host_out
        self.np_in = [h.numpy() for h in host_in]  # views of the pinned memory
        self.np_out = [h.numpy() for h in host_out]
        self.start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        self.end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        self.busy = False  # staged, not yet collected


class _TorchCudaGraphs(BatchRunner):
    """One CUDA graph per batch bucket, fp16 weights, one static buffer per input and output
    on the GPU; on the host, :data:`_DEPTH` sets of pinned input and output buffers. Float
    inputs run in the weights' dtype, others in their own; float outputs come back to the host
    as float32 (float64 where declared)."""

    asynchronous = True

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
        in_shapes: list[tuple[tuple[int, ...], torch.dtype]] = []
        for spec in entry.inputs:
            shape = spec.shape or (1,)
            if spec.dtype.startswith("float") or spec.dtype == "bfloat16":
                dev_dtype, host_dtype = wdtype, torch.float32
            else:
                dev_dtype = host_dtype = _torch_dtype(spec.dtype)
            self.static_in.append(torch.zeros((top, *shape), dtype=dev_dtype, device=dev))
            in_shapes.append(((top, *shape), host_dtype))
        self.stream = _stream()
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
        out_specs = [
            (tuple(o.shape), _host_dtype(o.dtype, _out_dtype(entry, k)))
            for k, o in enumerate(self.graphs[top][1])
        ]
        self.bufs = [
            _Buffers(
                [torch.zeros(s, dtype=d, pin_memory=True) for s, d in in_shapes],
                [torch.zeros(s, dtype=d, pin_memory=True) for s, d in out_specs],
            )
            for _ in range(_DEPTH)
        ]
        self._next = 0  # the buffer set the next batch stages into

    def _forward(self, b: int) -> list[torch.Tensor]:
        """The module on the first ``b`` rows of every static input: its static outputs."""
        return _outputs(self.module(*(x[:b] for x in self.static_in)), self.n_out)

    def stage(self, samples: list[Tensors]) -> Staged:
        n = len(samples)
        if not 0 < n <= self.buckets[-1]:
            raise ValueError(f"a batch of {n}: 1 to {self.buckets[-1]} samples")
        k = self._next
        buf = self.bufs[k]
        if buf.busy:
            raise RuntimeError(f"more than {_DEPTH} batches of one model in flight")
        hosts = buf.np_in  # pinned: one copy per sample, no np.stack
        if len(hosts) == 1:
            host = hosts[0]
            for j, sample in enumerate(samples):
                host[j] = sample
        else:
            for j, sample in enumerate(samples):
                for h, x in zip(hosts, sample, strict=True):
                    h[j] = x
        buf.busy = True
        self._next = (k + 1) % _DEPTH
        return Staged(n, buf=k)

    def launch(self, staged: Staged) -> None:
        import torch

        n, buf = staged.n, self.bufs[staged.buf]
        graph, outs = self.graphs[next(b for b in self.buckets if b >= n)]
        try:
            with torch.cuda.stream(self.stream):
                buf.start.record(self.stream)
                # Pad on the GPU: only the n real rows move; rows n..bucket keep stale inputs.
                # Every copy is asynchronous (pinned host memory; a dtype conversion runs on
                # the GPU), in stream order with the graph: the next batch's replay cannot
                # overwrite the static outputs before this batch's copies to the host read them.
                for static, pinned in zip(self.static_in, buf.host_in, strict=True):
                    static[:n].copy_(pinned[:n], non_blocking=True)
                graph.replay()
                for o, host in zip(outs, buf.host_out, strict=True):
                    host[:n].copy_(o[:n], non_blocking=True)
                buf.end.record(self.stream)
        except BaseException:
            self.stream.synchronize()  # nothing queued still reads the buffers
            buf.busy = False
            raise

    def done(self, staged: Staged) -> bool:
        return bool(self.bufs[staged.buf].end.query())  # type: ignore[no-untyped-call]

    def collect(self, staged: Staged) -> Sequence[Tensors]:
        n, buf = staged.n, self.bufs[staged.buf]
        try:
            buf.end.synchronize()  # (releases the GIL while it waits)
            staged.device_ns = int(buf.start.elapsed_time(buf.end) * 1e6)
            result = [_host_np(h[:n], _out_dtype(self.entry, k)) for k, h in enumerate(buf.np_out)]
        finally:
            buf.busy = False
        return _rows(result, n)


class _Onnx(SyncRunner):
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

    def compute(self, samples: list[Tensors]) -> Sequence[Tensors]:
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
            return _Sleep(entry, sleep_s=float(name.split(":", 1)[1]) / 1000.0)
        return _Echo(entry)
    if entry.kind == "onnx":
        return _Onnx(entry, device)
    module = build_module(entry)
    if device == "cpu":
        return _TorchCpu(entry, module)
    return _TorchCudaGraphs(entry, module, max_batch, dtype)
