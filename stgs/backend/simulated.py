"""A stateful simulated GPU node: the backend that the tests, the demo and the simulator use.

Like go-nvml's ``dgxa100`` mock it keeps state (MIG mode, GPU and compute instances with ids
and UUIDs, MPS daemons, attached clients) and enforces the rules that the real driver enforces:

* MIG layouts follow :func:`stgs.catalog.layout_violation` (memory-slice placements, at most 7
  compute slices, at most ``max_count`` instances of a profile); creating an instance whose
  slices are taken raises :class:`InsufficientResourcesError`, as NVML does;
* MIG UUIDs change on every create (handles go stale: re-enumerate);
* destroying an instance that has clients raises :class:`InUseError`;
* an MPS daemon per GPU (MIG off) or per MIG instance (MIG on), at most ``mps_max_clients``
  clients each; a client with an MPS share needs a running daemon;
* a lost GPU answers every call with :class:`GpuLostError` until :meth:`reset_gpu`, which, as a
  real reset does, loses every instance and daemon on it.

Faults are armed with :meth:`SimulatedNode.inject` and fire on the next matching operation:
``in_use``, ``insufficient_resources``, ``gpu_lost`` (the GPU is lost from then on), and
``worker_crash`` (the worker being started, or with :meth:`crash_worker` a running one, is
killed with SIGKILL).

Workers are real processes: on this node they run their models on the CPU (``STGS_DEVICE=cpu``)
while their environment carries the same pinning variables a real GPU worker gets.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from stgs.backend.base import Backend, DeviceRef, GpuInfo, MigDevice, MpsDaemonInfo
from stgs.catalog import GpuSku, MigPlacement, free_starts, get_sku
from stgs.errors import (
    BackendError,
    BackendUnavailableError,
    GpuLostError,
    InsufficientResourcesError,
    InUseError,
    MpsError,
    NotSupportedError,
)

__all__ = ["FaultKind", "SimulatedNode"]

_NS = uuid.UUID("6d1b6a52-5f1e-4b4e-9a51-2f9b1c0e7a11")
_FAKE_PID_BASE = 1 << 30  # pids of attached fake clients: never a real process


class FaultKind(Enum):
    IN_USE = "in_use"
    INSUFFICIENT_RESOURCES = "insufficient_resources"
    GPU_LOST = "gpu_lost"
    WORKER_CRASH = "worker_crash"


OPS = ("create_instance", "destroy_instance", "set_mig_mode", "start_mps", "stop_mps", "spawn")


@dataclass
class _Fault:
    kind: FaultKind
    op: str
    gpu: int | None
    skip: int  # matching calls to let through first
    times: int


@dataclass
class _Instance:
    placement: MigPlacement
    gi_id: int
    ci_id: int
    uuid: str


@dataclass
class _Gpu:
    index: int
    sku: GpuSku
    uuid: str
    mig_enabled: bool
    instances: dict[int, _Instance] = field(default_factory=dict)
    lost: bool = False


@dataclass
class _Client:
    ref: DeviceRef
    mps_pct: int | None
    proc: subprocess.Popen[bytes] | None  # None: a fake client attached by a test


class SimulatedNode(Backend):
    """A node of simulated GPUs: ``SimulatedNode(["H100-80GB"] * 2)`` or ``("A100-40GB", 4)``."""

    def __init__(
        self,
        gpus: Sequence[str] | str = "H100-80GB",
        count: int = 1,
        *,
        mig_enabled: bool = False,
        runtime_dir: Path | None = None,
        mps_max_clients: int | None = None,
        name: str = "sim",
    ) -> None:
        self._own_dir = runtime_dir is None
        super().__init__(
            Path(tempfile.mkdtemp(prefix="stgs-sim-")) if runtime_dir is None else runtime_dir
        )
        names = [gpus] * count if isinstance(gpus, str) else list(gpus)
        self.name = name
        self._lock = threading.RLock()
        self._gpus = [
            _Gpu(
                i,
                get_sku(n),
                f"GPU-{uuid.uuid5(_NS, f'{name}/{i}')}",
                mig_enabled and get_sku(n).supports_mig,
            )
            for i, n in enumerate(names)
        ]
        self._mps_max = mps_max_clients
        self._mps: dict[DeviceRef, MpsDaemonInfo] = {}
        self._clients: dict[int, _Client] = {}
        self._faults: list[_Fault] = []
        self._generation = 0
        self._next_fake_pid = _FAKE_PID_BASE
        self._crash_next_spawn = False
        self.calls: list[str] = []  # every write operation, in order: for tests

    # ------------------------------------------------------------------ faults
    def inject(
        self,
        kind: FaultKind,
        op: str,
        *,
        gpu: int | None = None,
        after: int = 0,
        times: int = 1,
    ) -> None:
        """Arm a fault: the ``after``-th next call of ``op`` (0: the next) fails ``times`` times."""
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r}; known: {', '.join(OPS)}")
        with self._lock:
            self._faults.append(_Fault(kind, op, gpu, after, times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _fire(self, op: str, gpu: int) -> FaultKind | None:
        for f in self._faults:
            if f.op == op and (f.gpu is None or f.gpu == gpu):
                if f.skip > 0:
                    f.skip -= 1
                    continue
                f.times -= 1
                if f.times <= 0:
                    self._faults.remove(f)
                return f.kind
        return None

    def _check_fault(self, op: str, gpu: int, what: str) -> FaultKind | None:
        kind = self._fire(op, gpu)
        if kind is None or kind is FaultKind.WORKER_CRASH:
            return kind
        if kind is FaultKind.IN_USE:
            raise InUseError(f"injected: {what}: in use")
        if kind is FaultKind.INSUFFICIENT_RESOURCES:
            raise InsufficientResourcesError(f"injected: {what}: insufficient resources")
        self.lose_gpu(gpu)
        raise GpuLostError(f"injected: GPU {gpu} is lost during {what}")

    def lose_gpu(self, gpu: int) -> None:
        """The GPU falls off the bus: its workers die, every call on it raises GpuLostError."""
        with self._lock:
            self._gpu(gpu).lost = True
            for pid, c in list(self._clients.items()):
                if c.ref.gpu == gpu:
                    self._kill(pid, c)

    def reset_gpu(self, gpu: int) -> None:
        """A GPU reset: healthy again, with no MIG instances and no MPS daemons."""
        with self._lock:
            g = self._gpus[gpu]
            g.lost = False
            g.instances.clear()
            for ref in [r for r in self._mps if r.gpu == gpu]:
                del self._mps[ref]

    def crash_worker(self, pid: int | None = None, ref: DeviceRef | None = None) -> list[int]:
        """SIGKILL running workers (one pid, or every one on ``ref``); returns the pids killed."""
        with self._lock:
            killed = []
            for p, c in list(self._clients.items()):
                mine = (pid is None or p == pid) and (ref is None or c.ref == ref)
                if mine and c.proc is not None and c.proc.poll() is None:
                    self._kill(p, c)
                    killed.append(p)
            return killed

    def _kill(self, pid: int, c: _Client) -> None:
        if c.proc is not None and c.proc.poll() is None:
            os.kill(pid, signal.SIGKILL)
        if c.proc is None:
            del self._clients[pid]

    # ------------------------------------------------------------------ fake clients
    def attach_client(self, ref: DeviceRef, mps_pct: int | None = None) -> int:
        """Attach a fake client process (someone else's) to ``ref``; returns its fake pid."""
        with self._lock:
            self._check_ref(ref)
            self._check_mps_client(ref, mps_pct)
            self._next_fake_pid += 1
            self._clients[self._next_fake_pid] = _Client(ref, mps_pct, None)
            return self._next_fake_pid

    def detach_client(self, pid: int) -> None:
        with self._lock:
            self._clients.pop(pid, None)

    # ------------------------------------------------------------------ discovery
    def gpus(self) -> list[GpuInfo]:
        with self._lock:
            return [
                GpuInfo(
                    index=g.index,
                    uuid=g.uuid,
                    name=g.sku.name,
                    sku=g.sku.name,
                    sm_count=g.sku.sm_count,
                    memory_mib=g.sku.memory_mib,
                    mig_capable=g.sku.supports_mig,
                    mig_enabled=g.mig_enabled,
                    mig_pending=False,
                    healthy=not g.lost,
                )
                for g in self._gpus
            ]

    def sku(self, gpu: int) -> GpuSku:
        return self._gpu(gpu).sku

    def _gpu(self, gpu: int) -> _Gpu:
        if not 0 <= gpu < len(self._gpus):
            raise BackendUnavailableError(f"no GPU {gpu} on node {self.name}")
        return self._gpus[gpu]

    def _live(self, gpu: int) -> _Gpu:
        g = self._gpu(gpu)
        if g.lost:
            raise GpuLostError(f"GPU {gpu} is lost (reset it)")
        return g

    def set_mig_mode(self, gpu: int, enabled: bool) -> None:
        with self._lock:
            g = self._live(gpu)
            if g.mig_enabled == enabled:
                return
            if enabled and not g.sku.supports_mig:
                raise NotSupportedError(f"GPU {gpu} ({g.sku.name}) does not support MIG")
            self._check_fault("set_mig_mode", gpu, f"GPU {gpu}: set MIG mode")
            if self._live_clients(lambda r: r.gpu == gpu):
                raise InUseError(f"GPU {gpu}: processes attached, cannot change MIG mode")
            if g.instances or any(r.gpu == gpu for r in self._mps):
                raise InUseError(f"GPU {gpu}: MIG instances or MPS daemons still exist")
            self.calls.append(f"set_mig_mode {gpu} {enabled}")
            g.mig_enabled = enabled

    def mig_devices(self, gpu: int) -> tuple[MigDevice, ...]:
        with self._lock:
            g = self._live(gpu)
            out = []
            for inst in g.instances.values():
                prof = g.sku.mig_profile(inst.placement.profile)
                out.append(
                    MigDevice(
                        gpu,
                        inst.placement,
                        inst.uuid,
                        inst.gi_id,
                        inst.ci_id,
                        prof.sm_count,
                        prof.memory_mib,
                    )
                )
            return tuple(sorted(out, key=lambda d: d.placement))

    def device_uuid(self, ref: DeviceRef) -> str:
        with self._lock:
            return self._check_ref(ref)

    def _check_ref(self, ref: DeviceRef) -> str:
        g = self._live(ref.gpu)
        if ref.mig_start is None:
            if g.mig_enabled:
                raise NotSupportedError(
                    f"GPU {ref.gpu} is in MIG mode: pin to a MIG instance, not the whole GPU"
                )
            return g.uuid
        if not g.mig_enabled:
            raise BackendUnavailableError(f"GPU {ref.gpu} is not in MIG mode: no {ref}")
        inst = g.instances.get(ref.mig_start)
        if inst is None:
            raise BackendUnavailableError(f"no MIG instance at {ref}")
        return inst.uuid

    def _live_clients(self, pred: Callable[[DeviceRef], bool]) -> list[int]:
        out = []
        for pid, c in list(self._clients.items()):
            if c.proc is not None and c.proc.poll() is not None:
                del self._clients[pid]  # exited: no longer attached
                continue
            if pred(c.ref):
                out.append(pid)
        return out

    def clients(self, ref: DeviceRef) -> list[int]:
        with self._lock:
            self._live(ref.gpu)
            return self._live_clients(lambda r: r == ref)

    # ------------------------------------------------------------------ MIG primitives
    def _create_instance(self, gpu: int, placement: MigPlacement) -> None:
        with self._lock:
            g = self._live(gpu)
            if not g.mig_enabled:
                raise BackendError(f"GPU {gpu}: MIG mode is off")
            self._check_fault("create_instance", gpu, f"GPU {gpu}: create {placement}")
            layout = [i.placement for i in g.instances.values()]
            if placement.start not in free_starts(g.sku, layout, placement.profile):
                raise InsufficientResourcesError(
                    f"GPU {gpu}: cannot create {placement}: slices taken or limits reached"
                )
            self._generation += 1
            gi_id = 1 + max((i.gi_id for i in g.instances.values()), default=0)
            mig_uuid = f"MIG-{uuid.uuid5(_NS, f'{g.uuid}/{gi_id}/{self._generation}')}"
            g.instances[placement.start] = _Instance(placement, gi_id, 0, mig_uuid)
            self.calls.append(f"create {gpu} {placement}")

    def _destroy_instance(self, gpu: int, placement: MigPlacement) -> None:
        with self._lock:
            g = self._live(gpu)
            inst = g.instances.get(placement.start)
            if inst is None or inst.placement != placement:
                raise BackendUnavailableError(f"GPU {gpu}: no MIG instance {placement}")
            self._check_fault("destroy_instance", gpu, f"GPU {gpu}: destroy {placement}")
            ref = DeviceRef(gpu, placement.start)
            if self._live_clients(lambda r: r == ref) or ref in self._mps:
                raise InUseError(f"GPU {gpu}: MIG instance {placement} has clients")
            del g.instances[placement.start]
            self.calls.append(f"destroy {gpu} {placement}")

    # ------------------------------------------------------------------ MPS
    def start_mps(self, ref: DeviceRef) -> MpsDaemonInfo:
        with self._lock:
            device = self._check_ref(ref)
            running = self._mps.get(ref)
            if running is not None and running.device_uuid == device:
                return running
            self._check_fault("start_mps", ref.gpu, f"start MPS on {ref}")
            base = self.runtime_dir / "mps" / device
            info = MpsDaemonInfo(ref, device, base / "pipe", base / "log", None)
            info.pipe_dir.mkdir(parents=True, exist_ok=True)
            info.log_dir.mkdir(parents=True, exist_ok=True)
            self._mps[ref] = info
            self.calls.append(f"start_mps {ref}")
            return info

    def stop_mps(self, ref: DeviceRef) -> None:
        with self._lock:
            if ref not in self._mps:
                return
            self._live(ref.gpu)
            self._check_fault("stop_mps", ref.gpu, f"stop MPS on {ref}")
            users = [
                p
                for p in self._live_clients(lambda r: r == ref)
                if self._clients[p].mps_pct is not None
            ]
            if users:
                raise InUseError(f"MPS daemon on {ref} still has clients (pids {users})")
            del self._mps[ref]
            self.calls.append(f"stop_mps {ref}")

    def mps_daemons(self) -> list[MpsDaemonInfo]:
        with self._lock:
            return sorted(self._mps.values(), key=lambda d: d.ref)

    def mps_limit(self, ref: DeviceRef) -> int:
        return self._mps_max if self._mps_max is not None else self.sku(ref.gpu).mps_max_clients

    def _check_mps_client(self, ref: DeviceRef, mps_pct: int | None) -> None:
        if mps_pct is None:
            return
        if not 0 < mps_pct <= 100:
            raise BackendError(f"MPS share must be in (0, 100], got {mps_pct}")
        daemon = self._mps.get(ref)
        if daemon is None:
            raise MpsError(f"no MPS daemon on {ref}: start it before its clients")
        n = sum(
            1
            for p in self._live_clients(lambda r: r == ref)
            if self._clients[p].mps_pct is not None
        )
        if n >= self.mps_limit(ref):
            raise InsufficientResourcesError(
                f"MPS daemon on {ref} has {n} clients, the limit is {self.mps_limit(ref)}"
            )

    # ------------------------------------------------------------------ workers
    def worker_env(self, ref: DeviceRef, mps_pct: int | None) -> dict[str, str]:
        with self._lock:
            env = {"CUDA_VISIBLE_DEVICES": self._check_ref(ref), "STGS_DEVICE": "cpu"}
            daemon = self._mps.get(ref)
            if mps_pct is not None and daemon is not None:
                env["CUDA_MPS_PIPE_DIRECTORY"] = str(daemon.pipe_dir)
                env["CUDA_MPS_LOG_DIRECTORY"] = str(daemon.log_dir)
                env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(mps_pct)
            return env

    def _before_spawn(self, ref: DeviceRef, mps_pct: int | None) -> None:
        with self._lock:
            self._check_ref(ref)
            self._check_mps_client(ref, mps_pct)
            kind = self._check_fault("spawn", ref.gpu, f"start a worker on {ref}")
            self._crash_next_spawn = kind is FaultKind.WORKER_CRASH

    def _after_spawn(
        self, ref: DeviceRef, mps_pct: int | None, proc: subprocess.Popen[bytes]
    ) -> None:
        with self._lock:
            self._clients[proc.pid] = _Client(ref, mps_pct, proc)
            if self._crash_next_spawn:
                self._crash_next_spawn = False
                os.kill(proc.pid, signal.SIGKILL)

    def close(self) -> None:
        with self._lock:
            for pid, c in list(self._clients.items()):
                if c.proc is not None and c.proc.poll() is None:
                    os.kill(pid, signal.SIGKILL)
                    c.proc.wait()
            self._clients.clear()
            if self._own_dir:
                shutil.rmtree(self.runtime_dir, ignore_errors=True)
