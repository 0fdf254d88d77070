"""The profiler without a GPU: grid parsing, model specs, output files, the orchestrator with a
fake worker (resume, failures, crashes), the MPS daemon wrapper with a fake binary, and the
CLI end to end in CPU mode."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from _helpers import run_python

from api.cli import main
from profiler.errors import ModelLoadError, MpsUnavailableError, NoGpuError, ProfilerError
from profiler.gpu import gpu_label
from profiler.grid import default_partitions, parse_batches, parse_partitions
from profiler.measure import summarise
from profiler.models import ModelSpec, parse_shape, resolve_spec
from profiler.mps import MpsDaemon, visible_devices_env
from profiler.output import CsvAppender, failures_path, measured_points
from profiler.report import fit_markdown, fit_rows
from profiler.run import ProfileConfig, run_profile
from profiler.workers import WorkerDied
from stgs.errors import ConfigError, ProfileError
from stgs.profiles import read_interference, read_profiles

# --- grid and specs -------------------------------------------------------------------------


def test_parse_batches_ranges_and_lists() -> None:
    assert parse_batches(["1..128"]) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert parse_batches(["8,1", "4"]) == (1, 4, 8)
    assert parse_batches(["16..48/16"]) == (16, 32, 48)
    for bad in (["0"], ["x"], ["8..4"], []):
        with pytest.raises(ProfilerError):
            parse_batches(bad)


def test_parse_partitions_expand_and_normalise() -> None:
    got = parse_partitions(["full", "green:16..48/16", "mps:50,25", "mig:3G.40GB"])
    assert got == ("full", "green:16", "green:32", "green:48", "mps:50", "mps:25", "mig:3g.40gb")
    assert parse_partitions(["mps:50.0", "mps:50"]) == ("mps:50",)
    for bad in (["mps:0"], ["green:x"], ["50"], ["bogus:1"], ["full:1"]):
        with pytest.raises(ProfilerError):
            parse_partitions(bad)


def test_default_partitions_grid() -> None:
    parts = default_partitions(132)
    assert parts[0] == "full"
    assert [p for p in parts if p.startswith("green:")] == [
        f"green:{s}" for s in range(16, 129, 16)
    ]
    assert [p for p in parts if p.startswith("mps:")] == [
        "mps:100",
        "mps:75",
        "mps:50",
        "mps:37",
        "mps:25",
        "mps:12",
    ]
    assert not any(p.startswith("mps") for p in default_partitions(132, mps=False))


def test_resolve_spec(tmp_path: Path) -> None:
    assert resolve_spec("torchvision:resnet50").name == "resnet50"
    assert resolve_spec("resnet50").kind == "torchvision"
    assert resolve_spec("bert_base").kind == "builtin"
    assert resolve_spec("mine=tiny_cnn").name == "mine"
    f = tmp_path / "m.pt2"
    f.write_bytes(b"x")
    spec = resolve_spec(str(f), (3, 8, 8))
    assert (spec.kind, spec.name, spec.input_shape) == ("export", "m", (3, 8, 8))
    # a .pt2 or .onnx file's inputs come from the file; a TorchScript file needs --input-shape
    assert resolve_spec(str(f)).input_shape is None
    ts = tmp_path / "m.pt"
    ts.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="input-shape"):
        resolve_spec(str(ts))
    onnx_file = tmp_path / "n.onnx"
    onnx_file.write_bytes(b"x")
    assert resolve_spec(str(onnx_file)).kind == "onnx"
    assert resolve_spec("echo").kind == "builtin"  # the test models profile too
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_spec(str(tmp_path / "nope.pt"), (3,))
    with pytest.raises(ModelLoadError, match="unknown model"):
        resolve_spec("resnet5000")
    assert parse_shape("3x224x224") == (3, 224, 224)
    with pytest.raises(ModelLoadError):
        parse_shape("3xA")
    assert issubclass(ModelLoadError, ConfigError)


def test_summarise() -> None:
    assert summarise([3.0, 1.0, 2.0]) == (2.0, pytest.approx(2.98))
    assert summarise([1.0, 2.0]) == (1.5, pytest.approx(1.99))
    assert summarise([5.0]) == (5.0, 5.0)


def test_gpu_label() -> None:
    assert gpu_label("NVIDIA H100 80GB HBM3") == "H100-80GB"
    assert gpu_label("NVIDIA H200") == "H200-141GB"
    assert gpu_label("NVIDIA Fancy GPU") == "Fancy-GPU"


def test_visible_devices_env_maps_outer_list() -> None:
    assert visible_devices_env(1, {"CUDA_VISIBLE_DEVICES": "4,5"})["CUDA_VISIBLE_DEVICES"] == "5"
    assert visible_devices_env(0, {})["CUDA_VISIBLE_DEVICES"] == "0"
    assert visible_devices_env("MIG-abc", {})["CUDA_VISIBLE_DEVICES"] == "MIG-abc"


# --- output files ---------------------------------------------------------------------------


def test_appender_keeps_existing_header_and_repairs_cut_line(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    out.write_text(
        "gpu,model,partition,sm_count,batch,latency_ms,memory_mib\n"
        "H100,resnet50,full,132,1,1.0,90"  # cut before its newline
    )
    a = CsvAppender(
        out,
        ("gpu", "model", "partition", "sm_count", "batch", "latency_ms", "memory_mib", "p99_ms"),
    )
    a.append(
        {
            "gpu": "H100-80GB",
            "model": "resnet50",
            "partition": "full",
            "sm_count": 132,
            "batch": 2,
            "latency_ms": 1.5,
            "memory_mib": 91.0,
            "p99_ms": 2.0,
        }
    )
    a.close()
    assert measured_points(out) == {
        ("H100-80GB", "resnet50", "full", 1),
        ("H100-80GB", "resnet50", "full", 2),
    }
    bad = tmp_path / "bad.csv"
    bad.write_text("gpu,model\n")
    with pytest.raises(ProfileError, match="missing column"):
        CsvAppender(bad, ("gpu",), required=("gpu", "batch"))


# --- the orchestrator with a fake worker ---------------------------------------------------


class FakeWorker:
    """Answers like profiler.worker: latency = 1 + batch / sm_count; scripted failures."""

    def __init__(self, env: Mapping[str, str], log: list[tuple[str, Any]], fail: dict[str, str]):
        self.env, self.log, self.fail = dict(env), log, fail
        self.alive = True
        self.model: str | None = None
        self.pct = float(env.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "100"))
        self.queued: list[dict[str, Any]] = []

    def request(self, msg: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
        op = msg["op"]
        self.log.append((op, msg.get("partition") or (msg.get("spec") or {}).get("name")))
        if op == "info":
            return {
                "ok": True,
                "name": "NVIDIA H100 80GB HBM3",
                "sm_count": 132,
                "memory_mib": 81559.0,
                "torch": "fake",
                "green_contexts": True,
            }
        if op == "load":
            name = msg["spec"]["name"]
            if name == self.fail.get("load"):
                return {"ok": False, "error": f"model {name!r} does not load", "load_error": True}
            self.model = name
            return {"ok": True}
        if op == "unload":
            self.model = None
            return {"ok": True}
        if op == "measure":
            part, batch = msg["partition"], msg["batch"]
            key = f"{self.model}/{part}/{batch}"
            if self.fail.get("crash") == key:
                self.alive = False
                raise WorkerDied("worker exited with status -11")
            if self.fail.get("error") == key:
                return {"ok": False, "error": "RuntimeError: cuDNN error", "fatal": False}
            kind, _, arg = part.partition(":")
            sms = int(arg) if kind == "green" else int(132 * self.pct / 100) // 2 * 2
            lat = 1.0 + batch / sms * 10
            return {
                "ok": True,
                "median_ms": lat,
                "p99_ms": lat * 1.1,
                "memory_mib": 100.0 + batch,
                "graph": "cuda",
                "iters": 5,
                "sm_count": sms,
                "seconds": 0.01,
            }
        if op == "warm":
            assert self.model is not None, "warm before load"
            return {"ok": True, "seconds": 0.01, "skipped": []}
        if op == "prepare":
            return {"ok": True, "graph": "cuda"}
        if op == "run_for":
            return {"ok": True, "median_ms": 2.0, "p99_ms": 2.2, "iters": 10}
        raise AssertionError(op)

    def send(self, msg: Mapping[str, Any]) -> None:
        self.queued.append(dict(msg))

    def receive(self, timeout_s: float) -> dict[str, Any]:
        self.queued.pop(0)
        return {"ok": True, "median_ms": 2.5, "p99_ms": 2.9, "iters": 10}

    def close(self) -> None:
        self.alive = False


class FakeDaemon:
    stopped = 0

    def __init__(self, device: object, pipe_dir: object = None) -> None:
        pass

    def start(self) -> FakeDaemon:
        return self

    def client_env(self, pct: float) -> dict[str, str]:
        return {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": f"{pct:g}"}

    def stop(self) -> None:
        FakeDaemon.stopped += 1


@pytest.fixture
def fake_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    import profiler.mps

    monkeypatch.setattr(profiler.mps, "MpsDaemon", FakeDaemon)
    monkeypatch.setattr(profiler.mps, "mps_available", lambda: True)
    FakeDaemon.stopped = 0


def _cfg(tmp_path: Path, *models: str, **kw: Any) -> ProfileConfig:
    base: dict[str, Any] = {
        "models": tuple(resolve_spec(m) for m in models),
        "out": tmp_path / "p.csv",
        "partitions": ("full", "green:16", "mps:50"),
        "batches": (1, 8, 32),
        "quiet": True,
    }
    base.update(kw)
    return ProfileConfig(**base)


def _factory(log: list[tuple[str, Any]], fail: dict[str, str] | None = None) -> Any:
    workers: list[FakeWorker] = []

    def make(device: str, env: Mapping[str, str]) -> FakeWorker:
        w = FakeWorker(env, log, fail or {})
        workers.append(w)
        return w

    make.workers = workers  # type: ignore[attr-defined]
    return make


def test_grid_rows_resume_and_fit(tmp_path: Path, fake_mps: None) -> None:
    log: list[tuple[str, Any]] = []
    s = run_profile(_cfg(tmp_path, "resnet50", "vgg16"), factory=_factory(log))
    assert (s.gpu, s.measured, s.failed, s.skipped) == ("H100-80GB", 18, 0, 0)
    assert FakeDaemon.stopped == 1
    table = read_profiles(tmp_path / "p.csv")
    assert len(table) == 18 and table.models() == ["resnet50", "vgg16"]
    assert {r.sm_count for r in table} == {132, 16, 66}
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header.endswith("p99_ms,graph,iters,dtype,seconds")
    # model-major order: every resnet50 point before any vgg16 point
    models = [r.model for r in table]
    assert models == sorted(models, key=["resnet50", "vgg16"].index)
    # resume: nothing left to measure
    log.clear()
    s2 = run_profile(_cfg(tmp_path, "resnet50", "vgg16"), factory=_factory(log))
    assert (s2.measured, s2.skipped) == (0, 18)
    assert not any(op == "measure" for op, _ in log)
    rows = fit_rows(read_profiles(tmp_path / "p.csv"))
    assert [r.model for r in rows] == ["resnet50", "vgg16"]
    assert "| H100-80GB | resnet50 |" in fit_markdown(rows)


def test_prewarm_loads_and_warms_every_partition_before_timing(
    tmp_path: Path, fake_mps: None
) -> None:
    log: list[tuple[str, Any]] = []
    fac = _factory(log)
    s = run_profile(_cfg(tmp_path, "resnet50", "vgg16"), factory=fac)
    assert s.measured == 18
    ops = [op for op, _ in log]
    first_measure = ops.index("measure")
    # resnet50: three workers loaded and warmed (one per partition) before its first point,
    # and not loaded again by the serial path
    assert sorted(p for op, p in log[:first_measure] if op == "warm") == [
        "full",
        "green:16",
        "mps:50",
    ]
    assert ops[:first_measure].count("load") == 3
    assert ops.count("load") == 6 and ops.count("warm") == 6  # and the same for vgg16
    # without prewarm: no warm op, the same rows
    log.clear()
    sub = tmp_path / "again"
    sub.mkdir()
    s2 = run_profile(_cfg(sub, "resnet50", prewarm=False), factory=_factory(log))
    assert s2.measured == 9 and "warm" not in [op for op, _ in log]


def test_failures_are_recorded_and_retried(tmp_path: Path, fake_mps: None) -> None:
    log: list[tuple[str, Any]] = []
    fail = {"error": "resnet50/green:16/32", "crash": "resnet50/full/8"}
    fac = _factory(log, fail)
    s = run_profile(_cfg(tmp_path, "resnet50"), factory=fac)
    assert (s.measured, s.failed) == (7, 2)
    text = failures_path(tmp_path / "p.csv").read_text()
    assert "cuDNN error" in text and "WorkerDied" in text
    # the crashed plain worker was replaced and the model reloaded in the new one; each failed
    # point was retried once in a fresh worker (and failed again)
    special = {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "STGS_PROFILER_GREEN_SMS"}
    plain = [w for w in fac.workers if not special & set(w.env)]
    assert len(plain) == 3
    assert len([w for w in fac.workers if w.env.get("STGS_PROFILER_GREEN_SMS") == "16"]) == 2
    # a second run measures only the two failed points
    s2 = run_profile(_cfg(tmp_path, "resnet50"), factory=_factory([]))
    assert (s2.measured, s2.skipped, s2.failed) == (2, 7, 0)


def test_a_failed_point_is_retried_once(tmp_path: Path, fake_mps: None) -> None:
    flaky = {"error": "resnet50/green:16/32"}

    class Flaky(FakeWorker):
        def request(self, msg: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
            r = super().request(msg, timeout_s)
            if msg["op"] == "measure" and not r["ok"]:
                flaky.clear()  # succeeds next time
            return r

    s = run_profile(_cfg(tmp_path, "resnet50"), factory=lambda d, env: Flaky(env, [], flaky))
    assert (s.measured, s.failed) == (9, 0)


def test_model_that_does_not_load_costs_only_its_points(tmp_path: Path, fake_mps: None) -> None:
    s = run_profile(_cfg(tmp_path, "resnet50", "vgg16"), factory=_factory([], {"load": "vgg16"}))
    assert s.measured == 9 and "vgg16" in s.load_failures
    assert read_profiles(tmp_path / "p.csv").models() == ["resnet50"]


def test_onnx_models_are_not_measured_in_green_contexts(tmp_path: Path, fake_mps: None) -> None:
    """onnxruntime's CUDA provider runs in the device's primary context: no green-context
    workers for an ONNX model (nor their points); the other models keep the whole grid."""
    log: list[tuple[str, Any]] = []
    fac = _factory(log)
    onnx = ModelSpec("onnxnet", "onnx", str(tmp_path / "net.onnx"))
    cfg = _cfg(tmp_path, "resnet50", models=(resolve_spec("resnet50"), onnx))
    s = run_profile(cfg, factory=fac)
    rows = read_profiles(tmp_path / "p.csv")
    parts = {m: {r.partition for r in rows if r.model == m} for m in ("resnet50", "onnxnet")}
    assert parts == {"resnet50": {"full", "green:16", "mps:50"}, "onnxnet": {"full", "mps:50"}}
    assert (s.measured, s.failed) == (15, 0)
    assert any("onnxnet" in n and "green" in n for n in s.notes)
    green_loads = [w.model for w in fac.workers if "STGS_PROFILER_GREEN_SMS" in w.env and w.model]
    assert "onnxnet" not in green_loads


def test_interference_pairs(tmp_path: Path, fake_mps: None) -> None:
    cfg = _cfg(
        tmp_path,
        "resnet50",
        "vgg16",
        "bert_base",
        interference=True,
        interference_batches=(8,),
        interference_splits=((50.0, 50.0), (25.0, 75.0)),
    )
    s = run_profile(cfg, factory=_factory([]))
    rows = read_interference(tmp_path / "p-interference.csv")
    # pairs (resnet50, vgg16) and (bert_base, resnet50): 2 pairs x 2 splits x 1 batch x 2 rows
    assert s.interference_rows == len(rows) == 8
    r = next(r for r in rows if r.model == "vgg16" and r.mps_pct == 75)
    assert (r.neighbour_pct, r.latency_ms, r.solo_latency_ms) == (25, 2.5, 2.0)
    s2 = run_profile(cfg, factory=_factory([]))
    assert s2.interference_rows == 0  # resumed: all there


def test_no_gpu_and_no_mps_are_clear_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import profiler.mps

    def dead(device: str, env: Mapping[str, str]) -> Any:
        raise WorkerDied("worker did not start: RuntimeError: CUDA is not available")

    with pytest.raises(NoGpuError, match="--device cpu"):
        run_profile(_cfg(tmp_path, "resnet50"), factory=dead)
    monkeypatch.setattr(profiler.mps, "mps_available", lambda: False)
    with pytest.raises(MpsUnavailableError):
        run_profile(_cfg(tmp_path, "resnet50"), factory=_factory([]))
    # default grid without the binary: MPS left out, with a note
    s = run_profile(_cfg(tmp_path, "resnet50", partitions=None, batches=(1,)), factory=_factory([]))
    assert s.measured == 9 and any("MPS" in n for n in s.notes)
    with pytest.raises(ProfilerError, match="CPU mode"):
        run_profile(_cfg(tmp_path, "tiny_mlp", device="cpu"), factory=_factory([]))


def test_mig_partitions_without_instances_are_predicted(
    tmp_path: Path, fake_mps: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import profiler.gpu

    monkeypatch.setattr(profiler.gpu, "list_mig_devices", lambda index: [])
    s = run_profile(
        _cfg(tmp_path, "resnet50", partitions=("full", "mig:3g.40gb"), batches=(1,)),
        factory=_factory([]),
    )
    assert s.measured == 1
    assert any("predicted from the measured SM curve" in n for n in s.notes)


# --- the MPS daemon wrapper, with a fake control binary -------------------------------------


def test_mps_daemon_start_and_quit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "bin" / "nvidia-cuda-mps-control"
    exe.parent.mkdir()
    exe.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-d" ]; then touch "$CUDA_MPS_PIPE_DIRECTORY/control"; exit 0; fi\n'
        'read cmd; [ "$cmd" = quit ] && rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"\n'
    )
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    with MpsDaemon(0) as d:
        assert d.pipe_dir is not None and (d.pipe_dir / "control").exists()
        env = d.client_env(37)
        assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "37"
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(d.pipe_dir)
        tmp = d.pipe_dir.parent
    assert not tmp.exists()  # private directories removed after quit
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(MpsUnavailableError, match="nvidia-cuda-mps-control"):
        MpsDaemon(0).start()


# --- the CLI end to end on the CPU ----------------------------------------------------------


def test_cli_profile_tiny_mlp_on_cpu_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "cpu.csv"
    args = [
        "profile",
        "tiny_mlp",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--batches",
        "1,2,4",
        "--iters",
        "5",
        "--time-cap",
        "0.05",
        "--quiet",
    ]
    r = run_python("-m", "api.cli", *args, timeout=120)
    table = read_profiles(out)
    assert [(x.gpu, x.model, x.partition, x.batch) for x in table] == [
        ("cpu", "tiny_mlp", "full", b) for b in (1, 2, 4)
    ]
    assert all(x.latency_ms > 0 and x.memory_mib > 0 for x in table)
    assert "3 points measured" in r.stderr
    # resumable: a second run measures nothing
    r2 = run_python("-m", "api.cli", *args, timeout=120)
    assert "0 points measured, 3 already" in r2.stderr


def test_cli_profile_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "nonsense_model", "--out", str(tmp_path / "x.csv")]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert (
        main(
            [
                "profile",
                "tiny_mlp",
                "--device",
                "cpu",
                "--partitions",
                "mps:50",
                "--out",
                str(tmp_path / "x.csv"),
                "--quiet",
            ]
        )
        == 2
    )


@pytest.mark.gpu
def test_gpu_profile_smoke(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    out = tmp_path / "gpu.csv"
    s = run_profile(
        _cfg(tmp_path, "tiny_cnn", partitions=("full", "green:16"), batches=(1, 8), out=out)
    )
    assert s.measured == 4
    assert {r.partition for r in read_profiles(out)} == {"full", "green:16"}
