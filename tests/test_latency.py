"""Latency functions: exactness, monotonicity, extrapolation, MIG fallback, fit error,
interference."""

from __future__ import annotations

import math
import subprocess
import sys
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stgs.errors import ProfileError
from stgs.latency import (
    DEFAULT_INTERFERENCE_GAMMA,
    InterferenceModel,
    LatencyModel,
    build_latency_models,
    fit_report,
)
from stgs.profiles import (
    InterferenceRow,
    ProfileRow,
    ProfileTable,
    default_interference_path,
    default_profiles_path,
    read_interference,
    read_profiles,
)

BATCHES = (1, 2, 4, 8, 16, 32, 64)
SMS = (16, 32, 66, 132)


def analytic(b: float, s: float) -> float:
    return 0.8 + 12.0 / s + b * (9.0 / s + 0.02)


def noise_free_rows(
    sms: tuple[int, ...] = SMS,
    batches: tuple[int, ...] = BATCHES,
    model: str = "toy",
) -> list[ProfileRow]:
    rows = []
    for s in sms:
        part = "full" if s == 132 else f"green:{s}"
        rows += [
            ProfileRow("H200", model, part, s, b, analytic(b, s), 300 + 5 * b) for b in batches
        ]
    return rows


@cache
def shipped() -> dict[tuple[str, str], LatencyModel]:
    return build_latency_models(read_profiles(default_profiles_path()))


KEYS = sorted(shipped())


def test_reproduces_noise_free_points_exactly() -> None:
    lm = LatencyModel(noise_free_rows())
    assert lm.sm_counts == SMS
    assert lm.max_measured_batch == 64
    assert not lm.has_mig_measurements
    for s in SMS:
        for b in BATCHES:
            assert lm.latency_ms(b, s) == pytest.approx(analytic(b, s), rel=0, abs=1e-9)


def test_ragged_grid() -> None:
    rows = noise_free_rows((16, 66), (1, 4, 16, 64)) + noise_free_rows((32, 132), (2, 8, 32))
    lm = LatencyModel(rows)
    for r in rows:
        assert lm.latency_ms(r.batch, r.sm_count) == pytest.approx(r.latency_ms, abs=1e-9)
    grid_b = np.arange(1, 200)
    for s in (8, 16, 20, 32, 50, 66, 100, 132, 400):
        curve = lm.latency_curve(grid_b, s)
        assert np.all(np.diff(curve) >= 0)
    for b in (1, 3, 9, 64, 150):
        by_sm = [lm.latency_ms(b, s) for s in range(1, 300)]
        assert np.all(np.diff(by_sm) <= 1e-12)


def test_interpolation_linear_in_inverse_sm() -> None:
    lm = LatencyModel(noise_free_rows())
    # analytic() is linear in 1/s, so interpolation in 1/s is exact between measured counts.
    for s in (20, 40, 50, 100, 120):
        for b in (1, 8, 64):
            assert lm.latency_ms(b, s) == pytest.approx(analytic(b, s), rel=1e-12)
    # ... and linear in batch between measured batches
    assert lm.latency_ms(3, 66) == pytest.approx(analytic(3, 66), rel=1e-12)


def test_monotone_correction_only_raises() -> None:
    rows = [
        ProfileRow("H200", "m", "full", 132, 1, 2.0, 10),
        ProfileRow("H200", "m", "full", 132, 2, 1.5, 10),  # faster at a larger batch
        ProfileRow("H200", "m", "full", 132, 4, 3.0, 10),
        ProfileRow("H200", "m", "mps:50", 66, 1, 1.8, 10),  # faster with fewer SMs
        ProfileRow("H200", "m", "mps:50", 66, 2, 2.5, 10),
        ProfileRow("H200", "m", "mps:50", 66, 4, 4.0, 10),
    ]
    lm = LatencyModel(rows)
    assert lm.latency_ms(2, 132) == 2.0
    assert lm.latency_ms(1, 66) == 2.0
    for r in rows:
        assert lm.latency_ms(r.batch, r.sm_count) >= r.latency_ms
    for s in (10, 66, 100, 132, 200):
        assert np.all(np.diff(lm.latency_curve(np.arange(1, 20), s)) >= 0)


