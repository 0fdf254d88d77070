"""The worker process: one per partition, ``python -m stgs.runtime --fd N --spec JSON``.

Its device is pinned by the environment the backend gave it (``CUDA_VISIBLE_DEVICES=MIG-<uuid>``,
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``); ``STGS_DEVICE`` says whether to run on ``cuda`` or, behind
the simulated node, on the ``cpu``. It loads each of its models once, says READY, then runs the
partition's duty cycle: round-robin over its models, one batch of up to ``batch`` queued requests
per model per cycle. The loop is work conserving: a cycle with nothing queued waits for the next
request instead of sleeping out the planned cycle length, so latency never pays for idle time.

Pipelining: a batch goes through its model's runner (:mod:`stgs.runtime.models`) in three steps:
``stage`` (gather the requests' tensors into the pinned input buffers), ``launch`` (queue the
input copy, the CUDA graph and the output copy on the worker's one stream) and ``collect`` (wait
for the results). While batch N runs on the GPU, the loop takes batch N+1 (the round robin's
next turn, which may be the same model), answers what it refuses, stages it and launches it
behind N; only then does it wait for N's results and send N's replies, which N+1 runs through.
It takes N+1 shortly before N is predicted to end (N's start on the device plus its model's
estimate, less the host's lead: the slowest slot's measured take-to-launch time plus
``TAKE_MARGIN_NS``; earlier if N is done), or at once when that turn's queue holds a full
batch: a request that arrives while N runs still joins N+1, where taking N+1 as soon as N is
launched would leave it for N+2, a whole turn more. The host waits for the GPU only in
``collect``, where it needs a result. At most two batches are in flight (a runner holds two sets
of buffers). A synchronous runner (the CPU's, whose ``launch`` computes) stages N+1 while N is
in flight but launches it only after N's replies. With ``STGS_WORKER_PIPELINE=0``
(:data:`PIPELINE_ENV`, read once at start) the worker runs one batch at a time: take, stage,
launch, collect, reply, as before the pipeline (for before/after measurements); the READY frame
says which (``pipeline``).

Deadlines: a request whose deadline has passed, or (with admission on) that would finish after
its deadline given the model's measured batch latency (an EMA), is answered "deadline exceeded"
without running. The batch latency is the batch's time on the device (CUDA events around its
copies and graph; on the CPU the runner's computation), not the host time from launch to
collect: in the pipeline that span also holds the batch before it on the stream and whatever
the host did before collecting. Admission adds the wait explicitly: a request taken while a
batch is in flight is predicted to end after that batch's predicted end (its start on the
device plus its model's estimate) plus its own model's estimate. When nothing of a take runs
and a request was refused on that prediction, the estimate shrinks (``ADMISSION_DECAY``): only
batches that run re-measure it, so a few slow batches must not make a model refuse everything
from then on. A STOP frame drains (Drain, below); a closed socket (the daemon is gone) ends the
worker once the batch in flight is answered.

Liveness: the duty-cycle loop sends a HEARTBEAT frame (with its longest batch so far, on the
device) whenever it has sent nothing for ``HEARTBEAT_INTERVAL_S``, idle or between batches. A
worker that is stopped (SIGSTOP) or stuck inside a batch falls silent (the loop blocks in that
batch's ``collect``), and the supervisor kills and restarts it. A batch that fails (the runner
raises in stage, launch or collect) is answered FAILED, and the loop goes on.

Batch statistics: at most once a second, after a batch, the worker sends a STATS frame (JSON,
``STATS_KEYS``): per model slot, cumulative since it started, the batches it ran and their run
time (their time on the device: input copy, graph, output copy), and the same for full batches
(the planned batch size) alone. The daemon compares them with the plan's predicted batch latency
(metrics ``stgs_partition_*batch*``): a model that overruns its profile shows there.

Data connections (``WorkerSpec.listen``): besides its control connection (the socketpair from
the supervisor), a worker can accept any number of data connections on a Unix stream socket, so
that frontend processes send requests straight to it. It binds the socket (mode 0600, a stale
file unlinked first) after loading its models and before READY: READY means "connectable". A
data connection carries the control connection's frames (:mod:`stgs.runtime.transport`), but
only REQUEST in (``model``: the slot index in ``spec.models`` order; ``req_id``: chosen by the
client, unique on its connection) and RESPONSE out; any other kind from a client is ignored
(STOP counts only on the control connection), and HEARTBEAT, STATS and READY go only to the
supervisor. One reader thread per connection (an accept thread starts them) queues requests into
the same per-model queues as the control connection's, so one batch mixes the requests of every
connection; each request keeps the connection it came on, and a batch's replies go out with one
``send_responses`` per connection. Threads rather than a selector loop: a reader blocked in
``recv_into`` holds no GIL, wakes only for its own bytes and takes every frame that arrived in
one call; a selector loop would add a ``select`` call and a dispatch per wake-up in Python, on
the path every request takes. A data connection that closes (end of file: a client must not
half-close while it waits) drops its requests still queued when they are taken (nobody to
answer); the others are untouched. A client that stops reading is cut off: a reply that cannot
be sent for ``DATA_SEND_TIMEOUT_S`` closes its connection, so that it never stalls the batch
loop that every connection shares. When the worker exits it closes its data connections and
unlinks the socket file.

Drain (STOP, on the control connection): the worker serves what is queued, from every
connection, and goes on serving its data connections until every client hung up, or until the
STOP's ``deadline_ns`` (0: none; the supervisor kills a worker that outlives it); only then does
it exit. A worker cannot tell from its queues that a client sent everything: a frontend routes
a request to a partition, then learns that the partition leaves and acknowledges it, and the
request may still be in the frontend's write buffer, or in the socket unread by this worker's
reader thread, when STOP arrives. Exiting on empty queues lost it ("request lost in flight" at
the frontend; EPIPE on its write). The client's hang-up is the proof instead: a frontend closes
its connection to a partition once the routing left it out and every answer is in (end of file
comes after every frame it sent). When STOP arrives the loop also accepts every connection still
in the listener's backlog (accepting and registering one happen under one lock), so that no
client that connected before is overlooked.

Trace (benchmarks): with ``STGS_WORKER_TRACE=DIR`` in its environment a worker records, per
batch, ``TRACE_BATCH`` and, per request taken, ``TRACE_REQUEST`` (``time.monotonic_ns()``, one
clock for every process of the host), and writes them to ``DIR/<pid>.npz`` when it exits
normally (after a drain or a closed connection; not when killed). A few integers per batch and
per request: nothing measurable beside a batch. The columns, and the host time on the GPU's
critical path computed from them: :mod:`stgs.workertrace`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import select
import socket
import struct
import sys
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from stgs.batching import ADMISSION_DECAY
from stgs.errors import ConfigError
from stgs.hostmem import keep_large_buffers
from stgs.lifeline import die_with_parent
from stgs.registry import ModelEntry
from stgs.runtime.models import BatchRunner, Staged, load_runner, model_entry
from stgs.runtime.transport import (
    DEADLINE,
    FAILED,
    HEARTBEAT,
    HEARTBEAT_INTERVAL_S,
    INVALID,
    READY,
    REQUEST,
    RESPONSE,
    STATS,
    STATS_KEYS,
    STOP,
    FrameSocket,
    Tensors,
)
from stgs.workertrace import TRACE_BATCH, TRACE_ENV, TRACE_REQUEST

__all__ = [
    "PIPELINE_ENV",
    "TRACE_BATCH",
    "TRACE_ENV",
    "TRACE_REQUEST",
    "ModelSlot",
    "WorkerSpec",
    "main",
    "pipeline_setting",
    "run",
]

SWITCH_INTERVAL_S = 200e-6  # the worker's GIL switch interval (see main)
PIPELINE_ENV = "STGS_WORKER_PIPELINE"
# The pipeline takes the next batch this long, beyond its measured preparation time, before the
# batch in flight is predicted to end: the thread's wake-up (GIL switch interval 200 us) and
# the prediction's error.
TAKE_MARGIN_NS = 300_000
TAKE_POLL_NS = 250_000  # meanwhile, how often at least it checks whether the batch is done
_NB = len(TRACE_BATCH)
STATS_INTERVAL_NS = 1_000_000_000  # at most one STATS frame a second
# How long a send on a data connection may wait for its client to read (SO_SNDTIMEO): far below
# the supervisor's hang threshold (twice the slowest batch plus 0.8 s by default), far above
# what a client that reads needs to drain a few MB.
DATA_SEND_TIMEOUT_S = 0.25
_DATA_SEND_TIMEOUT = struct.pack(  # a struct timeval
    "@ll", int(DATA_SEND_TIMEOUT_S), int(DATA_SEND_TIMEOUT_S % 1 * 1e6)
)


def pipeline_setting(environ: dict[str, str] | None = None) -> bool:
    """Whether workers pipeline their batches: ``STGS_WORKER_PIPELINE`` unset or ``1`` (the
    default), or ``0`` (one batch at a time: take, run, reply, as before the pipeline; for
    before/after measurements). ConfigError for any other value."""
    raw = (os.environ if environ is None else environ).get(PIPELINE_ENV, "")
    value = raw.strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{PIPELINE_ENV}={raw!r}: 1 (pipelined, the default) or 0 (sequential)")


@dataclass(frozen=True)
class ModelSlot:
    """A model the worker serves at its planned batch; ``entry``: its registry entry
    (:meth:`stgs.registry.ModelEntry.to_dict`) when it is not a built-in of that name (a
    model file)."""

    name: str
    batch: int
    entry: dict[str, Any] | None = None

    def model(self) -> ModelEntry:
        return model_entry(self.name) if self.entry is None else ModelEntry.from_dict(self.entry)


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker serves. ``device`` None: from ``STGS_DEVICE`` (default ``cuda``)."""

    name: str
    models: tuple[ModelSlot, ...]
    duty_cycle_ms: float = 0.0
    device: str | None = None
    admission: bool = True
    dtype: str = "float16"
    cpu_threads: int = 1
    listen: str | None = None  # a Unix socket path for data connections (module docstring)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        d = json.loads(text)
        d["models"] = tuple(ModelSlot(**m) for m in d["models"])
        return cls(**d)


