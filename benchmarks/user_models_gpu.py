"""A user's own model files profiled and served on a lent GPU, in one plan beside zoo models
(issue 15).

    # on a GPU (MIG disabled; the daemon starts and quits its own MPS daemons):
    python -m benchmarks.user_models_gpu [--seconds 5] [--protos http,grpc] [--json OUT]
    # anywhere: the simulated node with CPU workers (mobilenet_v2 only where torchvision imports)
    python -m benchmarks.user_models_gpu --simulated

1. **Model files** with fixed weights (``torch.manual_seed(0)``, then built; nothing is
   downloaded), in a Triton-layout model repository with ``config.pbtxt`` files (SLO and rate
   in its ``parameters``):

   * ``user_cnn_ts``, TorchScript (``torch.jit.script``): torchvision's resnet18
     (``weights=None``, 3x224x224 -> 1000) on a GPU where torchvision imports, else a
     hand-built residual CNN (3x64x64 -> 100); ``INPUT__0`` -> ``OUTPUT__0``;
   * ``user_twotower_onnx``, ONNX (``torch.onnx.export``): an image tower (three conv blocks)
     and a token tower (embedding, mean) fused into two heads: inputs ``image`` FP32 [3, 64, 64]
     and ``tokens`` INT64 [16], outputs ``logits`` FP32 [10] and ``normed_embedding`` FP32 [32]
     (L2-normalised).

   Their reference outputs on fixed inputs come from each framework's own run of the file, in
   fp32 on the same device: the TorchScript file by ``torch.jit.load`` (TF32 off), the ONNX
   file by an onnxruntime session (its CUDA provider where it has one; the providers are
   printed); mobilenet_v2's from torchvision's ``mobilenet_v2(weights=None)`` after
   ``torch.manual_seed(0)``.
2. ``stgs serve --model-repository REPO`` (NVML backend, ``allow_mig_changes = false``; its
   MPS daemons are quit at the end) registers both files at start; over REST the zoo models
   ``resnet50`` and ``bert_base`` (SLOs and rates of ``loadgen.DEFAULT_MODELS``; the shipped
   profiles plan them) and ``mobilenet_v2`` (torchvision, outside the zoo). The files and
   mobilenet_v2 have no profile: the daemon profiles them on the GPU, one at a time, over the
   profiler's default grid (15 partitions x 8 batches; about 1-2 minutes a model on an H100),
   then admits and plans them. Simulated: ``tiny_mlp`` and ``tiny_cnn`` stand in for the zoo
   models, every model is profiled on the CPU.
3. When every model is ready (or failed, with the reason): the plan (``GET /v1/plan``: its
   partitions and the models each serves); then each user model and mobilenet_v2 gets the fixed
   inputs through ``tritonclient.http`` (binary) and ``tritonclient.grpc``, every output
   compared with the reference. The served models run in fp16 with CUDA graphs (TorchScript,
   torchvision) or in onnxruntime's CUDA provider in fp32 (ONNX), so the tolerance is fp16's:
   every element within ``atol + rtol * |ref|``, rtol = 1e-2 and atol = 1e-2 x the output's
   scale (its largest ``|ref|``). Table: model, source, profiled (rows, seconds), partition, max
   abs error, tolerance, PASS/FAIL.
4. An open-loop Poisson load at every model's registered rate for ``--seconds`` through
   ``benchmarks/lib/kserve_load`` (binary tensors, every input of a model of several); the
   share of requests answered 200 within the model's SLO, per model.
5. The summary goes to ``--json`` or ``$OUT/user_models_gpu.json``. Exit 0 when every model
   served and every output check passed (the SLO shares are reported, not judged: a few
   seconds of load right after the plan is applied are a smoke test, not a benchmark).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from api.launch import LocalDaemon, wait_until
from benchmarks.lib import kserve_load
from benchmarks.lib.kserve_load import Target, summarize
from benchmarks.lib.loadgen import DEFAULT_MODELS, describe_plan, parse_models
from benchmarks.lib.node import daemon_sections, gpu_label, quit_mps
from benchmarks.lib.runs import run_header, write_summary
from stgs.plan import Plan

T = TypeVar("T")

TS_NAME = "user_cnn_ts"
ONNX_NAME = "user_twotower_onnx"
TV_NAME = "mobilenet_v2"
ZOO_GPU = ("resnet50", "bert_base")  # with their SLOs and rates in loadgen.DEFAULT_MODELS
ZOO_SIM = (("tiny_mlp", 500.0, 20.0), ("tiny_cnn", 500.0, 10.0))
RTOL = 1e-2
ATOL_OF_SCALE = 1e-2
BATCH = 4  # the fixed inputs' batch
VOCAB = 1000
TOKENS = 16
TWO_TOWER_IMAGE = (3, 64, 64)
# (SLO ms, rate req/s) of the models the daemon profiles: on the GPU, and on the simulated node
SLO_RATE_GPU = {TS_NAME: (20.0, 200.0), ONNX_NAME: (25.0, 100.0), TV_NAME: (15.0, 200.0)}
SLO_RATE_SIM = {TS_NAME: (2000.0, 5.0), ONNX_NAME: (2000.0, 5.0), TV_NAME: (5000.0, 1.0)}


@dataclass
class UserModel:
    """A model this benchmark checks: where it comes from, its fixed inputs, the reference."""

    name: str
    source: str  # what the table says
    slo_ms: float
    rate_rps: float
    inputs: dict[str, np.ndarray]  # by input name, batch first
    outputs: list[str]  # output names, as served
    reference: dict[str, np.ndarray] = field(default_factory=dict)
    reference_by: str = ""


# ---------------------------------------------------------------------- the user's networks
def _residual_cnn(classes: int = 100) -> Any:
    """A small ResNet-style network from torch.nn alone (where torchvision does not import)."""
    import torch

    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.skip = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        Block(16, 32, 2),
        Block(32, 64, 2),
        Block(64, 128, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, classes),
    )


def _two_tower() -> Any:
    """Image and tokens in; class logits and an L2-normalised embedding out."""
    import torch

    nn = torch.nn

    def block(cin: int, cout: int) -> Any:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.ReLU())

    class TwoTower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image = nn.Sequential(
                block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten()
            )
            self.embed = nn.Embedding(VOCAB, 64)
            self.text = nn.Sequential(nn.Linear(64, 128), nn.ReLU())
            self.fuse = nn.Sequential(nn.Linear(256, 256), nn.ReLU())
            self.cls = nn.Linear(256, 10)
            self.proj = nn.Linear(256, 32)

        def forward(
            self, image: torch.Tensor, tokens: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            t = self.text(self.embed(tokens).mean(dim=1))
            h = self.fuse(torch.cat([self.image(image), t], dim=1))
            return self.cls(h), nn.functional.normalize(self.proj(h), dim=1)

    return TwoTower()


def torchvision_ok() -> bool:
    """torchvision imports (a build for another torch fails at import: absent)."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision.models")
    except Exception:
        return False
    return True


