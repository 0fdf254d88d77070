"""The front door for model files: ``stgs serve`` on the simulated node (CPU workers), a
TorchScript and an ONNX file registered over REST with ``source: file:...`` (profiled on the
CPU, planned, served), inference through Triton's ``tritonclient.http``, outputs equal to the
eager torch model; a pickle is refused (422, naming the file) while the daemon keeps serving.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from api.launch import ONE_SIMULATED_GPU, LocalDaemon

torch = pytest.importorskip("torch")
httpclient = pytest.importorskip("tritonclient.http")

from test_registry import _net, save_onnx, save_torchscript  # noqa: E402

from stgs.registry import torchvision_names  # noqa: E402

pytestmark = pytest.mark.slow

X = np.random.default_rng(2).standard_normal((3, 8), dtype=np.float32)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDaemon]:
    work = tmp_path_factory.mktemp("files")
    models = work / "models"
    models.mkdir()
    save_torchscript(models / "net.pt")
    d = LocalDaemon(work, ONE_SIMULATED_GPU)
    try:
        d.start_serving(
            "scripted",
            2000,
            10,
            extra={
                "source": "file:net.pt",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [8]}],
            },
        )
        yield d
    finally:
        d.stop()


def _infer(d: LocalDaemon, model: str, input_name: str, x: np.ndarray) -> np.ndarray:
    c = httpclient.InferenceServerClient(url=f"127.0.0.1:{d.port}", network_timeout=30.0)
    try:
        inp = httpclient.InferInput(input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        out = httpclient.InferRequestedOutput("output", binary_data=True)
        return np.asarray(c.infer(model, [inp], outputs=[out]).as_numpy("output"))
    finally:
        c.close()


def _eager(x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return np.asarray(_net()(torch.from_numpy(x)).numpy())


def test_torchscript_file_serves_through_tritonclient(daemon: LocalDaemon) -> None:
    c = httpclient.InferenceServerClient(url=f"127.0.0.1:{daemon.port}")
    try:
        meta = c.get_model_metadata("scripted")
    finally:
        c.close()
    assert meta["inputs"][0]["name"] == "x" and meta["inputs"][0]["shape"] == [-1, 8]
    got = _infer(daemon, "scripted", "x", X)
    np.testing.assert_allclose(got, _eager(X), atol=1e-4, rtol=0)


def test_onnx_file_registers_profiles_and_serves(daemon: LocalDaemon) -> None:
    pytest.importorskip("onnxruntime")
    save_onnx(daemon.work / "models" / "net.onnx")
    daemon.register("onnxnet", 2000, 10, extra={"source": "file:net.onnx"})
    got = _infer(daemon, "onnxnet", "x", X)  # the graph's own input name
    np.testing.assert_allclose(got, _eager(X), atol=1e-4, rtol=0)


def test_pickle_is_refused_and_the_daemon_keeps_serving(daemon: LocalDaemon) -> None:
    torch.save(_net(), daemon.work / "models" / "pickled.pt")
    with daemon.client() as c:
        r = c.post(
            "/v1/models",
            json={
                "name": "pickled",
                "slo_ms": 2000,
                "rate_rps": 1,
                "source": "file:pickled.pt",
                "inputs": [{"shape": [8]}],
            },
        )
        assert r.status_code == 422, r.text
        assert "'pickled.pt'" in r.json()["error"] and "torch.save pickle" in r.json()["error"]
        r = c.post(
            "/v1/models",
            json={"name": "away", "slo_ms": 2000, "rate_rps": 1, "source": "file:../stgs.toml"},
        )
        assert r.status_code == 422 and "outside the model directory" in r.json()["error"]
    np.testing.assert_allclose(_infer(daemon, "scripted", "x", X), _eager(X), atol=1e-4, rtol=0)


@pytest.mark.skipif(
    "mobilenet_v2" not in torchvision_names(),
    reason="no working torchvision (its PyPI wheel needs a CUDA torch)",
)
def test_torchvision_model_outside_the_zoo_registers_profiles_and_serves(
    daemon: LocalDaemon,
) -> None:
    """mobilenet_v2 is not in the shipped profiles: it is profiled on the CPU at registration
    (batches 1..16, 5 timed runs each: about a minute on 2 cores), then served."""
    daemon.register("mobilenet_v2", 60000, 1, timeout_s=300)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    got = _infer(daemon, "mobilenet_v2", "input", x)
    from stgs.registry import build_module

    with torch.inference_mode():
        want = build_module("mobilenet_v2")(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
