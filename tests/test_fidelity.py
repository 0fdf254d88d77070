"""benchmarks/fidelity.py on the H100 runs (restored from git history, tests/_helpers.py): the
host-cost fits, the trace join, the interference check and the comparison modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _helpers import recorded_runs, run_python

from benchmarks import fidelity, fit_host_costs, repeatability, stall_windows
from benchmarks.lib import fitting
from benchmarks.lib import runs as rf
from partitioner.sim.config import HostCosts
from stgs.hostcosts import load_host_costs, write_host_costs

REC = recorded_runs() or Path("/nonexistent")  # skipped below where the history is missing
RUNS = REC / "2026-11-22-h100"
S3 = REC / "2026-11-22-h100-s3"


pytestmark = [
    pytest.mark.shipped_profiles,
    pytest.mark.skipif(not (RUNS / "full.npz").is_file(), reason="H100 runs not in git history"),
]


def test_client_fit_of_session_2() -> None:
    """The client-side fit (runs without a trace) still measures: positive loop costs, and
    images (0.6 MB) cost more on the way in than token ids (1 kB)."""
    runs = [rf.load_run(RUNS / "full.json"), rf.load_run(RUNS / "half.json")]
    fitted, info = fitting.fit_host(runs, {"bert_base"})
    assert fitted.batch_ms > 0 and fitted.sample_ms_per_mb > 0
    around = info["around_ms"]
    assert min(around["resnet50"]) > max(around["bert_base"])


def test_batches_from_answers() -> None:
    """Batches told apart by their answers: sizes within the planned batch, durations > 0."""
    run = rf.load_run(RUNS / "full.json")
    for mids, lat in fitting.gpu_latency(run):
        b = fitting.client_batches(run, mids)
        assert b["n"].sum() > 1000
        for slot, mi in enumerate(mids):
            mine = b["model"] == mi
            assert b["n"][mine].max() <= len(lat[slot]) - 1  # never above the planned batch
        assert not (b["b2b"] & b["idle"]).any()
        assert (b["dur_ms"][1:] > 0).all()


s3 = pytest.mark.skipif(not (S3 / "full.npz").is_file(), reason="session-3 runs not in git history")


@s3
def test_the_host_cost_file_is_the_trace_fit_of_session_3(tmp_path: Path) -> None:
    """``python -m benchmarks.fit_host_costs`` on the two session-3 runs: ``--check`` finds the
    shipped stgs/data/host-costs.json holding what they give (the simulator's defaults too);
    written to another file, the entry carries its provenance and the fit's parts."""
    runs = [str(S3 / "full.npz"), str(S3 / "half.json")]  # either file of a run names it
    proc = run_python("-m", "benchmarks.fit_host_costs", *runs, "--check", timeout=300)
    assert "holds these terms" in proc.stdout
    out = tmp_path / "host-costs.json"
    assert fit_host_costs.main([*runs, "--out", str(out)]) == 0
    f = load_host_costs(out)
    e = f.entry()
    assert f.default == "H100-80GB"  # the runs' GPU; the first entry of a new file
    assert e.terms == load_host_costs().entry().terms == HostCosts().terms()
    assert [r.run for r in e.provenance.runs] == [
        "2026-11-22-h100-s3/full",
        "2026-11-22-h100-s3/half",
    ]
    assert all(
        "serve_gpu.py" in r.command and r.date.startswith("2026-11-22") for r in e.provenance.runs
    )
    assert e.provenance.command.startswith("python -m benchmarks.fit_host_costs")
    assert "H100" in e.provenance.machine and e.fit["batches"] > 100_000
    # images take longer from the send to the worker's queue than token ids
    med = e.fit["sent_to_queued_median_ms"]
    assert med["0.6021 MB"] > med["0.0010 MB"] > 0
    # an entry that no longer matches its runs: --check exits 1
    bumped = e.terms.model_copy(update={"batch_ms": e.terms.batch_ms + 0.1})
    write_host_costs(out, "H100-80GB", e.model_copy(update={"terms": bumped}), default=True)
    assert fit_host_costs.main([*runs, "--check", "--out", str(out)]) == 1
    # bad input: exit 2, nothing written
    before = out.read_text()
    assert fit_host_costs.main([str(RUNS / "full.json"), "--out", str(out)]) == 2  # no trace
    assert fit_host_costs.main([str(tmp_path / "nope.npz"), "--out", str(out)]) == 2
    assert out.read_text() == before


@s3
def test_trace_join_and_every_request_queued() -> None:
    """Every request sent in phase 1 reached a worker's queue (the trace has as many rows in
    the window), and the join to the client's record is one to one and nearly complete."""
    run = rf.load_run(S3 / "half.json")
    tr = fitting.load_trace(run)
    assert tr is not None
    t, st = run.npz["t_sched"], run.npz["status"]
    win = (t >= run.lo) & (t < run.hi) & (st != rf.NOT_SENT)
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
    old = rf.load_run(RUNS / "full.json")
    assert fitting.load_trace(old) is None
    assert fitting.resolve_mode(old, "auto") == "scheduled"
    assert fitting.resolve_mode(run, "auto") == "queued"


@s3
def test_busy_interference_fits_the_trace_better() -> None:
    """Runner time per batch on the MPS partitions: the neighbours-running model errs less
    than the plan's static one (the evidence behind SimOptions.interference = "busy")."""
    runs = [rf.load_run(S3 / "full.json"), rf.load_run(S3 / "half.json")]
    lines, mae = fitting.interference_check(runs)
    assert mae["busy"] < 0.9 * mae["static"]
    assert len([x for x in lines if x.startswith("| full |")]) == 5


@s3
def test_queued_mode_meets_target_on_full_run_and_host_costs_matter() -> None:
    """Counted from the worker's queue (the load generator's lag out of both sides), the full
    run agrees within 10% for every model; without host costs it does not; end to end (the
    lag in the GPU's numbers only) it does not either."""
    run = rf.load_run(S3 / "full.json")
    rows, worst, info = fitting.compare(run, HostCosts(), 1, "queued")
    assert info["requests"] == 144514 and info["not_sent"] == 0
    assert info["expired_on_arrival"] > 0  # the lag's victims: misses on both sides
    assert worst < 0.10, rows
    _, worst_off, _ = fitting.compare(run, HostCosts(enabled=False), 1, "queued")
    assert worst_off > 0.2
    _, worst_e2e, _ = fitting.compare(run, HostCosts(), 1, "scheduled")
    assert worst_e2e > 0.2


def test_scheduled_mode_matches_serve_gpu_summary() -> None:
    """The end-to-end GPU numbers computed from the .npz are serve_gpu.py's own phase-1 rows."""
    run = rf.load_run(RUNS / "half.json")
    rows, _, info = fitting.compare(run, HostCosts(), 1, "scheduled")
    gpu = {r["model"]: r for r in run.res["windows"]["phase1"]["rows"]}
    for r in rows:
        assert r["gpu_attainment"] == pytest.approx(gpu[r["model"]]["attainment"], abs=1e-4)
        assert r["gpu_p99_ms"] == pytest.approx(gpu[r["model"]]["p99_ok_ms"], abs=0.01)
    assert info["requests"] == 72162


S4 = REC / "2026-11-22-h100-s4"
s4 = pytest.mark.skipif(
    not (S4 / "s1200c.npz").is_file(), reason="session-4 runs not in git history"
)


@s4
def test_calibration_from_another_run() -> None:
    """--calibrate-from: the runtime's latency per (model, partition) measured on run c scales
    the profiles for run d (same plan, same machine kind): a factor per partition of run c's
    plan, near 1, applied to exactly those curves, and the replay of d within the target."""
    cal = fitting.calibration([rf.load_run(S4 / "s1200c.json")])
    assert {m for m, _, _ in cal} == {
        "resnet50",
        "mobilenet_v3_large",
        "efficientnet_b0",
        "bert_base",
        "vit_b_16",
    }
    assert all(0.85 < f < 1.2 and n >= 1000 for f, n in cal.values())
    run = rf.load_run(S4 / "s1200d.json")
    sku = run.plan.gpus[0].sku
    prof = run.problem.models[run.names.index("bert_base")].profile
    before = run.problem.latency[(sku, prof)].latency_curve([1, 2, 4], 14, kind="mps")
    assert fitting.apply_calibration(run, cal) == 5
    after = run.problem.latency[(sku, prof)].latency_curve([1, 2, 4], 14, kind="mps")
    assert after == pytest.approx(before * cal[("bert_base", "mps", 14)][0])
    other = run.problem.latency[(sku, prof)].latency_curve([1, 2, 4], 66, kind="mps")
    fresh = rf.load_run(S4 / "s1200d.json")
    assert other == pytest.approx(
        fresh.problem.latency[(sku, prof)].latency_curve([1, 2, 4], 66, kind="mps")
    )
    _, worst, _ = fitting.compare(run, HostCosts(), 1, "queued", "busy")
    assert worst <= fitting.TARGET


@s4
def test_calibration_refuses_the_compared_run() -> None:
    with pytest.raises(SystemExit):
        fidelity.main([str(S4 / "s1200d.json"), "--calibrate-from", str(S4 / "s1200d.json")])


def test_stall_windows_merge_and_overlap() -> None:
    """benchmarks/stall_windows.py: late sends merge into windows; a batch overlaps a window
    when their intervals intersect."""
    sw = stall_windows
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


@s4
def test_calibration_by_bucket() -> None:
    """--calibrate-by bucket: a factor per captured bucket where 50 batches measured it, the
    partition's kept for the rest; the scaled curve takes each bucket's own factor."""
    cal = fitting.calibration([rf.load_run(S4 / "s1200c.json")], "bucket")
    part = cal[("mobilenet_v3_large", "mps", 32)]
    b1, b4 = cal[("mobilenet_v3_large", "mps", 32, 1)], cal[("mobilenet_v3_large", "mps", 32, 4)]
    assert b1[1] + cal[("mobilenet_v3_large", "mps", 32, 2)][1] + b4[1] == part[1]
    assert b4[0] < part[0] < b1[0]  # one factor per partition over-charges the large batches
    assert all(n >= fitting.CAL_MIN for _, n in cal.values())
    run = rf.load_run(S4 / "s1200d.json")
    sku = run.plan.gpus[0].sku
    prof = run.problem.models[run.names.index("mobilenet_v3_large")].profile
    before = run.problem.latency[(sku, prof)].latency_curve([1, 2, 3, 4], 32, kind="mps")
    fitting.apply_calibration(run, cal)
    after = run.problem.latency[(sku, prof)].latency_curve([1, 2, 3, 4], 32, kind="mps")
    f2 = cal[("mobilenet_v3_large", "mps", 32, 2)][0]
    # 3 is no bucket of batch 4: the partition's factor
    assert after == pytest.approx(before * np.array([b1[0], f2, part[0], b4[0]]))
    with pytest.raises(ValueError, match="calibrate by"):
        fitting.calibration([run], "model")


@s4
def test_fit_runtime_noise_and_compare_with_it(tmp_path: Path) -> None:
    """--fit-noise: factors of median 1 per served profile and "*", the runtime's spread (p99 /
    median > 1.05, the profiler's is ~1.005); --noise runtime replays with them (other draws,
    the GPU side unchanged)."""
    out = tmp_path / "noise.json"
    assert fidelity.main(["--fit-noise", str(out), str(S4 / "s1200c.json")]) == 0
    from partitioner.sim.noise import load_runtime_noise

    fs = load_runtime_noise(out)
    assert "*" in fs and "resnet50" in fs
    for v in fs.values():
        x = np.asarray(v)
        assert np.median(x) == pytest.approx(1.0, abs=0.01)
        assert np.percentile(x, 99) > 1.05
    run = rf.load_run(S4 / "s1200d.json")
    rows_p, _, info_p = fitting.compare(run, HostCosts(), 1, "queued", "busy")
    rows_r, _, info_r = fitting.compare(run, HostCosts(), 1, "queued", "busy", out)
    assert info_p["noise"] == "profile" and info_r["noise"].startswith("runtime")
    p, r = rows_p[-1], rows_r[-1]
    # the draws differ; p99 moves little (queueing dominates it; measured in docs/benchmarks.md)
    assert r["model"] == "all" and r["sim_p99_ms"] != p["sim_p99_ms"]
    assert abs(r["sim_p99_ms"] - p["sim_p99_ms"]) < 0.05 * p["sim_p99_ms"]
    assert r["gpu_p99_ms"] == p["gpu_p99_ms"]
    assert abs(r["sim_attainment"] - p["sim_attainment"]) < 0.01


def test_noise_flags_go_together() -> None:
    with pytest.raises(SystemExit) as exc:
        fidelity.main([str(RUNS / "full.json"), "--noise", "runtime"])
    assert exc.value.code == 2


@pytest.mark.parametrize("what", ["missing", "not json", "no npz", "not a run"])
def test_unreadable_run_exits_2_with_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str
) -> None:
    """fidelity.py, repeatability.py and stall_windows.py share read_run: a run that cannot be
    read is exit 2 and one line naming the file and why, not a traceback."""
    p = tmp_path / "run.json"
    if what == "not json":
        p.write_text("{")
    elif what == "no npz":
        p.write_text((RUNS / "full.json").read_text())
    elif what == "not a run":
        p.write_text("{}")
        np.savez(tmp_path / "run.npz", x=np.zeros(1))
    assert fidelity.main([str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run." in err
    with pytest.raises(
        rf.RunError,
        match={
            "missing": "no such file",
            "not json": "not JSON",
            "no npz": "run.npz: no such file",
            "not a run": "not a serve_gpu.py run",
        }[what],
    ):
        rf.read_run(p)
    sw = stall_windows
    with pytest.raises(SystemExit) as exc:
        sw.main([str(p), "--clean", str(p)])
    named = str(tmp_path / "run.")  # the JSON, or its missing .npz
    assert exc.value.code == 2 and named in capsys.readouterr().err
    rep = repeatability
    assert rep.main([str(p), str(p)]) == 2
    assert named in capsys.readouterr().err


@s4
def test_repeatability_of_c_and_d(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Runs c and d (one machine, one plan, one schedule): end to end (scheduled) the figures
    are serve_gpu.py's own phase-1 rows of each run, and the spread is what they differ by."""
    rep = repeatability
    out = tmp_path / "rep.json"
    c, d = S4 / "s1200c.json", S4 / "s1200d.json"
    assert rep.main([str(c), str(d), "--arrivals", "scheduled", "--json", str(out)]) == 0
    import json

    got = json.loads(out.read_text())
    for i, path in enumerate((c, d)):
        rows = {r["model"]: r for r in json.loads(path.read_text())["windows"]["phase1"]["rows"]}
        for m, v in got["models"].items():
            assert v["p99_ms"][i] == pytest.approx(rows[m]["p99_ok_ms"], abs=0.01)
            assert v["attainment"][i] == pytest.approx(rows[m]["attainment"], abs=1e-4)
    a = got["models"]["all"]
    assert a["p99_spread"] == pytest.approx(
        (max(a["p99_ms"]) - min(a["p99_ms"])) / min(a["p99_ms"])
    )
    assert "largest spread" in capsys.readouterr().out


@s4
def test_repeatability_refuses_non_repeats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rep = repeatability
    c = S4 / "s1200c.json"
    # another plan
    assert rep.main([str(c), str(RUNS / "full.json")]) == 2
    assert "plan 1 differs" in capsys.readouterr().err
    # the same plan, one request's schedule moved
    with np.load(S4 / "s1200c.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["t_sched"] = arrays["t_sched"].copy()
    arrays["t_sched"][7] += 1e-3
    (tmp_path / "x.json").write_text(c.read_text())
    np.savez(tmp_path / "x.npz", **arrays)
    assert rep.main([str(c), str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scheduled arrivals differ at 1 requests (first: #7" in err
    assert rep.main([str(c)]) == 2
