"""A Triton model repository through the front door: ``stgs serve`` on the simulated node (CPU
workers, frontends) started on a repository of a TorchScript and an ONNX model with their
``config.pbtxt`` (and two models it must refuse), then Triton's own clients,
``tritonclient.http`` and ``tritonclient.grpc``: inference equal to the eager torch model,
versions, the repository index, model configs, statistics, unload and load again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from api.launch import ONE_SIMULATED_GPU, LocalDaemon, wait_until

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from test_registry import _net, save_onnx, save_torchscript  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.slow

X = np.random.default_rng(5).standard_normal((3, 8), dtype=np.float32)
PARAMS = """
parameters { key: "slo_ms" value { string_value: "2000" } }
parameters { key: "rate_rps" value { string_value: "10" } }
"""


def _config(platform: str, inp: str, out: str, in_dims: str = "8", extra: str = "") -> str:
    return (
        f'platform: "{platform}"\nmax_batch_size: 16\n'
        f'input [ {{ name: "{inp}" data_type: TYPE_FP32 dims: [ {in_dims} ] }} ]\n'
        f'output [ {{ name: "{out}" data_type: TYPE_FP32 dims: [ 4 ] }} ]\n' + PARAMS + extra
    )


def build_repository(repo: Path) -> None:
    """torchnet (versions 1 and 2: 2 served), onnxnet (version 1); refused: badcfg (its config
    disagrees with its ONNX graph), badfile (a pickle, not TorchScript). Models of several
    inputs and outputs: tests/test_multi_io_e2e.py."""
    for v in ("1", "2"):
        (repo / "torchnet" / v).mkdir(parents=True)
        save_torchscript(repo / "torchnet" / v / "model.pt")
    (repo / "torchnet" / "config.pbtxt").write_text(
        _config("pytorch_libtorch", "INPUT__0", "OUTPUT__0")
    )
    (repo / "onnxnet" / "1").mkdir(parents=True)
    save_onnx(repo / "onnxnet" / "1" / "model.onnx")
    (repo / "onnxnet" / "config.pbtxt").write_text(_config("onnxruntime_onnx", "x", "y"))
    (repo / "badcfg" / "1").mkdir(parents=True)
    save_onnx(repo / "badcfg" / "1" / "model.onnx")
    (repo / "badcfg" / "config.pbtxt").write_text(
        _config("onnxruntime_onnx", "x", "y", in_dims="4")
    )
    (repo / "badfile" / "1").mkdir(parents=True)
    torch.save(_net(), repo / "badfile" / "1" / "model.pt")
    (repo / "badfile" / "config.pbtxt").write_text(
        _config("pytorch_libtorch", "INPUT__0", "OUTPUT__0")
    )


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDaemon]:
    work = tmp_path_factory.mktemp("repo")
    build_repository(work / "repo")
    d = LocalDaemon(work, ONE_SIMULATED_GPU + '[models]\nrepository = "repo"\n')
    try:
        p = d.start()
        with d.client() as c:
            wait_until("ready", lambda: c.get("/v2/health/ready").status_code == 200, 60, p)
            # registered at start from the repository (the refused ones are not registered)
            wait_until("both registered", lambda: len(c.get("/v1/models").json()) >= 2, 60, p)
        d.wait_all_ready(300)  # profiled, planned, serving; a failure stops it with the reason
        yield d
    finally:
        d.stop()


def _eager(x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return np.asarray(_net()(torch.from_numpy(x)).numpy())


def _http(c: Any, model: str, inp: str, out: str, version: str = "") -> np.ndarray:
    i = httpclient.InferInput(inp, list(X.shape), "FP32")
    i.set_data_from_numpy(X, binary_data=True)
    o = httpclient.InferRequestedOutput(out, binary_data=True)
    r = c.infer(model, [i], outputs=[o], model_version=version)
    assert r.get_response()["model_version"] == (version or r.get_response()["model_version"])
    return np.asarray(r.as_numpy(out))


def _grpc(c: Any, model: str, inp: str, out: str, version: str = "") -> np.ndarray:
    i = grpcclient.InferInput(inp, list(X.shape), "FP32")
    i.set_data_from_numpy(X)
    r = c.infer(model, [i], outputs=[grpcclient.InferRequestedOutput(out)], model_version=version)
    return np.asarray(r.as_numpy(out))


MODELS = {"torchnet": ("INPUT__0", "OUTPUT__0"), "onnxnet": ("x", "y")}


def test_both_clients_infer_equal_to_eager(http_c: Any, grpc_c: Any) -> None:
    want = _eager(X)
    for model, (inp, out) in MODELS.items():
        np.testing.assert_allclose(_http(http_c, model, inp, out), want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(_grpc(grpc_c, model, inp, out), want, atol=1e-4, rtol=0)
    # the served version (the newest that version_policy latest 1 selects) by its number
    np.testing.assert_allclose(
        _http(http_c, "torchnet", *MODELS["torchnet"], version="2"), want, atol=1e-4, rtol=0
    )
    np.testing.assert_allclose(
        _grpc(grpc_c, "torchnet", *MODELS["torchnet"], version="2"), want, atol=1e-4, rtol=0
    )
    assert http_c.is_model_ready("torchnet", "2") and grpc_c.is_model_ready("torchnet", "2")
    assert http_c.get_model_metadata("torchnet", "2")["versions"] == ["2"]
    for version in ("1", "3"):
        with pytest.raises(InferenceServerException, match="no version"):
            _http(http_c, "torchnet", *MODELS["torchnet"], version=version)
        with pytest.raises(InferenceServerException, match="no version"):
            _grpc(grpc_c, "torchnet", *MODELS["torchnet"], version=version)
    with pytest.raises(InferenceServerException, match="unknown output"):
        _http(http_c, "onnxnet", "x", "output")


def test_repository_index_names_every_model_and_why(
    daemon: LocalDaemon, http_c: Any, grpc_c: Any
) -> None:
    rows = {r["name"]: r for r in http_c.get_model_repository_index()}
    assert set(rows) == {"torchnet", "onnxnet", "badcfg", "badfile"}
    assert rows["torchnet"]["state"] == "READY" and rows["torchnet"]["version"] == "2"
    assert rows["onnxnet"]["state"] == "READY" and rows["onnxnet"]["version"] == "1"
    bad = {n: rows[n] for n in ("badcfg", "badfile")}
    assert all(r["state"] == "UNAVAILABLE" for r in bad.values())
    assert "'badcfg'" in bad["badcfg"]["reason"] and "dims [4]" in bad["badcfg"]["reason"]
    assert "[8]" in bad["badcfg"]["reason"]
    assert "torch.save pickle" in bad["badfile"]["reason"]
    g = grpc_c.get_model_repository_index(as_json=True)["models"]
    assert {m["name"]: m.get("state") for m in g} == {n: r["state"] for n, r in rows.items()}
    with daemon.client() as c:
        ready = c.post("/v2/repository/index", json={"ready": True}).json()
    assert {r["name"] for r in ready} == {"torchnet", "onnxnet"}


def test_model_config_is_the_config_pbtxt(http_c: Any, grpc_c: Any) -> None:
    h = http_c.get_model_config("onnxnet")
    assert h["name"] == "onnxnet" and h["platform"] == "onnxruntime_onnx"
    assert h["max_batch_size"] == 16
    assert h["input"][0]["name"] == "x" and h["input"][0]["data_type"] == "TYPE_FP32"
    assert h["input"][0]["dims"] == [8] and h["output"][0]["dims"] == [4]  # numbers
    assert h["parameters"]["slo_ms"]["string_value"] == "2000"
    g = grpc_c.get_model_config("torchnet", as_json=True)["config"]
    assert g["name"] == "torchnet" and g["input"][0]["name"] == "INPUT__0"
    assert http_c.get_model_config("torchnet", "2")["output"][0]["name"] == "OUTPUT__0"
    with pytest.raises(InferenceServerException):
        http_c.get_model_config("badcfg")


def test_statistics_count_what_was_served(http_c: Any, grpc_c: Any) -> None:
    """The frontends report their counts about once a second: the first read may lag."""
    _http(http_c, "onnxnet", "x", "y")
    end = time.monotonic() + 10
    while True:
        h = http_c.get_inference_statistics("onnxnet")["model_stats"][0]
        if h["inference_count"] >= 3 or time.monotonic() > end:
            break
        time.sleep(0.2)
    assert h["name"] == "onnxnet" and h["version"] == "1"
    assert h["inference_count"] >= 3 and isinstance(h["inference_count"], int)
    st = h["inference_stats"]
    assert st["success"]["count"] >= 1 and st["success"]["ns"] > 0
    assert st["queue"] == {"count": 0, "ns": 0}
    g = grpc_c.get_inference_statistics("onnxnet", as_json=True)["model_stats"][0]
    assert int(g["inference_count"]) >= h["inference_count"]
    every = {m["name"] for m in http_c.get_inference_statistics()["model_stats"]}
    assert {"torchnet", "onnxnet"} <= every


def test_unload_then_load_again_over_both_protocols(
    daemon: LocalDaemon, http_c: Any, grpc_c: Any
) -> None:
    """Loading and unloading change the daemon's state: with a token they need it, as mutating
    /v1 calls do."""
    want = _eager(X)
    auth = {"Authorization": f"Bearer {daemon.token}"}
    gauth = {"authorization": f"Bearer {daemon.token}"}
    with pytest.raises(InferenceServerException, match="token"):
        http_c.unload_model("onnxnet")
    with pytest.raises(InferenceServerException, match="token"):
        grpc_c.unload_model("onnxnet")
    http_c.unload_model("onnxnet", headers=auth)
    rows = {r["name"]: r for r in http_c.get_model_repository_index()}
    assert rows["onnxnet"]["state"] == "UNAVAILABLE" and rows["onnxnet"]["reason"] == "unloaded"
    with pytest.raises(InferenceServerException):
        _http(http_c, "onnxnet", "x", "y")
    http_c.load_model("onnxnet", headers=auth)
    assert http_c.is_model_ready("onnxnet")
    np.testing.assert_allclose(_http(http_c, "onnxnet", "x", "y"), want, atol=1e-4, rtol=0)

    grpc_c.unload_model("torchnet", headers=gauth)
    assert not any(
        m["name"] == "torchnet" and m.get("state") == "READY"
        for m in grpc_c.get_model_repository_index(as_json=True)["models"]
    )
    grpc_c.load_model("torchnet", headers=gauth)
    np.testing.assert_allclose(
        _grpc(grpc_c, "torchnet", *MODELS["torchnet"]), want, atol=1e-4, rtol=0
    )
    # a model the repository cannot serve: a clear error, the others keep serving
    with pytest.raises(InferenceServerException, match="dims"):
        http_c.load_model("badcfg", headers=auth)
    with pytest.raises(InferenceServerException, match="pickle"):
        grpc_c.load_model("badfile", headers=gauth)
    with pytest.raises(InferenceServerException):
        http_c.load_model("nosuchmodel", headers=auth)
    np.testing.assert_allclose(
        _http(http_c, "torchnet", *MODELS["torchnet"]), want, atol=1e-4, rtol=0
    )
