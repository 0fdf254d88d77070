"""A frontend process of the data plane: KServe v2 inference straight to the workers.

``python -m api.frontend --control-fd N --config JSON``. The daemon starts N of these. Each
accepts HTTP on one listening socket that the daemon bound once and handed down (``http_fd``;
the kernel spreads connections over the processes) and, when ``grpc_port`` >= 0, gRPC on a port
every frontend binds with SO_REUSEPORT. Inference requests never cross the control plane: the
frontend parses them (:func:`api.inference.parse_infer`: no pydantic, orjson when installed),
routes them (:class:`Router`) and sends them over its own data connection to each worker
(:class:`~stgs.runtime.aio.AsyncWorkerConnection`). Every other path (``/v1/*``, ``/metrics``,
``/docs``...) is proxied to the control plane's HTTP server on its Unix socket
(``control_socket``), status, headers and body kept.

Control channel (the inherited Unix socket ``--control-fd``; newline-delimited JSON):

* daemon -> frontend ``{"type": "routing", "version", "ready", "models", "partitions"}``: the
  models (SLO, input tensor) and the partitions serving them (data socket, models in slot order,
  planned rates). Applied in order, a version older than the one in use ignored (the snapshot
  answering ``hello`` can arrive after a newer one); answered
  ``{"type": "ack", "version", "failed": [ids]}`` once a connection to every listed partition
  is open (``failed``: those it could not reach) and nothing new goes to partitions no longer
  listed (their requests in flight finish on the old connections, closed when drained: a
  draining worker serves a connection until its client hangs up, so the close is what lets it
  exit; :mod:`stgs.runtime.worker`, Drain).
* frontend -> daemon ``{"type": "hello", "pid"}`` first; then about once a second
  ``{"type": "stats", "models": {...}}``, cumulative since start
  (:meth:`api.inference.InferenceStats.to_dict`, which the daemon adds to its own).

When the control channel closes (the daemon is gone) the frontend exits.

Why the frontend answers 429 itself (deadline-aware admission, :meth:`Router.infer_arrays`): a
request that no partition can serve by its deadline (already late, or the partition's queue on
this connection times its measured per-request service time exceeds the time left) costs the
worker nothing and the client gets its answer at once instead of at the deadline. In flight per
partition is bounded as well, so a queue never grows to seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hmac
import json
import logging
import os
import socket
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.types import Receive, Scope, Send

from api import logs
from api.inference import (
    EXTENSIONS,
    HEADER,
    InferenceStats,
    InferError,
    ModelIO,
    answer_outputs,
    await_answers,
    counted,
    dumps,
    encode_infer,
    parse_infer,
    rows_of,
    stack_rows,
    status_of,
    token_required,
)
from api.limits import BodyLimits, uvicorn_config
from stgs import __version__
from stgs.batching import route_load
from stgs.errors import (
    DeadlineExceededError,
    NoWorkerError,
    StgsError,
)
from stgs.hostmem import keep_large_buffers
from stgs.lifeline import die_with_parent
from stgs.runtime.aio import AsyncWorkerConnection

log = logging.getLogger("stgs.frontend")

EWMA_ALPHA = 0.2  # weight of a new per-round service time sample
STATS_INTERVAL_S = 1.0
MAX_CONTROL_LINE_BYTES = 64 << 20  # a routing snapshot of many models and partitions
# Trace (benchmarks), as the workers' (stgs.runtime.worker.TRACE_ENV): with STGS_FRONTEND_TRACE=DIR
# in its environment a frontend records, per HTTP inference request, FRONTEND_TRACE
# (time.monotonic_ns(), the host's one clock; status: the HTTP status answered) and writes them
# to DIR/frontend-<pid>.npz when it exits normally.
FRONTEND_TRACE_ENV = "STGS_FRONTEND_TRACE"
FRONTEND_TRACE = ("t_arrival", "t_body", "t_parsed", "t_answered", "t_written", "status")


# ---------------------------------------------------------------------------- routing
@dataclass(eq=False)  # one per connection: hashed by identity
class _Partition:
    """One partition as this frontend sees it: its data connection and what it serves."""

    id: str
    socket: str
    conn: AsyncWorkerConnection
    slots: dict[str, int]  # model -> its (first) slot in the worker's spec
    rates: dict[str, float]  # model -> planned rate (requests/s)
    service_s: dict[str, float]  # model -> EWMA of the time per round of batches, once measured
    batches: dict[str, int] = field(default_factory=dict)  # model -> planned batch (default 1)
    draining: bool = False
    in_flight: dict[str, int] = field(default_factory=dict)  # model -> sent, not yet answered

    def rounds(self, model: str, requests: int) -> int:
        """The worker's duty-cycle rounds that ``requests`` queued requests take: one batch of
        up to the planned batch per round."""
        return -(-requests // max(1, self.batches.get(model, 1)))


@dataclass(frozen=True)
class _Model:
    io: ModelIO
    slo_ms: float | None


class Router:
    """Routing snapshot, data connections and admission: the frontend's
    :class:`~api.inference.InferenceBackend`."""

    def __init__(self, max_in_flight: int = 64) -> None:
        self.max_in_flight = max_in_flight
        self.version = -1
        self.ready = False
        self.models: dict[str, _Model] = {}
        self.partitions: dict[str, _Partition] = {}  # listed in the current snapshot
        self._draining: set[_Partition] = set()  # left the snapshot; closed once drained
        self.stats = InferenceStats()  # what this frontend answered, sent to the daemon

    # ------------------------------------------------------------ InferenceBackend
    @property
    def restored(self) -> bool:
        return self.ready

    def model_io(self, model: str, version: str = "") -> ModelIO:
        if self.version < 0:  # started, no snapshot yet: the daemon is still wiring it in
            raise InferError(503, "this frontend has no routing from the daemon yet")
        m = self.models.get(model)
        if m is None:
            raise InferError(404, f"unknown model {model!r}")
        m.io.check_version(version)
        return m.io

    def model_ready(self, model: str) -> bool:
        return any(model in p.slots and not p.conn.closed for p in self.partitions.values())

    async def infer_arrays(
        self, model: str, arrays: tuple[np.ndarray, ...], arrival_ns: int | None
    ) -> tuple[np.ndarray, ...]:
        """Route the batch (one request per row, as Service does), answer by the deadline plus
        ``api.inference.ANSWER_GRACE_S``; count the outcome against the SLO from ``arrival_ns``."""
        t0 = time.monotonic_ns() if arrival_ns is None else arrival_ns
        m = self.models.get(model)
        slo_ms = m.slo_ms if m is not None else None
        n = len(arrays[0])
        return await counted(
            self._serve(model, arrays, t0, slo_ms),
            t0,
            slo_ms,
            lambda secs, met, kind: self.stats.record(model, n, secs, met, kind),
        )

    async def _serve(
        self, model: str, arrays: tuple[np.ndarray, ...], t0_ns: int, slo_ms: float | None
    ) -> tuple[np.ndarray, ...]:
        now = time.monotonic_ns()
        deadline_ns = 0 if slo_ms is None else t0_ns + int(slo_ms * 1e6)
        n = len(arrays[0])
        p = self._choose(model, n, now, deadline_ns)
        conn = p.conn
        slot = p.slots[model]
        ahead = conn.in_flight
        futs = [conn.submit(slot, row, deadline_ns) for row in rows_of(arrays)]
        p.in_flight[model] = p.in_flight.get(model, 0) + n
        try:
            await await_answers(model, futs, now, deadline_ns)
        finally:
            p.in_flight[model] -= n
            if p.draining and conn.awaited == 0:  # drained, or the rest timed out
                self._close_drained(p)
        outs = [f.result() for f in futs]
        # the time per round: the latency over the rounds of batches it waited for (the worker
        # takes up to its planned batch per round, so a queue of a batch is one round, not a
        # batch's worth of rounds)
        sample_s = (time.monotonic_ns() - now) / 1e9 / p.rounds(model, ahead + n)
        est = p.service_s.get(model, 0.0)
        p.service_s[model] = sample_s if est <= 0 else est + EWMA_ALPHA * (sample_s - est)
        return stack_rows(outs)

    def _choose(self, model: str, n: int, now_ns: int, deadline_ns: int) -> _Partition:
        """The least loaded partition (``stgs.batching.route_load``: the model's requests in
        flight there over its planned rate there) that can meet the
        deadline; DeadlineExceededError (429) when none can, NoWorkerError (503) when none
        serves the model."""
        if deadline_ns and now_ns >= deadline_ns:
            raise DeadlineExceededError(
                f"{model}: deadline passed {(now_ns - deadline_ns) / 1e6:.1f} ms before the"
                " request reached a worker (the server is overloaded)"
            )
        left_s = (deadline_ns - now_ns) / 1e9 if deadline_ns else float("inf")
        best: tuple[float, _Partition] | None = None
        serving = 0
        why = ""
        for p in self.partitions.values():
            if model not in p.slots or p.conn.closed:
                continue
            serving += 1
            queued = p.conn.in_flight
            if queued and queued + n > self.max_in_flight:
                why = f"{queued} requests in flight on a partition (at most {self.max_in_flight})"
                continue
            # An idle partition always gets the request (its worker sheds what it cannot run in
            # time): the estimate is re-measured whenever the queue empties, so a stale one
            # never refuses everything, and none is needed before the first answer.
            predicted_s = p.rounds(model, queued + n) * p.service_s.get(model, 0.0)
            if queued and predicted_s > left_s:
                why = (
                    f"a partition's queue ({queued} requests) would take {predicted_s * 1e3:.1f}"
                    f" ms, {left_s * 1e3:.1f} ms are left"
                )
                continue
            load = route_load(p.in_flight.get(model, 0), p.rates.get(model, 0.0))
            if best is None or load < best[0]:
                best = (load, p)
        if best is not None:
            return best[1]
        if not serving:
            raise NoWorkerError(f"no ready worker serves {model!r}")
        raise DeadlineExceededError(f"{model}: shed, no partition can meet its deadline: {why}")

    # ------------------------------------------------------------ snapshots
    async def apply(self, snapshot: dict[str, Any]) -> list[str]:
        """Apply a routing snapshot; the ids of listed partitions it could not connect to. A
        version older than the one in use is ignored: it could list partitions that have left
        since (and are draining)."""
        if int(snapshot.get("version", -1)) < self.version:
            return []
        models: dict[str, _Model] = {}
        for name, m in snapshot.get("models", {}).items():
            io = ModelIO.from_dict(name, m.get("input") or {})
            slo = m.get("slo_ms")
            models[name] = _Model(io, None if slo is None else float(slo))
        listed = {p["id"]: p for p in snapshot.get("partitions", [])}
        old = self.partitions
        new: dict[str, _Partition] = {}
        failed: list[str] = []
        for pid, spec in listed.items():
            slots: dict[str, int] = {}
            for k, name in enumerate(spec.get("models", [])):
                slots.setdefault(name, k)
            rates = {k: float(v) for k, v in (spec.get("rates") or {}).items()}
            batches = {k: int(v) for k, v in (spec.get("batches") or {}).items()}
            cur = old.get(pid)
            if cur is not None and cur.socket == spec["socket"] and not cur.conn.closed:
                # the same worker: keep its connection and what was learnt about it
                cur.slots, cur.rates, cur.batches = slots, rates, batches
                new[pid] = cur
                continue
            try:
                conn = await AsyncWorkerConnection.open(spec["socket"], name=pid)
            except OSError as exc:
                log.warning("partition %s: cannot connect to %s: %s", pid, spec["socket"], exc)
                failed.append(pid)
                continue
            new[pid] = _Partition(pid, spec["socket"], conn, slots, rates, {}, batches)
        kept = set(new.values())
        for p in old.values():
            if p not in kept:
                p.draining = True
                self._draining.add(p)
                if p.conn.awaited == 0:
                    self._close_drained(p)
        self.models = models
        self.partitions = new
        self.ready = bool(snapshot.get("ready", False))
        self.version = int(snapshot.get("version", -1))
        return failed

    def _close_drained(self, p: _Partition) -> None:
        self._draining.discard(p)
        p.conn.close()

    def close(self) -> None:
        for p in [*self.partitions.values(), *self._draining]:
            p.conn.close()
        self.partitions = {}
        self._draining.clear()


# ---------------------------------------------------------------------------- HTTP (ASGI)
_HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    )
)
_HEADER_KEY = HEADER.lower().encode()


async def _answer(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    hs = headers if headers is not None else [(b"content-type", b"application/json")]
    hs = [*hs, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": hs})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, obj: object) -> None:
    await _answer(send, status, dumps(obj))


async def _error(send: Send, status: int, message: str) -> None:
    await _json(send, status, {"error": message})


class FrontendApp:
    """The raw ASGI app: KServe v2 served here, everything else proxied to the control plane.
    No framework routing and no request models: the infer path is a few string compares, one
    JSON decode and the router."""

    def __init__(
        self,
        router: Router,
        *,
        control_socket: str | None,
        token: str | None = None,
        auth_all: bool = False,
    ) -> None:
        self.router = router
        self.control_socket = control_socket
        self.token = token
        self.auth_all = auth_all
        self._proxy: Any = None  # httpx.AsyncClient over the control socket, made on first use
        self.trace_dir = os.environ.get(FRONTEND_TRACE_ENV) or None
        self.trace: array[int] = array("q")  # FRONTEND_TRACE rows, flat

    def write_trace(self) -> None:
        """The trace as ``<dir>/frontend-<pid>.npz`` (nothing without STGS_FRONTEND_TRACE)."""
        if self.trace_dir is None:
            return
        try:
            os.makedirs(self.trace_dir, exist_ok=True)
            rows = np.frombuffer(self.trace, dtype=np.int64).reshape(-1, len(FRONTEND_TRACE))
            np.savez(os.path.join(self.trace_dir, f"frontend-{os.getpid()}.npz"), requests=rows)
        except OSError as exc:
            log.warning("frontend trace not written: %s", exc)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if not self._authorized(scope, method, path):
            await _answer(
                send,
                401,
                dumps({"error": "missing or wrong bearer token (Authorization: Bearer <token>)"}),
                [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
            )
            return
        is_v2 = path == "/v2" or path.startswith("/v2/")
        if is_v2 and await self._kserve(scope, receive, send, method, path):
            return
        await self._proxy_request(scope, receive, send)

    def _authorized(self, scope: Scope, method: str, path: str) -> bool:
        """api.app's rule: with a token, mutating /v1 calls need it; off loopback, every call."""
        if self.token is None:
            return True
        if not token_required(method, path, self.auth_all):
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, tok = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(
                    tok.strip().encode(), self.token.encode()
                )
        return False

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                if self._proxy is not None:
                    await self._proxy.aclose()
                # here, not after the server returns: uvicorn re-raises a SIGTERM it caught once
                # it is done, and the process ends there
                self.write_trace()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _kserve(
        self, scope: Scope, receive: Receive, send: Send, method: str, path: str
    ) -> bool:
        """Serve a KServe v2 path; False for a path that is not one (proxied instead)."""
        parts = path.split("/")  # "", "v2", ...
        r = self.router
        if len(parts) == 2:
            body: object = {
                "name": "stgs",
                "version": __version__,
                "extensions": list(EXTENSIONS),
            }
            return await self._get(send, method, 200, body)
        if parts[2] == "health" and len(parts) == 4:
            if parts[3] == "live":
                return await self._get(send, method, 200, {"live": True})
            if parts[3] == "ready":
                return await self._get(send, method, 200 if r.ready else 503, {"ready": r.ready})
            return False
        if parts[2] != "models" or len(parts) < 4 or not parts[3]:
            return False  # /v2/repository/...: the control plane's
        model = parts[3]
        if model == "stats" and len(parts) == 4:
            return False  # every model's statistics: the control plane's
        rest = parts[4:]
        version = ""
        if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
            version, rest = rest[1], rest[2:]
        if not rest or rest == ["ready"]:
            if method != "GET":
                return await self._get(send, method, 0, None)
            try:
                io = r.model_io(model, version)
            except InferError as exc:
                await _error(send, exc.status, exc.message)
                return True
            if not rest:
                await _json(send, 200, io.metadata())
                return True
            ok = r.model_ready(model)
            await _json(send, 200 if ok else 400, {"name": model, "ready": ok})
            return True
        if rest == ["infer"]:
            if method != "POST":
                await _error(send, 405, "Method Not Allowed")
                return True
            await self._infer(scope, receive, send, model, version)
            return True
        return False  # config, stats: the control plane's

    async def _get(self, send: Send, method: str, status: int, body: object) -> bool:
        if method != "GET":
            await _error(send, 405, "Method Not Allowed")
        else:
            await _json(send, status, body)
        return True

    async def _infer(
        self, scope: Scope, receive: Receive, send: Send, model: str, version: str = ""
    ) -> None:
        msg = await receive()  # BodyLimits hands the whole body as one message
        t_body = time.monotonic_ns()
        body: bytes = msg.get("body", b"")
        header_len = None
        for name, value in scope["headers"]:
            if name == _HEADER_KEY:
                header_len = value.decode("latin-1")
                break
        arrival_ns = scope.get("state", {}).get("arrival_ns")
        r = self.router
        t_parsed = t_answered = 0
        status = 200
        try:
            io = r.model_io(model, version)
            call = parse_infer(body, header_len, io)
            t_parsed = time.monotonic_ns()
            result = await r.infer_arrays(model, call.arrays, arrival_ns)
            t_answered = time.monotonic_ns()
            answer = answer_outputs(io, call, result)
        except InferError as exc:
            status = exc.status
            await _error(send, exc.status, exc.message)
        except StgsError as exc:
            status = status_of(exc)
            await _error(send, status, str(exc))
        else:
            content, headers = encode_infer(model, call.request_id, answer, version=io.version)
            await _answer(send, 200, content, headers)
        if self.trace_dir is not None:
            t0 = arrival_ns or t_body
            self.trace.extend((t0, t_body, t_parsed, t_answered, time.monotonic_ns(), status))

    async def _proxy_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward the request to the control plane's HTTP server; stream its answer back."""
        if self.control_socket is None:
            await _error(send, 404, "Not Found")
            return
        import httpx

        if self._proxy is None:
            self._proxy = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=self.control_socket),
                base_url="http://stgs-control",
                timeout=httpx.Timeout(None),
            )
        msg = await receive()
        body: bytes = msg.get("body", b"")
        headers = [
            (k, v) for k, v in scope["headers"] if k not in _HOP_BY_HOP and k != b"content-length"
        ]
        target = scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        req = self._proxy.build_request(scope["method"], target, headers=headers, content=body)
        try:
            resp = await self._proxy.send(req, stream=True)
        except httpx.HTTPError as exc:
            await _error(send, 502, f"the control plane is unreachable: {exc}")
            return
        try:
            out = [(k, v) for k, v in resp.headers.raw if k.lower() not in _HOP_BY_HOP]
            await send({"type": "http.response.start", "status": resp.status_code, "headers": out})
            async for chunk in resp.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await resp.aclose()


