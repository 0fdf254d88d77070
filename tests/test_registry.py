"""The model registry (stgs.registry): one definition of every model for the profiler and the
workers, model files with their own weights (.pt TorchScript, .pt2 torch.export, .onnx), and
the refusals of files that must not load.

Weights are fixed (``torch.manual_seed`` before every build); nothing is downloaded.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from partitioner.sim.config import HostCosts
from stgs.errors import ConfigError
from stgs.registry import (
    ModelEntry,
    ModelFileError,
    TensorSpec,
    build_module,
    file_entry,
    model_entry,
    onnx_session,
    resolve_model_file,
    sample_bytes,
    torchvision_names,
)

torch = pytest.importorskip("torch")

from profiler.models import build_model, resolve_spec  # noqa: E402
from stgs.runtime.models import load_runner  # noqa: E402

ATOL = 1e-4
SMALL_TV = "mobilenet_v2"


def _tv() -> bool:
    return SMALL_TV in torchvision_names()


# ---------------------------------------------------------------------- registry entries
def test_entries_describe_inputs_outputs_and_sizes() -> None:
    mlp = model_entry("tiny_mlp")
    assert (mlp.input_shape, mlp.input_dtype, mlp.outputs[0].shape) == ((64,), "float32", (10,))
    bert = model_entry("bert_base")
    assert bert.inputs[0] == TensorSpec("input_ids", "int64", (128,), 30522)
    assert bert.outputs[0].shape == (128, 768)  # the last hidden state, as profiled
    assert bert.example().max() < 30522 and bert.example().dtype == np.int64
    echo = model_entry("echo")
    assert echo.input_shape is None and not echo.needs_torch and echo.sample_bytes is None
    # one source of sizes for the simulator's host costs
    for name in ("tiny_mlp", "tiny_cnn", "bert_base"):
        assert sample_bytes(name) == model_entry(name).sample_bytes
        assert HostCosts().mb(name) == pytest.approx(sample_bytes(name) / 1e6)
    assert sample_bytes("resnet50") == 3 * 224 * 224 * 4
    assert sample_bytes("inception_v3") == 3 * 299 * 299 * 4
    # JSON round trip (worker specs, profiler requests)
    assert ModelEntry.from_dict(bert.to_dict()) == bert
    with pytest.raises(ConfigError, match="unknown model"):
        model_entry("no_such_net")


def _profiler_and_runtime(name: str, batch: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The same input through the profiler's model and the runtime's CPU runner."""
    spec = resolve_spec(name)
    model, make_input = build_model(spec, torch.device("cpu"), torch.float32)
    x = make_input(batch)
    with torch.inference_mode():
        prof = model(x)
    runner = load_runner(name, "cpu", batch)
    served = np.stack(runner.run(list(x.numpy())))
    return prof.numpy(), served


@pytest.mark.parametrize(
    "name",
    [
        "tiny_mlp",
        "tiny_cnn",
        "echo",
        pytest.param(
            SMALL_TV,
            marks=pytest.mark.skipif(
                not _tv(), reason="no working torchvision (its PyPI wheel needs CUDA torch)"
            ),
        ),
    ],
)
def test_profiler_and_workers_build_the_same_network(name: str) -> None:
    """What the profiler measures is what a worker serves: same network, same weights."""
    prof, served = _profiler_and_runtime(name)
    assert prof.shape == served.shape
    want = model_entry(name).outputs[0].shape
    if want is not None:
        assert prof.shape[1:] == want
    np.testing.assert_allclose(served, prof, rtol=1e-5, atol=1e-5)


def test_builds_are_deterministic() -> None:
    a, b = build_module("tiny_cnn"), build_module("tiny_cnn")
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


# ---------------------------------------------------------------------- model files
def _net() -> Any:
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


X = np.random.default_rng(1).standard_normal((5, 8), dtype=np.float32)


