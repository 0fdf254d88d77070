"""MIG layout files: stgs's own placement-exact form (``stgs.mig/v1``), and the bridge between a
plan, that form and NVIDIA mig-parted configs (:mod:`stgs.migparted`)::

    format: stgs.mig/v1
    name: stgs-plan               # the config name (and nvidia.com/mig.config label value)
    gpus:
      - index: 0                  # the GPU's index on the node
        sku: H100-80GB
        mig: true
        placements:               # exact: each GPU instance's profile and start memory slice
          - {profile: 3g.40gb, start: 0}
          - {profile: 1g.10gb, start: 4}
      - {index: 1, sku: H100-80GB, mig: false}

mig-parted's ``version: v1`` holds instance counts per profile, not placements: a layout
exported to it and imported back keeps its counts, but the import chooses the placements
(:func:`stgs.migparted.place_counts`, a deterministic best fit), which may differ from the
exported ones. Through this form a round trip is exact. Every file is checked whole (unknown
keys, a SKU not in the catalog, a GPU listed twice, placements that break the MIG rules) before
anything uses it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stgs.catalog import MigLayout, MigPlacement, canonical_layout, get_sku, layout_violation
from stgs.errors import ConfigError, validation_message
from stgs.migparted import MIG_PARTED_VERSION, export_mig_parted, import_mig_parted
from stgs.plan import Plan
from stgs.scenario import SkuName
from stgs.transition import gpu_layout

__all__ = [
    "DEFAULT_NAME",
    "MIG_FORMAT",
    "GpuLayout",
    "NodeLayouts",
    "check_config_name",
    "file_kind",
    "from_mapping",
    "from_mig_parted",
    "from_plan",
]

MIG_FORMAT = "stgs.mig/v1"
DEFAULT_NAME = "stgs-plan"

# A Kubernetes label value (the GPU Operator selects a config by nvidia.com/mig.config=NAME):
# at most 63 characters, alphanumeric at both ends, '-', '_' and '.' inside.
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def check_config_name(name: str) -> str:
    """``name`` when it can be a node label value (the config's name on the GPU Operator)."""
    if not _LABEL_VALUE.match(name):
        raise ConfigError(
            f"config name {name!r}: it becomes the label value nvidia.com/mig.config={name}, so"
            " at most 63 characters, letters and digits at both ends, '-', '_' or '.' inside"
        )
    return name


@dataclass(frozen=True)
class GpuLayout:
    """One GPU's MIG state: its layout in canonical form, or None for MIG disabled."""

    index: int
    sku: str
    layout: MigLayout | None

    def describe(self) -> str:
        if self.layout is None:
            what = "MIG disabled"
        elif not self.layout:
            what = "MIG enabled, no instance"
        else:
            what = ", ".join(str(p) for p in self.layout)
        return f"gpu {self.index} ({self.sku}): {what}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"index": self.index, "sku": self.sku, "mig": self.layout is not None}
        if self.layout is not None:
            d["placements"] = [{"profile": p.profile, "start": p.start} for p in self.layout]
        return d


@dataclass(frozen=True)
class NodeLayouts:
    """The MIG layouts of (some of) a node's GPUs, by GPU index, under one config name."""

    name: str
    gpus: tuple[GpuLayout, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"format": MIG_FORMAT, "name": self.name, "gpus": [g.to_dict() for g in self.gpus]}

    def to_text(self, fmt: Literal["yaml", "json"] = "yaml") -> str:
        """stgs's form as YAML (placements one per line, in flow style) or JSON."""
        d = self.to_dict()
        if fmt == "json":
            return json.dumps(d, indent=2) + "\n"
        for g in d["gpus"]:
            if "placements" in g:
                g["placements"] = [_Flow(p) for p in g["placements"]]
        return yaml.dump(d, Dumper=_Dumper, sort_keys=False, default_flow_style=False)

    def to_mig_parted(self) -> str:
        """The mig-parted ``version: v1`` YAML of these layouts: profile counts only (the
        placements are mig-parted's to choose when it applies them). GPUs 0..n-1 must all be
        there: mig-parted's ``devices: all`` and index lists address the node's GPUs."""
        indexes = [g.index for g in self.gpus]
        if indexes != list(range(len(indexes))):
            raise ConfigError(
                f"a mig-parted export needs the layouts of GPUs 0..n-1 in order, got {indexes}"
            )
        skus = {g.sku for g in self.gpus}
        text = export_mig_parted(
            {self.name: [g.layout for g in self.gpus]},
            sku=next(iter(skus)) if len(skus) == 1 else None,
        )
        head = (
            f"# mig-parted config {self.name!r} written by stgs: instance counts per profile"
            " only.\n# mig-parted chooses the placements when it applies it; stgs's exact"
            " placements: `stgs mig export --format stgs`.\n"
        )
        return head + text


class _Flow(dict[str, Any]):
    """A mapping written in flow style: ``{profile: 3g.40gb, start: 0}``."""


class _Dumper(yaml.SafeDumper):
    pass


def _represent_flow(dumper: yaml.SafeDumper, data: _Flow) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=True)


_Dumper.add_representer(_Flow, _represent_flow)


