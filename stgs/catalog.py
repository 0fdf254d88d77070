"""The GPU catalog: SKUs, their MIG profiles and the MIG placement rules.

These tables serve simulated GPUs, the planner and tests. At run time the daemon reads the real
catalog from NVML (its backend); where NVML and these tables disagree, NVML is right.

Placement rules (NVIDIA MIG user guide, mig-parted, NVML headers; see docs/architecture.md):

* a GPU instance occupies ``memory_slices`` consecutive memory slices (8 per GPU) from a
  ``start`` that its profile allows (``nvmlDeviceGetGpuInstancePossiblePlacements``);
* instances never overlap in memory slices;
* at most 7 compute slices are in use, and at most ``max_count`` instances of a profile.

Media-extension profiles (``+me``) are left out: they add video engines, not compute, and stgs
plans DNN inference.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache

from stgs.errors import MigLayoutError, UnknownSkuError

__all__ = [
    "SKUS",
    "GpuSku",
    "MigLayout",
    "MigPlacement",
    "MigProfile",
    "canonical_layout",
    "enumerate_layouts",
    "free_starts",
    "get_sku",
    "layout_violation",
]


@dataclass(frozen=True)
class MigProfile:
    """A GPU-instance profile, e.g. ``3g.40gb`` on an H100."""

    name: str
    compute_slices: int
    memory_slices: int  # the placement size, in memory slices (8 per GPU)
    sm_count: int
    memory_mib: int
    max_count: int
    starts: tuple[int, ...]  # allowed placement starts, in memory slices

    @property
    def fraction(self) -> float:
        """Share of the GPU's compute this instance takes (compute slices / 7)."""
        return self.compute_slices / 7.0


@dataclass(frozen=True, order=True)
class MigPlacement:
    """One GPU instance of a layout: a profile at a start position (in memory slices)."""

    start: int
    profile: str

    def __str__(self) -> str:
        return f"{self.profile}@{self.start}"


MigLayout = tuple[MigPlacement, ...]
"""A MIG layout in canonical form: placements sorted by start, then profile name."""


@dataclass(frozen=True)
class GpuSku:
    """A GPU model. ``mig_profiles`` is empty for GPUs without MIG."""

    name: str
    sm_count: int
    memory_mib: int
    mig_profiles: tuple[MigProfile, ...] = ()
    compute_slices: int = 7
    memory_slices: int = 8
    mps_max_clients: int = 48
    aliases: tuple[str, ...] = field(default=(), compare=False)

    @property
    def supports_mig(self) -> bool:
        return bool(self.mig_profiles)

    def mig_profile(self, name: str) -> MigProfile:
        for p in self.mig_profiles:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.mig_profiles) or "none (no MIG)"
        raise MigLayoutError(f"{self.name} has no MIG profile {name!r}; known: {known}")

    def mps_sm_count(self, pct: float, within_sm: int | None = None) -> int:
        """SMs a client at ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=pct`` gets: whole TPCs (even).

        Measured on an H200 (132 SMs): 20% -> 26, 40% -> 52, 50% -> 66, 60% -> 78, 80% -> 104.
        ``within_sm`` is the SM count of the MIG instance when MPS runs inside one.
        """
        total = self.sm_count if within_sm is None else within_sm
        if not 0 < pct <= 100:
            raise ValueError(f"MPS share must be in (0, 100], got {pct}")
        sms = int(total * pct / 100.0 + 1e-9)
        sms -= sms % 2
        return max(2, min(total, sms))


def _profiles(
    rows: Iterable[tuple[str, int, int, int, int, int, tuple[int, ...]]],
) -> tuple[MigProfile, ...]:
    return tuple(MigProfile(*row) for row in rows)


_1G = tuple(range(7))
_1G_DOUBLE = (0, 2, 4, 6)
_2G = (0, 2, 4)
_3G = (0, 4)
_4G = (0,)
_7G = (0,)

# (name, compute slices, memory slices, SMs, memory MiB, max count, starts)
_A100_40 = _profiles(
    [
        ("1g.5gb", 1, 1, 14, 4864, 7, _1G),
        ("1g.10gb", 1, 2, 14, 9984, 4, _1G_DOUBLE),
        ("2g.10gb", 2, 2, 28, 9984, 3, _2G),
        ("3g.20gb", 3, 4, 42, 20096, 2, _3G),
        ("4g.20gb", 4, 4, 56, 20096, 1, _4G),
        ("7g.40gb", 7, 8, 98, 40448, 1, _7G),
    ]
)
_A100_80 = _profiles(
    [
        ("1g.10gb", 1, 1, 14, 9984, 7, _1G),
        ("1g.20gb", 1, 2, 14, 20096, 4, _1G_DOUBLE),
        ("2g.20gb", 2, 2, 28, 20096, 3, _2G),
        ("3g.40gb", 3, 4, 42, 40448, 2, _3G),
        ("4g.40gb", 4, 4, 56, 40448, 1, _4G),
        ("7g.80gb", 7, 8, 98, 80896, 1, _7G),
    ]
)
_H100_80 = _profiles(
    [
        ("1g.10gb", 1, 1, 16, 9984, 7, _1G),
        ("1g.20gb", 1, 2, 26, 20096, 4, _1G_DOUBLE),
        ("2g.20gb", 2, 2, 32, 20096, 3, _2G),
        ("3g.40gb", 3, 4, 60, 40448, 2, _3G),
        ("4g.40gb", 4, 4, 64, 40448, 1, _4G),
        ("7g.80gb", 7, 8, 132, 80896, 1, _7G),
    ]
)
# Read through NVML on a lent H200 (MIG disabled): SM counts and memory as reported.
_H200_141 = _profiles(
    [
        ("1g.18gb", 1, 1, 16, 16384, 7, _1G),
        ("1g.35gb", 1, 2, 26, 33280, 4, _1G_DOUBLE),
        ("2g.35gb", 2, 2, 32, 33280, 3, _2G),
        ("3g.71gb", 3, 4, 60, 71424, 2, _3G),
        ("4g.71gb", 4, 4, 64, 71424, 1, _4G),
        ("7g.141gb", 7, 8, 132, 143360, 1, _7G),
    ]
)

