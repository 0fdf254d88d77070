"""Models of several inputs and outputs through the front door (issue 15): ``stgs serve`` on
the simulated node (CPU workers), a torch.export (.pt2) and an ONNX file registered over REST,
a TorchScript file from a model repository's ``config.pbtxt`` (two inputs, two outputs); Triton's
own clients (``tritonclient.http``, binary and JSON, and ``tritonclient.grpc``) send both inputs
in either order and get both outputs, or the one they ask for, equal to the eager model; a
missing, unknown or mistyped input is a 400 / INVALID_ARGUMENT naming it. Served by the
frontends (the data plane) and by the control plane alone (``frontends = 0``).

The model (fixed weights, no randomness): ``x`` FP32 [4] and ``idx`` INT64 [2] in,
``y = x @ W + b + sum(idx)`` FP32 [3] and ``z = 2 * idx + 1`` INT64 [2] out.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from api.kserve import binary_request
from api.launch import ONE_SIMULATED_GPU, LocalDaemon, wait_until

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.slow

W = (np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5).astype(np.float32)
B = np.array([0.1, -0.2, 0.3], dtype=np.float32)
X = np.array([[0.5, -1.0, 2.0, 0.25], [1.5, 0.0, -0.5, 3.0], [-2.0, 1.0, 0.75, -0.125]], np.float32)
IDX = np.array([[1, 2], [3, -4], [0, 7]], dtype=np.int64)
PARAMS = """
parameters { key: "slo_ms" value { string_value: "5000" } }
parameters { key: "rate_rps" value { string_value: "5" } }
"""


def eager(x: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        y, z = TwoIO()(torch.from_numpy(x), torch.from_numpy(idx))
    return y.numpy(), z.numpy()


class TwoIO(torch.nn.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.from_numpy(W.copy()), requires_grad=False)
        self.b = torch.nn.Parameter(torch.from_numpy(B.copy()), requires_grad=False)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x @ self.w + self.b + idx.sum(dim=1, keepdim=True).to(x.dtype)
        return y, idx * 2 + 1


def save_torchscript(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(TwoIO().eval()), str(path))


def save_export(path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(
            TwoIO().eval(),
            (torch.zeros(2, 4), torch.zeros(2, 2, dtype=torch.int64)),
            dynamic_shapes=({0: batch}, {0: batch}),
        )
    torch.export.save(ep, str(path))


def save_onnx(path: Path) -> None:
    """The same model as an ONNX graph built node by node (no exporter)."""
    h = onnx.helper
    tp = onnx.TensorProto
    graph = h.make_graph(
        [
            h.make_node("MatMul", ["x", "W"], ["m"]),
            h.make_node("Add", ["m", "B"], ["a"]),
            h.make_node("ReduceSum", ["idx", "axes"], ["s"], keepdims=1),
            h.make_node("Cast", ["s"], ["sf"], to=tp.FLOAT),
            h.make_node("Add", ["a", "sf"], ["y"]),
            h.make_node("Mul", ["idx", "two"], ["t"]),
            h.make_node("Add", ["t", "one"], ["z"]),
        ],
        "two_io",
        [
            h.make_tensor_value_info("x", tp.FLOAT, ["batch", 4]),
            h.make_tensor_value_info("idx", tp.INT64, ["batch", 2]),
        ],
        [
            h.make_tensor_value_info("y", tp.FLOAT, ["batch", 3]),
            h.make_tensor_value_info("z", tp.INT64, ["batch", 2]),
        ],
        [
            onnx.numpy_helper.from_array(W, "W"),
            onnx.numpy_helper.from_array(B, "B"),
            onnx.numpy_helper.from_array(np.array([1], np.int64), "axes"),
            onnx.numpy_helper.from_array(np.array(2, np.int64), "two"),
            onnx.numpy_helper.from_array(np.array(1, np.int64), "one"),
        ],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


TS_CONFIG = (
    'platform: "pytorch_libtorch"\nmax_batch_size: 8\n'
    # listed in the module's argument order (TorchScript has no signature)
    'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] },'
    ' { name: "idx" data_type: TYPE_INT64 dims: [ 2 ] } ]\n'
    'output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] },'
    ' { name: "z" data_type: TYPE_INT64 dims: [ 2 ] } ]\n' + PARAMS
)


@pytest.fixture(scope="module", params=["frontends", "control-plane"])
def daemon(request: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDaemon]:
    work = tmp_path_factory.mktemp("multi")
    (work / "models").mkdir()
    save_export(work / "models" / "two.pt2")
    save_onnx(work / "models" / "two.onnx")
    (work / "repo" / "tsmulti" / "1").mkdir(parents=True)
    save_torchscript(work / "repo" / "tsmulti" / "1" / "model.pt")
    (work / "repo" / "tsmulti" / "config.pbtxt").write_text(TS_CONFIG)
    options = "frontends = 0\n" if request.param == "control-plane" else ""
    d = LocalDaemon(work, ONE_SIMULATED_GPU + '[models]\nrepository = "repo"\n', options)
    try:
        p = d.start()
        with d.client() as c:
            wait_until("ready", lambda: c.get("/v2/health/ready").status_code == 200, 60, p)
        for name, fname in (("pt2multi", "two.pt2"), ("onnxmulti", "two.onnx")):
            d.register(name, 5000, 5, 300, {"source": f"file:{fname}"})
        d.wait_all_ready(300)
        yield d
    finally:
        d.stop()


MODELS = ("pt2multi", "onnxmulti", "tsmulti")


def _names(http_c: Any, model: str) -> tuple[list[str], list[str]]:
    meta = http_c.get_model_metadata(model)
    return [t["name"] for t in meta["inputs"]], [t["name"] for t in meta["outputs"]]


def _http_inputs(x: np.ndarray, idx: np.ndarray, binary: bool, names: list[str]) -> list[Any]:
    a = httpclient.InferInput(names[0], list(x.shape), "FP32")
    a.set_data_from_numpy(x, binary_data=binary)
    b = httpclient.InferInput(names[1], list(idx.shape), "INT64")
    b.set_data_from_numpy(idx, binary_data=binary)
    return [b, a]  # the second input first: inputs go by name


def _grpc_inputs(x: np.ndarray, idx: np.ndarray, names: list[str]) -> list[Any]:
    a = grpcclient.InferInput(names[0], list(x.shape), "FP32")
    a.set_data_from_numpy(x)
    b = grpcclient.InferInput(names[1], list(idx.shape), "INT64")
    b.set_data_from_numpy(idx)
    return [b, a]


def test_metadata_lists_every_input_and_output(http_c: Any, grpc_c: Any) -> None:
    for model in MODELS:
        h = http_c.get_model_metadata(model)
        g = grpc_c.get_model_metadata(model, as_json=True)
        assert [(t["datatype"], t["shape"]) for t in h["inputs"]] == [
            ("FP32", [-1, 4]),
            ("INT64", [-1, 2]),
        ]
        assert [(t["datatype"], t["shape"]) for t in h["outputs"]] == [
            ("FP32", [-1, 3]),
            ("INT64", [-1, 2]),
        ]
        assert [t["name"] for t in g["inputs"]] == [t["name"] for t in h["inputs"]]
        assert [t["name"] for t in g["outputs"]] == [t["name"] for t in h["outputs"]]
    assert _names(http_c, "onnxmulti") == (["x", "idx"], ["y", "z"])
    assert _names(http_c, "tsmulti") == (["x", "idx"], ["y", "z"])
    cfg = http_c.get_model_config("tsmulti")
    assert [t["name"] for t in cfg["input"]] == ["x", "idx"]


def test_both_clients_answer_both_outputs_equal_to_eager(http_c: Any, grpc_c: Any) -> None:
    want_y, want_z = eager(X, IDX)
    for model in MODELS:
        ins, outs = _names(http_c, model)
        for binary in (True, False):
            req = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in outs]
            r = http_c.infer(model, _http_inputs(X, IDX, binary, ins), outputs=req)
            np.testing.assert_allclose(r.as_numpy(outs[0]), want_y, atol=1e-4, rtol=0)
            z = r.as_numpy(outs[1])
            assert z.dtype == np.int64
            np.testing.assert_array_equal(z, want_z)
        # no outputs named: every output (JSON)
        r = http_c.infer(model, _http_inputs(X, IDX, False, ins))
        assert [o["name"] for o in r.get_response()["outputs"]] == outs
        np.testing.assert_allclose(r.as_numpy(outs[0]), want_y, atol=1e-4, rtol=0)
        g = grpc_c.infer(model, _grpc_inputs(X, IDX, ins))
        np.testing.assert_allclose(g.as_numpy(outs[0]), want_y, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(g.as_numpy(outs[1]), want_z)


def test_a_subset_of_outputs(http_c: Any, grpc_c: Any) -> None:
    _, want_z = eager(X[:1], IDX[:1])
    for model in MODELS:
        ins, outs = _names(http_c, model)
        r = http_c.infer(
            model,
            _http_inputs(X[:1], IDX[:1], True, ins),
            outputs=[httpclient.InferRequestedOutput(outs[1], binary_data=True)],
        )
        assert [o["name"] for o in r.get_response()["outputs"]] == [outs[1]]
        np.testing.assert_array_equal(r.as_numpy(outs[1]), want_z)
        assert r.as_numpy(outs[0]) is None
        g = grpc_c.infer(
            model,
            _grpc_inputs(X[:1], IDX[:1], ins),
            outputs=[grpcclient.InferRequestedOutput(outs[1])],
        )
        assert [o.name for o in g.get_response().outputs] == [outs[1]]
        np.testing.assert_array_equal(g.as_numpy(outs[1]), want_z)


def test_bad_inputs_are_refused_naming_the_input(http_c: Any, grpc_c: Any) -> None:
    ins, _ = _names(http_c, "onnxmulti")
    full_h = _http_inputs(X, IDX, True, ins)
    full_g = _grpc_inputs(X, IDX, ins)
    wrong_h = httpclient.InferInput("idx", list(IDX.shape), "INT32")
    wrong_h.set_data_from_numpy(IDX.astype(np.int32), binary_data=True)
    wrong_g = grpcclient.InferInput("idx", list(IDX.shape), "INT32")
    wrong_g.set_data_from_numpy(IDX.astype(np.int32))
    extra_h = httpclient.InferInput("w", [3, 1], "FP32")
    extra_h.set_data_from_numpy(np.zeros((3, 1), np.float32), binary_data=True)
    extra_g = grpcclient.InferInput("w", [3, 1], "FP32")
    extra_g.set_data_from_numpy(np.zeros((3, 1), np.float32))
    cases = [
        ("missing input 'idx'", [full_h[1]], [full_g[1]]),
        ("unknown input 'w'", [*full_h, extra_h], [*full_g, extra_g]),
        ("input 'idx': datatype INT32, the model takes INT64", [full_h[1], wrong_h], None),
    ]
    cases[2] = (cases[2][0], cases[2][1], [full_g[1], wrong_g])
    for why, h_in, g_in in cases:
        with pytest.raises(InferenceServerException, match=why) as e:
            http_c.infer("onnxmulti", h_in)
        assert e.value.status() == "400"
        with pytest.raises(InferenceServerException, match=why) as e:
            grpc_c.infer("onnxmulti", g_in)
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="unknown output 'nope'"):
        http_c.infer("onnxmulti", full_h, outputs=[httpclient.InferRequestedOutput("nope")])
    # batches that differ between the inputs
    short = httpclient.InferInput("x", [1, 4], "FP32")
    short.set_data_from_numpy(X[:1], binary_data=True)
    with pytest.raises(InferenceServerException, match="same batch"):
        http_c.infer("onnxmulti", [full_h[0], short])


def test_binary_request_of_several_inputs_gets_every_output_binary(daemon: LocalDaemon) -> None:
    """The benchmarks' own client (api.kserve.binary_request, benchmarks/lib/kserve_load): every
    input by name as binary data, and ``binary_data_output`` asks for every output as binary."""
    want_y, want_z = eager(X, IDX)
    body, headers = binary_request({"idx": IDX, "x": X}, binary_output=True)
    with daemon.client() as c:
        r = c.post("/v2/models/onnxmulti/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    outs = json.loads(r.content[:n])["outputs"]
    assert [(o["name"], o["datatype"]) for o in outs] == [("y", "FP32"), ("z", "INT64")]
    tail, got = r.content[n:], {}
    for o in outs:
        size = o["parameters"]["binary_data_size"]
        dtype = np.float32 if o["datatype"] == "FP32" else np.int64
        got[o["name"]] = np.frombuffer(tail[:size], dtype=dtype).reshape(o["shape"])
        tail = tail[size:]
    assert not tail
    np.testing.assert_allclose(got["y"], want_y, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(got["z"], want_z)
