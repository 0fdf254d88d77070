"""The MIG layout catalog against an independent oracle, plus the catalog's exact known facts.

The oracle below does not call ``layout_violation`` nor read the catalog's profile tables: it
encodes the placement rules of docs/gpu-facts.md ("MIG profiles") with bitmasks over the 8
memory slices, from a table typed in here. A test checks that the catalog's tables agree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from functools import cache
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stgs.catalog import (
    SKUS,
    GpuSku,
    MigLayout,
    MigPlacement,
    MigProfile,
    canonical_layout,
    enumerate_layouts,
    free_starts,
    get_sku,
    layout_violation,
)
from stgs.errors import ConfigError, MigLayoutError, UnknownSkuError

# --------------------------------------------------------------------------------------------
# the oracle: rules typed in from docs/gpu-facts.md


class Rule(NamedTuple):
    compute: int  # compute slices (7 per GPU)
    size: int  # memory slices occupied (8 per GPU)
    starts: frozenset[int]  # allowed starts, in memory slices
    max_count: int
    sms: int


_SHAPES = [  # the same placements on A100, H100 and H200
    (1, 1, frozenset(range(7)), 7),
    (1, 2, frozenset({0, 2, 4, 6}), 4),
    (2, 2, frozenset({0, 2, 4}), 3),
    (3, 4, frozenset({0, 4}), 2),
    (4, 4, frozenset({0}), 1),
    (7, 8, frozenset({0}), 1),
]


def _rules(names: str, sms: Sequence[int]) -> dict[str, Rule]:
    return {
        name: Rule(*shape, sm) for name, shape, sm in zip(names.split(), _SHAPES, sms, strict=True)
    }


_A100_SMS = (14, 14, 28, 42, 56, 98)
_HOPPER_SMS = (16, 26, 32, 60, 64, 132)
RULES: dict[str, dict[str, Rule]] = {
    "A100-40GB": _rules("1g.5gb 1g.10gb 2g.10gb 3g.20gb 4g.20gb 7g.40gb", _A100_SMS),
    "A100-80GB": _rules("1g.10gb 1g.20gb 2g.20gb 3g.40gb 4g.40gb 7g.80gb", _A100_SMS),
    "H100-80GB": _rules("1g.10gb 1g.20gb 2g.20gb 3g.40gb 4g.40gb 7g.80gb", _HOPPER_SMS),
    "H200-141GB": _rules("1g.18gb 1g.35gb 2g.35gb 3g.71gb 4g.71gb 7g.141gb", _HOPPER_SMS),
}
MIG_SKUS = sorted(RULES)
NON_MIG_SKUS = ["L4", "T4", "A10", "RTX-2080Ti"]
ALL_MEMORY = (1 << 8) - 1
MAX_COMPUTE = 7


def oracle(sku_name: str, placements: Iterable[tuple[str, int]]) -> bool:
    """True iff (profile, start) pairs form a valid MIG layout of ``sku_name``."""
    return rules_accept(RULES[sku_name], placements)


def rules_accept(rules: dict[str, Rule], placements: Iterable[tuple[str, int]]) -> bool:
    used = 0
    compute = 0
    counts: Counter[str] = Counter()
    for profile, start in placements:
        rule = rules.get(profile)
        if rule is None or start not in rule.starts:
            return False
        bits = ((1 << rule.size) - 1) << start
        if bits & ~ALL_MEMORY or bits & used:
            return False
        used |= bits
        compute += rule.compute
        counts[profile] += 1
    return compute <= MAX_COMPUTE and all(counts[p] <= rules[p].max_count for p in counts)


def pairs(layout: Iterable[MigPlacement]) -> list[tuple[str, int]]:
    return [(p.profile, p.start) for p in layout]


def sorted_layout(placements: Iterable[tuple[str, int]]) -> MigLayout:
    """Canonical form built here, not by the catalog: sorted by start, then profile name."""
    return tuple(MigPlacement(s, p) for s, p in sorted((s, p) for p, s in placements))


@cache
def brute_force(sku_name: str) -> tuple[frozenset[MigLayout], frozenset[MigLayout]]:
    """(every valid layout, the maximal ones), by brute force over all subsets of candidates.

    valid(S) = valid(S minus its lowest candidate) and that candidate is compatible with the
    rest: exact, since every rule is a pairwise overlap or a sum under a bound.
    """
    rules = RULES[sku_name]
    cands = [(p, s) for p, r in rules.items() for s in sorted(r.starts)]
    n = len(cands)
    bits = [((1 << rules[p].size) - 1) << s for p, s in cands]
    comp = [rules[p].compute for p, _ in cands]
    pid = {p: i for i, p in enumerate(rules)}
    unit = [1 << (4 * pid[p]) for p, _ in cands]  # per-profile counters, 4 bits each
    limit = [rules[p].max_count for p, _ in cands]
    shift = [4 * pid[p] for p, _ in cands]

    size = 1 << n
    valid = bytearray(size)
    mem = [0] * size
    cpu = [0] * size
    cnt = [0] * size
    valid[0] = 1
    for s in range(1, size):
        low = s & -s
        i = low.bit_length() - 1
        rest = s ^ low
        if not valid[rest] or mem[rest] & bits[i] or cpu[rest] + comp[i] > MAX_COMPUTE:
            continue
        c = cnt[rest] + unit[i]
        if (c >> shift[i]) & 0xF > limit[i]:
            continue
        valid[s], mem[s], cpu[s], cnt[s] = 1, mem[rest] | bits[i], cpu[rest] + comp[i], c

    def layout(s: int) -> MigLayout:
        return sorted_layout(cands[i] for i in range(n) if s >> i & 1)

    every = [s for s in range(size) if valid[s]]
    maximal = [s for s in every if not any(valid[s | 1 << i] for i in range(n) if not s >> i & 1)]
    return frozenset(map(layout, every)), frozenset(map(layout, maximal))


def catalog_maximal(sku: GpuSku) -> set[MigLayout]:
    """Maximal layouts by the catalog's own functions: no profile has a free start."""
    return {
        lay
        for lay in enumerate_layouts(sku.name)
        if all(not free_starts(sku, lay, p.name) for p in sku.mig_profiles)
    }


