"""The benchmarks' open-loop KServe v2 client: Poisson arrivals over several models, sent over HTTP
(aiohttp) or gRPC (grpc.aio, Triton's published protos) as binary tensors, from processes of its
own so that the client is not the server's bottleneck (``benchmarks/api_load.py``,
``benchmarks/api_gpu.py``).

Every request's record: (model index, lag s, latency s, status). The latency counts from when the
client meant to send the request (its scheduled arrival), so a client that falls behind shows
as misses, and its lag (scheduled -> actually sent) is reported. Status: the HTTP code, or for
gRPC the HTTP status its code stands for (``_GRPC_STATUS``: 429 RESOURCE_EXHAUSTED, 503
UNAVAILABLE, 504 DEADLINE_EXCEEDED, 499 CANCELLED, 500 INTERNAL; 520 any other); -1 a
connection error.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import random
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from api.kserve import KSERVE_OF, binary_request

Row = tuple[int, float, float, int]  # model index, lag s, latency s, status
PhasedRow = tuple[int, float, float, int, int]  # ... and the phase it was scheduled in
NO_ANSWER = -2  # a request the client gave up on (no status within ``ANSWER_TIMEOUT_S``)
ANSWER_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Target:
    """One model's share of the load: ``rate`` req/s of ``x`` (one request, batch dim first;
    the input ``input_name``), and ``more`` inputs by name for a model of several."""

    model: str
    rate: float
    x: np.ndarray
    input_name: str = "input"
    more: tuple[tuple[str, np.ndarray], ...] = ()

    def inputs(self) -> dict[str, np.ndarray]:
        return {self.input_name: self.x, **dict(self.more)}


def _sender(kind: str, addr: str, t: Target) -> Any:
    """A coroutine function that sends ``t``'s request once and returns the status."""
    if kind == "grpc":
        import grpc
        from tritonclient.grpc import service_pb2 as pb
        from tritonclient.grpc import service_pb2_grpc as pb_grpc

        stub = pb_grpc.GRPCInferenceServiceStub(_channels.setdefault(addr, _channel(addr)))
        named = t.inputs()
        req = pb.ModelInferRequest(
            model_name=t.model,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name=name, datatype=KSERVE_OF[str(x.dtype)], shape=list(x.shape)
                )
                for name, x in named.items()
            ],
            raw_input_contents=[np.ascontiguousarray(x).tobytes() for x in named.values()],
        )

        async def send_grpc() -> int:
            try:
                await stub.ModelInfer(req, timeout=30)
                return 200
            except grpc.aio.AioRpcError as exc:
                return _GRPC_STATUS.get(exc.code().name, 520)

        return send_grpc

    import aiohttp

    session = _sessions.get(addr)
    if session is None:
        session = _sessions[addr] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    body, headers = binary_request(t.inputs(), binary_output=True)
    url = f"http://{addr}/v2/models/{t.model}/infer"

    async def send_http() -> int:
        try:
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                return r.status
        except aiohttp.ClientError:
            return -1

    return send_http


# gRPC codes as the HTTP statuses they stand for (520: any other code)
_GRPC_STATUS = {
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
}
_channels: dict[str, Any] = {}
_sessions: dict[str, Any] = {}


async def _close_connections() -> None:
    """Close this client process's gRPC channels and HTTP sessions (after its last request)."""
    for ch in _channels.values():
        await ch.close()
    for s in _sessions.values():
        await s.close()
    _channels.clear()
    _sessions.clear()


def _channel(addr: str) -> Any:
    import grpc

    return grpc.aio.insecure_channel(addr)


async def _drive(
    kind: str,
    addr: str,
    targets: Sequence[Target],
    seconds: float,
    seed: int,
    warmup_s: float = 0.0,
) -> list[Row]:
    senders = [_sender(kind, addr, t) for t in targets]
    total = sum(t.rate for t in targets)
    weights = [t.rate for t in targets]
    rng = random.Random(seed)
    out: list[Row] = []

    async def one(i: int, t_plan: float, counted: bool) -> None:
        lag = time.monotonic() - t_plan
        code = await senders[i]()
        if counted:
            out.append((i, lag, time.monotonic() - t_plan, code))

    tasks = []
    start = time.monotonic() + 0.2
    t = 0.0
    idx = range(len(targets))
    while total > 0:
        t += rng.expovariate(total)  # the sum of the models' Poisson processes
        if t >= warmup_s + seconds:
            break
        i = rng.choices(idx, weights)[0] if len(targets) > 1 else 0
        delay = start + t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, start + t, t >= warmup_s)))
    await asyncio.gather(*tasks)
    await _close_connections()
    return out