class _Conn:
    """A connection requests come in on and their replies go back on (control or data)."""

    __slots__ = ("fs", "open")

    def __init__(self, fs: FrameSocket) -> None:
        self.fs = fs
        self.open = True  # False once its client is gone: its queued requests are dropped


@dataclass
class _Request:
    req_id: int
    deadline_ns: int
    array: Tensors  # one array, or a tuple (a model of several inputs)
    conn: _Conn  # where the reply goes
    t_queued: int = 0


@dataclass(eq=False, slots=True)
class _Batch:
    """A batch between its take and its replies."""

    slot: int
    live: list[_Request]
    taken: int
    row: int  # its trace row (-1 without a trace)
    t_take: int
    t_run: int = 0  # staging began
    t_launch: int = 0  # launched: its work queued on the device
    staged: Staged | None = None
    launched: bool = False
    start_ns: int = 0  # when it started on the device, as far as the host knows
    done_ns: int = 0  # a synchronous runner's batch: when its results existed


class Worker:
    def __init__(self, spec: WorkerSpec, fs: FrameSocket, *, pipeline: bool = True) -> None:
        self.spec = spec
        self.pipeline = pipeline
        self.fs = fs
        self.control = _Conn(fs)
        self.conns: set[_Conn] = set()  # open data connections (closed when the worker exits)
        self.listener: socket.socket | None = None
        self.device = spec.device or os.environ.get("STGS_DEVICE", "cuda")
        self.queues: list[deque[_Request]] = [deque() for _ in spec.models]
        self.cond = threading.Condition()
        self.stopping = False
        self.stop_deadline_ns = 0  # the STOP's deadline (0: none): the drain waits no longer
        self.gone = False
        self._accept_lock = threading.Lock()  # a connection is taken off the listener and
        # added to self.conns in one hold of it (_accept_pending)
        self.est_ns = [0.0] * len(spec.models)  # EMA of measured batch latency
        self.runners: list[BatchRunner] = []
        self.trace_dir = os.environ.get(TRACE_ENV) or None
        self.tb: array[int] = array("q")  # TRACE_BATCH rows, flat
        self.tr: array[int] = array("q")  # TRACE_REQUEST rows, flat
        # per slot, cumulative: STATS_KEYS (batches, run_ns, full_batches, full_run_ns)
        self.stats: dict[str, list[int]] = {k: [0] * len(spec.models) for k in STATS_KEYS}
        self.stats_sent_ns = 0
        self.beat_ns = 0  # when the duty-cycle loop last sent something (a beat or replies)
        self.max_run_ns = 0  # the longest batch so far (the supervisor's hang threshold)
        # per slot, EMA of the host time from a take to its launch returned (the pipeline's lead)
        self.prep_ns = [0.0] * len(spec.models)

    def load(self) -> None:
        entries = [m.model() for m in self.spec.models]
        torch_models = any(e.needs_torch for e in entries)
        if self.device == "cpu" and torch_models:
            import torch

            torch.set_num_threads(max(1, self.spec.cpu_threads))
        loaded: dict[str, BatchRunner] = {}
        for slot, entry in zip(self.spec.models, entries, strict=True):
            if slot.name not in loaded:  # one copy of the weights per process
                top = max(s.batch for s in self.spec.models if s.name == slot.name)
                loaded[slot.name] = load_runner(entry, self.device, top, dtype=self.spec.dtype)
            self.runners.append(loaded[slot.name])

    def listen(self, path: str) -> None:
        """Accept data connections on ``path`` from now on (a stale file there is replaced)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Born 0600: no window between bind and chmod in which another user could connect. The
        # umask is process wide, but only this thread runs yet.
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)  # accepts happen in _accept_pending, never blocking in it
        self.listener = sock
        threading.Thread(target=self._accept, name="accept", daemon=True).start()

    def _accept(self) -> None:
        """The accept thread: wait for connections, accept them (until the listener is shut
        down: the worker is exiting)."""
        assert self.listener is not None
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        while True:
            poller.poll()  # a shut or closed listener wakes it too: then the accept fails
            if not self._accept_pending():
                return

    def _accept_pending(self) -> bool:
        """Accept every connection waiting on the listener, each added to ``self.conns`` with
        its reader started in the same hold of the accept lock; False once the listener is shut
        down. The accept thread calls it, and the batch loop once it is told to drain: then
        every client that connected before STOP is in ``self.conns`` (none waits unaccepted in
        the backlog, unseen by the drain)."""
        if self.listener is None:
            return True
        with self._accept_lock:
            while True:
                try:
                    sock, _ = self.listener.accept()
                except BlockingIOError:  # none waiting
                    return True
                except OSError:  # the listener was shut down: the worker is exiting
                    return False
                sock.setblocking(True)
                # A client that stops reading must not stall the batch loop, and so every
                # other connection, on a full socket: a send that makes no progress for this
                # long fails, and the connection is cut (_cut).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _DATA_SEND_TIMEOUT)
                conn = _Conn(FrameSocket(sock))
                with self.cond:
                    self.conns.add(conn)
                threading.Thread(
                    target=self.read, args=(conn,), name="data-reader", daemon=True
                ).start()

    def close_data(self) -> None:
        """At exit: no new connections, the socket file gone, every data connection closed (its
        client sees end of file, and its reader thread ends)."""
        if self.listener is None:
            return
        path = self.listener.getsockname()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept (Linux)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        with self.cond:
            conns = list(self.conns)
        for c in conns:
            c.fs.close()

    def read(self, conn: _Conn | None = None) -> None:
        """Queue the requests of one connection (default: the control connection) until it
        closes. The control connection closing ends the worker; a data connection closing
        only marks its requests still queued to be dropped."""
        c = self.control if conn is None else conn
        control = c is self.control
        fs = c.fs
        try:
            while True:
                frame = fs.recv()
                if frame is None:
                    break
                if frame.kind != REQUEST:
                    if frame.kind == STOP and control:
                        with self.cond:
                            self.stopping = True
                            self.stop_deadline_ns = frame.deadline_ns
                            self.cond.notify()
                    continue
                if frame.model >= len(self.queues):
                    self._reply_error(c, frame.req_id, INVALID, f"no model #{frame.model}")
                    continue
                entry = self.runners[frame.model].entry
                arr = frame.tensors()
                why = _invalid(entry, arr)
                if why is not None:
                    name = self.spec.models[frame.model].name
                    self._reply_error(c, frame.req_id, INVALID, f"{name}: {why}")
                    continue
                with self.cond:
                    self.queues[frame.model].append(
                        _Request(frame.req_id, frame.deadline_ns, arr, c, time.monotonic_ns())
                    )
                    self.cond.notify()
        except (OSError, ValueError):
            pass
        if control:
            with self.cond:
                self.gone = True
                self.cond.notify()
            return
        c.open = False
        with self.cond:
            self.conns.discard(c)
            self.cond.notify()  # a draining loop waits for its last client to hang up
        fs.close()

    def _reply_error(self, c: _Conn, req_id: int, status: int, message: str) -> None:
        try:
            c.fs.send(RESPONSE, status=status, req_id=req_id, data=message.encode())
        except OSError:
            _cut(c)

    def beat(self, now_ns: int) -> None:
        """A HEARTBEAT when the loop has sent nothing for ``HEARTBEAT_INTERVAL_S``: it comes
        from this loop, so a worker that is stopped or stuck in a batch falls silent."""
        if now_ns - self.beat_ns < HEARTBEAT_INTERVAL_S * 1e9:
            return
        self.beat_ns = now_ns
        with contextlib.suppress(OSError):
            self.fs.send(HEARTBEAT, req_id=self.max_run_ns)

    def _clients_gone(self) -> bool:
        """Draining (under ``self.cond``): every data client hung up, or the STOP's deadline
        passed."""
        if not self.conns:
            return True
        return bool(self.stop_deadline_ns) and time.monotonic_ns() >= self.stop_deadline_ns

    def serve(self) -> None:
        """The duty-cycle loop (module docstring, "The loop", "Pipelining" and "Drain")."""
        n_slots = len(self.spec.models)
        cursor = 0  # the slot whose turn is next (round robin)
        inflight: _Batch | None = None  # launched, not yet collected
        swept = False  # told to drain, and every client that had connected accepted since
        while True:
            self.beat(time.monotonic_ns())
            if self.stopping and not swept:  # (outside self.cond: _accept_pending takes it)
                self._accept_pending()
                swept = True
            with self.cond:
                if inflight is None:
                    while not self.gone and not any(self.queues):
                        if self.stopping and (not swept or self._clients_gone()):
                            break
                        if not self.cond.wait(self._idle_wait_s()):
                            break  # idle: beat, then wait again
                elif self.pipeline and not inflight.done_ns:
                    self._wait_for_turn(cursor, inflight)
                waiting = not self.gone and any(self.queues)
                drained = self.stopping and swept and not waiting and self._clients_gone()
                ending = self.gone or drained
            nxt: _Batch | None = None
            if waiting:
                nxt, cursor = self._next_batch(cursor, n_slots, inflight)
            # The next batch goes on the device behind the one in flight, before the host
            # waits for that one's results; a synchronous runner's launch computes, so it
            # waits until the batch in flight is answered.
            if nxt is not None and (inflight is None or self.runners[nxt.slot].asynchronous):
                nxt = self._launch(nxt)
            if inflight is not None:
                ended = self._finish(inflight)
                if nxt is not None:  # it started on the device when the one before ended
                    nxt.start_ns = max(nxt.start_ns, ended)
            if nxt is not None and not nxt.launched:
                nxt = self._launch(nxt)
            inflight = nxt
            if inflight is not None and not self.pipeline:
                self._finish(inflight)
                inflight = None
            if ending and inflight is None:
                return

    def _idle_wait_s(self) -> float:
        """How long the idle loop waits for a request: until its next heartbeat, or, draining,
        the STOP's deadline if that comes first."""
        if not self.stop_deadline_ns:
            return HEARTBEAT_INTERVAL_S
        left = (self.stop_deadline_ns - time.monotonic_ns()) / 1e9
        return max(0.0, min(HEARTBEAT_INTERVAL_S, left))

    def _wait_for_turn(self, cursor: int, inflight: _Batch) -> None:
        """With a batch in flight on the device, hold the next take (under ``self.cond``) until
        shortly before that batch's predicted end: the host's lead (the slowest slot's time
        from take to launch, plus ``TAKE_MARGIN_NS``). Requests that arrive meanwhile join the
        batch instead of waiting a whole turn more. No wait when the next turn's queue holds a
        full batch (nothing more would fit), when the batch's end cannot be predicted yet, or
        once the worker is stopping; the wait ends early when the batch is done (polled every
        ``TAKE_POLL_NS`` or eighth of the estimate: an estimate that runs long must not leave
        the device idle)."""
        est = self.est_ns[inflight.slot]
        if not est:
            return
        take_at = inflight.start_ns + est - max(self.prep_ns) - TAKE_MARGIN_NS
        poll = max(TAKE_POLL_NS, est / 8)
        runner, staged = self.runners[inflight.slot], inflight.staged
        assert staged is not None
        n_slots = len(self.queues)
        while not self.gone and not self.stopping:
            left = take_at - time.monotonic_ns()
            if left <= 0 or runner.done(staged):
                return
            for step in range(n_slots):  # the next turn: the first queue with a request
                i = (cursor + step) % n_slots
                if self.queues[i]:
                    if len(self.queues[i]) >= self.spec.models[i].batch:
                        return
                    break
            self.cond.wait(min(left, poll) / 1e9)

    def _next_batch(
        self, cursor: int, n_slots: int, inflight: _Batch | None
    ) -> tuple[_Batch | None, int]:
        """From ``cursor`` on, round robin: the first take that leaves requests to run, staged
        (None when every queue was empty, or every take refused or failed); the next cursor."""
        for step in range(n_slots):
            i = (cursor + step) % n_slots
            with self.cond:
                q = self.queues[i]
                take = [q.popleft() for _ in range(min(self.spec.models[i].batch, len(q)))]
            if not take:
                continue
            b = self._take(i, take, inflight)
            if b is not None and self._stage(b):
                return b, (i + 1) % n_slots
        return None, cursor

    def _take(self, i: int, take: list[_Request], inflight: _Batch | None) -> _Batch | None:
        """Answer what must not run (its client gone, its deadline passed, or missed on the
        prediction); the batch of the rest, None when nothing is left."""
        now = time.monotonic_ns()
        margin = 0.0
        if self.spec.admission:
            # its own batch latency, after the batch in flight (if any) ends on the device
            margin = self.est_ns[i]
            if inflight is not None:
                end = inflight.done_ns or inflight.start_ns + self.est_ns[inflight.slot]
                margin += max(0.0, end - now)
        live = []
        predicted = 0  # refused only because the predicted batch latency would miss
        trace = self.trace_dir is not None
        row = -1
        if trace:
            row = len(self.tb) // _NB
            self.tb.extend((0,) * _NB)  # its row, filled when it is done
        for r in take:
            if not r.conn.open:  # its client is gone: nobody to answer
                continue
            if r.deadline_ns and now + margin > r.deadline_ns:
                late_ms = (now - r.deadline_ns) / 1e6
                msg = f"{self.spec.models[i].name}: deadline exceeded " + (
                    f"by {late_ms:.2f} ms in the queue"
                    if late_ms >= 0
                    else f"(predicted batch latency {margin / 1e6:.2f} ms would miss it)"
                )
                self._reply_error(r.conn, r.req_id, DEADLINE, msg)
                predicted += late_ms < 0
                if trace:
                    self.tr.extend((i, r.deadline_ns, r.t_queued, row, 0))
            else:
                live.append(r)
                if trace:
                    self.tr.extend((i, r.deadline_ns, r.t_queued, row, 1))
        if not live:
            if predicted:
                # Nothing ran, and some request was refused on the prediction alone. Only
                # batches that run refresh the estimate: without this, a few slow batches (e.g.
                # under time slicing) would keep the model refusing every request for good.
                self.est_ns[i] *= ADMISSION_DECAY
            if trace:
                self._trace(row, (i, len(take), 0, now, now, now, now, now, 0))
            return None
        return _Batch(i, live, len(take), row, now)

    def _stage(self, b: _Batch) -> bool:
        b.t_run = time.monotonic_ns()
        try:
            b.staged = self.runners[b.slot].stage([r.array for r in b.live])
        except Exception as exc:  # the model failed: answer, keep serving
            self._failed(b, exc)
            return False
        return True

    def _launch(self, b: _Batch) -> _Batch | None:
        """Queue ``b`` on the device; None when that failed (answered FAILED)."""
        runner = self.runners[b.slot]
        assert b.staged is not None
        b.t_launch = b.start_ns = time.monotonic_ns()
        try:
            runner.launch(b.staged)
        except Exception as exc:  # the model failed: answer, keep serving
            self._failed(b, exc)
            return None
        b.launched = True
        now = time.monotonic_ns()
        if not runner.asynchronous:
            b.done_ns = now
        else:
            prep = now - b.t_take
            p = self.prep_ns[b.slot]
            self.prep_ns[b.slot] = prep if p == 0 else 0.8 * p + 0.2 * prep
        return b

    def _finish(self, b: _Batch) -> int:
        """Wait for ``b``'s results and send its replies; account for it. When its results were
        on the host (``time.monotonic_ns``)."""
        i = b.slot
        assert b.staged is not None
        try:
            outs = self.runners[i].collect(b.staged)
        except Exception as exc:  # the model failed: answer, keep serving
            t1 = time.monotonic_ns()
            self._failed(b, exc)
            return t1
        t1 = time.monotonic_ns()
        # The batch's latency is its time on the device (CUDA events on a GPU): what it costs
        # wherever the host happened to be meanwhile (in the pipeline, launch to collect also
        # spans the batch before it on the stream); admission adds the wait behind a batch in
        # flight itself (_take).
        dt = b.staged.device_ns
        self.est_ns[i] = dt if self.est_ns[i] == 0 else 0.8 * self.est_ns[i] + 0.2 * dt
        self.max_run_ns = max(self.max_run_ns, dt)
        st = self.stats
        st["batches"][i] += 1
        st["run_ns"][i] += dt
        if len(b.live) >= self.spec.models[i].batch:
            st["full_batches"][i] += 1
            st["full_run_ns"][i] += dt
        if self._send_replies(b.live, outs):
            self.beat_ns = t1  # the replies told the supervisor the loop is alive
        if b.row >= 0:
            done = time.monotonic_ns()
            self._trace(
                b.row,
                (i, b.taken, len(b.live), b.t_take, b.t_run, t1, done, b.t_launch, dt),
            )
        if t1 - self.stats_sent_ns >= STATS_INTERVAL_NS:
            self.send_stats(t1)
        return t1

    def _failed(self, b: _Batch, exc: Exception) -> None:
        """The model raised in stage, launch or collect: every request of ``b`` gets FAILED."""
        name = self.spec.models[b.slot].name
        for r in b.live:
            self._reply_error(r.conn, r.req_id, FAILED, f"{name}: {exc!r}")
        if b.row >= 0:
            t1 = time.monotonic_ns()
            t_run = b.t_run or t1
            vals = (b.slot, b.taken, len(b.live), b.t_take, t_run, t1, t1, b.t_launch or t1, 0)
            self._trace(b.row, vals)

    def _trace(self, row: int, values: tuple[int, ...]) -> None:
        self.tb[row * _NB : (row + 1) * _NB] = array("q", values)

    def _send_replies(self, live: list[_Request], outs: Sequence[Any]) -> bool:
        """A batch's replies, in one ``send_responses`` per connection (one system call for
        small outputs). True when the control connection got some: they tell the supervisor
        the loop is alive; replies on data connections do not reach it."""
        first = live[0].conn
        for r in live:  # (a plain loop: half the cost of all() over a generator)
            if r.conn is not first:
                break
        else:  # the common case: one connection, nothing to group
            replies = [(r.req_id, _tensors(o)) for r, o in zip(live, outs, strict=True)]
            return self._send(first, replies) and first is self.control
        groups: dict[_Conn, list[tuple[int, Tensors]]] = {}
        for r, o in zip(live, outs, strict=True):
            group = groups.get(r.conn)
            if group is None:
                group = groups[r.conn] = []
            group.append((r.req_id, _tensors(o)))
        beat = False
        for c, group in groups.items():
            beat = (self._send(c, group) and c is self.control) or beat
        return beat

    @staticmethod
    def _send(c: _Conn, replies: list[tuple[int, Tensors]]) -> bool:
        try:
            c.fs.send_responses(replies)
        except OSError:
            _cut(c)
            return False
        return True

    def send_stats(self, now_ns: int) -> None:
        """The cumulative batch statistics as one STATS frame (a lost one costs nothing: the
        next carries the totals)."""
        self.stats_sent_ns = now_ns
        with contextlib.suppress(OSError):
            self.fs.send(STATS, data=json.dumps(self.stats).encode())

    def write_trace(self) -> None:
        """The trace as ``<dir>/<pid>.npz`` (nothing without ``STGS_WORKER_TRACE``)."""
        if self.trace_dir is None:
            return
        path = os.path.join(self.trace_dir, f"{os.getpid()}.npz")
        try:
            os.makedirs(self.trace_dir, exist_ok=True)
            np.savez(
                path,
                batches=np.frombuffer(self.tb, dtype=np.int64).reshape(-1, len(TRACE_BATCH)),
                requests=np.frombuffer(self.tr, dtype=np.int64).reshape(-1, len(TRACE_REQUEST)),
                models=np.asarray([m.name for m in self.spec.models]),
                name=np.asarray(self.spec.name),
            )
        except OSError as exc:
            print(f"stgs worker {self.spec.name}: trace not written: {exc}", file=sys.stderr)


