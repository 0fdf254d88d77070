"""Smoke test of benchmarks/serve_gpu.py in --simulated mode (CPU workers, a few seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _helpers import run_python


@pytest.mark.shipped_profiles
def test_serve_gpu_simulated(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    proc = run_python(
        "-m",
        "benchmarks.serve_gpu",
        "--simulated",
        "--warmup-s",
        "0.5",
        "--phase-s",
        "2",
        "--after-s",
        "1",
        "--runtime-dir",
        str(tmp_path / "rt"),
        "--json",
        str(out),
        timeout=60,
    )
    assert "PHASE 1" in proc.stdout and "SWITCH" in proc.stdout
    res = json.loads(out.read_text())
    c1 = res["checks"]["plan1"]
    assert c1["mps_partitions"] >= 3 and c1["time_shared_partitions"] >= 1 and c1["models"] >= 4
    assert res["checks"]["plan2"]["shares"] != c1["shares"]  # different partition sizes
    assert res["switch"]["record"]["state"] == "succeeded"
    assert res["lost"] == 0
    assert all(p["state"] == "ready" for p in res["partitions2"])
    phase1 = res["windows"]["phase1"]["rows"][-1]
    assert phase1["model"] == "all" and phase1["sent"] > 0
    assert phase1["ok"] + phase1["deadline"] == phase1["sent"]
    assert any("quit" in note for note in res["cleanup"])
    assert out.with_suffix(".npz").is_file()
    # the drained plan-1 workers wrote their trace, merged into the npz
    import numpy as np

    from stgs.runtime.worker import TRACE_BATCH, TRACE_REQUEST

    with np.load(out.with_suffix(".npz")) as z:
        wb, wr, parts = z["wb"], z["wr"], json.loads(str(z["w_parts"]))
        sent = int((z["status"] >= 0).sum())
    assert len(parts) == c1["mps_partitions"]  # plan 2's workers are killed, not drained
    assert wb.shape[1] == 1 + len(TRACE_BATCH) and wr.shape[1] == 1 + len(TRACE_REQUEST)
    assert 0 < len(wr) <= sent
    run = wb[:, 3] > 0
    # take <= run start <= run end <= replies sent; live <= taken
    assert np.all(wb[:, 4] <= wb[:, 5]) and np.all(wb[:, 5] <= wb[:, 6])
    assert np.all(wb[:, 6] <= wb[:, 7]) and np.all(wb[:, 3] <= wb[:, 2])
    # each request names a batch of its worker, which took it after it was queued
    for k in range(len(parts)):
        b, r = wb[wb[:, 0] == k], wr[wr[:, 0] == k]
        assert np.all(r[:, 4] < len(b))
        assert np.all(b[r[:, 4], 4] >= r[:, 3])
        assert int(r[:, 5].sum()) == int(b[run[wb[:, 0] == k], 3].sum())
