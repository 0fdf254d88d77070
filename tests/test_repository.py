"""The model repository's reading of Triton's layout (api/repository.py), without a daemon:
config.pbtxt through model_config_pb2, version policies, file names, the config checked against
the file, and Triton's JSON shape of a config."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.repository import Repository, RepositoryError, config_dict

torch = pytest.importorskip("torch")
from test_registry import save_export, save_onnx, save_torchscript  # noqa: E402

CFG = """
platform: "{platform}"
max_batch_size: {mbs}
input [ {{ name: "{inp}" data_type: {dt} dims: [ {dims} ] }} ]
output [ {{ name: "{out}" data_type: TYPE_FP32 dims: [ 4 ] }} ]
parameters {{ key: "slo_ms" value {{ string_value: "50" }} }}
parameters {{ key: "rate_rps" value {{ string_value: "20" }} }}
{extra}
"""


def _model(
    repo: Path,
    name: str,
    saver: object = save_torchscript,
    fname: str = "model.pt",
    versions: tuple[int, ...] = (1,),
    **kw: object,
) -> None:
    fields = {
        "platform": "pytorch_libtorch",
        "mbs": 8,
        "inp": "INPUT__0",
        "out": "OUTPUT__0",
        "dt": "TYPE_FP32",
        "dims": "8",
        "extra": "",
    }
    fields.update({k: v for k, v in kw.items()})
    (repo / name).mkdir(parents=True)
    for v in versions:
        (repo / name / str(v)).mkdir()
        saver(repo / name / str(v) / fname)  # type: ignore[operator]
    (repo / name / "config.pbtxt").write_text(CFG.format(**fields))


def test_torchscript_versions_and_spec(tmp_path: Path) -> None:
    _model(tmp_path, "net", versions=(1, 3, 2))
    repo = Repository(tmp_path, 1 << 30)
    m = repo.inspect("net")
    assert (m.version, m.versions, m.file) == (3, (3,), "net/3/model.pt")
    assert (m.slo_ms, m.rate_rps) == (50.0, 20.0)
    spec = repo.spec(m)
    assert spec["source"] == "repository:net/3" and spec["max_batch_size"] == 8
    e = repo.entry("net", 3)
    assert e.kind == "torchscript" and e.inputs[0].name == "INPUT__0"
    assert e.inputs[0].shape == (8,) and e.outputs[0].name == "OUTPUT__0"
    with pytest.raises(RepositoryError, match="version 1 is not among"):
        repo.inspect("net", 1)


@pytest.mark.parametrize(
    ("policy", "served", "selected"),
    [
        ("version_policy { all {} }", 3, (1, 2, 3)),
        ("version_policy { latest { num_versions: 2 } }", 3, (2, 3)),
        ("version_policy { specific { versions: [ 1, 2 ] } }", 2, (1, 2)),
    ],
)
def test_version_policies(tmp_path: Path, policy: str, served: int, selected: tuple[int]) -> None:
    _model(tmp_path, "net", versions=(1, 2, 3), extra=policy)
    m = Repository(tmp_path, 1 << 30).inspect("net")
    assert (m.version, m.versions) == (served, selected)


def test_onnx_and_export_checked_against_the_file(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    _model(tmp_path, "good", save_onnx, "model.onnx", platform="onnxruntime_onnx", inp="x", out="y")
    _model(
        tmp_path,
        "dims",
        save_onnx,
        "model.onnx",
        platform="onnxruntime_onnx",
        inp="x",
        out="y",
        dims="4",
    )
    _model(tmp_path, "name", save_onnx, "model.onnx", platform="onnxruntime_onnx", inp="z", out="y")
    _model(
        tmp_path,
        "dtype",
        save_onnx,
        "model.onnx",
        platform="onnxruntime_onnx",
        inp="x",
        out="y",
        dt="TYPE_INT64",
    )
    _model(tmp_path, "pt2", save_export, "model.pt2", inp="input")
    _model(tmp_path, "pt2name", save_export, "model.pt2", inp="x")
    repo = Repository(tmp_path, 1 << 30)
    e = repo.entry("good", None)
    assert (e.kind, e.inputs[0].name, e.outputs[0].name, e.inputs[0].shape) == (
        "onnx",
        "x",
        "y",
        (8,),
    )
    with pytest.raises(RepositoryError, match=r"'dims'.*dims \[4\], the ONNX graph has \[8\]"):
        repo.entry("dims", None)
    with pytest.raises(RepositoryError, match=r"input 'z' does not match the ONNX graph.*'x'"):
        repo.entry("name", None)
    with pytest.raises(RepositoryError, match="is TYPE_INT64, the ONNX graph has TYPE_FP32"):
        repo.entry("dtype", None)
    assert repo.entry("pt2", None).kind == "export"
    with pytest.raises(RepositoryError, match=r"torch.export signature, whose input is 'input'"):
        repo.entry("pt2name", None)


def test_refusals_name_the_model(tmp_path: Path) -> None:
    _model(tmp_path, "two", extra='input [ { name: "b" data_type: TYPE_FP32 dims: [ 8 ] } ]')
    _model(tmp_path, "mbs0", mbs=0)
    _model(tmp_path, "strings", dt="TYPE_STRING")
    _model(tmp_path, "wrongfile", fname="model.onnx", saver=save_torchscript)
    (tmp_path / "noconfig" / "1").mkdir(parents=True)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.pbtxt").write_text("max_batch_size: [")
    repo = Repository(tmp_path, 1 << 30)
    # several inputs are served (issue 15): the config of two inputs inspects
    assert [t.name for t in repo.inspect("two").config.input][-1] == "b"
    with pytest.raises(RepositoryError, match="max_batch_size 0"):
        repo.entry("mbs0", None)
    with pytest.raises(RepositoryError, match="TYPE_STRING"):
        repo.entry("strings", None)
    with pytest.raises(RepositoryError, match=r"version 1 has none of model.pt, model.pt2"):
        repo.inspect("wrongfile")
    with pytest.raises(RepositoryError, match=r"no config.pbtxt"):
        repo.inspect("noconfig")
    with pytest.raises(RepositoryError, match=r"'broken'.*does not parse"):
        repo.inspect("broken")


def test_spec_needs_an_slo_and_a_rate(tmp_path: Path) -> None:
    _model(tmp_path, "net")
    cfg = (tmp_path / "net" / "config.pbtxt").read_text()
    (tmp_path / "net" / "config.pbtxt").write_text(cfg.split("parameters")[0])
    repo = Repository(tmp_path, 1 << 30)
    m = repo.inspect("net")
    with pytest.raises(RepositoryError, match="no SLO or expected rate"):
        repo.spec(m)
    assert repo.spec(m, 10.0, 5.0)["slo_ms"] == 10.0


def test_config_json_is_tritons_shape(tmp_path: Path) -> None:
    _model(tmp_path, "net", extra="version_policy { specific { versions: [ 1 ] } }")
    repo = Repository(tmp_path, 1 << 30)
    d = repo.config_json(repo.inspect("net"))
    assert d["input"][0]["dims"] == [8] and d["version_policy"]["specific"]["versions"] == [1]
    assert d["max_batch_size"] == 8 and d["input"][0]["data_type"] == "TYPE_FP32"
    assert d["parameters"]["slo_ms"] == {"string_value": "50"}
    assert config_dict(repo.inspect("net").config)["output"][0]["dims"] == [4]
