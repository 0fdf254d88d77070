"""The one door to the hardware: the backend interface and its implementations.

``SimulatedNode`` (any catalog SKU and count, CPU workers) ships in the package; the real
``NvmlBackend`` lives in :mod:`stgs.backend.nvml` and imports ``pynvml`` only when built.
"""

from stgs.backend.base import (
    Backend,
    DeviceRef,
    DeviceUsage,
    GpuInfo,
    MigDevice,
    MpsDaemonInfo,
)
from stgs.backend.simulated import FaultKind, SimulatedNode

__all__ = [
    "Backend",
    "DeviceRef",
    "DeviceUsage",
    "FaultKind",
    "GpuInfo",
    "MigDevice",
    "MpsDaemonInfo",
    "SimulatedNode",
]
