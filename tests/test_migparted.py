"""mig-parted config import and export (stgs.migparted)."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from stgs.catalog import (
    MigLayout,
    canonical_layout,
    enumerate_layouts,
    free_starts,
    get_sku,
    layout_violation,
)
from stgs.errors import ConfigError, MigLayoutError
from stgs.migparted import (
    export_mig_parted,
    import_mig_parted,
    mig_parted_counts,
    mig_parted_spec,
    place_counts,
)

H100 = get_sku("H100")
MIG_SKUS = ["A100-40GB", "A100-80GB", "H100-80GB", "H200-141GB"]


def counts(layout: MigLayout) -> Counter[str]:
    return Counter(p.profile for p in layout)


def maximal_layouts(sku_name: str) -> list[MigLayout]:
    sku = get_sku(sku_name)
    return [
        lay
        for lay in enumerate_layouts(sku_name)
        if all(not free_starts(sku, lay, p.name) for p in sku.mig_profiles)
    ]


def lay(*pl: tuple[str, int]) -> MigLayout:
    return canonical_layout(pl)


def doc(*entries: dict[str, Any], name: str = "cfg") -> dict[str, Any]:
    return {"version": "v1", "mig-configs": {name: list(entries)}}


def entry(devices: Any = "all", enabled: Any = True, **mig_devices: int) -> dict[str, Any]:
    return {
        "devices": devices,
        "mig-enabled": enabled,
        "mig-devices": {k.replace("_", "."): v for k, v in mig_devices.items()},
    }


# --------------------------------------------------------------------------------------------
# round trips


def test_every_maximal_h100_layout_round_trips() -> None:
    maximal = maximal_layouts("H100")
    assert len(maximal) == 78
    for layout in maximal:
        text = export_mig_parted({"plan": [layout]}, sku=H100)
        got = import_mig_parted(text, "H100", "plan")
        assert list(got) == ["all"]
        back = got["all"]
        assert back is not None
        assert counts(back) == counts(layout)
        assert layout_violation(H100, back) is None
        assert back == canonical_layout(back)


@pytest.mark.parametrize("sku_name", MIG_SKUS)
def test_every_layout_round_trips_on_every_sku(sku_name: str) -> None:
    sku = get_sku(sku_name)
    layouts = enumerate_layouts(sku_name)
    spec = mig_parted_spec({"all-layouts": list(layouts)}, sku=sku, use_all=False)
    got = import_mig_parted(yaml.safe_dump(spec), sku, "all-layouts")
    assert sorted(k for k in got if k != "all") == list(range(len(layouts)))
    for index, layout in enumerate(layouts):
        back = got[index]
        assert back is not None
        assert counts(back) == counts(layout)
        assert layout_violation(sku, back) is None
        # placing a layout's own counts gives the same answer whatever layout they came from
        assert place_counts(sku, mig_parted_counts(layout)) == back


def test_plan_export_groups_equal_layouts() -> None:
    a = lay(("3g.40gb", 0), ("3g.40gb", 4))
    a_moved = lay(("3g.40gb", 4), ("3g.40gb", 0))
    b = lay(("4g.40gb", 0), ("2g.20gb", 4), ("1g.10gb", 6))
    text = export_mig_parted({"stgs-plan": [a, b, a_moved, None, ()]}, sku="h100")
    parsed = yaml.safe_load(text)
    assert parsed == {
        "version": "v1",
        "mig-configs": {
            "stgs-plan": [
                {"devices": [0, 2], "mig-enabled": True, "mig-devices": {"3g.40gb": 2}},
                {
                    "devices": [1],
                    "mig-enabled": True,
                    "mig-devices": {"4g.40gb": 1, "2g.20gb": 1, "1g.10gb": 1},
                },
                {"devices": [3], "mig-enabled": False, "mig-devices": {}},
                {"devices": [4], "mig-enabled": True, "mig-devices": {}},
            ]
        },
    }
    assert "devices: [0, 2]" in text
    got = import_mig_parted(text, "H100", "stgs-plan")
    assert got == {0: a, 1: b, 2: a, 3: None, 4: ()}


def test_export_all_devices_and_several_configs() -> None:
    seven = lay(("7g.80gb", 0))
    spec = mig_parted_spec({"whole": [seven, seven], "off": [None]})
    assert spec["mig-configs"]["whole"] == [
        {"devices": "all", "mig-enabled": True, "mig-devices": {"7g.80gb": 1}}
    ]
    assert spec["mig-configs"]["off"] == [
        {"devices": "all", "mig-enabled": False, "mig-devices": {}}
    ]
    explicit = mig_parted_spec({"whole": [seven, seven]}, use_all=False)
    assert explicit["mig-configs"]["whole"][0]["devices"] == [0, 1]
    text = export_mig_parted({"whole": [seven, seven], "off": [None]})
    assert import_mig_parted(text, "H100", "whole") == {"all": seven}
    assert import_mig_parted(text, "H100", "off") == {"all": None}


def test_mig_parted_counts_order() -> None:
    layout = lay(("1g.10gb", 6), ("2g.20gb", 4), ("1g.20gb", 2), ("1g.10gb", 0), ("1g.10gb", 1))
    assert list(mig_parted_counts(layout).items()) == [
        ("2g.20gb", 1),
        ("1g.20gb", 1),
        ("1g.10gb", 3),
    ]


# --------------------------------------------------------------------------------------------
# placement search


def test_best_fit_placements() -> None:
    # small instances go high, keeping the 4g (start 0 only) and the 3g at 0 possible
    assert place_counts(H100, {"1g.10gb": 1}) == lay(("1g.10gb", 6))
    assert place_counts(H100, {"3g.40gb": 1}) == lay(("3g.40gb", 4))
    assert place_counts(H100, {"2g.20gb": 1}) == lay(("2g.20gb", 4))
    # two 1g keep slice 6-7 for a 1g.20gb
    assert place_counts(H100, {"1g.10gb": 2}) == lay(("1g.10gb", 4), ("1g.10gb", 5))
    assert place_counts(H100, {}) == ()
    assert place_counts(H100, {"1g.10gb": 0}) == ()
    assert place_counts("H100", {"4g.40gb": 1, "3g.40gb": 1}) == lay(("4g.40gb", 0), ("3g.40gb", 4))


@pytest.mark.parametrize(
    ("wanted", "why"),
    [
        ({"4g.40gb": 2}, "at most 1 instances of 4g.40gb"),
        ({"1g.10gb": 8}, "at most 7 instances"),
        ({"4g.40gb": 1, "2g.20gb": 2}, "8 compute slices wanted"),
        ({"7g.80gb": 1, "1g.10gb": 1}, "8 compute slices wanted"),
        ({"1g.10gb": 7, "1g.20gb": 1}, "8 compute slices wanted"),
        ({"1g.20gb": 4, "1g.10gb": 1}, "9 memory slices wanted"),
    ],
)
def test_counts_that_do_not_fit(wanted: dict[str, int], why: str) -> None:
    with pytest.raises(MigLayoutError) as info:
        place_counts(H100, wanted)
    msg = str(info.value)
    assert "H100-80GB cannot hold" in msg
    assert why in msg
    assert "\n" not in msg


@pytest.mark.parametrize("sku_name", MIG_SKUS)
def test_counts_fit_iff_totals_fit(sku_name: str) -> None:
    """With these placement tables, counts fit on the GPU exactly when the per-profile counts,
    the compute slices (<= 7) and the memory slices (<= 8) do: placement never adds a limit."""
    sku = get_sku(sku_name)
    profiles = sku.mig_profiles
    fitting = {
        tuple(counts(layout)[p.name] for p in profiles) for layout in enumerate_layouts(sku_name)
    }
    for ns in itertools.product(*(range(p.max_count + 2) for p in profiles)):
        by_totals = (
            all(n <= p.max_count for p, n in zip(profiles, ns, strict=True))
            and sum(p.compute_slices * n for p, n in zip(profiles, ns, strict=True)) <= 7
            and sum(p.memory_slices * n for p, n in zip(profiles, ns, strict=True)) <= 8
        )
        assert (ns in fitting) == by_totals, ns


def test_place_counts_rejects_bad_input() -> None:
    with pytest.raises(MigLayoutError, match=r"no MIG profile '1g\.5gb'"):
        place_counts(H100, {"1g.5gb": 1})
    with pytest.raises(MigLayoutError, match="integer >= 0"):
        place_counts(H100, {"1g.10gb": -1})
    with pytest.raises(MigLayoutError, match="does not support MIG"):
        place_counts("L4", {})
    assert place_counts(H100, {"3c.3g.40gb": 2}) == lay(("3g.40gb", 0), ("3g.40gb", 4))
    with pytest.raises(MigLayoutError, match="compute-instance profile"):
        place_counts(H100, {"1c.3g.40gb": 1})


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(MIG_SKUS),
    st.data(),
)
def test_place_counts_fits_exactly_when_some_layout_does(
    sku_name: str, data: st.DataObject
) -> None:
    sku = get_sku(sku_name)
    names = [p.name for p in sku.mig_profiles]
    wanted = data.draw(st.dictionaries(st.sampled_from(names), st.integers(0, 8), max_size=6))
    want = Counter({k: v for k, v in wanted.items() if v})
    exists = any(counts(lay_) == want for lay_ in enumerate_layouts(sku_name))
    if exists:
        got = place_counts(sku, wanted)
        assert counts(got) == want
        assert layout_violation(sku, got) is None
        assert place_counts(sku, dict(reversed(list(wanted.items())))) == got
    else:
        with pytest.raises(MigLayoutError, match="cannot hold"):
            place_counts(sku, wanted)


# --------------------------------------------------------------------------------------------
# import: a config as NVIDIA writes it

NVIDIA_STYLE = """\
version: v1
mig-configs:
  all-disabled:
    - devices: all
      mig-enabled: false

  all-1g.10gb:
    - devices: all
      mig-enabled: true
      mig-devices:
        "1g.10gb": 7

  all-balanced:
    - device-filter: ["0x233010DE", "0x233110DE"]
      devices: all
      mig-enabled: true
      mig-devices:
        "1g.10gb": 2
        "2g.20gb": 1
        "3g.40gb": 1
    - device-filter: "0x20B010DE"
      devices: all
      mig-enabled: true
      mig-devices:
        "1g.5gb": 2
        "2g.10gb": 1
        "3g.20gb": 1

  custom:
    - devices: [0, 1]
      mig-enabled: true
      mig-devices:
        "3g.40gb": 2
    - devices: [2]
      mig-enabled: false
      mig-devices: {}
    - devices: [3]
      mig-enabled: true
      mig-devices:
        "1g.20gb": 1
        "1g.10gb": 0