# --------------------------------------------------------------------------------------------
# the oracle's table agrees with the catalog's


@pytest.mark.parametrize("sku_name", MIG_SKUS)
def test_catalog_tables_match_gpu_facts(sku_name: str) -> None:
    sku = get_sku(sku_name)
    table = {
        p.name: Rule(
            p.compute_slices, p.memory_slices, frozenset(p.starts), p.max_count, p.sm_count
        )
        for p in sku.mig_profiles
    }
    assert table == RULES[sku_name]
    assert (sku.compute_slices, sku.memory_slices) == (7, 8)
    assert all(len(set(p.starts)) == len(p.starts) for p in sku.mig_profiles)


def test_h200_profile_memory_as_measured() -> None:
    mib = {p.name: p.memory_mib for p in get_sku("H200").mig_profiles}
    assert mib == {
        "1g.18gb": 16384,
        "1g.35gb": 33280,
        "2g.35gb": 33280,
        "3g.71gb": 71424,
        "4g.71gb": 71424,
        "7g.141gb": 143360,
    }


# --------------------------------------------------------------------------------------------
# enumeration: sound, complete, canonical, no duplicates


@pytest.mark.parametrize("sku_name", MIG_SKUS)
def test_every_enumerated_layout_is_valid_canonical_and_unique(sku_name: str) -> None:
    layouts = enumerate_layouts(sku_name)
    assert len(set(layouts)) == len(layouts)
    assert () in layouts
    for lay in layouts:
        assert oracle(sku_name, pairs(lay)), lay
        assert lay == sorted_layout(pairs(lay)) == canonical_layout(lay)


@pytest.mark.parametrize("sku_name", MIG_SKUS)
def test_enumeration_equals_brute_force(sku_name: str) -> None:
    every, _ = brute_force(sku_name)
    assert set(enumerate_layouts(sku_name)) == every


