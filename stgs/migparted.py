"""Import and export of NVIDIA mig-parted configs (``version: v1``).

The format (``api/spec/v1`` of NVIDIA/mig-parted)::

    version: v1
    mig-configs:
      NAME:                         # the GPU Operator label nvidia.com/mig.config=NAME
        - devices: all | [0, 1]     # GPU indexes of the node
          device-filter: "0x233010DE" | ["0x2330...", ...]   # optional: PCI device ids
          mig-enabled: true | false
          mig-devices: {"1g.10gb": 2, "3g.40gb": 1}            # counts only, no placements

Export turns the MIG layouts of a plan (one per GPU) into one named config, grouping GPUs whose
layouts have the same counts. Import reads one named config back for one SKU and, because
mig-parted gives counts only, chooses concrete placements with a deterministic best-fit search
over :func:`stgs.catalog.enumerate_layouts`.

Validation is strict, like mig-parted's own parser: unknown keys, a wrong version, a wrong type
or a device listed twice raise :class:`~stgs.errors.ConfigError`; a profile the SKU does not have
or counts that do not fit on the GPU raise :class:`~stgs.errors.MigLayoutError`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from functools import cache
from typing import Any, Literal, TypeAlias

import yaml

from stgs.catalog import (
    GpuSku,
    MigLayout,
    MigPlacement,
    enumerate_layouts,
    free_starts,
    get_sku,
    layout_violation,
)
from stgs.errors import ConfigError, MigLayoutError

__all__ = [
    "MIG_PARTED_VERSION",
    "DeviceKey",
    "config_names",
    "export_mig_parted",
    "import_mig_parted",
    "load_yaml",
    "mig_parted_counts",
    "mig_parted_spec",
    "place_counts",
]

MIG_PARTED_VERSION = "v1"

DeviceKey: TypeAlias = int | Literal["all"]
"""A GPU index of the node, or ``"all"`` for an entry with ``devices: all``."""

_TOP_KEYS = frozenset({"version", "mig-configs"})
_ENTRY_KEYS = frozenset({"device-filter", "devices", "mig-enabled", "mig-devices"})
_PROFILE_RE = re.compile(r"^(\d+)g\.(\d+)gb$")
_CI_PROFILE_RE = re.compile(r"^(\d+)c\.((\d+)g\.\d+gb)$")


# --------------------------------------------------------------------------------------------
# export


def mig_parted_counts(layout: Iterable[MigPlacement]) -> dict[str, int]:
    """The ``mig-devices`` mapping of a layout: instances per profile, in a stable order."""
    counts = Counter(pl.profile for pl in layout)
    return {name: counts[name] for name in sorted(counts, key=_profile_order)}


def mig_parted_spec(
    configs: Mapping[str, Sequence[MigLayout | None]],
    *,
    sku: GpuSku | str | None = None,
    use_all: bool = True,
) -> dict[str, Any]:
    """The mig-parted document (a plain mapping) for ``configs``.

    ``configs`` maps a config name to the layouts of GPUs 0, 1, ... of a node: a layout
    (possibly empty: MIG enabled with no instance) or ``None`` for MIG disabled. GPUs whose
    layouts have equal counts share one entry (``devices: [0, 2]``); when every GPU shares one
    and ``use_all`` is true, the entry says ``devices: all`` (apply it only to nodes whose GPUs
    the plan covers entirely). With ``sku``, every layout is checked against its MIG rules.
    """
    sku_obj = get_sku(sku) if isinstance(sku, str) else sku
    if not configs:
        raise ConfigError("mig-parted export needs at least one named config")
    out: dict[str, list[dict[str, Any]]] = {}
    for name, layouts in configs.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"mig-parted config names must be non-empty strings, got {name!r}")
        if isinstance(layouts, str | bytes) or len(layouts) == 0:
            raise ConfigError(f"config {name!r}: give one layout (or None) per GPU, got none")
        groups: dict[tuple[tuple[str, int], ...] | None, list[int]] = {}
        for index, layout in enumerate(layouts):
            key = None if layout is None else _export_key(name, index, layout, sku_obj)
            groups.setdefault(key, []).append(index)
        entries: list[dict[str, Any]] = []
        for key, indexes in groups.items():
            devices: str | list[int] = "all" if use_all and len(groups) == 1 else indexes
            entry: dict[str, Any] = {"devices": devices, "mig-enabled": key is not None}
            entry["mig-devices"] = {} if key is None else dict(key)
            entries.append(entry)
        out[name] = entries
    return {"version": MIG_PARTED_VERSION, "mig-configs": out}


def export_mig_parted(
    configs: Mapping[str, Sequence[MigLayout | None]],
    *,
    sku: GpuSku | str | None = None,
    use_all: bool = True,
) -> str:
    """The mig-parted YAML text for ``configs``; see :func:`mig_parted_spec`.

    A plan's layouts as one config: ``export_mig_parted({"stgs-plan": plan_layouts}, sku=sku)``.
    """
    spec = mig_parted_spec(configs, sku=sku, use_all=use_all)
    for entries in spec["mig-configs"].values():
        for entry in entries:
            if isinstance(entry["devices"], list):
                entry["devices"] = _FlowList(entry["devices"])
    return yaml.dump(spec, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


class _FlowList(list[int]):
    """GPU indexes, written in flow style as mig-parted's examples do: ``devices: [0, 1]``."""