def _run_client(
    drive: Coroutine[Any, Any, list[Any]], path: str, cpus: Sequence[int] | None
) -> None:
    """A client process's body: pinned to ``cpus`` when given, on uvloop when installed, runs
    ``drive`` and writes its records to ``path``."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    Path(path).write_text(json.dumps(asyncio.run(drive)))


def _client(
    kind: str,
    addr: str,
    targets: Sequence[Target],
    seconds: float,
    seed: int,
    path: str,
    cpus: Sequence[int] | None,
    warmup_s: float = 0.0,
) -> None:
    _run_client(_drive(kind, addr, targets, seconds, seed, warmup_s), path, cpus)


def load(
    kind: str,
    addr: str,
    targets: Sequence[Target],
    seconds: float,
    clients: int,
    work: Path,
    *,
    cpus: Sequence[int] | None = None,
    seed: int = 17,
    warmup_s: float = 0.0,
) -> list[Row]:
    """The targets' rates for ``seconds`` from ``clients`` processes (each a share of every
    model's rate), pinned to ``cpus`` when given; every request's record. With ``warmup_s`` the
    load runs that much longer first, and the requests scheduled then are sent but not
    recorded."""
    ctx = mp.get_context("spawn")
    work.mkdir(parents=True, exist_ok=True)
    paths = [str(work / f"c{i}.json") for i in range(clients)]
    share = [replace(t, rate=t.rate / clients) for t in targets]
    procs = [
        ctx.Process(target=_client, args=(kind, addr, share, seconds, seed + i, p, cpus, warmup_s))
        for i, p in enumerate(paths)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(warmup_s + seconds + 120)
    stuck = [k for k, p in enumerate(procs) if p.is_alive()]
    for k in stuck:
        procs[k].kill()
        procs[k].join(10)
    failed = [k for k, (p, path) in enumerate(zip(procs, paths, strict=True)) if p.exitcode != 0]
    if failed or not all(Path(path).is_file() for path in paths):
        raise RuntimeError(
            f"load clients {failed or stuck} did not finish (exit codes"
            f" {[p.exitcode for p in procs]}; stuck and killed: {stuck})"
        )
    out: list[Row] = []
    for path in paths:
        out += [tuple(r) for r in json.loads(Path(path).read_text())]  # type: ignore[misc]
    return out


async def _drive_phased(
    kind: str,
    addr: str,
    targets: Sequence[Target],
    rates: Sequence[Sequence[float]],
    phase: Any,
    seed: int,
) -> list[PhasedRow]:
    """Poisson arrivals at ``rates[phase.value]`` (one rate per target) until ``phase.value``
    is -1; every request's record with its phase. A request that raises or gets no answer
    within ``ANSWER_TIMEOUT_S`` is recorded as ``NO_ANSWER``."""
    senders = [_sender(kind, addr, t) for t in targets]
    rng = random.Random(seed)
    out: list[PhasedRow] = []

    async def one(i: int, t_plan: float, k: int) -> None:
        lag = time.monotonic() - t_plan
        try:
            code = await asyncio.wait_for(senders[i](), ANSWER_TIMEOUT_S)
        except Exception:  # a timeout, or the client's own failure: not an answer
            code = NO_ANSWER
        out.append((i, lag, time.monotonic() - t_plan, code, k))

    tasks = []
    t = time.monotonic() + 0.2
    idx = range(len(targets))
    while (k := int(phase.value)) >= 0:
        weights = list(rates[k])
        total = sum(weights)
        if total <= 0:
            await asyncio.sleep(0.05)
            t = time.monotonic()
            continue
        t += rng.expovariate(total)  # memoryless: a new phase's rates apply from the next draw
        i = rng.choices(idx, weights)[0]
        delay = t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, t, k)))
    await asyncio.gather(*tasks)
    await _close_connections()
    return out


def _phased_client(
    kind: str,
    addr: str,
    targets: Sequence[Target],
    rates: Sequence[Sequence[float]],
    phase: Any,
    seed: int,
    path: str,
) -> None:
    _run_client(_drive_phased(kind, addr, targets, rates, phase, seed), path, None)


class PhasedLoad:
    """Open-loop load whose rates the caller switches while it runs: ``rates[k]`` (one rate per
    target, req/s in all) while the phase is ``k`` (:meth:`set_phase`), from ``clients``
    processes that each send a share; :meth:`stop` ends it, waits for every answer and returns
    every request's record with the phase it was scheduled in. For load steps whose end is an
    event (a re-plan seen), not a time."""

    def __init__(
        self,
        kind: str,
        addr: str,
        targets: Sequence[Target],
        rates: Sequence[Sequence[float]],
        clients: int,
        work: Path,
        *,
        seed: int = 17,
    ) -> None:
        if any(len(r) != len(targets) for r in rates):
            raise ValueError("every phase needs one rate per target")
        ctx = mp.get_context("spawn")
        work.mkdir(parents=True, exist_ok=True)
        self._phase = ctx.Value("i", 0)
        self._paths = [str(work / f"phased{i}.json") for i in range(clients)]
        share = [[r / clients for r in rs] for rs in rates]
        self._procs = [
            ctx.Process(
                target=_phased_client,
                args=(kind, addr, list(targets), share, self._phase, seed + i, p),
            )
            for i, p in enumerate(self._paths)
        ]
        for p in self._procs:
            p.start()

    def set_phase(self, k: int) -> None:
        self._phase.value = k

    def stop(self, timeout_s: float = ANSWER_TIMEOUT_S + 60.0) -> list[PhasedRow]:
        self._phase.value = -1
        for p in self._procs:
            p.join(timeout_s)
            if p.is_alive():
                p.kill()
                p.join(10)
                raise RuntimeError(f"a load client did not end within {timeout_s:.0f} s")
            if p.exitcode != 0:
                raise RuntimeError(f"a load client failed (exit {p.exitcode})")
        out: list[PhasedRow] = []
        for path in self._paths:
            out += [tuple(r) for r in json.loads(Path(path).read_text())]
        return out


def summarize(
    rows: Sequence[Row], slo_s: float | Sequence[float], names: Sequence[str] = ()
) -> dict[str, Any]:
    """Share within SLO (a 200 within the model's SLO of the scheduled send), percentiles of
    every answer's latency, the client's lag and the status counts; with ``names`` (the models
    by index) also each model's share within SLO and p99 (``by_model``)."""
    if not rows:
        return {"n": 0, "within_slo": 0.0, "codes": {}}
    arr = np.array(rows, dtype=np.float64)
    slos = np.asarray(slo_s if isinstance(slo_s, Sequence) else [slo_s], dtype=np.float64)
    slo = slos[arr[:, 0].astype(int)] if len(slos) > 1 else slos[0]
    lat, lag, code = arr[:, 2], arr[:, 1], arr[:, 3]
    ok = (code == 200) & (lat <= slo)
    codes: dict[str, int] = {}
    for c in code.astype(int).tolist():
        codes[str(c)] = codes.get(str(c), 0) + 1
    by_model = {}
    for i, name in enumerate(names):
        mine = arr[:, 0] == i
        if mine.any():
            by_model[name] = {
                "n": int(mine.sum()),
                "within_slo": float(ok[mine].mean()),
                "p50_ms": float(np.percentile(lat[mine], 50) * 1e3),
                "p99_ms": float(np.percentile(lat[mine], 99) * 1e3),
            }
    return {
        "n": len(rows),
        "within_slo": float(ok.mean()),
        **({"by_model": by_model} if by_model else {}),
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "lag_p99_ms": float(np.percentile(lag, 99) * 1e3),
        "codes": codes,
    }
