"""The node: its GPUs as the planner sees them, and as the operator reads them.

The one role that reads the backend for the service: which GPUs there are and whether a plan
may use MIG on them (:meth:`Node.gpu_specs`), the MIG layout found at start, and the node view
of ``GET /v1/gpus`` (:meth:`Node.view`), so that the HTTP layer never reads the backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from api.config import DaemonConfig
from stgs.backend.base import Backend
from stgs.errors import StgsError
from stgs.types import GpuSpec


class Node:
    """The GPUs of ``backend``; ``mig_allowed`` (per GPU index, None: all): where the daemon
    may turn MIG on when ``backend.allow_mig_changes``."""

    def __init__(
        self, cfg: DaemonConfig, backend: Backend, mig_allowed: Sequence[bool] | None = None
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        self.mig_allowed = None if mig_allowed is None else list(mig_allowed)

    def gpu_specs(self) -> tuple[GpuSpec, ...]:
        out = []
        for info in self.backend.gpus():
            sku = self.backend.sku(info.index)
            if self.cfg.backend.allow_mig_changes:
                allowed = self.mig_allowed is None or (
                    info.index < len(self.mig_allowed) and self.mig_allowed[info.index]
                )
                mig = sku.supports_mig and allowed
            else:
                mig = info.mig_enabled
            out.append(GpuSpec(sku.name, mig))
        return tuple(out)

    def skus(self) -> list[str]:
        return sorted({g.sku for g in self.gpu_specs()})

    def observed_layout(self) -> list[dict[str, Any]]:
        """Each GPU's MIG mode and instances as found (the start event's ``node``)."""
        out = []
        for info in self.backend.gpus():
            layout: Iterable[Any] = ()
            if info.mig_enabled and info.healthy:
                try:
                    layout = self.backend.mig_layout(info.index)
                except StgsError:
                    layout = ()
            out.append(
                {"gpu": info.index, "mig": info.mig_enabled, "layout": [str(p) for p in layout]}
            )
        return out

    def view(self, kind: str, partitions: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """``GET /v1/gpus``: every value the backend gives (``kind``: which backend), each GPU
        with its MIG devices and the runtime's ``partitions`` on it, and the MPS daemons; a
        failing read is reported, not raised."""
        backend = self.backend
        out: dict[str, Any] = {"backend": kind, "gpus": [], "mps_daemons": []}
        try:
            infos = backend.gpus()
        except StgsError as exc:
            out["error"] = str(exc)
            return out
        by_gpu: dict[int, list[Mapping[str, Any]]] = {}
        for p in partitions:
            by_gpu.setdefault(int(p["partition"].split()[0].removeprefix("gpu")), []).append(p)
        for info in infos:
            g: dict[str, Any] = {
                "index": info.index,
                "uuid": info.uuid,
                "name": info.name,
                "sku": info.sku,
                "sm_count": info.sm_count,
                "memory_mib": info.memory_mib,
                "mig_capable": info.mig_capable,
                "mig_enabled": info.mig_enabled,
                "mig_pending": info.mig_pending,
                "healthy": info.healthy,
                "mig_devices": [],
                "partitions": by_gpu.get(info.index, []),
            }
            if info.mig_enabled and info.healthy:
                try:
                    g["mig_devices"] = [
                        {
                            "profile": d.placement.profile,
                            "start": d.placement.start,
                            "uuid": d.uuid,
                            "sm_count": d.sm_count,
                            "memory_mib": d.memory_mib,
                        }
                        for d in backend.mig_devices(info.index)
                    ]
                except StgsError as exc:
                    g["error"] = str(exc)
            out["gpus"].append(g)
        try:
            out["mps_daemons"] = [
                {
                    "device": str(d.ref),
                    "uuid": d.device_uuid,
                    "pipe_dir": str(d.pipe_dir),
                    "pid": d.pid,
                }
                for d in backend.mps_daemons()
            ]
        except StgsError as exc:
            out["mps_error"] = str(exc)
        return out