class _Dumper(yaml.SafeDumper):
    pass


def _represent_flow_list(dumper: yaml.SafeDumper, data: _FlowList) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_Dumper.add_representer(_FlowList, _represent_flow_list)


def _export_key(
    name: str, index: int, layout: MigLayout, sku: GpuSku | None
) -> tuple[tuple[str, int], ...]:
    where = f"config {name!r}, GPU {index}"
    if isinstance(layout, str | bytes) or not all(isinstance(p, MigPlacement) for p in layout):
        raise ConfigError(f"{where}: a layout is a sequence of MigPlacement, got {layout!r}")
    if sku is not None:
        reason = layout_violation(sku, layout)
        if reason is not None:
            raise MigLayoutError(f"{where}: invalid {sku.name} layout: {reason}")
    return tuple(mig_parted_counts(layout).items())


def _profile_order(name: str) -> tuple[int, int, str]:
    """Larger instances first (as mig-parted flattens), then by memory, then by name."""
    m = _PROFILE_RE.match(name)
    if m is None:
        return (0, 0, name)
    return (-int(m.group(1)), -int(m.group(2)), name)


# --------------------------------------------------------------------------------------------
# import


def import_mig_parted(
    source: str | Mapping[str, Any],
    sku: GpuSku | str,
    config_name: str,
    *,
    device_id: str | int | None = None,
) -> dict[DeviceKey, MigLayout | None]:
    """The layouts that mig-parted config ``config_name`` asks for on GPUs of model ``sku``.

    ``source`` is the YAML text or the already-parsed mapping. The result maps each device key
    of the config (a GPU index, or ``"all"``) to a concrete layout in canonical form (placements
    chosen by :func:`place_counts`), or to ``None`` where the entry has ``mig-enabled: false``.

    Entries with a ``device-filter`` apply only to GPUs whose PCI device id (``device_id``, e.g.
    ``"0x233010DE"``) the filter lists; without ``device_id`` such entries are an error, since
    profile names alone do not tell GPU models apart. A GPU covered by two applicable entries
    is an error too (mig-parted would silently let the later one win).
    """
    sku_obj = get_sku(sku) if isinstance(sku, str) else sku
    if not sku_obj.supports_mig:
        raise MigLayoutError(f"{sku_obj.name} does not support MIG")
    spec = _load(source)
    configs = _parse_spec(spec)
    for name, entries in configs.items():  # the whole document must be well formed
        for i, raw in enumerate(entries):
            _parse_entry(raw, f"mig-configs.{name}[{i}]")
    if config_name not in configs:
        known = ", ".join(sorted(configs)) or "none"
        raise ConfigError(f"no mig-parted config {config_name!r}; known: {known}")
    wanted = _parse_device_id(device_id, "device_id") if device_id is not None else None

    out: dict[DeviceKey, MigLayout | None] = {}
    for i, raw in enumerate(configs[config_name]):
        where = f"mig-configs.{config_name}[{i}]"
        devices, filters, enabled, counts = _parse_entry(raw, where)
        if filters is not None:
            if wanted is None:
                raise ConfigError(f"{where} has a device-filter: pass device_id= to select entries")
            if wanted not in filters:
                continue
        try:
            layout = place_counts(sku_obj, counts) if enabled else None
        except MigLayoutError as exc:
            raise MigLayoutError(f"{where}: {exc}") from exc
        keys: list[DeviceKey] = ["all"] if devices == "all" else list(devices)
        for key in keys:
            if key in out or (key == "all" and out) or "all" in out:
                what = "devices: all" if key == "all" else f"GPU {key}"
                raise ConfigError(f"{where}: {what} overlaps an earlier entry of {config_name!r}")
            out[key] = layout
    if not out:
        raise ConfigError(
            f"mig-parted config {config_name!r} has no entry for device id {device_id!r}"
        )
    return out