def save_torchscript(path: Path, use_torchvision: bool) -> tuple[str, tuple[int, ...], int]:
    """The TorchScript file; (what it is, one sample's input shape, classes)."""
    import torch

    torch.manual_seed(0)
    if use_torchvision:
        tvm: Any = importlib.import_module("torchvision.models")
        module, what, shape, classes = tvm.resnet18(weights=None), "resnet18", (3, 224, 224), 1000
    else:
        module, what, shape, classes = _residual_cnn(), "residual CNN", (3, 64, 64), 100
    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jit: Any = torch.jit  # typed loosely
        try:
            saved, how = jit.script(module), "torch.jit.script"
        except Exception:  # not scriptable: traced
            saved, how = jit.trace(module, torch.zeros(2, *shape)), "torch.jit.trace"
        jit.save(saved, str(path))
    return f"{what}, {how}", shape, classes


def save_onnx(path: Path) -> str:
    """The ONNX file (one file, no external data); the exporter used."""
    import torch

    torch.manual_seed(0)
    module = _two_tower().eval()
    args = (torch.zeros(2, *TWO_TOWER_IMAGE), torch.zeros(2, TOKENS, dtype=torch.int64))
    ins, outs = ["image", "tokens"], ["logits", "normed_embedding"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if importlib.util.find_spec("onnxscript") is not None:
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamic_shapes=({0: batch}, {0: batch}),
                dynamo=True,
                external_data=False,
                input_names=ins,
                output_names=outs,
            )
            return "torch.onnx.export (dynamo)"
        axes = {n: {0: "batch"} for n in (*ins, *outs)}
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamic_axes=axes,
            dynamo=False,
            input_names=ins,
            output_names=outs,
        )
        return "torch.onnx.export (TorchScript exporter; onnxscript not installed)"