def _cut(c: _Conn) -> None:
    """A send failed: the client is gone, or it stopped reading (``DATA_SEND_TIMEOUT_S``) and
    the send may have ended mid-frame. The connection ends here: the client sees end of file,
    not a torn frame, its reader thread here ends, and its requests still queued are dropped."""
    c.open = False
    with contextlib.suppress(OSError):
        c.fs.sock.shutdown(socket.SHUT_RDWR)


def _tensors(o: Any) -> Tensors:
    """A runner's result as it travels: a tuple of arrays, or one array."""
    return tuple(np.asarray(x) for x in o) if isinstance(o, tuple) else np.asarray(o)


def _invalid(entry: ModelEntry, t: Tensors) -> str | None:
    """Why a request's tensors do not fit the model's inputs (None: they do). A test model
    (echo, sleep, fail) takes anything; a model of one input takes one array."""
    if entry.kind == "test":
        return None
    specs = entry.inputs
    if not isinstance(t, tuple):
        if len(specs) != 1:
            return f"{len(specs)} inputs expected ({', '.join(s.name for s in specs)}), got 1"
        return _invalid_one(specs[0].shape, specs[0].dtype, t, "input")
    if len(t) != len(specs):
        return f"{len(specs)} input(s) expected ({', '.join(s.name for s in specs)}), got {len(t)}"
    for spec, arr in zip(specs, t, strict=True):
        why = _invalid_one(spec.shape, spec.dtype, arr, f"input {spec.name!r}")
        if why is not None:
            return why
    return None


