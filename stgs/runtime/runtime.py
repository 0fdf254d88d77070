"""Carry out a plan: partitions, MPS daemons, workers; move between plans; route requests.

:class:`Runtime` is the one place that changes what runs. Two entry points:

* :meth:`Runtime.apply` moves from the current plan to a target plan. It diffs the two and
  changes only what differs (a partition is identified by its GPU, shape, place and its models
  with their batches; a rate change alone only re-weights routing). Make before break: new MIG
  instances are created beside the old ones where their slices are free, new MPS daemons and
  workers are started and must be READY before the old partitions are drained (no new requests,
  the ones in flight finish) and stopped; then the MIG instances no longer used are destroyed.
  A new instance whose slices are still held by an old one is made after that old partition is
  drained and stopped (break first, for those only). When any step fails, the runtime rolls back
  to the last good plan, keeps the reason (:attr:`Runtime.history`) and raises
  :class:`~stgs.errors.TransitionError`.
* :meth:`Runtime.update` is the reconcile step, safe to call at any time and often (a monitor
  thread calls it every ``monitor_interval_s`` and whenever a worker's connection closes): it
  notices dead workers (the process exited or its socket closed) and hung ones (a ready worker
  whose duty-cycle loop sent no frame for ``hang_after_s``: twice its slowest batch, planned or
  measured, plus ``hang_grace_s``), kills them, fails their partition at once (requests in flight
  fail with :class:`~stgs.errors.WorkerDiedError`) and restarts it: at once when the worker had
  become ready (a crash or a hang while serving), with back-off (``RESTART_BACKOFF_S``) when
  workers keep failing before they are ready (a crash loop while loading), up to
  ``restart_limit`` failed starts in a row. Every failure, restart and recovery is reported
  through ``on_event``.

Every partition has an explicit :class:`PartitionState`: ``pending`` (decided, not started),
``starting`` (process up, loading models), ``ready`` (receives requests), ``draining`` (no new
requests, in-flight ones finish), ``stopped``, ``failed`` (died or never became ready).

Requests: :meth:`Runtime.submit` picks a ready partition that serves the model (weighted by the
rate the plan assigned to it there, least loaded first) and returns a future; with none ready it
fails at once with :class:`~stgs.errors.NoWorkerError`. Deadlines come from ``slos`` (per model,
ms, counted from the call) unless given per request, as an absolute ``deadline_ns``.

Data connections: with ``data_dir``, every worker also listens on ``data_dir/w<seq>.sock``
(:attr:`PartitionRuntime.socket_path`, in :meth:`Runtime.describe`), ``seq`` fresh per spawn so
that a restarted worker never shares a path with its predecessor; frontend processes connect
there and send requests to the worker directly (:mod:`stgs.runtime.worker`).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from stgs import events
from stgs.backend.base import Backend, DeviceRef
from stgs.batching import route_load
from stgs.catalog import MigLayout, MigPlacement, canonical_layout, get_sku, layout_violation
from stgs.errors import (
    BackendError,
    ConfigError,
    InUseError,
    NoWorkerError,
    StgsError,
    TransitionError,
)
from stgs.plan import Partition, Plan
from stgs.registry import ModelEntry
from stgs.runtime.process import WorkerProcess
from stgs.runtime.transport import SocketTransport, Tensors
from stgs.runtime.worker import ModelSlot, WorkerSpec
from stgs.transition import GpuState, Held, NodeState, PartitionKey, Step, transition
from stgs.transition import partition_keys as partition_keys  # the one identity, re-exported

__all__ = [
    "PartitionKey",
    "PartitionRuntime",
    "PartitionState",
    "Runtime",
    "TransitionRecord",
    "TransitionState",
]

log = logging.getLogger(__name__)

# Delay before the restart after the n-th failed start in a row (the last one repeats); a
# worker that became ready ends the run, so a failure while serving restarts at once.
# The longest Unix socket path (``sun_path`` is 108 bytes with the terminating NUL), and the
# longest sequence number a worker's socket name is checked for.
MAX_SOCKET_PATH_BYTES = 107
MAX_SOCKET_SEQ = 10**9
RESTART_BACKOFF_S = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
EventFn = Callable[[str, str, dict[str, Any]], object]
"""(kind, message, data): what the runtime did on its own (a worker failed, was restarted)."""
RoutingFn = Callable[[frozenset["PartitionKey"], bool], object]
"""(partitions leaving, wait): the routable partitions changed; with ``wait``, return only once
no router outside this process sends anything new to the leaving ones (the data plane's
frontends acknowledged it): the runtime drains them next."""


class PartitionState(Enum):
    PENDING = "pending"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class TransitionState(Enum):
    APPLYING = "applying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # and rolled back to the last good plan
    ROLLBACK_FAILED = "rollback_failed"


@dataclass
class PartitionRuntime:
    """One partition's live record."""

    key: PartitionKey
    partition: Partition
    ref: DeviceRef
    state: PartitionState = PartitionState.PENDING
    worker: WorkerProcess | None = None
    restarts: int = 0  # worker restarts since the partition started (monotone)
    failures: int = 0  # failed starts in a row (the back-off); 0 once a worker is ready
    restart_at: float | None = None  # when a failed partition's worker starts again
    last_error: str | None = None
    started_at: float = 0.0
    ready_at: float = 0.0
    rates: dict[str, float] = field(default_factory=dict)
    socket_path: str | None = None  # where its current worker accepts data connections
    in_flight: dict[str, int] = field(default_factory=dict)  # per model, routed and unanswered

    def slowest_batch_s(self) -> float:
        """The longest batch this partition is known to run: planned, or measured so far."""
        planned = max((m.latency_ms for m in self.partition.models), default=0.0) / 1e3
        measured = 0.0 if self.worker is None else self.worker.transport.max_batch_ns / 1e9
        return max(planned, measured)

    @property
    def pid(self) -> int | None:
        return None if self.worker is None else self.worker.pid


