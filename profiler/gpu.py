"""The NVML door of the profiler: driver version and existing MIG instances (read only).

The profiler never changes MIG mode or layout; it only lists the instances that exist. Every
function tolerates a machine without NVML (returns nothing), since it only informs.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from stgs.catalog import SKUS
from stgs.profiles import normalise_gpu

__all__ = ["MigDevice", "driver_version", "gpu_label", "list_mig_devices"]

_MIG_NAME = re.compile(r"(\d+g\.\d+gb(?:\+me)?)", re.IGNORECASE)


@dataclass(frozen=True)
class MigDevice:
    profile: str  # e.g. "3g.40gb"
    uuid: str  # "MIG-..."


def gpu_label(device_name: str, memory_mib: float = 0.0) -> str:
    """The catalog name of a device name as CUDA reports it (``NVIDIA H100 80GB HBM3`` ->
    ``H100-80GB``); unknown devices keep their name, spaces as dashes."""
    name = device_name.strip().removeprefix("NVIDIA").strip()
    if not name:
        return "unknown"
    label = normalise_gpu(name)
    if label in SKUS:
        return label
    dashed = "-".join(name.split())
    for sku in SKUS.values():  # e.g. "H100 80GB HBM3" vs the alias "H100-80GB-HBM3"
        if dashed.lower().startswith(sku.name.lower()):
            return sku.name
    return dashed


def driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


def list_mig_devices(index: int) -> list[MigDevice]:
    """MIG instances that exist on GPU ``index`` (none when MIG is off or NVML is missing)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    out: list[MigDevice] = []
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        current, _pending = pynvml.nvmlDeviceGetMigMode(h)
        if current != pynvml.NVML_DEVICE_MIG_ENABLE:
            return []
        for i in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(h)):
            try:
                mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(h, i)
            except pynvml.NVMLError:
                continue
            name = pynvml.nvmlDeviceGetName(mig)
            uuid = pynvml.nvmlDeviceGetUUID(mig)
            name = name.decode() if isinstance(name, bytes) else str(name)
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            m = _MIG_NAME.search(name)
            if m:
                out.append(MigDevice(m.group(1).lower(), uuid))
    except Exception:
        return out
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return out