def config_pbtxt(
    platform: str,
    inputs: Sequence[tuple[str, str, Sequence[int]]],
    outputs: Sequence[tuple[str, str, Sequence[int]]],
    slo_ms: float,
    rate_rps: float,
    max_batch_size: int = 128,
) -> str:
    """A Triton ``config.pbtxt``: tensors as (name, TYPE_*, dims), the SLO and rate."""

    def tensors(items: Sequence[tuple[str, str, Sequence[int]]]) -> str:
        return ",\n".join(
            f'  {{ name: "{n}" data_type: {t} dims: [ {", ".join(str(d) for d in dims)} ] }}'
            for n, t, dims in items
        )

    return (
        f'platform: "{platform}"\nmax_batch_size: {max_batch_size}\n'
        f"input [\n{tensors(inputs)}\n]\noutput [\n{tensors(outputs)}\n]\n"
        f'parameters {{ key: "slo_ms" value {{ string_value: "{slo_ms:g}" }} }}\n'
        f'parameters {{ key: "rate_rps" value {{ string_value: "{rate_rps:g}" }} }}\n'
    )


def build_repository(
    repo: Path, simulated: bool, use_torchvision: bool, slo_rate: Mapping[str, tuple[float, float]]
) -> tuple[list[UserModel], dict[str, str]]:
    """The repository's two models, their fixed inputs; notes on how they were made."""
    rng = np.random.default_rng(1234)
    (repo / TS_NAME / "1").mkdir(parents=True)
    what, shape, classes = save_torchscript(
        repo / TS_NAME / "1" / "model.pt", use_torchvision and not simulated
    )
    slo, rate = slo_rate[TS_NAME]
    (repo / TS_NAME / "config.pbtxt").write_text(
        config_pbtxt(
            "pytorch_libtorch",
            [("INPUT__0", "TYPE_FP32", shape)],
            [("OUTPUT__0", "TYPE_FP32", (classes,))],
            slo,
            rate,
        )
    )
    ts = UserModel(
        TS_NAME,
        f"TorchScript ({what})",
        slo,
        rate,
        {"INPUT__0": rng.standard_normal((BATCH, *shape), dtype=np.float32)},
        ["OUTPUT__0"],
    )
    (repo / ONNX_NAME / "1").mkdir(parents=True)
    exporter = save_onnx(repo / ONNX_NAME / "1" / "model.onnx")
    slo, rate = slo_rate[ONNX_NAME]
    (repo / ONNX_NAME / "config.pbtxt").write_text(
        config_pbtxt(
            "onnxruntime_onnx",
            [("image", "TYPE_FP32", TWO_TOWER_IMAGE), ("tokens", "TYPE_INT64", (TOKENS,))],
            [("logits", "TYPE_FP32", (10,)), ("normed_embedding", "TYPE_FP32", (32,))],
            slo,
            rate,
        )
    )
    onnx = UserModel(
        ONNX_NAME,
        "ONNX (two-tower, 2 in / 2 out)",
        slo,
        rate,
        {
            "image": rng.standard_normal((BATCH, *TWO_TOWER_IMAGE), dtype=np.float32),
            "tokens": rng.integers(0, VOCAB, size=(BATCH, TOKENS)).astype(np.int64),
        },
        ["logits", "normed_embedding"],
    )
    return [ts, onnx], {"torchscript": what, "onnx_exporter": exporter}