# Computed two ways (the catalog's DFS with free_starts; brute force over 2**18 subsets with
# the oracle above) and written down: the same on all four MIG SKUs, whose placements agree.
LAYOUTS_PER_MIG_SKU = 723
MAXIMAL_LAYOUTS_PER_MIG_SKU = 78


@pytest.mark.parametrize("sku_name", MIG_SKUS)
def test_layout_counts(sku_name: str) -> None:
    every, maximal = brute_force(sku_name)
    assert len(enumerate_layouts(sku_name)) == len(every) == LAYOUTS_PER_MIG_SKU
    assert catalog_maximal(get_sku(sku_name)) == maximal
    assert len(maximal) == MAXIMAL_LAYOUTS_PER_MIG_SKU


def test_h100_maximal_layouts() -> None:
    maximal = catalog_maximal(get_sku("H100"))
    assert len(maximal) == MAXIMAL_LAYOUTS_PER_MIG_SKU
    assert sorted_layout([("7g.80gb", 0)]) in maximal
    assert sorted_layout([("3g.40gb", 0), ("3g.40gb", 4)]) in maximal
    assert sorted_layout([("4g.40gb", 0), ("3g.40gb", 4)]) in maximal
    assert sorted_layout([("1g.10gb", s) for s in range(7)]) in maximal
    # maximal with memory slice 7 idle: 7 compute slices in use, no profile starts at 7
    assert (
        sorted_layout([("4g.40gb", 0), ("1g.10gb", 4), ("1g.10gb", 5), ("1g.10gb", 6)]) in maximal
    )
    # 3g@0 + 2g@4 still has room for a 1g at slice 6
    assert sorted_layout([("3g.40gb", 0), ("2g.20gb", 4)]) not in maximal


@pytest.mark.parametrize("sku_name", NON_MIG_SKUS)
def test_non_mig_skus_have_no_layouts(sku_name: str) -> None:
    sku = get_sku(sku_name)
    assert not sku.supports_mig
    assert enumerate_layouts(sku_name) == ()
    assert layout_violation(sku, []) is not None
    with pytest.raises(MigLayoutError, match="no MIG"):
        sku.mig_profile("1g.10gb")


# --------------------------------------------------------------------------------------------
# hypothesis: random candidate lists, valid starts or not, known profiles or not

_ALIEN_PROFILES = ["5g.50gb", "1g.5gb+me", "", "7g.80gb ", "3c.3g.40gb"]
_ANY_PROFILE = sorted({n for r in RULES.values() for n in r} | set(_ALIEN_PROFILES))


@st.composite
def sku_and_candidates(draw: st.DrawFn) -> tuple[str, list[tuple[str, int]]]:
    sku_name = draw(st.sampled_from(MIG_SKUS))
    own = sorted(RULES[sku_name])
    profile = st.one_of(st.sampled_from(own), st.sampled_from(_ANY_PROFILE))
    start = st.one_of(st.integers(-2, 9), st.sampled_from([0, 2, 4, 6]))
    return sku_name, draw(st.lists(st.tuples(profile, start), max_size=10))


@settings(max_examples=400, deadline=None)
@given(sku_and_candidates())
def test_every_valid_layout_is_enumerated(case: tuple[str, list[tuple[str, int]]]) -> None:
    sku_name, candidates = case
    kept: list[tuple[str, int]] = []
    for cand in candidates:
        if oracle(sku_name, [*kept, cand]):
            kept.append(cand)
    assert sorted_layout(kept) in set(enumerate_layouts(sku_name))
    assert layout_violation(get_sku(sku_name), canonical_layout(kept)) is None


@settings(max_examples=400, deadline=None)
@given(sku_and_candidates())
def test_layout_violation_agrees_with_oracle(case: tuple[str, list[tuple[str, int]]]) -> None:
    sku_name, candidates = case
    placements = [MigPlacement(s, p) for p, s in candidates]
    reason = layout_violation(get_sku(sku_name), placements)
    if oracle(sku_name, candidates):
        assert reason is None
    else:
        assert isinstance(reason, str) and reason


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(MIG_SKUS), st.data())
def test_free_starts_agrees_with_oracle(sku_name: str, data: st.DataObject) -> None:
    sku = get_sku(sku_name)
    layout = data.draw(st.sampled_from(enumerate_layouts(sku_name)))
    for profile, rule in RULES[sku_name].items():
        expected = [
            s for s in sorted(rule.starts) if oracle(sku_name, [*pairs(layout), (profile, s)])
        ]
        assert free_starts(sku, layout, profile) == expected


