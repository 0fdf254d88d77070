"""Timing one (model, batch) on the current device: CUDA graphs and CUDA events, or CPU.

Runs inside a worker process (:mod:`profiler.worker`); imports torch lazily.

CUDA: the input is made on the device; the model runs eagerly ``warmup_eager`` times on the
measuring stream (lazy initialisation, library heuristics), then one CUDA graph is captured on
that stream and replayed ``warmup`` times; then up to ``iters`` replays are timed, each between
two CUDA events, stopping early once ``time_cap_s`` of GPU time has been spent (at least
``min_iters`` timed replays). Where capture fails the eager forward is timed the same way and the
row says ``graph=eager``. :func:`measure_cuda` reports the memory the point *added*: the peak of
``torch.cuda.max_memory_allocated`` over the point minus what was allocated when it started
(input, activations, the graph's pool, library workspaces); the worker adds the weights, so
that a point's memory does not depend on what the process measured before.

CPU: the forward is timed with ``time.perf_counter`` (``graph=eager``); memory is the size of
the parameters, buffers and input (CPU allocations are not tracked).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Measurement",
    "Prepared",
    "TimingOptions",
    "measure_cpu",
    "measure_cuda",
    "prepare_cuda",
    "run_for",
    "summarise",
]


@dataclass(frozen=True)
class TimingOptions:
    iters: int = 50
    min_iters: int = 5
    warmup: int = 3
    warmup_eager: int = 2
    time_cap_s: float = 0.3


@dataclass(frozen=True)
class Measurement:
    median_ms: float
    p99_ms: float
    memory_mib: float
    graph: str  # "cuda" or "eager"
    iters: int
    samples_ms: tuple[float, ...] = ()


def summarise(samples_ms: list[float]) -> tuple[float, float]:
    """(median, p99) of the samples (p99 by linear interpolation; the max for few samples)."""
    if not samples_ms:
        raise ValueError("no samples")
    xs = sorted(samples_ms)
    n = len(xs)
    mid = n // 2
    median = xs[mid] if n % 2 else 0.5 * (xs[mid - 1] + xs[mid])
    pos = 0.99 * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    p99 = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return median, p99


def _n_iters(first_ms: float, opts: TimingOptions) -> int:
    """Timed iterations: as many as fit in the time cap, within [min_iters, iters]."""
    if first_ms <= 0:
        return opts.iters
    fit = int(opts.time_cap_s * 1000.0 / first_ms)
    return max(opts.min_iters, min(opts.iters, fit))


def measure_cpu(
    model: Any, make_input: Callable[[int], Any], batch: int, opts: TimingOptions
) -> Measurement:
    import torch

    x = make_input(batch)
    with torch.inference_mode():
        for _ in range(max(1, opts.warmup)):
            model(x)
        t0 = time.perf_counter()
        model(x)
        first = (time.perf_counter() - t0) * 1000.0
        samples = [first]
        for _ in range(_n_iters(first, opts) - 1):
            t0 = time.perf_counter()
            model(x)
            samples.append((time.perf_counter() - t0) * 1000.0)
    nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    nbytes += sum(t.numel() * t.element_size() for t in (x if isinstance(x, tuple) else (x,)))
    med, p99 = summarise(samples)
    return Measurement(med, p99, nbytes / 2**20, "eager", len(samples), tuple(samples))


def _timed(run: Callable[[], Any], stream: Any, opts: TimingOptions) -> list[float]:
    import torch

    def once(n: int) -> list[float]:
        pairs = []
        with torch.cuda.stream(stream):
            for _ in range(n):
                a = _event()
                b = _event()
                a.record(stream)
                run()
                b.record(stream)
                pairs.append((a, b))
        stream.synchronize()
        return [a.elapsed_time(b) for a, b in pairs]

    first = once(1)
    return first + once(_n_iters(first[0], opts) - 1)


class Prepared:
    """A (model, batch) ready to replay on ``stream``: its input, and its CUDA graph if any."""

    def __init__(self, model: Any, x: Any, stream: Any, graph: Any, kind: str) -> None:
        self.model, self.x, self.stream, self.graph, self.kind = model, x, stream, graph, kind

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.model(self.x)


def prepare_cuda(
    model: Any,
    make_input: Callable[[int], Any],
    batch: int,
    opts: TimingOptions,
    stream: Any,
    *,
    use_graph: bool = True,
) -> Prepared:
    """Make the input, warm up eagerly, capture a CUDA graph on ``stream`` (eager if it fails),
    and replay it ``opts.warmup`` times."""
    import torch

    device = stream.device
    with torch.inference_mode():
        x = make_input(batch)
        torch.cuda.synchronize(device)
        with torch.cuda.stream(stream):
            for _ in range(max(1, opts.warmup_eager)):
                model(x)
        stream.synchronize()
        prepared = Prepared(model, x, stream, None, "eager")
        if use_graph:
            g = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(g, stream=stream):
                    model(x)
                prepared = Prepared(model, x, stream, g, "cuda")
            except Exception:  # capture unsupported by this model: time it eagerly
                torch.cuda.synchronize(device)
        with torch.cuda.stream(stream):
            for _ in range(opts.warmup):
                prepared.run()
        stream.synchronize()
    return prepared


def measure_cuda(
    model: Any,
    make_input: Callable[[int], Any],
    batch: int,
    opts: TimingOptions,
    stream: Any,
    *,
    use_graph: bool = True,
) -> Measurement:
    """Time ``model`` at ``batch`` on ``stream`` (a CUDA graph where capture works)."""
    import torch

    device = stream.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    prepared = prepare_cuda(model, make_input, batch, opts, stream, use_graph=use_graph)
    with torch.inference_mode():
        samples = _timed(prepared.run, stream, opts)
    peak = (torch.cuda.max_memory_allocated(device) - start) / 2**20
    med, p99 = summarise(samples)
    return Measurement(med, p99, peak, prepared.kind, len(samples), tuple(samples))


def _event() -> Any:
    """A CUDA event that records time (torch types its constructor loosely)."""
    import torch

    event: Any = torch.cuda.Event
    return event(enable_timing=True)


def run_for(run: Callable[[], Any], stream: Any, seconds: float) -> list[float]:
    """Replay ``run`` back to back for ``seconds`` of wall time; per-replay GPU times (ms)."""
    import torch

    pairs = []
    deadline = time.monotonic() + seconds
    with torch.cuda.stream(stream):
        while time.monotonic() < deadline:
            a = _event()
            b = _event()
            a.record(stream)
            run()
            b.record(stream)
            pairs.append((a, b))
            if len(pairs) % 8 == 0:
                b.synchronize()  # keep the queue short so that wall time tracks GPU time
    stream.synchronize()
    return [a.elapsed_time(b) for a, b in pairs]