# ---------------------------------------------------------------------- references
def references(
    models: Sequence[UserModel], repo: Path, device: str, tv: UserModel | None
) -> dict[str, Any]:
    """Each framework's own fp32 run of each model on ``device``; onnxruntime's version and
    providers (available, and the reference session's)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    info: dict[str, Any] = {}
    by_name = {m.name: m for m in models}
    ts = by_name[TS_NAME]
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        jit: Any = torch.jit  # typed loosely
        module = jit.load(str(repo / TS_NAME / "1" / "model.pt"), map_location=device)
        out = module.eval()(torch.from_numpy(ts.inputs["INPUT__0"]).to(device))
    ts.reference = {"OUTPUT__0": out.float().cpu().numpy()}
    ts.reference_by = f"torch.jit.load, fp32, {device}"

    ort: Any = importlib.import_module("onnxruntime")
    have = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" in have:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    sess = ort.InferenceSession(str(repo / ONNX_NAME / "1" / "model.onnx"), providers=providers)
    onnx = by_name[ONNX_NAME]
    got = sess.run(onnx.outputs, onnx.inputs)
    onnx.reference = dict(zip(onnx.outputs, (np.asarray(g) for g in got), strict=True))
    onnx.reference_by = f"onnxruntime {ort.__version__}, fp32, {sess.get_providers()[0]}"
    info.update(
        version=ort.__version__, available_providers=have, reference_session=sess.get_providers()
    )
    if tv is not None:
        tvm: Any = importlib.import_module("torchvision.models")
        torch.manual_seed(0)
        net = tvm.mobilenet_v2(weights=None).eval().to(device)
        with torch.inference_mode():
            y = net(torch.from_numpy(tv.inputs["input"]).to(device))
        tv.reference = {"output": y.float().cpu().numpy()}
        tv.reference_by = (
            f"torchvision mobilenet_v2(weights=None) after manual_seed(0), fp32, {device}"
        )
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return info


def compare(got: np.ndarray, ref: np.ndarray) -> tuple[float, float, bool]:
    """(max abs error, atol, within tolerance): ``|got - ref| <= atol + RTOL * |ref|``
    everywhere, atol = ATOL_OF_SCALE x the largest ``|ref|``."""
    got = np.asarray(got, dtype=np.float64).reshape(ref.shape)
    ref64 = ref.astype(np.float64)
    err = np.abs(got - ref64)
    atol = ATOL_OF_SCALE * float(np.max(np.abs(ref64))) if ref.size else 0.0
    ok = bool(np.all(err <= atol + RTOL * np.abs(ref64)))
    return float(err.max()) if err.size else 0.0, atol, ok


def infer_both(port: int, grpc_port: int, m: UserModel) -> dict[str, dict[str, np.ndarray]]:
    """Every output of ``m`` on its fixed inputs, through tritonclient.http and .grpc."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import np_to_triton_dtype

    out: dict[str, dict[str, np.ndarray]] = {}
    h = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}", network_timeout=120.0)
    try:
        ins = []
        for name, x in m.inputs.items():
            i = httpclient.InferInput(name, list(x.shape), np_to_triton_dtype(x.dtype))
            i.set_data_from_numpy(x, binary_data=True)
            ins.append(i)
        outs = [httpclient.InferRequestedOutput(o, binary_data=True) for o in m.outputs]
        r = h.infer(m.name, ins, outputs=outs)
        out["http"] = {o: np.asarray(r.as_numpy(o)) for o in m.outputs}
    finally:
        h.close()
    g = grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
    try:
        gins = []
        for name, x in m.inputs.items():
            i = grpcclient.InferInput(name, list(x.shape), np_to_triton_dtype(x.dtype))
            i.set_data_from_numpy(x)
            gins.append(i)
        gouts = [grpcclient.InferRequestedOutput(o) for o in m.outputs]
        gr = g.infer(m.name, gins, outputs=gouts, client_timeout=120.0)
        out["grpc"] = {o: np.asarray(gr.as_numpy(o)) for o in m.outputs}
    finally:
        g.close()
    return out