# On the real SKUs the compute (<= 7) and per-profile count limits never bind before the memory
# slices do, so a synthetic SKU checks that layout_violation enforces them too.
SYNTHETIC_RULES = {
    "1g.t": Rule(1, 1, frozenset(range(8)), 3, 10),
    "2g.t": Rule(2, 1, frozenset(range(8)), 8, 20),
}
SYNTHETIC = GpuSku(
    "synthetic",
    100,
    1000,
    tuple(
        MigProfile(name, r.compute, r.size, r.sms, 100, r.max_count, tuple(sorted(r.starts)))
        for name, r in SYNTHETIC_RULES.items()
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["1g.t", "2g.t", "3g.t"]), st.integers(-1, 8))))
def test_synthetic_compute_and_count_limits(candidates: list[tuple[str, int]]) -> None:
    placements = [MigPlacement(s, p) for p, s in candidates]
    reason = layout_violation(SYNTHETIC, placements)
    assert (reason is None) == rules_accept(SYNTHETIC_RULES, candidates), reason


def test_synthetic_limits_exactly() -> None:
    def check(*pl: tuple[str, int]) -> str | None:
        return layout_violation(SYNTHETIC, [MigPlacement(s, p) for p, s in pl])

    assert check(("1g.t", 0), ("1g.t", 1), ("1g.t", 2), ("2g.t", 3), ("2g.t", 4)) is None
    assert "more than 3 instances" in (check(*[("1g.t", s) for s in range(4)]) or "")
    assert "8 compute slices" in (check(*[("2g.t", s) for s in range(4)]) or "")


# --------------------------------------------------------------------------------------------
# exact facts


def _violation(*pl: tuple[str, int], sku: str = "H100") -> str | None:
    return layout_violation(get_sku(sku), [MigPlacement(s, p) for p, s in pl])


def test_known_h100_layouts() -> None:
    assert _violation(*[("1g.10gb", s) for s in range(7)]) is None
    assert _violation(("3g.40gb", 0), ("3g.40gb", 4)) is None
    assert _violation(("4g.40gb", 0), ("3g.40gb", 4)) is None
    assert _violation(("4g.40gb", 0), ("2g.20gb", 4), ("1g.20gb", 6)) is None
    assert _violation(("2g.20gb", 0), ("2g.20gb", 2), ("3g.40gb", 4)) is None
    assert _violation(("2g.20gb", 0), ("2g.20gb", 2), ("2g.20gb", 4), ("1g.10gb", 6)) is None
    assert _violation(*[("1g.10gb", s) for s in range(6)], ("1g.20gb", 6)) is None
    assert _violation(*[("1g.20gb", s) for s in (0, 2, 4, 6)]) is None


def test_known_h100_violations() -> None:
    assert "overlaps" in (_violation(("4g.40gb", 0), ("4g.40gb", 0)) or "")
    assert "cannot start" in (_violation(("1g.10gb", 7)) or "")
    assert "cannot start" in (_violation(("3g.40gb", 2)) or "")
    assert "cannot start" in (_violation(("2g.20gb", 6)) or "")
    assert "no MIG profile" in (_violation(("1g.5gb", 0)) or "")
    assert _violation(("3g.40gb", 0), ("3g.40gb", 4), ("1g.10gb", 6)) is not None
    sku = get_sku("H100")
    seven = [MigPlacement(0, "7g.80gb")]
    for p in sku.mig_profiles:
        for s in p.starts:
            assert layout_violation(sku, [*seven, MigPlacement(s, p.name)]) is not None
            assert free_starts(sku, seven, p.name) == []
    # A100-40GB: 1g.10gb is the double-memory 1g there, so it cannot start at slice 1.
    assert _violation(("1g.10gb", 1), sku="A100-40GB") is not None
    assert _violation(("1g.10gb", 1), sku="A100-80GB") is None