def _invalid_one(shape: tuple[int, ...] | None, dtype: str, arr: Any, what: str) -> str | None:
    if shape is not None and tuple(arr.shape) != shape:
        return f"{what} shape {tuple(arr.shape)}, expected {shape}"
    if dtype and arr.dtype != np.dtype(dtype):
        return f"{what} dtype {arr.dtype}, expected {dtype}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    die_with_parent()  # a daemon killed while this loads must not leave it running
    keep_large_buffers()  # image frames without page faults (stgs.hostmem)
    ap = argparse.ArgumentParser(prog="stgs-worker")
    ap.add_argument("--fd", type=int, required=True, help="connected socket inherited")
    ap.add_argument("--spec", required=True, help="WorkerSpec as JSON")
    args = ap.parse_args(argv)
    spec = WorkerSpec.from_json(args.spec)
    fs = FrameSocket(socket.socket(fileno=args.fd))
    try:
        pipeline = pipeline_setting()
    except ConfigError as exc:
        print(f"stgs worker {spec.name}: {exc}", file=sys.stderr)
        return 3
    worker = Worker(spec, fs, pipeline=pipeline)
    t0 = time.monotonic()
    try:
        worker.load()
    except Exception as exc:
        print(f"stgs worker {spec.name}: loading failed: {exc!r}", file=sys.stderr)
        return 3
    # The models (and torch's own object graph) live as long as the process: move them out of
    # the cyclic collector's reach. Otherwise every full collection walks them (measured: ~55 ms
    # with torch imported) and stalls the duty cycle meanwhile.
    gc.collect()
    gc.freeze()
    # The reader thread queues requests while the duty cycle runs; with Python's default 5 ms
    # GIL switch interval a request could wait that long to be queued (the H100 trace showed
    # p99 4-15 ms from submit to queue, even for tiny inputs). 200 us bounds that wait.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    if spec.listen is not None:
        try:
            worker.listen(spec.listen)
        except OSError as exc:
            print(
                f"stgs worker {spec.name}: cannot listen on {spec.listen}: {exc}", file=sys.stderr
            )
            return 3
    info = {
        "pid": os.getpid(),
        "device": worker.device,
        "load_s": time.monotonic() - t0,
        "pipeline": pipeline,
    }
    fs.send(READY, data=json.dumps(info).encode())
    reader = threading.Thread(target=worker.read, name="reader", daemon=True)
    reader.start()
    worker.serve()
    fs.close()
    worker.close_data()
    worker.write_trace()
    reader.join(5.0)
    return 0


def run(entry: Callable[[], int] | None = None) -> None:
    """Process entry point: ``entry()`` (default: this worker's ``main``), then exit with its
    status and no interpreter teardown (torch's thread pools can abort in it)."""
    code = (entry or main)()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