"""


def test_import_nvidia_style_config() -> None:
    assert import_mig_parted(NVIDIA_STYLE, H100, "all-disabled") == {"all": None}
    seven = import_mig_parted(NVIDIA_STYLE, "h100", "all-1g.10gb")["all"]
    assert seven == lay(*[("1g.10gb", s) for s in range(7)])
    custom = import_mig_parted(NVIDIA_STYLE, H100, "custom")
    assert custom == {
        0: lay(("3g.40gb", 0), ("3g.40gb", 4)),
        1: lay(("3g.40gb", 0), ("3g.40gb", 4)),
        2: None,
        3: lay(("1g.20gb", 6)),
    }
    balanced = import_mig_parted(NVIDIA_STYLE, H100, "all-balanced", device_id="0x233010de")
    got = balanced["all"]
    assert got is not None and layout_violation(H100, got) is None
    assert counts(got) == Counter({"1g.10gb": 2, "2g.20gb": 1, "3g.40gb": 1})
    a100 = import_mig_parted(NVIDIA_STYLE, "A100-40GB", "all-balanced", device_id=0x20B010DE)
    assert a100["all"] is not None and counts(a100["all"])["3g.20gb"] == 1
    parsed = yaml.safe_load(NVIDIA_STYLE)
    assert import_mig_parted(parsed, H100, "custom") == custom


def test_device_filter_needs_device_id() -> None:
    with pytest.raises(ConfigError, match="pass device_id"):
        import_mig_parted(NVIDIA_STYLE, H100, "all-balanced")
    with pytest.raises(ConfigError, match="no entry for device id"):
        import_mig_parted(NVIDIA_STYLE, H100, "all-balanced", device_id="0x1234ABCD")
    with pytest.raises(ConfigError, match="not a PCI device id"):
        import_mig_parted(NVIDIA_STYLE, H100, "all-balanced", device_id="H100")


# --------------------------------------------------------------------------------------------
# import: strict validation, one-line messages

BAD_CONFIGS: list[tuple[Any, type[Exception], str]] = [
    ("version: v2\nmig-configs: {cfg: []}", ConfigError, "unknown mig-parted version 'v2'"),
    ({"mig-configs": {"cfg": [entry()]}}, ConfigError, "lacks the 'version' field"),
    ({**doc(entry(**{"7g_80gb": 1})), "extra": 1}, ConfigError, "unexpected mig-parted field"),
    ({"version": "v1", "mig-configs": {}}, ConfigError, "at least one entry"),
    ({"version": "v1", "mig-configs": {"cfg": []}}, ConfigError, "mig-configs.cfg must be a list"),
    (doc({**entry(**{"7g_80gb": 1}), "mig-device": {}}), ConfigError, "unexpected field"),
    (doc({"devices": "all", "mig-devices": {}}), ConfigError, "missing required field 'mig-en"),
    (doc({"mig-enabled": False}), ConfigError, "missing required field 'devices'"),
    (doc(entry(devices="some")), ConfigError, "devices must be 'all'"),
    (doc(entry(devices=[])), ConfigError, "devices must be 'all'"),
    (doc(entry(devices=[0, -1])), ConfigError, "devices must be 'all'"),
    (doc(entry(devices=[True])), ConfigError, "devices must be 'all'"),
    (doc(entry(devices=[0, 0])), ConfigError, "lists a GPU twice"),
    (doc(entry(enabled="maybe")), ConfigError, "mig-enabled must be true or false"),
    (doc({"devices": "all", "mig-enabled": True}), ConfigError, "'mig-devices' is required"),
    (doc(entry(enabled=False, **{"1g_10gb": 1})), ConfigError, "while 'mig-enabled' is false"),
    (doc(entry(**{"1g_10gb": -1})), ConfigError, "count must be an integer >= 0"),
    (doc({**entry(), "mig-devices": {"1g.10gb": "2"}}), ConfigError, "count must be an integer"),
    (doc({**entry(), "mig-devices": ["1g.10gb"]}), ConfigError, "mig-devices must be a mapping"),
    (doc({**entry(), "device-filter": []}), ConfigError, "device-filter must be a string"),
    (
        doc(entry(**{"1g_10gb": 1}), entry(devices=[0], **{"1g_10gb": 1})),
        ConfigError,
        "GPU 0 overlaps an earlier entry",
    ),
    (
        doc(entry(devices=[0], **{"1g_10gb": 1}), entry(**{"1g_10gb": 1})),
        ConfigError,
        "devices: all overlaps an earlier entry",
    ),
    (
        doc(entry(devices=[0, 1], **{"1g_10gb": 1}), entry(devices=[1], **{"7g_80gb": 1})),
        ConfigError,
        "GPU 1 overlaps an earlier entry",
    ),
    (doc(entry(**{"1g_5gb": 1})), MigLayoutError, "has no MIG profile '1g.5gb'"),
    (doc(entry(**{"1g_10gb+me": 1})), MigLayoutError, "has no MIG profile"),
    (doc(entry(**{"4g_40gb": 2})), MigLayoutError, "mig-configs.cfg[0]: H100-80GB cannot hold"),
    (doc(entry(**{"3g_40gb": 2, "2g_20gb": 1})), MigLayoutError, "8 compute slices wanted"),
    ("- just\n- a list\n", ConfigError, "is a mapping, got list"),
    ("version: v1\nmig-configs: {cfg: [", ConfigError, "not valid YAML"),
    ("version: v1\nversion: v1\nmig-configs: {}\n", ConfigError, "duplicate key 'version'"),
]


@pytest.mark.parametrize(("source", "error", "message"), BAD_CONFIGS)
def test_import_rejects(source: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        import_mig_parted(source, H100, "cfg")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_import_validates_other_configs_too() -> None:
    spec = doc(entry(**{"7g_80gb": 1}))
    spec["mig-configs"]["other"] = [entry(devices="some")]
    with pytest.raises(ConfigError, match=r"mig-configs\.other\[0\]\.devices must be"):
        import_mig_parted(spec, H100, "cfg")


def test_import_unknown_config_name_lists_known() -> None:
    with pytest.raises(ConfigError, match=r"no mig-parted config 'nope'; known: all-1g\.10gb, "):
        import_mig_parted(NVIDIA_STYLE, H100, "nope")


def test_import_for_non_mig_sku() -> None:
    with pytest.raises(MigLayoutError, match="L4 does not support MIG"):
        import_mig_parted(NVIDIA_STYLE, "L4", "all-disabled")


def test_yaml_error_is_one_line_and_chained() -> None:
    with pytest.raises(ConfigError) as info:
        import_mig_parted("version: v1\n  mig-configs: [\n", H100, "cfg")
    assert "\n" not in str(info.value)
    assert isinstance(info.value.__cause__, yaml.YAMLError)


# --------------------------------------------------------------------------------------------
# export: validation


def test_export_rejects() -> None:
    with pytest.raises(MigLayoutError, match="config 'p', GPU 1: invalid H100-80GB layout"):
        export_mig_parted({"p": [(), lay(("4g.40gb", 0), ("3g.40gb", 0))]}, sku="H100")
    with pytest.raises(MigLayoutError, match="no MIG profile"):
        export_mig_parted({"p": [lay(("1g.5gb", 0))]}, sku=H100)
    with pytest.raises(ConfigError, match="at least one named config"):
        export_mig_parted({})
    with pytest.raises(ConfigError, match="one layout"):
        export_mig_parted({"p": []})
    with pytest.raises(ConfigError, match="non-empty strings"):
        export_mig_parted({"": [()]})
    with pytest.raises(ConfigError, match="sequence of MigPlacement"):
        export_mig_parted({"p": [(("3g.40gb", 0),)]})  # type: ignore[list-item]
