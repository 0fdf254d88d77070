"""The backend interface: the one door to the hardware.

Everything that touches NVML, MIG, MPS or the CUDA environment of a worker goes through a
:class:`Backend`. Two implementations ship: :class:`~stgs.backend.nvml.NvmlBackend` (NVML through
``nvidia-ml-py`` and ``nvidia-cuda-mps-control``) and
:class:`~stgs.backend.simulated.SimulatedNode` (a stateful node of any catalog SKU and count,
with the same placement rules, MPS limits, client counts and injectable faults).

The MIG algorithm is written once, here, over four small primitives that each implementation
provides (create / destroy one instance at a placement, list instances, count clients), so the
simulated node exercises the same code the real GPU runs (mig-parted style *assert then apply*):

1. assert: the target is a valid layout of the SKU (:func:`stgs.catalog.layout_violation`), MIG
   is on, and no instance to be destroyed has clients (else :class:`InUseError`, nothing touched);
2. skip: an instance that is already at its placement is kept ("skipping: already set");
3. apply: destroy what goes (compute instances, then the GPU instance), create what comes (with
   its explicit placement);
4. on any failure roll back to the previous layout, then re-raise; re-enumerate afterwards (MIG
   UUIDs go stale on every destroy/create) and check that the layout read back equals the target.
"""

from __future__ import annotations

import logging
import os
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stgs import lifeline
from stgs.catalog import GpuSku, MigLayout, MigPlacement, canonical_layout, layout_violation
from stgs.errors import BackendError, InUseError, MigLayoutError