def test_repeated_measurements_take_median() -> None:
    rows = noise_free_rows()
    extra = [
        ProfileRow("H200", "toy", "mps:50", 66, 8, analytic(8, 66) * f, 340) for f in (1.3, 1.2)
    ]
    lm = LatencyModel([*rows, *extra])  # median of (x, 1.3x, 1.2x) = 1.2x
    assert lm.latency_ms(8, 66) == pytest.approx(analytic(8, 66) * 1.2)


def test_batch_extrapolation_linear() -> None:
    lm = LatencyModel(noise_free_rows())
    slope = (analytic(64, 66) - analytic(32, 66)) / 32
    for b in (65, 100, 128, 1000):
        assert lm.latency_ms(b, 66) == pytest.approx(analytic(64, 66) + slope * (b - 64))
    assert lm.latency_ms(0.5, 66) == pytest.approx(analytic(1, 66))  # clamped below
    for key in KEYS[::7]:
        m = shipped()[key]
        top = m.max_measured_batch
        for s in (m.sm_counts[0], m.sm_counts[-1], 50):
            a, b, c = m.latency_curve([top + 50, top + 150, top + 250], s)
            assert b > m.latency_ms(top, s)
            assert c - b == pytest.approx(b - a, rel=1e-9)


def test_sm_extrapolation_bounds() -> None:
    for key in KEYS:
        m = shipped()[key]
        top = m.sm_counts[-1]
        for b in (1, 8, 128, 300):
            at_top = m.latency_ms(b, top)
            for s in (top + 1, 2 * top, 10_000, 1e9):
                v = m.latency_ms(b, s)
                assert 0.9 * at_top - 1e-12 <= v <= at_top
            lo = m.sm_counts[0]
            assert m.latency_ms(b, max(1, lo // 2)) >= m.latency_ms(b, lo)


def test_single_sm_count() -> None:
    lm = LatencyModel(noise_free_rows((66,)))
    assert lm.latency_ms(8, 132) == lm.latency_ms(8, 66)  # no gain assumed
    assert lm.latency_ms(8, 33) == pytest.approx(2 * lm.latency_ms(8, 66))  # ~1/s


def test_vectorised_equals_scalar() -> None:
    batches = np.arange(1, 300)
    for key in KEYS[::5]:
        m = shipped()[key]
        for s in (1, 7, 14, 26.5, 60, 66, 98, 132, 500):
            curve = m.latency_curve(batches, s)
            scalar = np.array([m.latency_ms(int(b), s) for b in batches])
            np.testing.assert_allclose(curve, scalar, rtol=0, atol=1e-12)
        for prof in m.mig_profiles[:2]:
            sm = next(r.sm_count for r in m.rows if r.partition == f"mig:{prof}")
            curve = m.latency_curve(batches, sm, mig_profile=prof)
            scalar = np.array([m.latency_ms(int(b), sm, mig_profile=prof) for b in batches])
            np.testing.assert_allclose(curve, scalar, rtol=0, atol=1e-12)


def test_mig_falls_back_to_sm_curve_without_mig_rows() -> None:
    lm = LatencyModel(noise_free_rows())
    assert not lm.has_mig_measurements
    for b in (1, 16, 100):
        for s in (16, 60):
            assert lm.latency_ms(b, s, mig_profile="3g.71gb") == lm.latency_ms(b, s)


def test_mig_rows_used_when_present() -> None:
    rows = noise_free_rows()
    mig = [
        ProfileRow("H200", "toy", f"mig:{p}", s, b, analytic(b, s) * 1.25, 300)
        for p, s in (("1g.18gb", 16), ("3g.71gb", 60), ("7g.141gb", 132))
        for b in BATCHES
    ]
    lm = LatencyModel(rows + mig)
    assert lm.has_mig_measurements
    assert lm.mig_profiles == ("1g.18gb", "3g.71gb", "7g.141gb")
    assert lm.sm_counts == SMS  # the shared curve
    assert lm.latency_ms(8, 60, mig_profile="3g.71gb") == pytest.approx(analytic(8, 60) * 1.25)
    assert lm.latency_ms(8, 60) == pytest.approx(analytic(8, 60), rel=1e-9)
    # an unmeasured profile: the MIG curve across SM counts (linear in 1/s here, so exact)
    assert lm.latency_ms(8, 32, mig_profile="2g.35gb") == pytest.approx(analytic(8, 32) * 1.25)


def test_partition_kind_families() -> None:
    """MPS clients measured slower than green contexts at the same SM count: each kind is
    predicted from its own rows, and kind=None keeps the shared curve of both."""
    rows = noise_free_rows()
    mps = [
        ProfileRow("H200", "toy", f"mps:{pct}", s, b, analytic(b, s) * 1.06, 300)
        for pct, s in ((25, 32), (50, 66), (100, 132))
        for b in BATCHES
    ]
    lm = LatencyModel(rows + mps)
    for b in (1, 8, 64):
        assert lm.latency_ms(b, 66, kind="mps") == pytest.approx(analytic(b, 66) * 1.06)
        assert lm.latency_ms(b, 66, kind="full") == pytest.approx(analytic(b, 66))
        assert lm.latency_ms(b, 16, kind="green") == pytest.approx(analytic(b, 16))
        # a MIG instance without MIG rows: predicted from the whole-GPU / green curve
        assert lm.latency_ms(b, 32, mig_profile="2g.35gb", kind="mig") == pytest.approx(
            analytic(b, 32)
        )
        shared = lm.latency_ms(b, 66)
        assert analytic(b, 66) <= shared <= analytic(b, 66) * 1.06 + 1e-9
    # MPS rows at one SM count only: no MPS family, the shared curve serves kind="mps"
    lm1 = LatencyModel(rows + [r for r in mps if r.sm_count == 66])
    assert lm1.latency_ms(8, 66, kind="mps") == lm1.latency_ms(8, 66)


def test_a100_profiles_with_same_sm_count_keep_their_own_curves() -> None:
    m = shipped()[("A100-80GB", "resnet50")]
    small = m.latency_ms(128, 14, mig_profile="1g.10gb")
    big = m.latency_ms(128, 14, mig_profile="1g.20gb")
    assert small > big  # 1g.10gb has one memory slice, 1g.20gb two


def test_memory() -> None:
    rows = [
        ProfileRow("L4", "m", "full", 58, 1, 1.0, 400),
        ProfileRow("L4", "m", "mps:50", 28, 1, 2.0, 420),  # max over partitions
        ProfileRow("L4", "m", "full", 58, 4, 2.0, 430),
        ProfileRow("L4", "m", "full", 58, 8, 3.0, 470),
    ]
    lm = LatencyModel(rows)
    assert lm.memory_mib(1) == 420
    assert lm.memory_mib(2) == pytest.approx(423.3333333)
    assert lm.memory_mib(8) == 470
    assert lm.memory_mib(16) == pytest.approx(550)
    for m in list(shipped().values())[::9]:
        mem = [m.memory_mib(b) for b in range(1, 400)]
        assert np.all(np.diff(mem) >= 0)


def test_errors() -> None:
    lm = LatencyModel(noise_free_rows())
    with pytest.raises(ValueError):
        lm.latency_ms(1, 0)
    with pytest.raises(ValueError):
        lm.latency_curve([1, 0], 66)
    with pytest.raises(ProfileError):
        LatencyModel([])
    with pytest.raises(ProfileError):
        LatencyModel(noise_free_rows() + noise_free_rows(model="other"))
    with pytest.raises(ProfileError, match="vgg16"):
        LatencyModel.from_table(ProfileTable(noise_free_rows()), "H200", "vgg16")


def test_build_latency_models_keys() -> None:
    table = read_profiles(default_profiles_path())
    models = shipped()
    assert len(models) == 84
    for (gpu, model), lm in models.items():
        assert (lm.gpu, lm.model) == (gpu, model)
        assert table.has(gpu, model)
    assert LatencyModel.from_table(table, "H200", "vgg16").gpu == "H200-141GB"


sm_values = st.one_of(st.integers(1, 400), st.floats(1.0, 1e5, allow_nan=False))
batch_values = st.one_of(st.integers(1, 512), st.floats(0.5, 2048.0, allow_nan=False))


@settings(max_examples=300, deadline=None)
@given(
    key=st.sampled_from(KEYS),
    b=st.tuples(batch_values, batch_values).map(sorted),
    s=st.tuples(sm_values, sm_values).map(sorted),
    mig=st.booleans(),
)
def test_monotone_on_shipped_models(
    key: tuple[str, str], b: list[float], s: list[float], mig: bool
) -> None:
    m = shipped()[key]
    prof = m.mig_profiles[0] if (mig and m.mig_profiles) else None
    (b1, b2), (s1, s2) = b, s
    for sm in (s1, s2):
        assert m.latency_ms(b1, sm, mig_profile=prof) <= m.latency_ms(b2, sm, mig_profile=prof)
    for bb in (b1, b2):
        if prof is None:
            assert m.latency_ms(bb, s2) <= m.latency_ms(bb, s1)
        else:
            # unmeasured-profile path: the MIG curve across SM counts
            assert m.latency_ms(bb, s2, mig_profile="x") <= m.latency_ms(bb, s1, mig_profile="x")


def test_fit_report_on_shipped_set() -> None:
    reports = [fit_report(m) for m in shipped().values()]
    by_sm = [fit_report(m, mode="sm") for m in shipped().values()]
    for name, reps in (("point", reports), ("sm", by_sm)):
        errors = np.concatenate([r.errors for r in reps])
        med = float(np.median(errors))
        p95 = float(np.percentile(errors, 95))
        print(f"\nleave-one-out ({name}): {len(errors)} points, median {med:.2%}, p95 {p95:.2%}")
        for r in sorted(reps, key=lambda r: -r.max_error)[:3]:
            print(" worst:", r)
        assert all(r.n_points > 0 for r in reps)
        assert med < 0.05
        assert p95 < 0.10


def test_fit_report_noise_free_and_edges() -> None:
    rows = noise_free_rows()
    rep = fit_report(rows)
    # interior points only: batches 2..32 at each of the four SM counts
    assert rep.n_points == 4 * (len(BATCHES) - 2)
    assert rep.max_error < 1e-9  # analytic() is linear in batch
    sm_rep = fit_report(LatencyModel(rows), mode="sm")
    # green rows at 16, 32, 66 SMs form their own family beside the whole GPU (132): one
    # interior SM count (32) is held out
    assert sm_rep.n_points == len(BATCHES)
    assert sm_rep.max_error < 1e-9  # analytic() is linear in 1/s
    tiny = fit_report(noise_free_rows((66,), (1, 2)))
    assert tiny.n_points == 0
    assert math.isnan(tiny.median_error)


def test_interference_default_gamma() -> None:
    im = InterferenceModel()
    assert DEFAULT_INTERFERENCE_GAMMA == 0.45
    assert im.slowdown("resnet50", "H200", 0) == 1.0
    assert im.slowdown("resnet50", "H200", 50) == pytest.approx(1.225)
    # covers the measured co-location slowdowns of gpu-facts.md: +21% at 50%, +31% at 70%
    assert im.slowdown("bert_base", "H200", 50) >= 1.21
    assert im.slowdown("x", "H200", 70) >= 1.31
    with pytest.raises(ValueError):
        im.slowdown("x", "H200", -1)


def test_interference_fitted_gamma() -> None:
    def row(model: str, nb: float, lat: float) -> InterferenceRow:
        return InterferenceRow("H200", model, 50, 32, nb, lat, 10.0)

    ratios = [0.1, 0.2, 0.3, 0.4, 0.5]
    rows = [row("a", 50, 10 * (1 + r * 0.5)) for r in ratios]
    rows.append(row("b", 25, 9.0))  # faster beside neighbours: gamma clamps to 0
    im = InterferenceModel.from_rows(rows)
    assert im.gamma("a", "H200-141GB") == pytest.approx(np.percentile(ratios, 90))
    assert im.slowdown("a", "H200", 100) == pytest.approx(1 + np.percentile(ratios, 90))
    assert im.gamma("b", "H200") == 0.0
    assert im.slowdown("b", "H200", 75) == 1.0
    assert im.is_fitted("a", "h200") and not im.is_fitted("c", "H200")
    assert im.gamma("c", "H200") == DEFAULT_INTERFERENCE_GAMMA
    assert InterferenceModel.from_rows(rows, default_gamma=0.2).gamma("c", "L4") == 0.2

    shipped_im = InterferenceModel.from_rows(read_interference(default_interference_path()))
    gammas = list(shipped_im.gammas.values())
    assert len(gammas) == 24
    assert all(0.2 < g < DEFAULT_INTERFERENCE_GAMMA for g in gammas)


def test_no_torch_import() -> None:
    code = "import sys, stgs.latency, stgs.profiles; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
