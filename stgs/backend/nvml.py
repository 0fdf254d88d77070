"""The real backend: NVML through ``nvidia-ml-py`` (``import pynvml``) and MPS control daemons.

This is the only module of stgs that imports ``pynvml``, and only when a backend is built.
Facts it relies on (docs/gpu-facts.md):

* profile *enum* vs *id*: ``nvmlDeviceGetGpuInstanceProfileInfo(h, NVML_GPU_INSTANCE_PROFILE_*)``
  takes the enum and returns ``info.id``; create, list and placement calls take ``info.id``;
* placements count memory slices (8 per GPU): ``start``/``size`` of
  ``c_nvmlGpuInstancePlacement_t``, passed by reference to
  ``nvmlDeviceCreateGpuInstanceWithPlacement``;
* teardown order: compute instances, then the GPU instance; ``NVMLError_InUse`` means
  processes are attached; handles and MIG UUIDs go stale after any destroy/create, so every read
  enumerates afresh (``nvmlDeviceGetMigDeviceHandleByIndex`` raises NotFound for empty slots);
* ``nvmlDeviceSetMigMode`` returns an activation status to compare with ``NVML_SUCCESS``; a mode
  that stays pending needs a GPU reset (Ampere);
* NVML errors are subclasses of ``NVMLError``; :func:`map_nvml_error` maps them onto the stgs
  tree at this boundary (``raise ... from exc``).

The live MIG catalog (profiles, SM counts, memory, possible placements) is read from NVML, not
from :mod:`stgs.catalog`: where the two disagree, NVML is right.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from stgs.backend.base import (
    Backend,
    DeviceRef,
    DeviceUsage,
    GpuInfo,
    MigDevice,
    MpsDaemonInfo,
)
from stgs.backend.mps import MpsControl
from stgs.catalog import SKUS, GpuSku, MigPlacement, MigProfile, get_sku
from stgs.errors import (
    BackendError,
    BackendUnavailableError,
    GpuLostError,
    InsufficientResourcesError,
    InUseError,
    MpsError,
    NoPermissionError,
    NotSupportedError,
    UnknownSkuError,
)

__all__ = ["NvmlBackend", "map_nvml_error", "profile_name", "sku_for_name"]

T = TypeVar("T")

# NVML return codes (nvml.h), so that mapping errors needs no pynvml import.
_UNINITIALIZED = 1
_NOT_SUPPORTED = 3
_NO_PERMISSION = 4
_NOT_FOUND = 6
_DRIVER_NOT_LOADED = 9
_LIBRARY_NOT_FOUND = 12
_GPU_IS_LOST = 15
_IN_USE = 19
_INSUFFICIENT_RESOURCES = 23
_GPU_NOT_FOUND = 28

_ERROR_CLASSES: dict[int, type[BackendError]] = {
    _IN_USE: InUseError,
    _INSUFFICIENT_RESOURCES: InsufficientResourcesError,
    _GPU_IS_LOST: GpuLostError,
    _NOT_SUPPORTED: NotSupportedError,
    _NO_PERMISSION: NoPermissionError,
    _UNINITIALIZED: BackendUnavailableError,
    _NOT_FOUND: BackendUnavailableError,
    _DRIVER_NOT_LOADED: BackendUnavailableError,
    _LIBRARY_NOT_FOUND: BackendUnavailableError,
    _GPU_NOT_FOUND: BackendUnavailableError,
}


def map_nvml_error(exc: BaseException, what: str) -> BackendError:
    """The stgs error for an ``NVMLError`` (its ``value`` is the NVML return code)."""
    code = getattr(exc, "value", None)
    cls = _ERROR_CLASSES.get(code, BackendError) if isinstance(code, int) else BackendError
    return cls(f"{what}: {exc} (NVML error {code})")


def _text(v: Any) -> str:
    return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)


def profile_name(raw: Any, slice_count: int, memory_mib: int) -> str:
    """``1g.10gb`` from NVML's profile name (``MIG 1g.10gb``) or, if empty, from its sizes."""
    name = _text(raw).strip()
    if name.upper().startswith("MIG "):
        name = name[4:].strip()
    if name:
        return name
    return f"{slice_count}g.{round(memory_mib / 1024)}gb"