__all__ = [
    "Backend",
    "DeviceRef",
    "GpuInfo",
    "MigDevice",
    "MpsDaemonInfo",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class DeviceRef:
    """Where a worker or an MPS daemon runs: a whole GPU, or the MIG instance at ``mig_start``."""

    gpu: int
    mig_start: int | None = None

    def __str__(self) -> str:
        return f"gpu{self.gpu}" if self.mig_start is None else f"gpu{self.gpu}/mig@{self.mig_start}"


@dataclass(frozen=True)
class GpuInfo:
    """What discovery tells about one GPU. ``sku`` is the catalog name when known."""

    index: int
    uuid: str
    name: str
    sku: str | None
    sm_count: int
    memory_mib: int
    mig_capable: bool
    mig_enabled: bool
    mig_pending: bool  # a mode change is pending (needs a reset on Ampere)
    healthy: bool


@dataclass(frozen=True)
class MigDevice:
    """A live MIG instance (a GPU instance with one compute instance over all its slices)."""

    gpu: int
    placement: MigPlacement
    uuid: str  # MIG-<uuid>; stale after any destroy/create on the GPU
    gi_id: int
    ci_id: int
    sm_count: int
    memory_mib: int

    @property
    def ref(self) -> DeviceRef:
        return DeviceRef(self.gpu, self.placement.start)


@dataclass(frozen=True)
class MpsDaemonInfo:
    """A running MPS control daemon and the directories its clients must use."""

    ref: DeviceRef
    device_uuid: str
    pipe_dir: Path
    log_dir: Path
    pid: int | None


@dataclass(frozen=True)
class DeviceUsage:
    """Measured use of a GPU (``ref.mig_start`` None) or of a MIG instance, at one read.

    ``utilization``: the share of the driver's last sample period in which a kernel ran on the
    device (NVML's ``utilization.gpu`` / 100), None where the driver does not measure it (a MIG
    instance: NVML answers NOT_SUPPORTED there)."""

    ref: DeviceRef
    mig_profile: str | None
    memory_used_bytes: int
    memory_total_bytes: int
    utilization: float | None


class Backend(ABC):
    """One node's GPUs. Write paths raise :class:`~stgs.errors.BackendError` subclasses."""

    def __init__(self, runtime_dir: Path) -> None:
        self.runtime_dir = Path(runtime_dir)

    # ------------------------------------------------------------------ discovery
    @abstractmethod
    def gpus(self) -> list[GpuInfo]:
        """Every GPU of the node, in index order (read path: tolerates missing values)."""

    def usage(self) -> list[DeviceUsage]:
        """Measured utilisation and memory of every GPU and MIG instance (read path); empty
        where nothing is measured (the simulated node: it models no memory or load)."""
        return []

    @abstractmethod
    def sku(self, gpu: int) -> GpuSku:
        """The catalog entry (or the live NVML catalog) of GPU ``gpu``."""

    @abstractmethod
    def set_mig_mode(self, gpu: int, enabled: bool) -> None:
        """Turn MIG on or off; raises when the change stays pending (a reset is needed)."""

    @abstractmethod
    def mig_devices(self, gpu: int) -> tuple[MigDevice, ...]:
        """The live MIG instances of GPU ``gpu``, sorted by placement, enumerated afresh."""

    @abstractmethod
    def device_uuid(self, ref: DeviceRef) -> str:
        """``GPU-<uuid>`` of a whole GPU or ``MIG-<uuid>`` of the instance at ``ref``."""

    @abstractmethod
    def clients(self, ref: DeviceRef) -> list[int]:
        """PIDs of the processes attached to the GPU or MIG instance (MPS servers included)."""

    # ------------------------------------------------------------------ MIG primitives
    @abstractmethod
    def _create_instance(self, gpu: int, placement: MigPlacement) -> None:
        """Create a GPU instance at ``placement`` and one compute instance over all of it."""

    @abstractmethod
    def _destroy_instance(self, gpu: int, placement: MigPlacement) -> None:
        """Destroy the compute instances, then the GPU instance at ``placement``."""

    # ------------------------------------------------------------------ MPS
    @abstractmethod
    def start_mps(self, ref: DeviceRef) -> MpsDaemonInfo:
        """Start (or find running) the MPS control daemon of ``ref``; idempotent."""

    @abstractmethod
    def stop_mps(self, ref: DeviceRef) -> None:
        """Stop the MPS daemon of ``ref``; :class:`InUseError` while it has clients."""

    @abstractmethod
    def mps_daemons(self) -> list[MpsDaemonInfo]:
        """The MPS daemons stgs started and that are still alive."""

    # ------------------------------------------------------------------ workers
    @abstractmethod
    def worker_env(self, ref: DeviceRef, mps_pct: int | None) -> dict[str, str]:
        """The environment that pins a worker to ``ref`` (and its MPS share)."""

    def spawn_worker(
        self,
        ref: DeviceRef,
        mps_pct: int | None,
        argv: Sequence[str],
        *,
        pass_fds: Sequence[int] = (),
        extra_env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a worker process pinned to ``ref``; the caller owns the process."""
        env = dict(os.environ)
        # A worker sees only its own device: drop whatever pinning the daemon inherited.
        for key in ("CUDA_VISIBLE_DEVICES", "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
            env.pop(key, None)
        env.pop("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", None)
        env.update(self.worker_env(ref, mps_pct))
        if extra_env:
            env.update(extra_env)
        self._before_spawn(ref, mps_pct)
        proc = lifeline.popen(argv, env=env, pass_fds=tuple(pass_fds), close_fds=True)
        self._after_spawn(ref, mps_pct, proc)
        return proc

    def _before_spawn(self, ref: DeviceRef, mps_pct: int | None) -> None:  # noqa: B027
        """Checks before a worker starts (the simulated node enforces MPS limits here)."""

    def _after_spawn(  # noqa: B027
        self, ref: DeviceRef, mps_pct: int | None, proc: subprocess.Popen[bytes]
    ) -> None:
        """Bookkeeping once a worker started."""

    def close(self) -> None:  # noqa: B027
        """Release the backend (NVML shutdown); MPS daemons and MIG instances stay."""

    # ------------------------------------------------------------------ MIG layouts
    def mig_layout(self, gpu: int) -> MigLayout:
        """The live layout of GPU ``gpu`` in canonical form."""
        return canonical_layout(d.placement for d in self.mig_devices(gpu))

    def apply_mig_layout(self, gpu: int, layout: Sequence[MigPlacement]) -> tuple[MigDevice, ...]:
        """Make the MIG layout of ``gpu`` exactly ``layout``; roll back on failure.

        Idempotent: instances already in place are kept. Returns the re-enumerated devices.
        """
        sku = self.sku(gpu)
        target = canonical_layout(layout)
        why = layout_violation(sku, target)
        if why is not None:
            raise MigLayoutError(f"GPU {gpu} ({sku.name}): {why}")
        info = self.gpus()[gpu]
        if not info.mig_enabled:
            raise BackendError(f"GPU {gpu}: MIG mode is off; enable it before applying a layout")
        current = self.mig_layout(gpu)
        if current == target:
            log.debug("GPU %d: MIG layout already set, skipping", gpu)
            return self.mig_devices(gpu)
        remove = [p for p in current if p not in target]
        add = [p for p in target if p not in current]
        daemons = {d.ref for d in self.mps_daemons()}
        for p in remove:  # assert before touching anything
            ref = DeviceRef(gpu, p.start)
            pids = self.clients(ref)
            if pids:
                raise InUseError(
                    f"GPU {gpu}: MIG instance {p} still has clients (pids {sorted(pids)}); "
                    "drain and stop them first"
                )
            if ref in daemons:
                raise InUseError(f"GPU {gpu}: MIG instance {p} still runs an MPS daemon")
        removed: list[MigPlacement] = []
        added: list[MigPlacement] = []
        try:
            for p in remove:
                self._destroy_instance(gpu, p)
                removed.append(p)
            for p in add:
                self._create_instance(gpu, p)
                added.append(p)
        except BackendError as exc:
            log.warning("GPU %d: MIG change failed (%s); rolling back", gpu, exc)
            self._rollback(gpu, removed, added, exc)
            raise
        devices = self.mig_devices(gpu)
        got = canonical_layout(d.placement for d in devices)
        if got != target:
            raise BackendError(
                f"GPU {gpu}: MIG layout read back {_fmt(got)} differs from {_fmt(target)}"
            )
        return devices

    def _rollback(
        self,
        gpu: int,
        removed: Sequence[MigPlacement],
        added: Sequence[MigPlacement],
        cause: BackendError,
    ) -> None:
        try:
            for p in reversed(added):
                self._destroy_instance(gpu, p)
            for p in reversed(removed):
                self._create_instance(gpu, p)
        except BackendError as exc:
            raise BackendError(
                f"GPU {gpu}: rollback after '{cause}' failed too: {exc}; "
                f"the layout is now {self._safe_layout(gpu)}"
            ) from exc

    def _safe_layout(self, gpu: int) -> str:
        try:
            return _fmt(self.mig_layout(gpu))
        except BackendError:
            return "unknown"


def _fmt(layout: MigLayout) -> str:
    return "[" + ", ".join(str(p) for p in layout) + "]"