# ---------------------------------------------------------------------- the daemon
def _models(c: Any) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in c.get("/v1/models").json()}


def wait_settled(
    c: Any, names: Sequence[str], timeout_s: float, proc: subprocess.Popen[bytes], t0: float
) -> dict[str, dict[str, Any]]:
    """Wait until every model is ready, failed or refused (or the time is up), printing who is
    where every 15 s; the models' records then."""
    end = time.monotonic() + timeout_s
    last_print = 0.0
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited ({proc.returncode})")
        ms = _models(c)
        settled = all(
            n in ms and (ms[n]["ready"] or ms[n]["status"] in ("failed", "refused")) for n in names
        )
        now = time.monotonic()
        if settled or now > end or now - last_print >= 15.0:
            last_print = now
            row = "; ".join(
                f"{n}: {ms[n]['status']}{'' if ms[n]['ready'] else ' (' + ms[n]['detail'] + ')'}"
                if n in ms
                else f"{n}: not registered"
                for n in names
            )
            print(f"  t={now - t0:6.1f} s  {row}", flush=True)
        if settled or now > end:
            return ms
        time.sleep(1.0)


def partitions_of(view: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The plan's lines (``describe_plan``, each partition's state) and each model's
    partition."""
    if not view.get("plan"):
        return ["  (no plan)"], {}
    plan = Plan.from_dict(view["plan"])
    lines = describe_plan(plan)
    where: dict[str, str] = {}
    for gpu, p in plan.partitions():
        kind = f"MPS {p.mps_pct}%" if p.kind == "mps" else p.kind
        label = f"GPU {gpu.index} {kind} ({p.sm_count} SMs)"
        for m in p.models:
            where[m.name] = f"{label} b{m.batch}"
    states = [f"{p.get('partition')}: {p.get('state')}" for p in view.get("partitions", [])]
    lines.append(f"  partition states: {', '.join(states) or '-'}")
    return lines, where


def profiled_events(c: Any) -> dict[str, dict[str, Any]]:
    """Each model's profiling run as the daemon logged it: rows and seconds."""
    out: dict[str, dict[str, Any]] = {}
    for e in c.get("/v1/events", params={"kind": "profiled", "limit": 1000}).json():
        d = e.get("data", {})
        out.setdefault(str(d.get("model")), {"rows": d.get("rows"), "seconds": d.get("seconds")})
    return out


def quit_profiler_mps(since: float) -> None:
    """Quit MPS control daemons the daemon's GPU profiler started (private pipe directories
    ``stgs-mps-*`` in the temp directory) and left running when it was stopped mid-run: only
    those made after ``since``, by this run."""
    for pipe in Path(tempfile.gettempdir()).glob("stgs-mps-*/pipe"):
        with contextlib.suppress(OSError):
            if pipe.stat().st_mtime >= since and (pipe / "control").exists():
                quit_mps(pipe.parent)


