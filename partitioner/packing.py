"""Packing partitions onto GPUs: MPS shares (sum <= 100%) and MIG instances (placement rules).

A GPU takes its mode from the first partition packed onto it: MIG instances (and MPS inside
them) only go to GPUs in MIG mode, whole-GPU and MPS partitions only to GPUs without MIG.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from stgs.catalog import MigPlacement, canonical_layout, enumerate_layouts, free_starts, get_sku


@dataclass
class Instance:
    """A MIG instance in a bin, with the MPS shares packed inside it (empty: used whole)."""

    profile: str
    start: int
    mps_pcts: list[int] = field(default_factory=list)

    @property
    def mps_free(self) -> int:
        return 100 - sum(self.mps_pcts)


@dataclass
class GpuBin:
    """One GPU being filled."""

    sku: str
    mig: bool | None = None  # None: empty, mode not chosen yet
    mps_pcts: list[int] = field(default_factory=list)  # non-MIG mode: shares (100 = whole)
    instances: list[Instance] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.mig is None

    @property
    def layout(self) -> tuple[MigPlacement, ...]:
        return canonical_layout(MigPlacement(i.start, i.profile) for i in self.instances)

    @property
    def mps_free(self) -> int:
        return 100 - sum(self.mps_pcts)

    def used_frac(self) -> float:
        if self.mig:
            sku = get_sku(self.sku)
            return sum(sku.mig_profile(i.profile).compute_slices for i in self.instances) / 7.0
        return sum(self.mps_pcts) / 100.0

    # ------------------------------------------------------------ non-MIG mode
    def can_take_mps(self, pct: int) -> bool:
        return self.mig is not True and self.mps_free >= pct

    def take_mps(self, pct: int) -> int:
        self.mig = False
        self.mps_pcts.append(pct)
        return len(self.mps_pcts) - 1

    # ------------------------------------------------------------ MIG mode
    def best_start(self, profile: str) -> int | None:
        """Where a new ``profile`` instance leaves the most room (None: it does not fit)."""
        if self.mig is False:
            return None
        return _best_start(self.sku, self.layout, profile)

    def take_instance(self, profile: str, start: int) -> Instance:
        self.mig = True
        inst = Instance(profile, start)
        self.instances.append(inst)
        return inst


@cache
def _best_start(sku_name: str, layout: tuple[MigPlacement, ...], profile: str) -> int | None:
    sku = get_sku(sku_name)
    if not sku.supports_mig:
        return None
    starts = free_starts(sku, layout, profile)
    if not starts:
        return None
    return max(
        starts,
        key=lambda s: (
            _extensions(sku_name, canonical_layout([*layout, MigPlacement(s, profile)])),
            s,
        ),
    )


@cache
def _layout_sets(sku: str) -> tuple[frozenset[MigPlacement], ...]:
    return tuple(frozenset(lay) for lay in enumerate_layouts(sku))


@cache
def _extensions(sku: str, layout: tuple[MigPlacement, ...]) -> int:
    """How many valid layouts contain ``layout``: a measure of the room it leaves."""
    have = frozenset(layout)
    return sum(1 for lay in _layout_sets(sku) if have <= lay)