def _quiet(fn: Callable[[], Any]) -> Any:
    """torch's exporters warn (deprecations inside torch); the tests make warnings errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def save_torchscript(path: Path) -> None:
    _quiet(lambda: torch.jit.save(torch.jit.script(_net()), str(path)))


def save_export(path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = _quiet(
        lambda: torch.export.export(_net(), (torch.zeros(2, 8),), dynamic_shapes=({0: batch},))
    )
    torch.export.save(ep, str(path))


def save_onnx(path: Path, external_data: bool = False) -> None:
    pytest.importorskip("onnxscript")
    batch = torch.export.Dim("batch", min=1, max=1024)
    _quiet(
        lambda: torch.onnx.export(
            _net(),
            (torch.zeros(2, 8),),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=external_data,
        )
    )


SAVERS = {".pt": save_torchscript, ".pt2": save_export, ".onnx": save_onnx}


@pytest.mark.parametrize("suffix", [".pt", ".pt2", ".onnx"])
def test_model_files_load_and_match_eager(tmp_path: Path, suffix: str) -> None:
    if suffix == ".onnx":
        pytest.importorskip("onnxruntime")
    path = tmp_path / f"net{suffix}"
    SAVERS[suffix](path)
    given = (TensorSpec("x", "float32", (8,)),) if suffix == ".pt" else ()
    entry = file_entry("net", resolve_model_file(tmp_path, path.name), given)
    assert entry.kind == {".pt": "torchscript", ".pt2": "export", ".onnx": "onnx"}[suffix]
    assert (entry.input_shape, entry.input_dtype) == ((8,), "float32")
    if suffix != ".pt":  # the file's own signature
        assert entry.outputs[0].shape == (4,) and entry.outputs[0].dtype == "float32"
    with torch.inference_mode():
        want = _net()(torch.from_numpy(X)).numpy()
    served = np.stack(load_runner(entry, "cpu", 8).run(list(X)))  # a worker
    np.testing.assert_allclose(served, want, atol=ATOL, rtol=0)
    with torch.inference_mode():  # the profiler's path: the same loader
        model, make_input = build_model(
            resolve_spec(str(path), (8,) if suffix == ".pt" else None),
            torch.device("cpu"),
            torch.float32,
        )
        np.testing.assert_allclose(model(torch.from_numpy(X)).numpy(), want, atol=ATOL, rtol=0)
        assert tuple(model(make_input(2)).shape) == (2, 4)
    # a registration whose shape contradicts the file is refused
    if suffix != ".pt":
        with pytest.raises(ModelFileError, match="shape"):
            file_entry("net", path, (TensorSpec("x", "float32", (9,)),))


class Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("unpickled!",))


def test_pickles_are_refused(tmp_path: Path) -> None:
    torch.save(_net(), tmp_path / "saved.pt")  # torch.save of a module: a pickle in a zip
    with pytest.raises(ModelFileError, match=r"'saved.pt'.*torch.save pickle"):
        file_entry("m", tmp_path / "saved.pt", (TensorSpec("x", "float32", (8,)),))
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ModelFileError, match=r"'legacy.pt'.*not a zip"):
        file_entry("m", tmp_path / "legacy.pt", (TensorSpec("x", "float32", (8,)),))
    torch.save(_net().state_dict(), tmp_path / "state.pt2")
    with pytest.raises(ModelFileError, match=r"'state.pt2'.*not a torch.export archive"):
        file_entry("m", tmp_path / "state.pt2")
    # a torch.export archive with a pickle that is not plain tensors in it
    save_export(tmp_path / "ok.pt2")
    with (
        zipfile.ZipFile(tmp_path / "ok.pt2") as src,
        zipfile.ZipFile(tmp_path / "evil.pt2", "w") as dst,
    ):
        for item in src.infolist():
            dst.writestr(item, src.read(item.filename))
        root = src.namelist()[0].split("/")[0]
        dst.writestr(f"{root}/data/sample_inputs/extra.pt", pickle.dumps(Evil()))
    with pytest.raises(ModelFileError, match=r"'evil.pt2'.*weights_only"):
        file_entry("m", tmp_path / "evil.pt2")
    with pytest.raises(ModelFileError, match=r"'evil.pt2'"):
        build_module(
            ModelEntry(
                "m", "export", str(tmp_path / "evil.pt2"), (TensorSpec("x", "float32", (8,)),)
            )
        )


def test_onnx_on_a_gpu_never_runs_on_the_cpu_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime runs a session on the CPU, with a warning only, when the CUDA provider asked
    for does not load; a GPU worker or the GPU profiler would then serve and time the CPU. Here
    (onnxruntime without CUDA) that is what a build listing a provider it cannot load does."""
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu here: its CUDA provider may load")
    save_onnx(tmp_path / "net.onnx")
    entry = file_entry("net", tmp_path / "net.onnx")
    with pytest.raises(ModelFileError, match=r"'net.onnx'.*no CUDA provider"):
        onnx_session(entry, "cuda")
    listed = [*ort.get_available_providers(), "CUDAExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    with (
        pytest.warns(UserWarning, match="CUDAExecutionProvider"),
        pytest.raises(ModelFileError, match=r"'net.onnx'.*CUDA provider did not load"),
    ):
        onnx_session(entry, "cuda")
    assert onnx_session(entry, "cpu").get_providers() == ["CPUExecutionProvider"]


def test_paths_outside_the_model_dir_are_refused(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    save_torchscript(tmp_path / "outside.pt")
    (models / "link.pt").symlink_to(tmp_path / "outside.pt")
    for rel, why in (
        ("../outside.pt", "outside the model directory"),
        ("link.pt", "outside the model directory"),
        (str(tmp_path / "outside.pt"), "relative to the model directory"),
        ("nope.pt", "no such file"),
        ("x.pkl", "only TorchScript"),
        ("", "empty path"),
    ):
        with pytest.raises(ModelFileError, match=why):
            resolve_model_file(models, rel)


def test_big_and_bad_files_are_refused(tmp_path: Path) -> None:
    save_torchscript(tmp_path / "net.pt")
    with pytest.raises(ModelFileError, match=r"'net.pt' is .* MiB, above the limit"):
        file_entry("m", tmp_path / "net.pt", (TensorSpec("x", "float32", (8,)),), max_bytes=100)
    with pytest.raises(ModelFileError, match=r"'net.pt'.*no input signature"):
        file_entry("m", tmp_path / "net.pt")
    (tmp_path / "bad.onnx").write_bytes(b"not a protobuf at all")
    pytest.importorskip("onnx")
    with pytest.raises(ModelFileError, match=r"'bad.onnx' does not load as onnx"):
        file_entry("m", tmp_path / "bad.onnx")
    save_onnx(tmp_path / "ext.onnx", external_data=True)  # weights in a file beside it
    with pytest.raises(ModelFileError, match=r"'ext.onnx'.*external data is refused"):
        file_entry("m", tmp_path / "ext.onnx")
    (tmp_path / "bad.pt2").write_bytes(b"PK junk")
    with pytest.raises(ModelFileError, match=r"'bad.pt2'"):
        file_entry("m", tmp_path / "bad.pt2")