def test_h100_sm_counts() -> None:
    sku = get_sku("H100")
    assert sku.mig_profile("1g.20gb").sm_count == 26
    assert sku.mig_profile("1g.10gb").sm_count == 16
    assert sku.mig_profile("7g.80gb").sm_count == sku.sm_count == 132
    assert sku.mig_profile("3g.40gb").fraction == pytest.approx(3 / 7)


def test_free_starts() -> None:
    sku = get_sku("H100")
    assert free_starts(sku, (), "1g.10gb") == list(range(7))
    assert free_starts(sku, (), "3g.40gb") == [0, 4]
    three = canonical_layout([("3g.40gb", 0)])
    assert free_starts(sku, three, "3g.40gb") == [4]
    assert free_starts(sku, three, "4g.40gb") == []
    assert free_starts(sku, three, "1g.20gb") == [4, 6]
    assert free_starts(sku, canonical_layout([("1g.10gb", 6)]), "1g.20gb") == [0, 2, 4]
    six = canonical_layout([("1g.10gb", s) for s in range(6)])
    assert free_starts(sku, six, "1g.10gb") == [6]
    assert free_starts(sku, six, "1g.20gb") == [6]
    with pytest.raises(MigLayoutError, match=r"known: 1g\.10gb"):
        free_starts(sku, (), "5g.50gb")


def test_canonical_layout() -> None:
    a = canonical_layout([("3g.40gb", 4), ("1g.10gb", 0), MigPlacement(1, "1g.10gb")])
    assert a == (MigPlacement(0, "1g.10gb"), MigPlacement(1, "1g.10gb"), MigPlacement(4, "3g.40gb"))
    assert canonical_layout(a) == a
    assert canonical_layout(reversed(a)) == a
    assert str(a[2]) == "3g.40gb@4"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("H100", "H100-80GB"),
        ("h100", "H100-80GB"),
        ("H100-SXM5-80GB", "H100-80GB"),
        (" h100_80gb ", "H100-80GB"),
        ("h100 80gb hbm3", "H100-80GB"),
        ("h200", "H200-141GB"),
        ("a100-sxm4-40gb", "A100-40GB"),
        ("A100-PCIE-80GB", "A100-80GB"),
        ("GeForce RTX 2080 Ti", "RTX-2080Ti"),
        ("rtx2080ti", "RTX-2080Ti"),
        ("l4", "L4"),
    ],
)
def test_get_sku_aliases(name: str, expected: str) -> None:
    assert get_sku(name) is SKUS[expected]


def test_unknown_sku_lists_known() -> None:
    with pytest.raises(UnknownSkuError) as info:
        get_sku("B200")
    msg = str(info.value)
    assert "'B200'" in msg
    assert all(name in msg for name in SKUS)
    assert isinstance(info.value, ConfigError)
    with pytest.raises(UnknownSkuError):
        enumerate_layouts("no-such-gpu")


@pytest.mark.parametrize(("pct", "sms"), [(20, 26), (40, 52), (50, 66), (60, 78), (80, 104)])
def test_mps_sm_count_h200_measurements(pct: int, sms: int) -> None:
    assert get_sku("H200").mps_sm_count(pct) == sms


def test_mps_sm_count_edges() -> None:
    h200 = get_sku("H200")
    assert h200.mps_sm_count(100) == 132
    assert h200.mps_sm_count(0.1) == 2  # at least one TPC
    assert h200.mps_sm_count(50, within_sm=60) == 30
    assert h200.mps_sm_count(33.3, within_sm=60) == 18  # 19.98 -> 19 -> even 18
    for pct in (0, -5, 100.5):
        with pytest.raises(ValueError, match="MPS share"):
            h200.mps_sm_count(pct)
    for pct in range(1, 101):
        n = h200.mps_sm_count(pct)
        assert n % 2 == 0 and 2 <= n <= 132
