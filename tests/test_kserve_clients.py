"""Triton's own clients against the real daemon: ``tritonclient.http`` and ``tritonclient.grpc``.

The daemon (``stgs serve``, simulated node, CPU workers) serves ``tiny_mlp``; both clients go
through health, server and model metadata, JSON (HTTP) and binary inference, async inference,
gRPC streaming, and the errors (unknown model or version, wrong input name, shape or datatype,
NaN), and must get the same answers for the same input.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from api.launch import ONE_SIMULATED_GPU, LocalDaemon

pytestmark = pytest.mark.slow

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

X = np.random.default_rng(0).standard_normal((3, 64), dtype=np.float32)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDaemon]:
    d = LocalDaemon(tmp_path_factory.mktemp("clients"), ONE_SIMULATED_GPU)
    try:
        d.start_serving("tiny_mlp", 2000, 10)
        yield d
    finally:
        d.stop()


def _grpc_infer(c: Any, x: np.ndarray, model: str = "tiny_mlp", name: str = "input") -> Any:
    inp = grpcclient.InferInput(name, list(x.shape), "FP32" if x.dtype == np.float32 else "FP16")
    inp.set_data_from_numpy(x)
    return c.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("output")])


def _http_infer(c: Any, x: np.ndarray, *, binary: bool) -> np.ndarray:
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("output", binary_data=binary)
    return np.asarray(c.infer("tiny_mlp", [inp], outputs=[out]).as_numpy("output"))


def test_health_and_metadata_agree(grpc_c: Any, http_c: Any) -> None:
    assert grpc_c.is_server_live() and grpc_c.is_server_ready()
    assert http_c.is_server_live() and http_c.is_server_ready()
    assert grpc_c.is_model_ready("tiny_mlp") and http_c.is_model_ready("tiny_mlp")
    assert grpc_c.get_server_metadata().name == "stgs"
    g = grpc_c.get_model_metadata("tiny_mlp", as_json=True)
    h = http_c.get_model_metadata("tiny_mlp")
    assert g["inputs"][0]["name"] == h["inputs"][0]["name"] == "input"
    assert [int(d) for d in g["inputs"][0]["shape"]] == h["inputs"][0]["shape"] == [-1, 64]
    assert g["inputs"][0]["datatype"] == h["inputs"][0]["datatype"] == "FP32"
    assert g["outputs"][0]["name"] == "output" and g["versions"] == ["1"]


def test_infer_same_answer_on_every_path(grpc_c: Any, http_c: Any) -> None:
    g = _grpc_infer(grpc_c, X).as_numpy("output")
    assert g.shape == (3, 10) and g.dtype == np.float32
    np.testing.assert_allclose(_http_infer(http_c, X, binary=True), g, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_http_infer(http_c, X, binary=False), g, rtol=1e-5, atol=1e-6)


def test_grpc_async_and_stream_infer(grpc_c: Any, daemon: LocalDaemon) -> None:
    want = _grpc_infer(grpc_c, X).as_numpy("output")
    got: queue.Queue[Any] = queue.Queue()
    inp = grpcclient.InferInput("input", [3, 64], "FP32")
    inp.set_data_from_numpy(X)
    grpc_c.async_infer("tiny_mlp", [inp], callback=lambda result, error: got.put((result, error)))
    res, err = got.get(timeout=30)
    assert err is None
    np.testing.assert_allclose(res.as_numpy("output"), want, rtol=1e-5, atol=1e-6)

    stream = grpcclient.InferenceServerClient(url=f"127.0.0.1:{daemon.grpc_port}")
    answers: queue.Queue[Any] = queue.Queue()
    done = threading.Event()
    try:
        stream.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i in range(5):
            stream.async_stream_infer("tiny_mlp", [inp], request_id=str(i))
        bad = grpcclient.InferInput("input", [1, 63], "FP32")
        bad.set_data_from_numpy(np.ones((1, 63), np.float32))
        stream.async_stream_infer("tiny_mlp", [bad], request_id="bad")
        seen: dict[str, Any] = {}
        for _ in range(6):
            r, e = answers.get(timeout=30)
            if e is not None:
                seen["error"] = str(e)
            else:
                seen[r.get_response().id] = r.as_numpy("output")
        done.set()
    finally:
        stream.stop_stream()
        stream.close()
    assert sorted(k for k in seen if k != "error") == ["0", "1", "2", "3", "4"]
    for i in range(5):
        np.testing.assert_allclose(seen[str(i)], want, rtol=1e-5, atol=1e-6)
    assert "shape" in seen["error"]


@pytest.mark.parametrize(
    ("case", "status", "words"),
    [
        ("unknown model", "StatusCode.NOT_FOUND", "unknown model"),
        ("wrong version", "StatusCode.NOT_FOUND", "version"),
        ("wrong input name", "StatusCode.INVALID_ARGUMENT", "unknown input"),
        ("wrong shape", "StatusCode.INVALID_ARGUMENT", "shape"),
        ("wrong datatype", "StatusCode.INVALID_ARGUMENT", "datatype"),
        ("nan", "StatusCode.INVALID_ARGUMENT", "NaN"),
    ],
)
def test_grpc_errors(grpc_c: Any, case: str, status: str, words: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        if case == "unknown model":
            _grpc_infer(grpc_c, X, model="nope")
        elif case == "wrong version":
            inp = grpcclient.InferInput("input", [3, 64], "FP32")
            inp.set_data_from_numpy(X)
            grpc_c.infer("tiny_mlp", [inp], model_version="7")
        elif case == "wrong input name":
            _grpc_infer(grpc_c, X, name="x")
        elif case == "wrong shape":
            _grpc_infer(grpc_c, np.ones((1, 63), np.float32))
        elif case == "wrong datatype":
            _grpc_infer(grpc_c, X.astype(np.float16))
        else:
            _grpc_infer(grpc_c, np.full((1, 64), np.nan, np.float32))
    assert info.value.status() == status, info.value
    assert words in info.value.message(), info.value.message()
    with pytest.raises(InferenceServerException) as missing:
        grpc_c.is_model_ready("nope")
    assert missing.value.status() == "StatusCode.NOT_FOUND"


def test_http_errors_match(http_c: Any) -> None:
    inp = httpclient.InferInput("input", [1, 63], "FP32")
    inp.set_data_from_numpy(np.ones((1, 63), np.float32))
    with pytest.raises(InferenceServerException, match="shape"):
        http_c.infer("tiny_mlp", [inp])
    with pytest.raises(InferenceServerException, match="unknown model"):
        http_c.infer("nope", [inp])