def place_counts(sku: GpuSku | str, counts: Mapping[str, int]) -> MigLayout:
    """A concrete layout with exactly ``counts`` instances per profile (deterministic best fit).

    Among the valid layouts with these counts, take the one that leaves the most room: the
    largest instance that can still be added, then the most (profile, start) pairs that can
    still be added, then the first in canonical order. Raises MigLayoutError when none exists.
    """
    sku_obj = get_sku(sku) if isinstance(sku, str) else sku
    if not sku_obj.supports_mig:
        raise MigLayoutError(f"{sku_obj.name} does not support MIG")
    wanted: dict[str, int] = {}
    for name, n in counts.items():
        prof = sku_obj.mig_profile(_normalise_profile(name))  # MigLayoutError if unknown
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise MigLayoutError(f"count of {name!r} must be an integer >= 0, got {n!r}")
        if n:
            wanted[prof.name] = wanted.get(prof.name, 0) + n
    key = tuple(sorted(wanted.items()))
    found = _best_layouts(sku_obj.name).get(key)
    if found is not None:
        return found
    raise MigLayoutError(f"{sku_obj.name} cannot hold {dict(key)}: {_why_not(sku_obj, wanted)}")


@cache
def _best_layouts(sku_name: str) -> dict[tuple[tuple[str, int], ...], MigLayout]:
    """For each multiset of profiles that fits, its best-fit layout (see place_counts)."""
    sku = get_sku(sku_name)
    best: dict[tuple[tuple[str, int], ...], tuple[tuple[int, int], MigLayout]] = {}
    for layout in enumerate_layouts(sku.name):
        key = tuple(sorted(Counter(pl.profile for pl in layout).items()))
        addable = [(p, free_starts(sku, layout, p.name)) for p in sku.mig_profiles]
        largest = max((p.compute_slices for p, starts in addable if starts), default=0)
        room = (-largest, -sum(len(starts) for _, starts in addable))
        if key not in best or (room, layout) < best[key]:
            best[key] = (room, layout)
    return {key: layout for key, (_, layout) in best.items()}


def _why_not(sku: GpuSku, wanted: Mapping[str, int]) -> str:
    for name, n in wanted.items():
        prof = sku.mig_profile(name)
        if n > prof.max_count:
            return f"at most {prof.max_count} instances of {name}"
    compute = sum(sku.mig_profile(name).compute_slices * n for name, n in wanted.items())
    if compute > sku.compute_slices:
        return f"{compute} compute slices wanted, at most {sku.compute_slices}"
    memory = sum(sku.mig_profile(name).memory_slices * n for name, n in wanted.items())
    if memory > sku.memory_slices:
        return f"{memory} memory slices wanted, at most {sku.memory_slices}"
    return "no placement of these instances avoids overlapping memory slices"


def _normalise_profile(name: object) -> str:
    """``"3c.3g.40gb"`` (one compute instance filling its GPU instance) is ``"3g.40gb"``."""
    if not isinstance(name, str):
        raise MigLayoutError(f"MIG profile names are strings, got {name!r}")
    m = _CI_PROFILE_RE.match(name)
    if m is None:
        return name
    if m.group(1) != m.group(3):
        raise MigLayoutError(
            f"compute-instance profile {name!r} is not supported (stgs uses one compute "
            "instance per GPU instance)"
        )
    return m.group(2)


