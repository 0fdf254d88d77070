"""Inference: requests through the runtime's workers, every outcome counted against the SLO.

The daemon's own KServe v2 paths (REST and gRPC, :class:`api.inference.InferenceBackend`) serve
through :class:`Serving`; so do tests and scripts (:meth:`Serving.infer`). Frontend processes
serve from the workers' data sockets instead (:mod:`api.frontend`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from api import inference
from api.inference import ModelIO, ModelLookup
from api.roles.common import Observer
from stgs.errors import DeadlineExceededError, NoWorkerError
from stgs.runtime import PartitionState, Runtime


@dataclass
class Inflight:
    """Requests (samples) submitted and not answered yet, per model (the metrics' pending)."""

    counts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, model: str, n: int) -> None:
        with self.lock:
            self.counts[model] = self.counts.get(model, 0) + n


class Serving:
    """Serves from ``runtime``; ``models``: the registered models' records and entries
    (:class:`~api.roles.registration.Registration`); ``observer.on_request``: every outcome."""

    def __init__(self, runtime: Runtime, models: ModelLookup, observer: Observer) -> None:
        self.runtime = runtime
        self.models = models
        self.observer = observer
        self.inflight = Inflight()

    # ------------------------------------------------------------------ what serves
    def model_ready(self, name: str) -> bool:
        return any(
            p.state is PartitionState.READY and name in p.rates
            for p in list(self.runtime.partitions.values())
        )

    def partitions(self) -> list[dict[str, Any]]:
        """Every partition the runtime holds and its state (:meth:`Runtime.describe`)."""
        return self.runtime.describe()

    def batch_totals(self) -> dict[str, tuple[int, int]]:
        """Per model: batches its current workers ran and their run time (ns), from the workers'
        STATS (since each worker started)."""
        out: dict[str, tuple[int, int]] = {}
        for p in list(self.runtime.partitions.values()):
            w = p.worker
            for name, st in ({} if w is None else dict(w.transport.batch_stats)).items():
                b, ns = out.get(name, (0, 0))
                out[name] = (b + int(st.get("batches", 0)), ns + int(st.get("run_ns", 0)))
        return out

    # ------------------------------------------------------------------ inference
    def model_io(self, model: str, version: str = "") -> ModelIO:
        """(InferenceBackend) the registered model's tensors; InferError(404) when unknown."""
        return inference.model_io(self.models, model, version)

    async def infer_arrays(
        self, model: str, arrays: tuple[np.ndarray, ...], arrival_ns: int | None
    ) -> tuple[np.ndarray, ...]:
        """(InferenceBackend) the batch through the model, one request per row."""
        outs = await self.infer_async(model, inference.rows_of(arrays), arrival_ns=arrival_ns)
        return inference.stack_rows(outs)

    def infer(self, name: str, samples: list[Any]) -> list[Any]:
        """Blocking :meth:`infer_async` for callers without an event loop (tests, scripts)."""
        return asyncio.run(self.infer_async(name, samples))

    async def infer_async(
        self, name: str, samples: list[Any], *, arrival_ns: int | None = None
    ) -> list[Any]:
        """Run ``samples`` (one array per sample) through the model; ServingError on failure.

        The SLO clock starts at ``arrival_ns`` (when the request reached the server; default
        now): a request that already missed its deadline is shed at once
        (DeadlineExceededError), the worker sheds what cannot meet it, and whatever the worker
        does the call answers by the deadline plus ``inference.ANSWER_GRACE_S``
        (WorkerTimeoutError). Every outcome is counted, against the SLO, from the arrival."""
        slo_ms = self.runtime.slos.get(name)
        t0 = time.monotonic_ns() if arrival_ns is None else arrival_ns
        deadline_ns = 0 if slo_ms is None else t0 + int(slo_ms * 1e6)
        n = len(samples)

        def record(secs: float, met: bool, kind: str) -> None:
            if self.observer.on_request is not None:
                self.observer.on_request(name, n, secs, met, kind)

        self.inflight.add(name, n)
        try:
            return await inference.counted(
                self._serve(name, samples, deadline_ns), t0, slo_ms, record
            )
        finally:
            self.inflight.add(name, -n)

    async def _serve(self, name: str, samples: list[Any], deadline_ns: int) -> list[Any]:
        now = time.monotonic_ns()
        if deadline_ns and now >= deadline_ns:
            raise DeadlineExceededError(
                f"{name}: deadline passed {(now - deadline_ns) / 1e6:.1f} ms before the request"
                " reached a worker (the server is overloaded)"
            )
        futs = await self._submit(name, samples, deadline_ns)
        await inference.await_answers(
            name, [asyncio.wrap_future(f) for f in futs], now, deadline_ns
        )
        return [f.result() for f in futs]

    async def _submit(self, name: str, samples: list[Any], deadline_ns: int) -> list[Future[Any]]:
        """Submit every sample. With no ready worker, fail at once (NoWorkerError: 503), except
        during a transition (the break-first gap of a MIG change), where the request waits for
        the new worker until its deadline."""
        while True:
            first = self.runtime.submit(name, samples[0], deadline_ns=deadline_ns)
            if not (first.done() and isinstance(first.exception(), NoWorkerError)):
                break
            waiting = self.runtime.transitioning and name in self.runtime.slos
            if not waiting or time.monotonic_ns() + 5_000_000 >= (deadline_ns or 0):
                return [first]
            await asyncio.sleep(0.005)
        rest = [self.runtime.submit(name, s, deadline_ns=deadline_ns) for s in samples[1:]]
        return [first, *rest]