# ---------------------------------------------------------------------------- the process
@dataclass(frozen=True)
class FrontendConfig:
    """What the daemon passes in ``--config`` (JSON)."""

    http_fd: int
    slot: int = 0  # this frontend's index among the daemon's (its log lines say it)
    host: str = "127.0.0.1"  # the daemon's serving address: gRPC binds it
    grpc_port: int = -1
    token_file: str | None = None
    auth_all: bool = False
    control_socket: str | None = None
    max_body_bytes: int = 1 << 20
    max_infer_body_bytes: int = 64 << 20
    max_header_bytes: int = 64 << 10
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_body_timeout_s: float = 10.0
    max_concurrency: int = 4096
    log_format: str = "text"
    access_log: bool = False
    max_in_flight: int = 64  # per partition, this frontend's share

    @classmethod
    def from_json(cls, text: str) -> FrontendConfig:
        return cls(**json.loads(text))


class Frontend:
    """The process: the control channel, the router, uvicorn and (optionally) gRPC."""

    def __init__(self, cfg: FrontendConfig, control: socket.socket) -> None:
        self.cfg = cfg
        self.control = control
        self.router = Router(cfg.max_in_flight)
        token = None
        if cfg.token_file:
            with open(cfg.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        self.token = token
        self.app = FrontendApp(
            self.router, control_socket=cfg.control_socket, token=token, auth_all=cfg.auth_all
        )

    async def run(self) -> None:
        import uvicorn

        cfg = self.cfg
        asgi = BodyLimits(
            self.app,
            max_body_bytes=cfg.max_body_bytes,
            max_infer_body_bytes=cfg.max_infer_body_bytes,
            body_timeout_s=cfg.body_timeout_s,
            idle_body_timeout_s=cfg.idle_body_timeout_s,
        )
        config = uvicorn_config(
            asgi,
            header_timeout_s=cfg.header_timeout_s,
            max_header_bytes=cfg.max_header_bytes,
            max_concurrency=cfg.max_concurrency,
            log_level="info" if cfg.access_log else "warning",  # access lines are INFO
            graceful_s=5,
            access_log=cfg.access_log,
        )
        server = uvicorn.Server(config)
        grpc_server = None
        if cfg.grpc_port >= 0:
            from api import grpc_server as grpc_mod

            control_client = (  # Triton's model API: the control plane's
                None
                if cfg.control_socket is None
                else grpc_mod.ControlClient.unix(cfg.control_socket)
            )
            grpc_server, _ = await grpc_mod.start(
                self.router,
                cfg.host,
                cfg.grpc_port,
                token=self.token,
                auth_all=cfg.auth_all,
                max_message_bytes=cfg.max_infer_body_bytes,
                max_concurrent_rpcs=cfg.max_concurrency,
                reuse_port=True,
                control=control_client,
            )
        control = asyncio.create_task(self._control(server))
        # the socket object from the fd itself (uvicorn's ``fd=`` assumes a Unix socket)
        listener = socket.socket(fileno=cfg.http_fd)
        # What start-up made lives as long as the process: out of the collector's sight, so
        # that no full collection walks it on a request's path (as the workers do).
        gc.collect()
        gc.freeze()
        try:
            await server.serve(sockets=[listener])
        finally:
            control.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await control
            if grpc_server is not None:
                await grpc_server.stop(1.0)
            self.router.close()

    async def _control(self, server: Any) -> None:
        """Read routing snapshots, write acks and stats; the channel's end ends the process."""
        reader, writer = await asyncio.open_unix_connection(
            sock=self.control, limit=MAX_CONTROL_LINE_BYTES
        )

        def send(msg: dict[str, Any]) -> None:
            writer.write(dumps(msg) + b"\n")

        async def stats() -> None:
            while True:
                await asyncio.sleep(STATS_INTERVAL_S)
                send({"type": "stats", "models": self.router.stats.to_dict()})

        send({"type": "hello", "pid": os.getpid()})
        ticker = asyncio.create_task(stats())
        try:
            while line := await reader.readline():
                try:
                    msg = json.loads(line)
                except ValueError:
                    log.warning("control channel: not JSON: %.80r", line)
                    continue
                if isinstance(msg, dict) and msg.get("type") == "routing":
                    failed = await self.router.apply(msg)
                    send({"type": "ack", "version": self.router.version, "failed": failed})
                    await writer.drain()
        except (ConnectionError, ValueError) as exc:  # ValueError: a line over the limit
            log.warning("control channel broke: %s", exc)
        finally:
            ticker.cancel()
            log.info("control channel closed: exiting")
            server.should_exit = True


def main(argv: Sequence[str] | None = None) -> int:
    # a daemon killed with SIGKILL takes its frontends along at once: none keeps the public
    # port (inherited) from the daemon that starts next
    die_with_parent()
    keep_large_buffers()  # request bodies without page faults (stgs.hostmem)
    ap = argparse.ArgumentParser(prog="stgs-frontend")
    ap.add_argument("--control-fd", type=int, required=True, help="the control channel's fd")
    ap.add_argument("--config", required=True, help="FrontendConfig as JSON")
    args = ap.parse_args(argv)
    cfg = FrontendConfig.from_json(args.config)
    # INFO with the access log on: uvicorn writes it at INFO
    logs.setup(
        cfg.log_format, logging.INFO if cfg.access_log else logging.WARNING, f"frontend {cfg.slot}"
    )
    control = socket.socket(fileno=args.control_fd)
    frontend = Frontend(cfg, control)
    try:
        import uvloop
    except ImportError:
        asyncio.run(frontend.run())
    else:
        uvloop.run(frontend.run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