@dataclass
class TransitionRecord:
    policy: str
    state: TransitionState
    started_at: float
    finished_at: float | None = None
    reason: str | None = None
    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


class _TransitionFailed(StgsError):
    pass


def _held_state(state: PartitionState) -> Literal["live", "down", "stopped"]:
    """A record's state as :func:`stgs.transition.transition` reads it."""
    if state in (PartitionState.READY, PartitionState.STARTING):
        return "live"
    return "stopped" if state is PartitionState.STOPPED else "down"


class Runtime:
    """Runs plans on a backend's GPUs; see the module docstring."""

    def __init__(
        self,
        backend: Backend,
        *,
        slos: Mapping[str, float] | None = None,
        device: str | None = None,
        admission: bool = True,
        ready_timeout_s: float = 120.0,
        drain_timeout_s: float = 30.0,
        restart_limit: int = 10,
        monitor_interval_s: float = 0.1,
        hang_grace_s: float | None = 0.8,
        cpu_threads: int = 1,
        clock: Callable[[], float] = time.monotonic,
        on_event: EventFn | None = None,
        data_dir: Path | None = None,
    ) -> None:
        if data_dir is not None:
            longest = data_dir / f"w{MAX_SOCKET_SEQ}.sock"
            if len(os.fsencode(longest)) > MAX_SOCKET_PATH_BYTES:
                raise ConfigError(
                    f"data_dir {data_dir} is too long for Unix socket paths: {longest} would "
                    f"exceed {MAX_SOCKET_PATH_BYTES} bytes; choose a shorter directory"
                )
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.backend = backend
        self.slos = dict(slos or {})
        # Models that are not built-ins of their name (model files): their registry entries,
        # set by the daemon when it registers them; workers load them from these.
        self.entries: dict[str, ModelEntry] = {}
        self.device = device
        self.admission = admission
        self.ready_timeout_s = ready_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.restart_limit = restart_limit
        self.monitor_interval_s = monitor_interval_s
        self.hang_grace_s = hang_grace_s  # None: no hang detection
        self.cpu_threads = cpu_threads
        self.clock = clock
        self.on_event = on_event
        self.on_routing: RoutingFn | None = None  # the data plane's frontends follow routing
        self.data_dir = data_dir  # None: workers accept no data connections
        self._socket_seq = itertools.count()
        self.transitioning = False  # apply() is under way (a model may lack a worker briefly)
        self.current_plan: Plan | None = None
        self.last_good: Plan | None = None
        self.history: list[TransitionRecord] = []
        self.partitions: dict[PartitionKey, PartitionRuntime] = {}
        self._lock = threading.RLock()  # one transition or reconcile step at a time
        self._route_lock = threading.Lock()  # routing choices vs state changes
        self._count_lock = threading.Lock()  # PartitionRuntime.in_flight
        self._wake = threading.Event()
        self._stop_monitor = threading.Event()
        self._monitor: threading.Thread | None = None
        self._started_mps: set[DeviceRef] = set()

    # ------------------------------------------------------------------ queries
    def states(self) -> dict[PartitionKey, PartitionState]:
        return {k: p.state for k, p in self.partitions.items()}

    def count(self, state: PartitionState) -> int:
        return sum(1 for p in self.partitions.values() if p.state is state)

    # ------------------------------------------------------------------ requests
    def submit(
        self,
        model: str,
        array: Tensors,
        *,
        deadline_ms: float | None = None,
        deadline_ns: int | None = None,
    ) -> Future[Tensors]:
        """Route one request; the future raises a ServingError subclass on failure.

        ``deadline_ns`` (on ``time.monotonic_ns()``) wins over ``deadline_ms`` (from now), which
        wins over the model's SLO from now."""
        if deadline_ns is None:
            ms = deadline_ms if deadline_ms is not None else self.slos.get(model)
            deadline_ns = 0 if ms is None else time.monotonic_ns() + int(ms * 1e6)
        with self._route_lock:
            best: tuple[float, PartitionRuntime] | None = None
            for p in self.partitions.values():
                if p.state is not PartitionState.READY or p.worker is None:
                    continue
                if model not in p.rates or p.worker.transport.closed:
                    continue
                load = route_load(p.in_flight.get(model, 0), p.rates[model])
                if best is None or load < best[0]:
                    best = (load, p)
            if best is not None:
                chosen = best[1]
                assert chosen.worker is not None
                fut, send = chosen.worker.transport.reserve(model, array, deadline_ns=deadline_ns)
                with self._count_lock:
                    chosen.in_flight[model] = chosen.in_flight.get(model, 0) + 1
        if best is not None:
            fut.add_done_callback(lambda _: self._answered(chosen, model))
            send()  # outside the lock: large tensors to different workers go in parallel
            return fut
        fut = Future()
        fut.set_exception(NoWorkerError(f"no ready worker serves {model!r}"))
        return fut

    def _answered(self, p: PartitionRuntime, model: str) -> None:
        """A routed request's future is done: it no longer counts as in flight there (its own
        lock: the callback may run in the caller's thread, under the routing lock)."""
        with self._count_lock:
            p.in_flight[model] -= 1

    def infer(
        self,
        model: str,
        array: Tensors,
        *,
        deadline_ms: float | None = None,
        timeout_s: float = 30.0,
    ) -> Tensors:
        return self.submit(model, array, deadline_ms=deadline_ms).result(timeout_s)

    # ------------------------------------------------------------------ monitor
    def start_monitor(self) -> None:
        if self._monitor is not None:
            return
        self._stop_monitor.clear()
        self._monitor = threading.Thread(
            target=self._monitor_loop, name="stgs-monitor", daemon=True
        )
        self._monitor.start()

    def _monitor_loop(self) -> None:
        while not self._stop_monitor.is_set():
            self._wake.wait(self.monitor_interval_s)
            self._wake.clear()
            if self._stop_monitor.is_set():
                break
            try:
                self.update(blocking=False)
            except Exception:  # the loop survives every exception, and says so
                log.exception("reconcile step failed")

    def _on_close(self, _t: SocketTransport) -> None:
        self._wake.set()

    def close(self) -> None:
        """Stop the monitor and every worker (quickly: no draining)."""
        self._stop_monitor.set()
        self._wake.set()
        if self._monitor is not None:
            self._monitor.join(5)
            self._monitor = None
        with self._lock:
            for p in self.partitions.values():
                if p.worker is not None:
                    p.worker.kill()
                p.state = PartitionState.STOPPED
            self.partitions.clear()

    # ------------------------------------------------------------------ reconcile
    def update(self, *, blocking: bool = True) -> None:
        """One reconcile step: promote ready workers, fail dead and hung ones, restart failed
        partitions whose back-off has passed."""
        if not self._lock.acquire(blocking=blocking):
            return  # a transition is under way; it owns the partitions
        try:
            now = self.clock()
            for p in list(self.partitions.values()):
                w = p.worker
                if p.state is PartitionState.FAILED:
                    if p.restart_at is not None and now >= p.restart_at:
                        self._restart(p)
                    continue
                if w is None or p.state not in (PartitionState.STARTING, PartitionState.READY):
                    continue
                if not w.alive:
                    self._fail(p, w.reap())  # fails what was in flight
                elif p.state is PartitionState.STARTING:
                    if w.transport.ready.is_set():
                        self._set(p, PartitionState.READY)
                        p.ready_at, p.failures = now, 0
                        self._event("worker_ready", f"partition {p.key}: worker ready", p)
                        self._routing(frozenset(), wait=False)
                    elif now - p.started_at > self.ready_timeout_s:
                        self._fail(p, f"not ready within {self.ready_timeout_s:g} s", kill=True)
                else:
                    hung = self.hang_after_s(p)
                    silent = (time.monotonic_ns() - w.transport.last_frame_ns) / 1e9
                    if hung is not None and silent > hung:
                        why = f"worker pid {w.pid} hung: silent {silent:.2f} s; killed"
                        self._fail(p, why, kill=True)
        finally:
            self._lock.release()

    def hang_after_s(self, p: PartitionRuntime) -> float | None:
        """How long a ready worker may stay silent before it counts as hung (None: never)."""
        if self.hang_grace_s is None:
            return None
        return 2.0 * p.slowest_batch_s() + self.hang_grace_s

    def _fail(self, p: PartitionRuntime, reason: str, *, kill: bool = False) -> None:
        """A worker died (or, with ``kill``, is killed now): the partition fails, before its
        requests in flight do, and its restart is scheduled."""
        self._set(p, PartitionState.FAILED, reason)
        if kill and p.worker is not None:
            p.worker.kill()
        p.failures += 1
        delay: float | None = None
        then = f"not restarted: {self.restart_limit} failed starts in a row"
        if p.failures <= self.restart_limit:
            delay = RESTART_BACKOFF_S[min(p.failures, len(RESTART_BACKOFF_S)) - 1]
            then = f"restart in {delay:g} s" if delay else "restarting"
            if p.failures > 1:
                then += f" ({p.failures} failed starts in a row)"
        p.restart_at = None if delay is None else self.clock() + delay
        self._event("worker_failed", f"partition {p.key} failed: {reason}; {then}", p)
        self._routing(frozenset(), wait=False)
        if delay == 0:
            self._restart(p)

    def _restart(self, p: PartitionRuntime) -> None:
        p.restart_at = None
        p.restarts += 1
        self._spawn(p)
        if p.state is PartitionState.FAILED:  # could not even start: try again later
            self._fail(p, p.last_error or "could not start")
            return
        self._event("worker_restarted", f"partition {p.key}: worker restarted (pid {p.pid})", p)

    def _routing(self, leaving: frozenset[PartitionKey], *, wait: bool) -> None:
        if self.on_routing is None:
            return
        try:
            self.on_routing(leaving, wait)
        except Exception:  # routing updates are retried by the next change; never break here
            log.exception("routing hook failed")

    def _event(self, kind: str, message: str, p: PartitionRuntime) -> None:
        """A worker event: to ``on_event`` (the daemon stores and logs it), else to the log
        here, so that it is logged once either way."""
        if self.on_event is None:
            log.log(events.level(kind), "%s", message)
            return
        data = {"partition": str(p.key), "pid": p.pid, "restarts": p.restarts}
        try:
            self.on_event(kind, message, data)
        except Exception:  # a read path (logs, metrics): never breaks supervision
            log.exception("event hook failed")

    def _set(self, p: PartitionRuntime, state: PartitionState, error: str | None = None) -> None:
        with self._route_lock:
            p.state = state
            if error is not None:
                p.last_error = error

    def _entry_dict(self, name: str) -> dict[str, Any] | None:
        entry = self.entries.get(name)
        return None if entry is None else entry.to_dict()

    def _spawn(self, p: PartitionRuntime) -> None:
        spec = WorkerSpec(
            name=str(p.key),
            models=tuple(
                ModelSlot(m.name, m.batch, self._entry_dict(m.name)) for m in p.partition.models
            ),
            duty_cycle_ms=p.partition.duty_cycle_ms,
            device=self.device,
            admission=self.admission,
            cpu_threads=self.cpu_threads,
            listen=None
            if self.data_dir is None
            else str(self.data_dir / f"w{next(self._socket_seq)}.sock"),
        )
        p.socket_path = spec.listen
        mps_pct = p.partition.mps_pct if p.partition.kind == "mps" else None
        try:
            p.worker = WorkerProcess(self.backend, p.ref, mps_pct, spec, on_close=self._on_close)
        except (BackendError, OSError) as exc:
            p.worker = None
            self._set(p, PartitionState.FAILED, f"could not start: {exc}")
            return
        p.started_at = self.clock()
        self._set(p, PartitionState.STARTING)

    # ------------------------------------------------------------------ transitions
    def apply(self, target: Plan) -> TransitionRecord:
        """Move to ``target``; on failure roll back to the last good plan and raise."""
        with self._lock:
            self.transitioning = True
            try:
                return self._apply(target)
            finally:
                self.transitioning = False

    def _apply(self, target: Plan) -> TransitionRecord:
        with self._lock:
            rec = TransitionRecord(target.policy, TransitionState.APPLYING, self.clock())
            self.history.append(rec)
            before = self._observe()
            try:
                self._transition(target, rec)
            except StgsError as exc:
                rec.reason = str(exc)
                log.warning("transition to %s failed: %s; rolling back", target.policy, exc)
                try:
                    self._rollback(before)
                except StgsError as exc2:
                    rec.state = TransitionState.ROLLBACK_FAILED
                    rec.reason = f"{exc}; rollback failed: {exc2}"
                    rec.finished_at = self.clock()
                    raise TransitionError(rec.reason, rolled_back=False) from exc2
                rec.state = TransitionState.FAILED
                rec.finished_at = self.clock()
                raise TransitionError(rec.reason, rolled_back=True) from exc
            rec.state = TransitionState.SUCCEEDED
            rec.finished_at = self.clock()
            self.current_plan = self.last_good = target
            return rec

    def _observe(self) -> dict[int, tuple[bool, MigLayout]]:
        out = {}
        for info in self.backend.gpus():
            if not info.healthy:
                continue
            layout = self.backend.mig_layout(info.index) if info.mig_enabled else ()
            out[info.index] = (info.mig_enabled, layout)
        return out

    def _rollback(self, before: Mapping[int, tuple[bool, MigLayout]]) -> None:
        if self.last_good is not None:
            self._transition(
                self.last_good, TransitionRecord("rollback", TransitionState.APPLYING, self.clock())
            )
            return
        for p in list(self.partitions.values()):
            self._stop_partition(p, drain=False)
        self.partitions.clear()
        self._stop_unused_mps(set())
        for gpu, (mig, layout) in before.items():
            info = self.backend.gpus()[gpu]
            if info.mig_enabled and self.backend.mig_layout(gpu) != layout:
                self.backend.apply_mig_layout(gpu, () if not mig else layout)
            if info.mig_enabled != mig:
                self.backend.set_mig_mode(gpu, mig)

    def _validate(self, plan: Plan) -> None:
        """Refuse, before any change, a plan the node cannot run."""
        infos = self.backend.gpus()
        for g in plan.gpus:
            if not 0 <= g.index < len(infos):
                raise ConfigError(f"plan uses GPU {g.index}; the node has {len(infos)}")
            sku = self.backend.sku(g.index)
            if get_sku(g.sku).name != sku.name:
                raise ConfigError(f"plan has a {g.sku} as GPU {g.index}; the node a {sku.name}")
            if g.partitions and not infos[g.index].healthy:
                raise BackendError(f"GPU {g.index} is unhealthy")
            starts: dict[int, str] = {}
            for p in g.partitions:
                if p.kind == "mps" and p.mps_pct is None:
                    raise ConfigError(f"GPU {g.index}: an MPS partition without mps_pct")
                if g.mig:
                    if p.mig_start is None or p.mig_profile is None:
                        raise ConfigError(
                            f"GPU {g.index} is in MIG mode: {p.kind} partition "
                            "without a MIG placement"
                        )
                    if starts.setdefault(p.mig_start, p.mig_profile) != p.mig_profile:
                        raise ConfigError(f"GPU {g.index}: two profiles at slice {p.mig_start}")
                elif p.kind == "mig" or p.mig_start is not None:
                    raise ConfigError(f"GPU {g.index}: MIG partition on a GPU without MIG")
            layout = canonical_layout(MigPlacement(s, prof) for s, prof in starts.items())
            if g.mig:
                why = layout_violation(sku, layout)
                if why is not None:
                    raise ConfigError(f"GPU {g.index}: invalid MIG layout: {why}")

    def _transition(self, target: Plan, rec: TransitionRecord) -> None:
        """Carry out :func:`stgs.transition.transition`'s steps, in their order."""
        self._validate(target)
        held = dict(self.partitions)  # the records before the change, by key
        change = transition(
            {k: Held(p.partition, _held_state(p.state)) for k, p in held.items()},
            target,
            self._node_state(),
        )
        started: list[PartitionRuntime] = []
        drained: dict[PartitionKey, float] = {}  # drain deadline of each drained partition
        forgotten = False
        for step in change.steps:
            if step.phase == "free" and not forgotten:
                self._forget(held, change.kept)
                forgotten = True
            self._do(step, held, rec, started, drained)
        if not forgotten:
            self._forget(held, change.kept)
        self.current_plan = target

    def _do(
        self,
        step: Step,
        held: Mapping[PartitionKey, PartitionRuntime],
        rec: TransitionRecord,
        started: list[PartitionRuntime],
        drained: dict[PartitionKey, float],
    ) -> None:
        """One step of a transition (see :mod:`stgs.transition`)."""
        k, part = step.key, step.partition
        if step.op in ("keep", "reweight"):  # rate changes only re-weight routing
            assert k is not None and part is not None
            p = self.partitions[k]
            with self._route_lock:
                p.partition = part
                p.rates = {m.name: m.rate_rps for m in part.models}
            rec.kept.append(str(k))
        elif step.op == "route":
            self._routing(step.leaving, wait=True)
        elif step.op == "drain":
            assert k is not None
            p = held[k]
            if p.worker is not None and p.state is PartitionState.READY:
                self._set(p, PartitionState.DRAINING)  # the router sends it nothing new
                end = drained[k] = self.clock() + self.drain_timeout_s
                w = p.worker
                while w.transport.in_flight and w.alive and self.clock() < end:
                    time.sleep(0.002)
        elif step.op == "stop":
            assert k is not None
            p = held[k]
            if p.state is PartitionState.STOPPED:
                return
            if p.worker is not None:
                if k in drained:
                    p.worker.stop(timeout_s=max(0.0, drained[k] - self.clock()) + 1.0)
                else:
                    p.worker.kill()
            self._set(p, PartitionState.STOPPED)
            rec.stopped.append(str(k))
        elif step.op == "mps_stop":
            assert step.ref is not None
            self._stop_mps(DeviceRef(*step.ref))
        elif step.op == "mig_layout":
            assert step.gpu is not None
            self.backend.apply_mig_layout(step.gpu, step.layout)
        elif step.op == "mig_mode":
            assert step.gpu is not None and step.mig is not None
            self.backend.set_mig_mode(step.gpu, step.mig)
        elif step.op == "mps_start":
            assert step.ref is not None
            ref = DeviceRef(*step.ref)
            self.backend.start_mps(ref)
            self._started_mps.add(ref)
        elif step.op == "start":
            assert k is not None and part is not None and step.ref is not None
            p = PartitionRuntime(
                k, part, DeviceRef(*step.ref), rates={m.name: m.rate_rps for m in part.models}
            )
            self.partitions[k] = p
            self._spawn(p)
            started.append(p)
            rec.started.append(str(k))
        elif step.op == "ready":
            self._await_ready(started)

    def _await_ready(self, started: list[PartitionRuntime]) -> None:
        """Every new worker must become ready."""
        deadline = self.clock() + self.ready_timeout_s
        for p in started:
            if p.state is PartitionState.FAILED or p.worker is None:
                raise _TransitionFailed(f"partition {p.key}: {p.last_error}")
            left = max(0.0, deadline - self.clock())
            if not p.worker.wait_ready(left):
                why = (
                    p.worker.exit_reason()
                    if p.worker.proc.poll() is not None
                    else (f"not ready within {self.ready_timeout_s:g} s")
                )
                p.worker.kill()
                self._set(p, PartitionState.FAILED, why)
                raise _TransitionFailed(f"partition {p.key}: worker did not start: {why}")
            self._set(p, PartitionState.READY)
            p.ready_at, p.failures = self.clock(), 0

    def _forget(
        self, held: Mapping[PartitionKey, PartitionRuntime], kept: Collection[PartitionKey]
    ) -> None:
        """Drop the records of the partitions that left (not those replaced under their key)."""
        keep = set(kept)
        for k, p in held.items():
            if k not in keep and self.partitions.get(k) is p:
                del self.partitions[k]

    def _node_state(self) -> NodeState:
        gpus = {}
        for info in self.backend.gpus():
            mig = info.mig_enabled
            layout = self.backend.mig_layout(info.index) if mig and info.healthy else ()
            gpus[info.index] = GpuState(mig, layout)
        mps = frozenset((r.gpu, r.mig_start) for r in self._started_mps)
        return NodeState(gpus, mps)

    def _stop_partition(self, p: PartitionRuntime, *, drain: bool) -> None:
        w = p.worker
        if w is None:
            self._set(p, PartitionState.STOPPED)
            return
        if drain and p.state is PartitionState.READY:
            self._set(p, PartitionState.DRAINING)  # the router sends it nothing new
            end = self.clock() + self.drain_timeout_s
            while w.transport.in_flight and w.alive and self.clock() < end:
                time.sleep(0.002)
            w.stop(timeout_s=max(0.0, end - self.clock()) + 1.0)
        else:
            w.kill()
        self._set(p, PartitionState.STOPPED)

    def _stop_unused_mps(self, in_use: set[DeviceRef]) -> None:
        for ref in sorted(self._started_mps - in_use):
            self._stop_mps(ref)

    def _stop_mps(self, ref: DeviceRef) -> None:
        try:
            self.backend.stop_mps(ref)
        except InUseError as exc:
            mine = [
                p.key
                for p in self.partitions.values()
                if p.ref == ref
                and p.partition.kind == "mps"
                and p.state is not PartitionState.STOPPED
            ]
            if mine:
                raise
            # clients that are not this runtime's workers: the daemon's profiler measuring MPS
            # shares on the node's daemon. Keep it; a later transition stops it once idle.
            log.info("MPS daemon on %s kept for its other clients: %s", ref, exc)
            return
        except BackendError as exc:
            if self._daemon_exists(ref):
                raise
            log.debug("MPS daemon on %s already gone: %s", ref, exc)
        self._started_mps.discard(ref)

    def _daemon_exists(self, ref: DeviceRef) -> bool:
        return any(d.ref == ref for d in self.backend.mps_daemons())

    def describe(self) -> list[dict[str, Any]]:
        """Per partition: key, state, pid, restarts, last error, data socket (None without
        ``data_dir``), for status pages and logs."""
        return [
            {
                "partition": str(k),
                "id": k.short_id,
                "state": p.state.value,
                "pid": p.pid,
                "restarts": p.restarts,
                "last_error": p.last_error,
                "socket": p.socket_path,
                "restart_in_s": None
                if p.restart_at is None
                else round(max(0.0, p.restart_at - self.clock()), 3),
            }
            for k, p in sorted(self.partitions.items())
        ]