def _table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    head = ("model", "source", "profiled", "partition", "max abs err", "tolerance", "result")
    body = [
        (
            r["model"],
            r["source"],
            r["profiled"],
            r["partition"],
            "-" if r["max_abs_err"] is None else f"{r['max_abs_err']:.3g}",
            "-" if r["atol"] is None else f"{r['atol']:.3g} + {RTOL:g}|ref|",
            r["result"],
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    return [fmt.format(*head), *(fmt.format(*b) for b in body)]


def _retrying(fn: Callable[[], T], tries: int = 10) -> T:
    """``fn()``, again after a shed request (429: the worker predicted a deadline miss, as it
    may while cold) or one that found no ready worker (503), up to ``tries`` times."""
    for k in range(tries):
        try:
            return fn()
        except Exception as exc:
            text = str(exc)
            transient = any(w in text for w in ("429", "503", "deadline", "no ready worker"))
            if not transient or k == tries - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def check_outputs(
    d: LocalDaemon, checked: Sequence[UserModel], ms: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Each ready model's outputs over both protocols against its reference."""
    out: dict[str, dict[str, Any]] = {}
    for m in checked:
        rec = ms.get(m.name, {})
        if not rec.get("ready"):
            out[m.name] = {"result": "FAIL", "why": f"{rec.get('status')}: {rec.get('detail')}"}
            continue
        try:
            got = _retrying(functools.partial(infer_both, d.port, d.grpc_port, m))
        except Exception as exc:
            out[m.name] = {"result": "FAIL", "why": f"{type(exc).__name__}: {exc}"}
            continue
        worst = (0.0, 0.0)
        ok = True
        per: dict[str, Any] = {}
        for proto, outs in got.items():
            for name in m.outputs:
                err, atol, good = compare(outs[name], m.reference[name])
                per[f"{proto}:{name}"] = {"max_abs_err": err, "atol": atol, "ok": good}
                ok &= good
                if err >= worst[0]:
                    worst = (err, atol)
        out[m.name] = {
            "result": "PASS" if ok else "FAIL",
            "max_abs_err": worst[0],
            "atol": worst[1],
            "outputs": per,
            "reference": m.reference_by,
        }
    return out


def load_phase(
    d: LocalDaemon,
    regs: Sequence[tuple[str, float, float]],
    inputs: Mapping[str, dict[str, np.ndarray]],
    args: argparse.Namespace,
    work: Path,
) -> dict[str, Any]:
    """Open-loop load at the registered rates; per protocol and model: share within SLO."""
    targets = []
    for name, _, rate in regs:
        xs = list(inputs[name].items())
        (first, x), more = xs[0], tuple(xs[1:])
        targets.append(Target(name, rate, x[:1], first, tuple((n, a[:1]) for n, a in more)))
    res: dict[str, Any] = {}
    for proto in args.protos.split(","):
        addr = f"127.0.0.1:{d.grpc_port if proto == 'grpc' else d.port}"
        warm = [Target(t.model, max(1.0, 0.1 * t.rate), t.x, t.input_name, t.more) for t in targets]
        kserve_load.load(proto, addr, warm, 2.0, 1, work / f"warm-{proto}")
        got = kserve_load.load(proto, addr, targets, args.seconds, args.clients, work / proto)
        per = {}
        for i, (name, slo, rate) in enumerate(regs):
            s = summarize([r for r in got if r[0] == i], [slo / 1e3])
            per[name] = {"rate_rps": rate, "slo_ms": slo, **s}
            print(
                f"  {proto:4} {name:20} {rate:6g}/s  SLO {slo:6g} ms  n={s['n']:6d}"
                f"  within SLO {s['within_slo']:.4f}  p50 {s.get('p50_ms', 0):8.2f} ms"
                f"  p99 {s.get('p99_ms', 0):8.2f} ms  {s['codes']}",
                flush=True,
            )
        res[proto] = per
    return res


# ---------------------------------------------------------------------- main
def _zoo(simulated: bool) -> list[tuple[str, float, float]]:
    if simulated:
        return list(ZOO_SIM)
    mix = {m.name: m for m in parse_models(DEFAULT_MODELS)}
    return [(n, mix[n].slo_ms, mix[n].rate_rps) for n in ZOO_GPU]


def environment(device: str, use_tv: bool) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device,
        "gpu": gpu_label() if device == "cuda" else "cpu",
        "torchvision": importlib.import_module("torchvision").__version__ if use_tv else None,
        "transformers": importlib.util.find_spec("transformers") is not None,
        "onnxscript": importlib.util.find_spec("onnxscript") is not None,
    }
    return env


def run(args: argparse.Namespace, work: Path, out: dict[str, Any]) -> int:
    import torch

    t_start = time.monotonic()
    device = "cpu" if args.simulated else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (run with --simulated on a machine without a GPU)")
    use_tv = torchvision_ok()
    out["environment"] = env = environment(device, use_tv)
    print(f"environment: {json.dumps(env)}")
    slo_rate = SLO_RATE_SIM if args.simulated else SLO_RATE_GPU

    # 1. the files, the repository, the references
    repo = work / "repo"
    t = time.monotonic()
    models, made = build_repository(repo, args.simulated, use_tv, slo_rate)
    tv: UserModel | None = None
    if use_tv:
        slo, rate = slo_rate[TV_NAME]
        x = np.random.default_rng(99).standard_normal((BATCH, 3, 224, 224), dtype=np.float32)
        tv = UserModel(
            TV_NAME, "torchvision (outside the zoo)", slo, rate, {"input": x}, ["output"]
        )
    else:
        print("torchvision does not import here: no mobilenet_v2")
        out["notes"].append("no mobilenet_v2: torchvision does not import")
    checked = [*models, *([tv] if tv is not None else [])]
    out["onnxruntime"] = references(models, repo, device, tv)
    out["files"] = made
    ort_info = out["onnxruntime"]
    print(
        f"files and references in {time.monotonic() - t:.1f} s: {made}; onnxruntime"
        f" {ort_info['version']} providers {ort_info['available_providers']}"
    )
    if device == "cuda" and "CUDAExecutionProvider" not in ort_info["available_providers"]:
        note = (
            "onnxruntime has no CUDA provider here (install onnxruntime-gpu): the ONNX model"
            " cannot run on the GPU and will fail to profile"
        )
        print(f"NOTE: {note}")
        out["notes"].append(note)
    out["timings_s"]["files_and_references"] = round(time.monotonic() - t, 1)

    # 2. the daemon on the repository; zoo models and mobilenet_v2 over REST
    d = LocalDaemon(work / "daemon", daemon_sections(args.simulated))
    zoo = _zoo(args.simulated)
    regs = [*zoo, *((m.name, m.slo_ms, m.rate_rps) for m in checked)]
    names = [r[0] for r in regs]
    since = time.time()
    try:
        t0 = time.monotonic()
        p = d.start(args=["--model-repository", str(repo)])
        with d.client(timeout_s=120.0) as c:
            wait_until("the daemon", lambda: c.get("/v2/health/ready").status_code == 200, 120, p)
            out["timings_s"]["daemon_up"] = round(time.monotonic() - t0, 1)
            print(f"daemon up in {out['timings_s']['daemon_up']} s on {repo}")
            tv_reg = [(m.name, m.slo_ms, m.rate_rps) for m in checked if m.name == TV_NAME]
            for name, slo, rate in [*zoo, *tv_reg]:  # the files: from the repository
                t = time.monotonic()
                r = c.post("/v1/models", json={"name": name, "slo_ms": slo, "rate_rps": rate})
                status = r.json().get("status") if r.status_code < 300 else r.text
                took = time.monotonic() - t
                print(f"POST /v1/models {name} -> {r.status_code} {status} ({took:.1f} s)")
                if r.status_code not in (200, 201, 202):
                    raise RuntimeError(f"registering {name}: {r.status_code} {r.text}")
            print("waiting for every model (the files and mobilenet_v2 profile one at a time):")
            budget = args.ready_timeout_s - (time.monotonic() - t0)
            ms = wait_settled(c, names, budget, p, t0)
            out["timings_s"]["all_settled"] = round(time.monotonic() - t0, 1)
            out["models"] = {n: {k: ms[n].get(k) for k in ("status", "detail")} for n in ms}
            view = c.get("/v1/plan").json()
            out["plan"] = view.get("plan")
            lines, where = partitions_of(view)
            print("the plan (GET /v1/plan):\n" + "\n".join(lines))
            profiled = profiled_events(c)
        out["profiled"] = profiled

        # 3. outputs against the references
        t = time.monotonic()
        checks = check_outputs(d, checked, ms)
        out["timings_s"]["checks"] = round(time.monotonic() - t, 1)
        rows = []
        for name, _, _ in regs:
            m = next((u for u in checked if u.name == name), None)
            pr = profiled.get(name)
            ck = checks.get(name, {})
            rec = ms.get(name, {})
            zoo_source = "built-in" if args.simulated else "zoo"
            source = m.source if m is not None else zoo_source
            if pr:
                prof = f"{pr['rows']} rows, {pr['seconds']:g} s"
            else:
                prof = "shipped" if m is None and not args.simulated else "-"
            why = ck.get("why", "")
            if m is None and not rec.get("ready"):
                why = f"{rec.get('status')}: {rec.get('detail')}"
            rows.append(
                {
                    "model": name,
                    "source": source,
                    "profiled": prof,
                    "partition": where.get(name, "-"),
                    "max_abs_err": ck.get("max_abs_err"),
                    "atol": ck.get("atol"),
                    "result": ck.get("result", "ready" if rec.get("ready") else "FAIL"),
                    "why": why,
                    "reference": ck.get("reference", ""),
                }
            )
        out["rows"] = rows
        out["checks"] = checks
        print(
            f"\noutputs through tritonclient.http and .grpc vs the framework's own fp32 run"
            f" (PASS: every element within {ATOL_OF_SCALE:g} x max|ref| + {RTOL:g} x |ref|):"
        )
        for line in _table(rows):
            print("  " + line)
        for row in rows:
            if row["why"]:
                print(f"  {row['model']}: {row['why']}")

        # 4. a short open-loop load at the registered rates
        ready = [r for r in regs if ms.get(r[0], {}).get("ready")]
        inputs = {m.name: m.inputs for m in checked}
        from stgs.registry import model_entry

        for name, _, _ in zoo:
            inputs[name] = {"input": model_entry(name).example(seed=7)[None]}
        if ready and args.seconds > 0:
            print(f"\nopen-loop load at the registered rates for {args.seconds:g} s:")
            t = time.monotonic()
            out["load"] = load_phase(d, ready, inputs, args, work / "load")
            out["timings_s"]["load"] = round(time.monotonic() - t, 1)
    finally:
        t = time.monotonic()
        d.stop()
        if not args.simulated:
            quit_mps(d.work / "run")
            quit_profiler_mps(since)
        out["timings_s"]["stop"] = round(time.monotonic() - t, 1)
        out["log_tail"] = d.log_path.read_text(errors="replace")[-6000:]
    out["timings_s"]["total"] = round(time.monotonic() - t_start, 1)
    ok = all(ms.get(n, {}).get("ready") for n in names) and all(
        c["result"] == "PASS" for c in checks.values()
    )
    out["ok"] = ok
    print(f"\ntimings (s): {out['timings_s']}")
    print(f"result: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--simulated", action="store_true", help="the simulated node, CPU workers")
    ap.add_argument("--seconds", type=float, default=5.0, help="open-loop load (0: none)")
    ap.add_argument("--clients", type=int, default=2, help="load generator processes")
    ap.add_argument("--protos", default="http", help="http, grpc or http,grpc")
    ap.add_argument(
        "--ready-timeout-s",
        type=float,
        default=None,
        help="from the daemon's start until every model is ready (default 420 on a GPU, 600"
        " simulated)",
    )
    ap.add_argument("--json", default=None, help="summary (default $OUT/user_models_gpu.json)")
    args = ap.parse_args(argv)
    if args.ready_timeout_s is None:
        args.ready_timeout_s = 600.0 if args.simulated else 420.0
    out: dict[str, Any] = {**run_header("user_models_gpu", argv), "notes": [], "timings_s": {}}
    work = Path(tempfile.mkdtemp(prefix="stgs-usermodels-"))
    rc = 1
    try:
        rc = run(args, work, out)
    except Exception as exc:  # report what happened, clean up, fail
        out["error"] = f"{type(exc).__name__}: {exc}"
        print(f"error: {out['error']}", file=sys.stderr)
        tail = out.get("log_tail")
        if tail:
            print("the daemon's log, last lines:\n" + "\n".join(tail.splitlines()[-30:]))
    finally:
        write_summary(out, args.json, "user_models_gpu")
        shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
