"""benchmarks/fidelity.py on the committed H100 runs: the host-cost fits, the trace join, the
interference check and the comparison modes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from partitioner.sim.config import HostCosts

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "results" / "2026-11-22-h100"
S3 = ROOT / "benchmarks" / "results" / "2026-11-22-h100-s3"


def _fidelity():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("fidelity", ROOT / "benchmarks" / "fidelity.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fidelity"] = mod
    spec.loader.exec_module(mod)
    return mod


pytestmark = [
    pytest.mark.shipped_profiles,
    pytest.mark.skipif(not (RUNS / "full.npz").is_file(), reason="H100 runs not in the tree"),
]


def test_client_fit_of_session_2() -> None:
    """The client-side fit (runs without a trace) still measures: positive loop costs, and
    images (0.6 MB) cost more on the way in than token ids (1 kB)."""
    fid = _fidelity()
    runs = [fid.load_run(RUNS / "full.json"), fid.load_run(RUNS / "half.json")]
    fitted, info = fid.fit_host(runs, {"bert_base"})
    assert fitted.batch_ms > 0 and fitted.sample_ms_per_mb > 0
    around = info["around_ms"]
    assert min(around["resnet50"]) > max(around["bert_base"])


def test_batches_from_answers() -> None:
    """Batches told apart by their answers: sizes within the planned batch, durations > 0."""
    fid = _fidelity()
    run = fid.load_run(RUNS / "full.json")
    for mids, lat in fid.gpu_latency(run):
        b = fid.client_batches(run, mids)
        assert b["n"].sum() > 1000
        for slot, mi in enumerate(mids):
            mine = b["model"] == mi
            assert b["n"][mine].max() <= len(lat[slot]) - 1  # never above the planned batch
        assert not (b["b2b"] & b["idle"]).any()
        assert (b["dur_ms"][1:] > 0).all()


s3 = pytest.mark.skipif(not (S3 / "full.npz").is_file(), reason="session-3 runs not in the tree")


@s3
def test_defaults_are_the_trace_fit_of_session_3() -> None:
    """The simulator's default host costs are what --fit measures on the workers' trace of
    the two session-3 runs (one set for every model)."""
    fid = _fidelity()
    runs = [fid.load_run(S3 / "full.json"), fid.load_run(S3 / "half.json")]
    fitted, info = fid.fit_host_trace(runs)
    d = HostCosts()
    for k in (
        "request_ms",
        "request_ms_per_mb",
        "batch_ms",
        "sample_ms",
        "sample_ms_per_mb",
        "reply_ms",
    ):
        assert getattr(fitted, k) == pytest.approx(getattr(d, k), abs=1e-4), k
    # images take longer from the send to the worker's queue than token ids
    med = info["sent_to_queued_median_ms"]
    assert med["0.6021 MB"] > med["0.0010 MB"] > 0


@s3
def test_trace_join_and_every_request_queued() -> None:
    """Every request sent in phase 1 reached a worker's queue (the trace has as many rows in
    the window), and the join to the client's record is one to one and nearly complete."""
    fid = _fidelity()
    run = fid.load_run(S3 / "half.json")
    tr = fid.load_trace(run)
    assert tr is not None
    t, st = run.npz["t_sched"], run.npz["status"]
    win = (t >= run.lo) & (t < run.hi) & (st != fid.NOT_SENT)
    rows = (tr.row_arrival_s >= run.lo) & (tr.row_arrival_s < run.hi) & (tr.row_model >= 0)
    assert int(rows.sum()) == int(win.sum())
    joined = tr.req_row[tr.req_row >= 0]
    assert len(np.unique(joined)) == len(joined)
    assert (tr.req_row[win] >= 0).mean() > 0.95
    # a joined pair: same model, and the row's arrival within 50 us of the schedule
    i = np.flatnonzero(win & (tr.req_row >= 0))
    r = tr.req_row[i]
    assert (tr.row_model[r] == run.npz["model"][i]).all()
    assert np.abs(tr.row_arrival_s[r] - t[i]).max() <= 50e-6
    # no trace: None, and auto falls back to the end-to-end mode
    old = fid.load_run(RUNS / "full.json")
    assert fid.load_trace(old) is None
    assert fid.resolve_mode(old, "auto") == "scheduled"
    assert fid.resolve_mode(run, "auto") == "queued"


@s3
def test_busy_interference_fits_the_trace_better() -> None:
    """Runner time per batch on the MPS partitions: the neighbours-running model errs less
    than the plan's static one (the evidence behind SimOptions.interference = "busy")."""
    fid = _fidelity()
    runs = [fid.load_run(S3 / "full.json"), fid.load_run(S3 / "half.json")]
    lines, mae = fid.interference_check(runs)
    assert mae["busy"] < 0.9 * mae["static"]
    assert len([x for x in lines if x.startswith("| full |")]) == 5