def sku_for_name(name: str, memory_mib: int | None = None) -> str | None:
    """The catalog SKU of an NVML device name (``NVIDIA H100 80GB HBM3`` -> ``H100-80GB``)."""
    n = _text(name)
    for prefix in ("NVIDIA ", "Tesla ", "GeForce "):
        n = n.replace(prefix, "")
    n = n.strip()
    try:
        return get_sku(n).name
    except UnknownSkuError:
        pass
    first = re.split(r"[\s\-]+", n)[0].upper()
    cands = [s for s in SKUS.values() if re.split(r"[\s\-]+", s.name)[0].upper() == first]
    if not cands:
        return None
    if memory_mib is not None:
        cands.sort(key=lambda s: abs(s.memory_mib - memory_mib))
    return cands[0].name


class NvmlBackend(Backend):
    """The GPUs of this machine through NVML; MIG changes need root."""

    def __init__(self, runtime_dir: Path, *, mps_binary: str = "nvidia-cuda-mps-control") -> None:
        super().__init__(runtime_dir)
        import pynvml  # the one place in stgs that imports it

        self._nv: Any = pynvml
        self._lock = threading.RLock()
        self._profiles: dict[int, dict[str, tuple[int, MigProfile]]] = {}
        self._skus: dict[int, GpuSku] = {}
        self._call("NVML init", self._nv.nvmlInit)
        self._mps = MpsControl(self.runtime_dir, binary=mps_binary)

    # ------------------------------------------------------------------ helpers
    def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except self._nv.NVMLError as exc:
            raise map_nvml_error(exc, what) from exc

    def _handle(self, gpu: int) -> Any:
        return self._call(f"GPU {gpu}", self._nv.nvmlDeviceGetHandleByIndex, gpu)

    def close(self) -> None:
        with contextlib.suppress(self._nv.NVMLError):
            self._nv.nvmlShutdown()

    # ------------------------------------------------------------------ discovery
    def gpus(self) -> list[GpuInfo]:
        nv = self._nv
        out = []
        for i in range(self._call("device count", nv.nvmlDeviceGetCount)):
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
                name = _text(nv.nvmlDeviceGetName(h))
                uuid = _text(nv.nvmlDeviceGetUUID(h))
                mem = int(nv.nvmlDeviceGetMemoryInfo(h).total) // (1 << 20)
            except nv.NVMLError as exc:
                if getattr(exc, "value", None) != _GPU_IS_LOST:
                    raise map_nvml_error(exc, f"GPU {i}") from exc
                # read path: a lost GPU is listed, unhealthy
                out.append(GpuInfo(i, "", "", None, 0, 0, False, False, False, False))
                continue
            try:
                current, pending = nv.nvmlDeviceGetMigMode(h)
                capable = True
            except nv.NVMLError:
                current = pending = 0
                capable = False
            sku = sku_for_name(name, mem)
            sm = get_sku(sku).sm_count if sku is not None else 0
            out.append(
                GpuInfo(
                    index=i,
                    uuid=uuid,
                    name=name,
                    sku=sku,
                    sm_count=sm,
                    memory_mib=mem,
                    mig_capable=capable,
                    mig_enabled=current == nv.NVML_DEVICE_MIG_ENABLE,
                    mig_pending=current != pending,
                    healthy=True,
                )
            )
        return out

    def usage(self) -> list[DeviceUsage]:
        """Per GPU: ``nvmlDeviceGetUtilizationRates`` and ``nvmlDeviceGetMemoryInfo``; per MIG
        instance (MIG on): its memory, and its utilisation where NVML gives one (it answers
        NOT_SUPPORTED for MIG devices: None). A GPU or instance that does not answer is left
        out (read path: never raises)."""
        nv = self._nv
        out: list[DeviceUsage] = []
        with self._lock:
            try:
                count = int(nv.nvmlDeviceGetCount())
            except nv.NVMLError:
                return out
            for i in range(count):
                try:
                    h = nv.nvmlDeviceGetHandleByIndex(i)
                except nv.NVMLError:
                    continue
                got = _device_usage(nv, h, DeviceRef(i), None)
                if got is None:
                    continue
                out.append(got)
                try:
                    mig_on = nv.nvmlDeviceGetMigMode(h)[0] == nv.NVML_DEVICE_MIG_ENABLE
                except nv.NVMLError:
                    mig_on = False
                if mig_on:
                    out.extend(self._mig_usage(i, h))
        return out

    def _mig_usage(self, gpu: int, h: Any) -> list[DeviceUsage]:
        nv = self._nv
        try:
            places = {gi_id: pl for pl, _gi, gi_id, _prof in self._gpu_instances(gpu)}
            n = int(nv.nvmlDeviceGetMaxMigDeviceCount(h))
        except (nv.NVMLError, BackendError):
            return []
        out = []
        for idx in range(n):
            try:
                mh = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, idx)
                pl = places.get(int(nv.nvmlDeviceGetGpuInstanceId(mh)))
            except nv.NVMLError:
                continue  # an empty slot
            if pl is None:
                continue
            got = _device_usage(nv, mh, DeviceRef(gpu, pl.start), pl.profile)
            if got is not None:
                out.append(got)
        return sorted(out, key=lambda u: (u.ref.gpu, u.ref.mig_start or 0))

    def _live_profiles(self, gpu: int) -> dict[str, tuple[int, MigProfile]]:
        """name -> (NVML profile id, profile) from NVML's own catalog of this GPU."""
        if gpu in self._profiles:
            return self._profiles[gpu]
        nv = self._nv
        h = self._handle(gpu)
        out: dict[str, tuple[int, MigProfile]] = {}
        for enum in range(nv.NVML_GPU_INSTANCE_PROFILE_COUNT):
            try:
                info = nv.nvmlDeviceGetGpuInstanceProfileInfo(h, enum)
            except nv.NVMLError:
                continue  # not on this GPU
            name = profile_name(getattr(info, "name", b""), info.sliceCount, info.memorySizeMB)
            if "+" in name:  # +me, +gfx: media or graphics extensions, not for stgs
                continue
            arr = (nv.c_nvmlGpuInstancePlacement_t * 8)()
            count = ctypes.c_uint(8)
            self._call(
                f"GPU {gpu}: placements of {name}",
                nv.nvmlDeviceGetGpuInstancePossiblePlacements,
                h,
                info.id,
                arr,
                ctypes.byref(count),
            )
            starts = tuple(sorted(int(arr[k].start) for k in range(count.value)))
            size = int(arr[0].size) if count.value else 0
            prof = MigProfile(
                name=name,
                compute_slices=int(info.sliceCount),
                memory_slices=size,
                sm_count=int(info.multiprocessorCount),
                memory_mib=int(info.memorySizeMB),
                max_count=int(info.instanceCount),
                starts=starts,
            )
            out[name] = (int(info.id), prof)
        self._profiles[gpu] = out
        return out

    def sku(self, gpu: int) -> GpuSku:
        if gpu in self._skus:
            return self._skus[gpu]
        info = self.gpus()[gpu]
        base = get_sku(info.sku) if info.sku is not None else None
        profiles: tuple[MigProfile, ...] = ()
        if info.mig_capable:
            profiles = tuple(p for _, p in self._live_profiles(gpu).values())
        sm = base.sm_count if base is not None else max((p.sm_count for p in profiles), default=0)
        sku = GpuSku(base.name if base is not None else info.name, sm, info.memory_mib, profiles)
        self._skus[gpu] = sku
        return sku

    def set_mig_mode(self, gpu: int, enabled: bool) -> None:
        nv = self._nv
        with self._lock:
            h = self._handle(gpu)
            mode = nv.NVML_DEVICE_MIG_ENABLE if enabled else nv.NVML_DEVICE_MIG_DISABLE
            current, _ = self._call(f"GPU {gpu}: MIG mode", nv.nvmlDeviceGetMigMode, h)
            if current == mode:
                return
            status = self._call(f"GPU {gpu}: set MIG mode", nv.nvmlDeviceSetMigMode, h, mode)
            if status != nv.NVML_SUCCESS:
                raise map_nvml_error(nv.NVMLError(status), f"GPU {gpu}: MIG mode activation")
            current, pending = self._call(f"GPU {gpu}: MIG mode", nv.nvmlDeviceGetMigMode, h)
            if current != pending:
                raise BackendError(f"GPU {gpu}: MIG mode change is pending: reset the GPU")
            self._profiles.pop(gpu, None)
            self._skus.pop(gpu, None)

    # ------------------------------------------------------------------ MIG state
    def _gpu_instances(self, gpu: int) -> list[tuple[MigPlacement, Any, int, MigProfile]]:
        """(placement, GPU instance handle, GI id, profile) of every live GPU instance."""
        nv = self._nv
        h = self._handle(gpu)
        out = []
        for name, (pid, prof) in self._live_profiles(gpu).items():
            arr = (nv.c_nvmlGpuInstance_t * max(1, prof.max_count))()
            count = ctypes.c_uint(0)
            self._call(
                f"GPU {gpu}: list {name}",
                nv.nvmlDeviceGetGpuInstances,
                h,
                pid,
                arr,
                ctypes.byref(count),
            )
            for k in range(count.value):
                gi = arr[k]
                info = self._call(f"GPU {gpu}: instance info", nv.nvmlGpuInstanceGetInfo, gi)
                out.append((MigPlacement(int(info.placement.start), name), gi, int(info.id), prof))
        return out

    def mig_devices(self, gpu: int) -> tuple[MigDevice, ...]:
        nv = self._nv
        with self._lock:
            h = self._handle(gpu)
            by_gi: dict[int, tuple[str, int]] = {}
            n = self._call(f"GPU {gpu}: MIG slots", nv.nvmlDeviceGetMaxMigDeviceCount, h)
            for idx in range(n):
                try:
                    mh = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, idx)
                except nv.NVMLError_NotFound:
                    continue  # an empty slot
                except nv.NVMLError as exc:
                    raise map_nvml_error(exc, f"GPU {gpu}: MIG device {idx}") from exc
                gi_id = self._call("GI id", nv.nvmlDeviceGetGpuInstanceId, mh)
                ci_id = self._call("CI id", nv.nvmlDeviceGetComputeInstanceId, mh)
                by_gi[int(gi_id)] = (
                    _text(self._call("MIG UUID", nv.nvmlDeviceGetUUID, mh)),
                    int(ci_id),
                )
            out = []
            for placement, _gi, gi_id, prof in self._gpu_instances(gpu):
                uuid, ci_id = by_gi.get(gi_id, ("", -1))  # no compute instance: no device
                out.append(
                    MigDevice(gpu, placement, uuid, gi_id, ci_id, prof.sm_count, prof.memory_mib)
                )
            return tuple(sorted(out, key=lambda d: d.placement))

    def device_uuid(self, ref: DeviceRef) -> str:
        if ref.mig_start is None:
            return _text(self._call("GPU UUID", self._nv.nvmlDeviceGetUUID, self._handle(ref.gpu)))
        for d in self.mig_devices(ref.gpu):
            if d.placement.start == ref.mig_start and d.uuid:
                return d.uuid
        raise BackendUnavailableError(f"no MIG device at {ref}")

    def clients(self, ref: DeviceRef) -> list[int]:
        nv = self._nv
        uuid = self.device_uuid(ref)
        h = self._call(f"handle of {uuid}", nv.nvmlDeviceGetHandleByUUID, uuid)
        procs = self._call(f"processes on {ref}", nv.nvmlDeviceGetComputeRunningProcesses, h)
        return sorted(int(p.pid) for p in procs)

    def _create_instance(self, gpu: int, placement: MigPlacement) -> None:
        nv = self._nv
        with self._lock:
            h = self._handle(gpu)
            pid, prof = self._live_profiles(gpu)[placement.profile]
            pl = nv.c_nvmlGpuInstancePlacement_t()
            pl.start = placement.start
            pl.size = prof.memory_slices
            gi = self._call(
                f"GPU {gpu}: create {placement}",
                nv.nvmlDeviceCreateGpuInstanceWithPlacement,
                h,
                pid,
                ctypes.byref(pl),
            )
            try:
                enum = _ci_enum(nv, prof.compute_slices)
                ci = self._call(
                    f"GPU {gpu}: compute profile of {placement}",
                    nv.nvmlGpuInstanceGetComputeInstanceProfileInfo,
                    gi,
                    enum,
                    nv.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
                )
                self._call(
                    f"GPU {gpu}: compute instance of {placement}",
                    nv.nvmlGpuInstanceCreateComputeInstance,
                    gi,
                    ci.id,
                )
            except BackendError:
                self._call(f"GPU {gpu}: undo {placement}", nv.nvmlGpuInstanceDestroy, gi)
                raise

    def _destroy_instance(self, gpu: int, placement: MigPlacement) -> None:
        nv = self._nv
        with self._lock:
            found = [gi for p, gi, _, _ in self._gpu_instances(gpu) if p == placement]
            if not found:
                raise BackendUnavailableError(f"GPU {gpu}: no MIG instance {placement}")
            gi = found[0]
            for enum in range(nv.NVML_COMPUTE_INSTANCE_PROFILE_COUNT):  # compute first
                try:
                    info = nv.nvmlGpuInstanceGetComputeInstanceProfileInfo(
                        gi, enum, nv.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED
                    )
                except nv.NVMLError:
                    continue
                arr = (nv.c_nvmlComputeInstance_t * 8)()
                count = ctypes.c_uint(0)
                self._call(
                    f"GPU {gpu}: compute instances of {placement}",
                    nv.nvmlGpuInstanceGetComputeInstances,
                    gi,
                    info.id,
                    arr,
                    ctypes.byref(count),
                )
                for k in range(count.value):
                    self._call(
                        f"GPU {gpu}: destroy compute instance of {placement}",
                        nv.nvmlComputeInstanceDestroy,
                        arr[k],
                    )
            self._call(f"GPU {gpu}: destroy {placement}", nv.nvmlGpuInstanceDestroy, gi)

    # ------------------------------------------------------------------ MPS
    def start_mps(self, ref: DeviceRef) -> MpsDaemonInfo:
        with self._lock:
            return self._mps.start(ref, self.device_uuid(ref))

    def stop_mps(self, ref: DeviceRef) -> None:
        with self._lock:
            self._mps.stop(ref)

    def mps_daemons(self) -> list[MpsDaemonInfo]:
        with self._lock:
            return sorted(
                (d for d in self._mps.daemons.values() if self._mps.alive(d.device_uuid)),
                key=lambda d: d.ref,
            )

    # ------------------------------------------------------------------ workers
    def worker_env(self, ref: DeviceRef, mps_pct: int | None) -> dict[str, str]:
        uuid = self.device_uuid(ref)
        env = {"CUDA_VISIBLE_DEVICES": uuid, "STGS_DEVICE": "cuda"}
        if mps_pct is not None:
            daemon = self._mps.daemons.get(ref)
            if daemon is None or daemon.device_uuid != uuid:
                raise MpsError(f"no MPS daemon on {ref}: start it before its clients")
            env.update(self._mps.env(uuid))
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(mps_pct)
        return env


def _device_usage(
    nv: Any, handle: Any, ref: DeviceRef, mig_profile: str | None
) -> DeviceUsage | None:
    """One device's memory and utilisation; None when its memory cannot be read."""
    try:
        mem = nv.nvmlDeviceGetMemoryInfo(handle)
    except nv.NVMLError:
        return None
    util: float | None
    try:
        util = float(nv.nvmlDeviceGetUtilizationRates(handle).gpu) / 100.0
    except nv.NVMLError:
        util = None  # NOT_SUPPORTED on MIG devices
    return DeviceUsage(ref, mig_profile, int(mem.used), int(mem.total), util)


def _ci_enum(nv: Any, slices: int) -> int:
    """The compute-instance profile enum that spans a GPU instance of ``slices`` slices."""
    name = f"NVML_COMPUTE_INSTANCE_PROFILE_{slices}_SLICE"
    if not hasattr(nv, name):
        raise NotSupportedError(f"no compute instance profile for {slices} slices")
    return int(getattr(nv, name))