# ------------------------------------------------------------------------------- reading
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _PlacementEntry(_Strict):
    profile: str = Field(min_length=1)
    start: int = Field(ge=0)


class _GpuEntry(_Strict):
    index: int = Field(ge=0, le=4095)
    sku: SkuName
    mig: bool
    placements: list[_PlacementEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _valid_layout(self) -> _GpuEntry:
        sku = get_sku(self.sku)
        if not self.mig:
            if self.placements:
                raise ValueError(f"GPU {self.index}: placements given while mig is false")
            return self
        if not sku.supports_mig:
            raise ValueError(f"GPU {self.index}: {sku.name} does not support MIG (mig: true)")
        why = layout_violation(sku, self.layout() or ())
        if why is not None:
            raise ValueError(f"GPU {self.index}: not a valid {sku.name} layout: {why}")
        return self

    def layout(self) -> MigLayout | None:
        if not self.mig:
            return None
        return canonical_layout(MigPlacement(p.start, p.profile) for p in self.placements)


class _FileEntry(_Strict):
    format: str
    name: str = DEFAULT_NAME
    gpus: list[_GpuEntry] = Field(min_length=1)

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v != MIG_FORMAT:
            raise ValueError(f"unknown format {v!r}; this stgs reads {MIG_FORMAT}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            return check_config_name(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc

    @model_validator(mode="after")
    def _unique(self) -> _FileEntry:
        seen: set[int] = set()
        for g in self.gpus:
            if g.index in seen:
                raise ValueError(f"GPU {g.index} is listed twice")
            seen.add(g.index)
        return self


def file_kind(data: Any) -> Literal["stgs", "mig-parted"]:
    """Which form a parsed file is: stgs's (``format:``) or mig-parted's (``version:``)."""
    if isinstance(data, Mapping):
        if "format" in data:
            return "stgs"
        if "version" in data or "mig-configs" in data:
            return "mig-parted"
    raise ConfigError(
        f"not a MIG layout file: expected stgs's form (format: {MIG_FORMAT}) or a mig-parted"
        f" config (version: {MIG_PARTED_VERSION})"
    )


def from_mapping(data: Any, source: str = "MIG layout file") -> NodeLayouts:
    """stgs's form, read exactly (the placements as written, in canonical order)."""
    try:
        f = _FileEntry.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {validation_message(exc)}") from exc
    gpus = tuple(GpuLayout(g.index, g.sku, g.layout()) for g in sorted(f.gpus, key=_index))
    return NodeLayouts(f.name, gpus)


def _index(g: _GpuEntry) -> int:
    return g.index


def from_mig_parted(
    source: str | Mapping[str, Any],
    skus: str | Sequence[str],
    config_name: str,
    *,
    gpu_count: int | None = None,
    device_id: str | int | None = None,
) -> NodeLayouts:
    """The layouts mig-parted config ``config_name`` asks for, placements chosen by best fit.

    ``skus``: one SKU for every GPU, or the node's SKUs by GPU index (then the node has that
    many GPUs). An entry with ``devices: all`` covers GPUs 0..``gpu_count``-1, so it needs the
    node's GPU count (``gpu_count`` or the length of ``skus``).
    """
    per_gpu = [skus] if isinstance(skus, str) else list(skus)
    count = gpu_count if gpu_count is not None else (None if isinstance(skus, str) else len(skus))
    if count is not None and count < 1:
        raise ConfigError(f"the node's GPU count must be >= 1, got {count}")
    names = sorted({get_sku(s).name for s in per_gpu})
    imported = {n: import_mig_parted(source, n, config_name, device_id=device_id) for n in names}
    keys = next(iter(imported.values())).keys()
    if "all" in keys:
        if count is None:
            raise ConfigError(
                f"mig-parted config {config_name!r} applies to 'devices: all': give the node's"
                " GPU count"
            )
        indexes = list(range(count))
    else:
        indexes = sorted(int(k) for k in keys)
        if count is not None and indexes[-1] >= count:
            raise ConfigError(
                f"mig-parted config {config_name!r} lists GPU {indexes[-1]}; the node has"
                f" {count} GPU(s)"
            )
    gpus = []
    for i in indexes:
        sku = get_sku(per_gpu[0] if isinstance(skus, str) else per_gpu[i]).name
        found = imported[sku]
        gpus.append(GpuLayout(i, sku, found["all"] if "all" in found else found[i]))
    return NodeLayouts(check_config_name(config_name), tuple(gpus))


def from_plan(plan: Plan, name: str = DEFAULT_NAME) -> NodeLayouts:
    """The MIG layout of every GPU of ``plan`` (None where the plan keeps MIG off)."""
    gpus = []
    for g in plan.gpus:
        sku = get_sku(g.sku)
        layout = gpu_layout(g) if g.mig else None
        if layout is not None:
            why = layout_violation(sku, layout)
            if why is not None:
                raise ConfigError(f"the plan's GPU {g.index} has no valid {sku.name} layout: {why}")
        gpus.append(GpuLayout(g.index, sku.name, layout))
    if not gpus:
        raise ConfigError("the plan has no GPU")
    return NodeLayouts(check_config_name(name), tuple(sorted(gpus, key=lambda x: x.index)))