@s3
def test_queued_mode_meets_target_on_full_run_and_host_costs_matter() -> None:
    """Counted from the worker's queue (the load generator's lag out of both sides), the full
    run agrees within 10% for every model; without host costs it does not; end to end (the
    lag in the GPU's numbers only) it does not either."""
    fid = _fidelity()
    run = fid.load_run(S3 / "full.json")
    rows, worst, info = fid.compare(run, HostCosts(), 1, "queued")
    assert info["requests"] == 144514 and info["not_sent"] == 0
    assert info["expired_on_arrival"] > 0  # the lag's victims: misses on both sides
    assert worst < 0.10, rows
    _, worst_off, _ = fid.compare(run, HostCosts(enabled=False), 1, "queued")
    assert worst_off > 0.2
    _, worst_e2e, _ = fid.compare(run, HostCosts(), 1, "scheduled")
    assert worst_e2e > 0.2


def test_scheduled_mode_matches_serve_gpu_summary() -> None:
    """The end-to-end GPU numbers computed from the .npz are serve_gpu.py's own phase-1 rows."""
    fid = _fidelity()
    run = fid.load_run(RUNS / "half.json")
    rows, _, info = fid.compare(run, HostCosts(), 1, "scheduled")
    gpu = {r["model"]: r for r in run.res["windows"]["phase1"]["rows"]}
    for r in rows:
        assert r["gpu_attainment"] == pytest.approx(gpu[r["model"]]["attainment"], abs=1e-4)
        assert r["gpu_p99_ms"] == pytest.approx(gpu[r["model"]]["p99_ok_ms"], abs=0.01)
    assert info["requests"] == 72162


S4 = ROOT / "benchmarks" / "results" / "2026-11-22-h100-s4"
s4 = pytest.mark.skipif(not (S4 / "s1200c.npz").is_file(), reason="session-4 runs not in the tree")


@s4
def test_calibration_from_another_run() -> None:
    """--calibrate-from: the runtime's latency per (model, partition) measured on run c scales
    the profiles for run d (same plan, same machine kind): a factor per partition of run c's
    plan, near 1, applied to exactly those curves, and the replay of d within the target."""
    fid = _fidelity()
    cal = fid.calibration([fid.load_run(S4 / "s1200c.json")])
    assert {m for m, _, _ in cal} == {
        "resnet50",
        "mobilenet_v3_large",
        "efficientnet_b0",
        "bert_base",
        "vit_b_16",
    }
    assert all(0.85 < f < 1.2 and n >= 1000 for f, n in cal.values())
    run = fid.load_run(S4 / "s1200d.json")
    sku = run.plan.gpus[0].sku
    prof = run.problem.models[run.names.index("bert_base")].profile
    before = run.problem.latency[(sku, prof)].latency_curve([1, 2, 4], 14, kind="mps")
    assert fid.apply_calibration(run, cal) == 5
    after = run.problem.latency[(sku, prof)].latency_curve([1, 2, 4], 14, kind="mps")
    assert after == pytest.approx(before * cal[("bert_base", "mps", 14)][0])
    other = run.problem.latency[(sku, prof)].latency_curve([1, 2, 4], 66, kind="mps")
    fresh = fid.load_run(S4 / "s1200d.json")
    assert other == pytest.approx(
        fresh.problem.latency[(sku, prof)].latency_curve([1, 2, 4], 66, kind="mps")
    )
    _, worst, _ = fid.compare(run, HostCosts(), 1, "queued", "busy")
    assert worst <= fid.TARGET


@s4
def test_calibration_refuses_the_compared_run() -> None:
    fid = _fidelity()
    with pytest.raises(SystemExit):
        fid.main([str(S4 / "s1200d.json"), "--calibrate-from", str(S4 / "s1200d.json")])


def test_stall_windows_merge_and_overlap() -> None:
    """benchmarks/stall_windows.py: late sends merge into windows; a batch overlaps a window
    when their intervals intersect."""
    spec = importlib.util.spec_from_file_location(
        "stall_windows", ROOT / "benchmarks" / "stall_windows.py"
    )
    assert spec is not None and spec.loader is not None
    sw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sw)
    win = np.array([[1.0, 2.0], [5.0, 6.0]])
    got = sw.overlaps(win, np.array([0.0, 1.5, 2.5, 4.0, 6.5]), np.array([0.9, 1.6, 3.0, 5.1, 7.0]))
    assert got.tolist() == [False, True, False, True, False]
    assert sw.overlaps(np.zeros((0, 2)), np.array([0.0]), np.array([1.0])).tolist() == [False]

    from types import SimpleNamespace

    run = SimpleNamespace(  # just what windows() reads
        lo=0.0,
        hi=10.0,
        npz={
            "t_sched": np.array([1.0, 1.001, 1.002, 3.0, 11.0]),
            "sent": np.array([1.010, 1.011, 1.0021, 3.0001, 11.02]),
        },
    )
    # the first two are > 3 ms late and overlap: one window; the third is on time; the last is
    # after phase 1
    assert sw.windows(run, 3.0).tolist() == [[1.0, 1.011]]
