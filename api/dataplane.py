"""The data plane, seen from the control plane: frontend processes and the routing they follow.

With ``server.frontends = N > 0`` inference never enters the control-plane process. The daemon
binds the serving port once and starts N frontend processes (``python -m api.frontend``) that
all accept on that one socket (and share the gRPC port with SO_REUSEPORT); each holds its own
connection to every worker's data socket, so workers batch across frontends. The control
plane's own HTTP server (REST ``/v1``, ``/metrics``, the OpenAPI document) listens on a Unix
socket; the frontends proxy every path but ``/v2`` to it, so users see one port.

Each frontend has a control channel: a socketpair, newline-delimited JSON.

* control plane -> frontend: ``routing`` snapshots (:func:`routing_snapshot`): the models with
  their SLO and input, the ready partitions with their data socket, their models in slot order
  and planned rates, and whether the daemon is ready. Versions only grow.
* frontend -> control plane: ``hello`` at start (it is sent the current snapshot), ``ack`` of a
  version once it routes by it (connections open to every partition listed, nothing new to
  partitions no longer listed), ``stats`` about once a second (cumulative per model:
  :class:`~api.inference.InferenceStats`).

Make before break across processes: the runtime calls :meth:`DataPlane.routing_changed` after a
plan's new workers are ready and before its old ones drain; it publishes the routing without
the leaving partitions and returns once every live frontend acknowledged it (or after
``ack_timeout_s``: a frontend that does not answer is restarted). Then the old workers drain
what every frontend had sent them. A frontend that dies is restarted (at once; with back-off
when it keeps dying young); the others keep serving meanwhile, and the dead one's statistics
are kept so the counters never go back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from api.inference import InferenceStats, InferError, model_io
from stgs import events, lifeline

if TYPE_CHECKING:
    from api.service import Service
    from stgs.runtime import PartitionKey

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 5.0
CONTROL_SEND_TIMEOUT_S = 1
RESTART_BACKOFF_S = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
YOUNG_S = 10.0  # a frontend that dies younger than this counts towards the back-off

EventFn = Callable[[str, str, dict[str, Any]], object]
StatsFn = Callable[[str, dict[str, float]], None]
"""(model, deltas since the last stats message: requests, ok, slo_met, shed): the load meter."""


def routing_snapshot(
    svc: Service, version: int, leaving: Collection[PartitionKey] = ()
) -> dict[str, Any]:
    """The routing the frontends follow now: ready partitions with a data socket, minus
    ``leaving``; the live models with their SLO and input."""
    from stgs.runtime import PartitionState

    models: dict[str, Any] = {}
    for rec in svc.store.models():
        try:
            io = model_io(svc, rec.name)
        except InferError:
            continue
        models[rec.name] = {
            "slo_ms": float(rec.spec["slo_ms"]),
            "input": io.to_dict(),  # the input, and the output, versions, batch bound
        }
    parts = []
    for p in list(svc.runtime.partitions.values()):
        if p.state is not PartitionState.READY or p.socket_path is None or p.key in leaving:
            continue
        parts.append(
            {
                "id": str(p.key),
                "socket": p.socket_path,
                "models": [m.name for m in p.partition.models],
                "rates": dict(p.rates),
                # the planned batch per model: the frontend's admission counts rounds of batches
                "batches": {m.name: m.batch for m in p.partition.models},
            }
        )
    return {
        "type": "routing",
        "version": version,
        "ready": bool(svc.restored),
        "models": models,
        "partitions": parts,
    }


@dataclass
class _Frontend:
    """One frontend process and its control channel."""

    slot: int
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    started_at: float
    acked: int = 0
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, msg: Mapping[str, Any]) -> bool:
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        try:
            with self.send_lock:
                self.sock.sendall(data)
        except OSError:
            return False
        return True


class DataPlane:
    """Starts, feeds and supervises the frontend processes; see the module docstring."""

    def __init__(
        self,
        svc: Service,
        *,
        count: int,
        listen: socket.socket,
        config: Mapping[str, Any],
        on_event: EventFn | None = None,
        on_stats: StatsFn | None = None,
        ack_timeout_s: float = ACK_TIMEOUT_S,
    ) -> None:
        self.svc = svc
        self.count = count
        self.listen = listen
        self.config = dict(config)
        self.on_event = on_event
        self.on_stats = on_stats
        self.ack_timeout_s = ack_timeout_s
        self.version = 0
        self._leaving: frozenset[PartitionKey] = frozenset()  # left out of version's routing
        self.restarts = 0
        self._frontends: dict[int, _Frontend] = {}
        self._retired = InferenceStats()  # what frontends that died had counted
        self._young_deaths: dict[int, int] = {}
        self._restart_at: dict[int, float] = {}
        self._lock = threading.Lock()
        self._acked = threading.Condition(self._lock)
        self._publish_lock = threading.Lock()
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None

    # ------------------------------------------------------------------ processes
    def start(self) -> None:
        for slot in range(self.count):
            self._spawn(slot)
        self._supervisor = threading.Thread(target=self._supervise, name="stgs-frontends")
        self._supervisor.daemon = True
        self._supervisor.start()

    def _spawn(self, slot: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # A frontend that stops reading must not block the publisher (the runtime's monitor
        # publishes while it holds the runtime's lock): a send that makes no progress for
        # CONTROL_SEND_TIMEOUT_S fails, and the frontend is seen as late (restarted on a wait).
        timeout = struct.pack("ll", int(CONTROL_SEND_TIMEOUT_S), 0)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        cfg = {**self.config, "http_fd": self.listen.fileno(), "slot": slot}
        argv = [
            sys.executable,
            "-m",
            "api.frontend",
            "--control-fd",
            str(theirs.fileno()),
            "--config",
            json.dumps(cfg),
        ]
        try:
            proc = lifeline.popen(
                argv, pass_fds=(theirs.fileno(), self.listen.fileno()), close_fds=True
            )
        except OSError as exc:
            ours.close()
            log.error("frontend %d could not start: %s", slot, exc)
            self._restart_at[slot] = time.monotonic() + RESTART_BACKOFF_S[-1]
            return
        finally:
            theirs.close()
        fe = _Frontend(slot, proc, ours, time.monotonic())
        with self._lock:
            self._frontends[slot] = fe
        threading.Thread(
            target=self._read, args=(fe,), name=f"frontend-{slot}-control", daemon=True
        ).start()
        log.info("frontend %d started (pid %d)", slot, proc.pid)

    def _supervise(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            with self._lock:
                dead = [fe for fe in self._frontends.values() if fe.proc.poll() is not None]
            for fe in dead:
                self._retire(fe, now)
            for slot, at in list(self._restart_at.items()):
                if now >= at and not self._stop.is_set():
                    del self._restart_at[slot]
                    self.restarts += 1
                    self._spawn(slot)
                    self._event("frontend_restarted", f"frontend {slot} restarted", slot=slot)

    def _retire(self, fe: _Frontend, now: float) -> None:
        with self._lock:
            if self._frontends.get(fe.slot) is not fe:
                return
            del self._frontends[fe.slot]
            self._retired.add(fe.stats)
            self._acked.notify_all()
        with contextlib.suppress(OSError):
            fe.sock.close()
        code = fe.proc.returncode
        young = now - fe.started_at < YOUNG_S
        n = self._young_deaths.get(fe.slot, 0) + 1 if young else 0
        self._young_deaths[fe.slot] = n
        delay = RESTART_BACKOFF_S[min(max(n, 1), len(RESTART_BACKOFF_S)) - 1] if n else 0.0
        self._restart_at[fe.slot] = now + delay
        why = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        self._event(
            "frontend_failed",
            f"frontend {fe.slot} (pid {fe.proc.pid}) died: {why}; restart in {delay:g} s",
            slot=fe.slot,
            pid=fe.proc.pid,
        )

    def _read(self, fe: _Frontend) -> None:
        """The frontend's messages: hello (send it the routing), acks, stats."""
        prev: dict[str, dict[str, Any]] = {}
        with fe.sock.makefile("rb") as f:
            for line in f:
                try:
                    msg = json.loads(line)
                    kind = msg.get("type")
                except (ValueError, AttributeError):
                    log.warning("frontend %d: unreadable control message", fe.slot)
                    continue
                if kind == "hello":
                    self._hello(fe)
                elif kind == "ack":
                    with self._lock:
                        fe.acked = max(fe.acked, int(msg.get("version", 0)))
                        self._acked.notify_all()
                    if msg.get("failed"):
                        log.warning("frontend %d could not reach %s", fe.slot, msg["failed"])
                elif kind == "stats":
                    models = msg.get("models")
                    if isinstance(models, dict):
                        with self._lock:
                            fe.stats = models
                        self._deltas(prev, models)
                        prev = models

    def _deltas(self, prev: Mapping[str, Any], now: Mapping[str, Any]) -> None:
        if self.on_stats is None:
            return
        for model, st in now.items():
            old = prev.get(model, {})
            d = {
                k: float(st.get(k, 0)) - float(old.get(k, 0))
                for k in ("requests", "ok", "slo_met", "shed")
            }
            if any(d.values()):
                self.on_stats(model, d)

    def _hello(self, fe: _Frontend) -> None:
        """A (re)started frontend's first routing: the current version, its leaving partitions
        left out as in the published one (a frontend that starts while a transition waits for
        the acks must not route to the partitions about to drain). It may arrive after a newer
        version that a publish sent meanwhile: the frontend ignores a version older than its
        own."""
        with self._lock:
            version, leaving = self.version, self._leaving
        fe.send(routing_snapshot(self.svc, version, leaving))

    # ------------------------------------------------------------------ routing
    def publish(self, leaving: Collection[PartitionKey] = (), *, wait: bool = False) -> bool:
        """Send every frontend the routing now (without ``leaving``); with ``wait``, return
        once all live frontends acknowledged it (False after ``ack_timeout_s``)."""
        with self._publish_lock:
            with self._lock:
                self.version += 1
                self._leaving = frozenset(leaving)
            snap = routing_snapshot(self.svc, self.version, leaving)
            with self._lock:
                live = list(self._frontends.values())
            for fe in live:
                fe.send(snap)
            if not wait:
                return True
            return self._wait_acked(snap["version"], live)

    def _wait_acked(self, version: int, frontends: list[_Frontend]) -> bool:
        end = time.monotonic() + self.ack_timeout_s
        with self._lock:
            while True:
                late = [
                    fe
                    for fe in frontends
                    if fe.acked < version and self._frontends.get(fe.slot) is fe
                ]
                if not late:
                    return True
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._acked.wait(left)
        for fe in late:  # it cannot be trusted to stop using the old routing: restart it
            log.error("frontend %d did not acknowledge routing %d: killed", fe.slot, version)
            with contextlib.suppress(OSError):
                fe.proc.kill()
        return False

    def routing_changed(self, leaving: Collection[PartitionKey]) -> None:
        """The runtime's hook between make and break: publish, wait for every ack."""
        self.publish(leaving, wait=True)

    # ------------------------------------------------------------------ reads
    def stats(self) -> InferenceStats:
        """Every frontend's counts, the dead ones' included (monotone)."""
        with self._lock:
            out = InferenceStats()
            out.add_stats(self._retired)
            for fe in self._frontends.values():
                out.add(fe.stats)
        return out

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "slot": fe.slot,
                    "pid": fe.proc.pid,
                    "alive": fe.proc.poll() is None,
                    "acked": fe.acked,
                    "uptime_s": round(time.monotonic() - fe.started_at, 1),
                }
                for fe in sorted(self._frontends.values(), key=lambda f: f.slot)
            ]

    def _event(self, kind: str, message: str, **data: Any) -> None:
        """An event: to ``on_event`` (the daemon stores and logs it), else to the log here."""
        if self.on_event is None:
            log.log(events.level(kind), "%s", message)
        else:
            try:
                self.on_event(kind, message, data)
            except Exception:
                log.exception("event hook failed")

    def close(self) -> None:
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(2)
        with self._lock:
            fes = list(self._frontends.values())
            self._frontends.clear()
        for fe in fes:
            with contextlib.suppress(OSError):
                fe.proc.terminate()
        for fe in fes:
            try:
                fe.proc.wait(5)
            except subprocess.TimeoutExpired:
                fe.proc.kill()
                fe.proc.wait(5)
            with contextlib.suppress(OSError):
                fe.sock.close()