class _StrictLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects duplicate mapping keys."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Hashable, Any]:
    seen: set[Hashable] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise ConfigError(f"duplicate key {key!r} (line {line})")
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, what: str = "mig-parted config") -> Any:
    """YAML (or JSON) text parsed safely; a duplicate key or bad YAML is a ConfigError that
    names ``what``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {_yaml_problem(exc)}") from exc
    except ConfigError as exc:  # a duplicate key
        raise ConfigError(f"{what}: {exc}") from exc


def config_names(source: str | Mapping[str, Any]) -> list[str]:
    """The names of a mig-parted document's configs, in file order (the document checked)."""
    return list(_parse_spec(_load(source)))


def _load(source: str | Mapping[str, Any]) -> Mapping[str, Any]:
    data = load_yaml(source) if isinstance(source, str) else source
    if not isinstance(data, Mapping):
        raise ConfigError(f"a mig-parted config is a mapping, got {type(data).__name__}")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        return f"{exc.problem} (line {exc.problem_mark.line + 1})"
    return " ".join(str(exc).split()) or type(exc).__name__


def _parse_spec(spec: Mapping[str, Any]) -> dict[str, list[Any]]:
    unknown = sorted(str(k) for k in spec if k not in _TOP_KEYS)
    if unknown:
        raise ConfigError(f"unexpected mig-parted field(s): {', '.join(unknown)}")
    if "version" not in spec:
        raise ConfigError("mig-parted config lacks the 'version' field")
    if spec["version"] != MIG_PARTED_VERSION:
        raise ConfigError(
            f"unknown mig-parted version {spec['version']!r}; supported: {MIG_PARTED_VERSION}"
        )
    configs = spec.get("mig-configs")
    if not isinstance(configs, Mapping) or not configs:
        raise ConfigError("'mig-configs' must be a mapping with at least one entry")
    out: dict[str, list[Any]] = {}
    for name, entries in configs.items():
        if not isinstance(name, str):
            raise ConfigError(f"mig-parted config names are strings, got {name!r}")
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"mig-configs.{name} must be a list with at least one entry")
        out[name] = entries
    return out


def _parse_entry(
    raw: Any, where: str
) -> tuple[Literal["all"] | list[int], frozenset[int] | None, bool, dict[str, int]]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in _ENTRY_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unexpected field(s): {', '.join(unknown)}")
    for required in ("devices", "mig-enabled"):
        if required not in raw:
            raise ConfigError(f"{where}: missing required field {required!r}")

    devices_raw = raw["devices"]
    devices: Literal["all"] | list[int]
    if devices_raw == "all":
        devices = "all"
    elif (
        isinstance(devices_raw, list)
        and devices_raw
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices_raw)
    ):
        if len(set(devices_raw)) != len(devices_raw):
            raise ConfigError(f"{where}.devices lists a GPU twice: {devices_raw}")
        devices = list(devices_raw)
    else:
        raise ConfigError(
            f"{where}.devices must be 'all' or a non-empty list of GPU indexes, got {devices_raw!r}"
        )

    filters: frozenset[int] | None = None
    if "device-filter" in raw:
        f = raw["device-filter"]
        items = [f] if isinstance(f, str) else f
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{where}.device-filter must be a string or a list of strings")
        filters = frozenset(_parse_device_id(x, f"{where}.device-filter") for x in items)

    enabled = raw["mig-enabled"]
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}.mig-enabled must be true or false, got {enabled!r}")

    mig_devices = raw.get("mig-devices")
    if mig_devices is None:
        if enabled:
            raise ConfigError(f"{where}: 'mig-devices' is required when 'mig-enabled' is true")
        mig_devices = {}
    if not isinstance(mig_devices, Mapping):
        raise ConfigError(f"{where}.mig-devices must be a mapping of profile name to count")
    counts: dict[str, int] = {}
    for name, n in mig_devices.items():
        if not isinstance(name, str):
            raise ConfigError(f"{where}.mig-devices: profile names are strings, got {name!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"{where}.mig-devices.{name}: count must be an integer >= 0")
        counts[name] = n
    if not enabled and any(counts.values()):
        raise ConfigError(f"{where}: MIG devices given while 'mig-enabled' is false")
    return devices, filters, enabled, counts


def _parse_device_id(value: object, where: str) -> int:
    """A PCI device id as mig-parted writes it (``"0x233010DE"``: device, then vendor)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        try:
            return int(value, 16)
        except ValueError:
            pass
    raise ConfigError(f"{where}: not a PCI device id like '0x233010DE': {value!r}")