SKUS: dict[str, GpuSku] = {
    sku.name: sku
    for sku in (
        GpuSku("A100-40GB", 108, 40960, _A100_40, aliases=("A100-SXM4-40GB", "A100-PCIE-40GB")),
        GpuSku("A100-80GB", 108, 81920, _A100_80, aliases=("A100-SXM4-80GB", "A100-PCIE-80GB")),
        GpuSku(
            "H100-80GB", 132, 81559, _H100_80, aliases=("H100", "H100-SXM5-80GB", "H100-80GB-HBM3")
        ),
        GpuSku("H200-141GB", 132, 143771, _H200_141, aliases=("H200",)),
        GpuSku("L4", 58, 23034),
        GpuSku("T4", 40, 15360),
        GpuSku("A10", 72, 23028),
        GpuSku("RTX-2080Ti", 68, 11264, aliases=("GeForce-RTX-2080-Ti", "RTX2080Ti")),
    )
}


def _norm(name: str) -> str:
    return name.strip().lower().replace(" ", "-").replace("_", "-")


def get_sku(name: str) -> GpuSku:
    """The catalog entry for ``name`` (case-insensitive; known aliases accepted)."""
    sku = SKUS.get(name)
    return sku if sku is not None else _lookup_sku(name)


@cache
def _lookup_sku(name: str) -> GpuSku:
    key = _norm(name)
    for sku in SKUS.values():
        if key == _norm(sku.name) or key in (_norm(a) for a in sku.aliases):
            return sku
    raise UnknownSkuError(f"unknown GPU SKU {name!r}; known: {', '.join(SKUS)}")


def canonical_layout(placements: Iterable[MigPlacement | tuple[str, int]]) -> MigLayout:
    """Placements sorted by start then profile: the one form layouts are compared in."""
    out = [p if isinstance(p, MigPlacement) else MigPlacement(p[1], p[0]) for p in placements]
    return tuple(sorted(out))


def layout_violation(sku: GpuSku, placements: Sequence[MigPlacement]) -> str | None:
    """Why ``placements`` is not a valid MIG layout of ``sku``, or None when it is."""
    if not sku.supports_mig:
        return f"{sku.name} does not support MIG"
    used = [False] * sku.memory_slices
    compute = 0
    counts: dict[str, int] = {}
    for pl in placements:
        try:
            prof = sku.mig_profile(pl.profile)
        except MigLayoutError as exc:
            return str(exc)
        if pl.start not in prof.starts:
            return f"{prof.name} cannot start at memory slice {pl.start} (allowed: {prof.starts})"
        for s in range(pl.start, pl.start + prof.memory_slices):
            if used[s]:
                return f"{pl} overlaps another instance at memory slice {s}"
            used[s] = True
        compute += prof.compute_slices
        counts[prof.name] = counts.get(prof.name, 0) + 1
        if counts[prof.name] > prof.max_count:
            return f"more than {prof.max_count} instances of {prof.name}"
    if compute > sku.compute_slices:
        return f"{compute} compute slices in use, at most {sku.compute_slices}"
    return None


def free_starts(sku: GpuSku, layout: Sequence[MigPlacement], profile: str) -> list[int]:
    """Starts at which one more ``profile`` instance can be added to ``layout``."""
    return list(_free_starts(sku, canonical_layout(layout), profile))


@cache
def _free_starts(sku: GpuSku, layout: MigLayout, profile: str) -> tuple[int, ...]:
    prof = sku.mig_profile(profile)
    out = []
    for start in prof.starts:
        cand = [*layout, MigPlacement(start, profile)]
        if layout_violation(sku, cand) is None:
            out.append(start)
    return tuple(out)


@cache
def enumerate_layouts(sku_name: str) -> tuple[MigLayout, ...]:
    """Every valid MIG layout of a SKU (the empty one included), in canonical form.

    Depth-first over candidate placements in canonical order, so each layout is produced once.
    """
    sku = get_sku(sku_name)
    if not sku.supports_mig:
        return ()
    cands = sorted(MigPlacement(s, p.name) for p in sku.mig_profiles for s in p.starts)
    out: list[MigLayout] = []

    def walk(i: int, current: list[MigPlacement]) -> None:
        out.append(tuple(current))
        for j in range(i, len(cands)):
            current.append(cands[j])
            if layout_violation(sku, current) is None:
                walk(j + 1, current)
            current.pop()

    walk(0, [])
    return tuple(out)
