"""The model registry: every model stgs profiles, plans for and serves, defined once.

A :class:`ModelEntry` says what a model takes and returns (its input and output tensors, each
with a name, a dtype and one sample's shape, Triton style: several of each, all served) and
where it comes from (``kind``, ``target``); :func:`build_module` builds it. The profiler
(``profiler/models.py``), the runtime's workers (``stgs/runtime/models.py``), the API
(registration, KServe metadata), the simulator (:func:`sample_bytes`) and the benchmarks
(``model_entry(name).example()``) all read it here, so that the network a profile measured is
the network a worker serves.

Built-in models (:func:`model_entry`), with fixed weights (``torch.manual_seed(0)`` before
each build; latency does not depend on the weights):

* ``tiny_mlp`` (64 -> 128 -> 10) and ``tiny_cnn`` (3x32x32 -> 10): CI, CPU, milliseconds;
* ``bert_base``: transformers ``BertModel(BertConfig(), add_pooling_layer=False)``, input 128
  token ids (int64), output the last hidden state (128 x 768): the network the shipped
  profiles measured. Without transformers, an encoder of the same shape built from
  ``torch.nn`` alone stands in (12 layers, 768 wide, 12 heads; same input and output), for
  the profiler and the workers alike;
* ``wav2vec2_base``: torchaudio's ``wav2vec2_base()``, 1 s of 16 kHz audio in, its frame
  features out (49 x 768), as profiled; needs torchaudio;
* any ``torchvision.models`` classification model (``resnet50``, ``mobilenet_v2``, ...) with
  ``weights=None``: 3x224x224 in (3x299x299 for inception_v3), 1000 logits out; needs a
  working torchvision;
* ``echo`` (returns its input, any shape and dtype), ``sleep:<ms>`` (echo after ``ms``
  milliseconds a batch) and ``fail`` (raises): transport tests and benchmarks. Workers run
  them without torch; the profiler times them as torch modules (an identity).

Model files (:func:`file_entry`, the daemon's ``source: file:<path>``), with their own weights:

* TorchScript (``.pt``, ``.ts``; ``torch.jit.save``), loaded by ``torch.jit.load``. A
  ``torch.save`` pickle is refused before anything is unpickled: a TorchScript archive is a zip
  with ``code/`` and ``constants.pkl``, which ``torch.jit.load`` reads with TorchScript's own
  restricted unpickler. Its inputs come from the registration (no signature in the file);
* ``torch.export`` (``.pt2``; ``torch.export.save``), loaded by ``torch.export.load``. That
  call falls back to a full ``pickle`` for some payloads, so the archive is checked first:
  every pickled payload in it must load with ``torch.load(weights_only=True)``, and custom or
  opaque objects are refused. Its inputs and outputs come from the exported program's
  signature (the batch dimension must be the first, and dynamic);
* ONNX (``.onnx``), run by an **onnxruntime** ``InferenceSession`` (CPU execution provider on
  the CPU; the CUDA provider where the worker runs on a GPU and onnxruntime-gpu offers it; a
  GPU session whose CUDA provider does not load is an error, not onnxruntime's silent CPU
  fallback).
  Why onnxruntime rather than a conversion to torch: it is ONNX's reference runtime and runs
  every standard operator of every opset, whereas onnx-to-torch converters cover a subset and
  would make "loads" depend on which ops a file uses; and its numbers match the eager torch
  model within float error on the CPU. The cost: an ONNX model is not a torch module, so a
  GPU worker cannot capture it in the runtime's CUDA graphs (onnxruntime has its own CUDA
  graph option), and the profiler's GPU mode times it eagerly, through host copies. The GPU
  latency of onnxruntime-CUDA against torch with CUDA graphs is still to be measured (the lent
  GPUs have no onnxruntime-gpu). A conversion was tried (onnx2torch 1.5.15, 2026-12-07): it
  has no converter for what ``torch.onnx.export`` writes today (opset 20: ``Shape``-19,
  ``ReduceMean``-18; at opset 17 after onnx's version converter, ``Reshape`` with
  ``allowzero=1``), which is the subset problem above, measured (docs/operations.md). Inputs
  and outputs come from the graph (initializers excluded); external data files are refused
  (they could name paths outside the model directory).

Files load only from a path the caller resolved inside its model directory
(:func:`resolve_model_file`: no ``..``, no absolute path, no symlink out of it) and up to a
size limit; every refusal is a :class:`ModelFileError` naming the file and the reason.

Metadata never imports torch for built-in models; :func:`build_module` and the file
inspectors import torch, onnx and onnxruntime lazily.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import threading
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from stgs.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "BUILTIN",
    "DEFAULT_MAX_FILE_BYTES",
    "FILE_FORMATS",
    "ZOO",
    "ModelEntry",
    "ModelFileError",
    "TensorSpec",
    "build_module",
    "file_entry",
    "file_tensors",
    "model_entry",
    "resolve_model_file",
    "sample_bytes",
    "torchvision_names",
]

Array = npt.NDArray[Any]

ZOO_TORCHVISION = (
    "resnet50",
    "resnet18",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "vit_b_16",
    "densenet121",
    "vgg16",
    "inception_v3",
    "googlenet",
    "mnasnet1_0",
)
ZOO = (*ZOO_TORCHVISION, "bert_base", "wav2vec2_base")
"""The shipped zoo (the models of ``stgs/data/profiles.csv``): vision, language and speech."""
BUILTIN = ("tiny_mlp", "tiny_cnn", "bert_base", "wav2vec2_base")
TEST_MODELS = ("echo", "fail", "sleep:<ms>")

BERT_SEQ_LEN = 128
BERT_VOCAB = 30522
BERT_HIDDEN = 768
WAV2VEC2_SAMPLES = 16000  # 1 s of 16 kHz audio
WAV2VEC2_FRAMES = 49  # wav2vec2's feature extractor on 16000 samples (stride 320, field 400)
IMAGE = (3, 224, 224)
TV_INPUT = {"inception_v3": (3, 299, 299)}
TV_CLASSES = 1000

FILE_FORMATS = {".pt": "torchscript", ".ts": "torchscript", ".pt2": "export", ".onnx": "onnx"}
FILE_KINDS = ("torchscript", "export", "onnx")
DEFAULT_MAX_FILE_BYTES = 2 << 30  # 2 GiB
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool")


class ModelFileError(ConfigError):
    """A model file that does not load, or may not: the message names the file and why."""


# ---------------------------------------------------------------------- entries
@dataclass(frozen=True)
class TensorSpec:
    """One input or output: ``dtype`` a numpy dtype name ("" any), ``shape`` one sample's
    shape without the batch dimension (None: any). Integer inputs take values in
    ``[0, high)`` (token ids, indices; ``high`` 0: 2) where examples are made."""

    name: str
    dtype: str
    shape: tuple[int, ...] | None
    high: int = 0

    @property
    def nbytes(self) -> int | None:
        """One sample's bytes (None when the shape or dtype is open)."""
        if self.shape is None or not self.dtype:
            return None
        return math.prod(self.shape) * _itemsize(self.dtype)

    def example(self, rng: np.random.Generator) -> Array:
        shape = self.shape if self.shape is not None else (4,)
        dtype = self.dtype or "float32"
        if dtype == "bool":
            return rng.integers(0, 2, size=shape).astype(bool)
        if np.dtype(dtype).kind in "iu":
            return rng.integers(0, self.high or 2, size=shape).astype(dtype)
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else int(np.dtype(dtype).itemsize)


@dataclass(frozen=True)
class ModelEntry:
    """A model: its tensors, and where it comes from.

    ``kind``: ``builtin``, ``torchvision``, ``test`` (echo, sleep, fail), or a file format
    (``torchscript``, ``export``, ``onnx``); ``target``: the built-in or torchvision name, or
    the file's resolved path. ``needs_torch``: a worker imports torch to serve it.
    """

    name: str
    kind: str
    target: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...] = field(default=())
    needs_torch: bool = True

    @property
    def is_file(self) -> bool:
        return self.kind in FILE_KINDS

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """The served (first) input's sample shape; None: any."""
        return self.inputs[0].shape

    @property
    def input_dtype(self) -> str:
        """The served (first) input's numpy dtype name; "": any."""
        return self.inputs[0].dtype

    @property
    def sample_bytes(self) -> int | None:
        """Bytes of one request's inputs (None when a shape is open)."""
        sizes = [t.nbytes for t in self.inputs]
        return None if any(s is None for s in sizes) else sum(s or 0 for s in sizes)

    def example(self, seed: int = 0) -> Array:
        """A valid random sample of the served (first) input."""
        return self.inputs[0].example(np.random.default_rng(seed))

    def examples(self, seed: int = 0) -> dict[str, Array]:
        """A valid random sample of every input, by name."""
        rng = np.random.default_rng(seed)
        return {t.name: t.example(rng) for t in self.inputs}

    def renamed(self, name: str) -> ModelEntry:
        return replace(self, name=name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (worker specs, profiler requests); :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelEntry:
        def tensors(items: Sequence[Mapping[str, Any]]) -> tuple[TensorSpec, ...]:
            return tuple(
                TensorSpec(
                    str(t["name"]),
                    str(t["dtype"]),
                    None if t.get("shape") is None else tuple(int(s) for s in t["shape"]),
                    int(t.get("high", 0)),
                )
                for t in items
            )

        return cls(
            name=str(d["name"]),
            kind=str(d["kind"]),
            target=str(d["target"]),
            inputs=tensors(d["inputs"]),
            outputs=tensors(d.get("outputs") or ()),
            needs_torch=bool(d.get("needs_torch", True)),
        )


def _t(name: str, dtype: str, shape: tuple[int, ...] | None, high: int = 0) -> TensorSpec:
    return TensorSpec(name, dtype, shape, high)


_FIXED: dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]] = {
    "tiny_mlp": ((_t("input", "float32", (64,)),), (_t("output", "float32", (10,)),)),
    "tiny_cnn": ((_t("input", "float32", (3, 32, 32)),), (_t("output", "float32", (10,)),)),
    "bert_base": (
        (_t("input_ids", "int64", (BERT_SEQ_LEN,), BERT_VOCAB),),
        (_t("last_hidden_state", "float32", (BERT_SEQ_LEN, BERT_HIDDEN)),),
    ),
    "wav2vec2_base": (
        (_t("waveform", "float32", (WAV2VEC2_SAMPLES,)),),
        (_t("features", "float32", (WAV2VEC2_FRAMES, BERT_HIDDEN)),),
    ),
}


def torchvision_names() -> set[str]:
    """torchvision's classification models, when torchvision imports (empty otherwise: a
    torchvision built for another torch, e.g. a CUDA wheel beside a CPU torch, fails at
    import and counts as absent)."""
    ok, _ = _torchvision_status()
    if not ok:
        return set()
    tvm = importlib.import_module("torchvision.models")
    return set(tvm.list_models(module=tvm))


_TV_STATUS: tuple[bool, str] | None = None


def _torchvision_status() -> tuple[bool, str]:
    global _TV_STATUS
    if _TV_STATUS is None:
        if importlib.util.find_spec("torchvision") is None:
            _TV_STATUS = (False, "torchvision is not installed")
        else:
            try:
                importlib.import_module("torchvision.models")
                _TV_STATUS = (True, "")
            except Exception as exc:  # a broken install (wrong torch build): absent
                _TV_STATUS = (False, f"torchvision does not import: {type(exc).__name__}: {exc}")
    return _TV_STATUS


def _test_entry(name: str) -> ModelEntry:
    if name.startswith("sleep:"):
        try:
            ms = float(name.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"bad sleep model {name!r}: use sleep:<ms>") from None
        if not (ms >= 0 and math.isfinite(ms)):
            raise ConfigError(f"bad sleep model {name!r}: ms must be >= 0")
    anything = (_t("input", "", None),)
    return ModelEntry(name, "test", name, anything, (_t("output", "", None),), needs_torch=False)


def model_entry(name: str) -> ModelEntry:
    """The built-in model ``name`` (see the module docstring); ConfigError when unknown."""
    if name in ("echo", "fail") or name.startswith("sleep:"):
        return _test_entry(name)
    if name in _FIXED:
        if name == "wav2vec2_base" and importlib.util.find_spec("torchaudio") is None:
            raise ConfigError("unknown model 'wav2vec2_base' here: it needs the torchaudio package")
        ins, outs = _FIXED[name]
        return ModelEntry(name, "builtin", name, ins, outs)
    if name in torchvision_names():
        return ModelEntry(
            name,
            "torchvision",
            name,
            (_t("input", "float32", TV_INPUT.get(name, IMAGE)),),
            (_t("output", "float32", (TV_CLASSES,)),),
        )
    ok, why = _torchvision_status()
    hint = "" if ok else f" ({why}: no torchvision models)"
    raise ConfigError(
        f"unknown model {name!r}{hint}; built in: {', '.join((*BUILTIN, *TEST_MODELS))},"
        " and torchvision's classification models"
    )


def sample_bytes(name: str) -> int:
    """Bytes of one request's input for the model ``name`` (profile name), without torchvision
    or a file at hand: the built-in's size, else a torchvision image (3x224x224 float32;
    3x299x299 for inception_v3). The simulator's host-cost model uses it."""
    if name in _FIXED:
        return sum(t.nbytes or 0 for t in _FIXED[name][0])
    return math.prod(TV_INPUT.get(name, IMAGE)) * 4


# ---------------------------------------------------------------------- files
def resolve_model_file(model_dir: Path, rel: str) -> Path:
    """``rel`` inside ``model_dir``, resolved (symlinks too); ModelFileError when it escapes,
    has no model-file suffix, or is not a file."""
    if not rel or "\x00" in rel:
        raise ModelFileError("model file: empty path")
    base = model_dir.resolve()
    p = Path(rel)
    if p.is_absolute():
        raise ModelFileError(f"model file {rel!r}: give a path relative to the model directory")
    if ".." in p.parts:
        raise ModelFileError(f"model file {rel!r} is outside the model directory ('..')")
    target = (base / p).resolve()
    if not target.is_relative_to(base):
        raise ModelFileError(f"model file {rel!r} is outside the model directory")
    if target.suffix not in FILE_FORMATS:
        raise ModelFileError(
            f"model file {rel!r}: only TorchScript (.pt, .ts), torch.export (.pt2) or ONNX"
            " (.onnx) files load (never pickled modules)"
        )
    if not target.is_file():
        raise ModelFileError(f"model file {rel!r}: no such file in the model directory")
    return target


def file_entry(
    name: str,
    path: Path,
    inputs: Sequence[TensorSpec] = (),
    *,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> ModelEntry:
    """The entry of the model file ``path`` (already resolved inside its model directory),
    served as ``name``. Checks its size and format (no pickle), and reads its tensors from the
    file where the format has them; ``inputs`` (from the registration) fill in or must agree.
    ModelFileError names the file and the reason."""
    kind = FILE_FORMATS.get(path.suffix)
    if kind is None:
        raise ModelFileError(f"model file {path.name!r}: unknown format {path.suffix!r}")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelFileError(f"model file {path.name!r}: {exc.strerror}") from None
    if size > max_bytes:
        raise ModelFileError(
            f"model file {path.name!r} is {size / 2**20:.1f} MiB, above the limit of"
            f" {max_bytes / 2**20:.1f} MiB (models.max_file_mb)"
        )
    given = tuple(inputs)
    ins: tuple[TensorSpec, ...]
    outs: tuple[TensorSpec, ...]
    try:
        if kind == "torchscript":
            check_torchscript(path)
            if not given:
                raise ModelFileError(
                    f"model file {path.name!r}: a TorchScript file has no input signature;"
                    " register it with inputs: [{name, datatype, shape}]"
                )
            ins, outs = given, (_t("output", "float32", None),)
        elif kind == "export":
            ins, outs = _export_tensors(path)
        else:
            ins, outs = _onnx_tensors(path)
    except ModelFileError:
        raise
    except Exception as exc:  # a file the library cannot read: the user's file's fault
        raise ModelFileError(
            f"model file {path.name!r} does not load as {kind}: {type(exc).__name__}: {exc}"
        ) from exc
    ins = _merge_inputs(path.name, ins, given)
    return ModelEntry(name, kind, str(path), ins, outs)


def file_tensors(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The inputs and outputs a torch.export (``.pt2``) or ONNX file declares, as the file
    has them (a shape None where a sample dimension is open); ModelFileError for a TorchScript
    file (no signature) or one that does not load. Model repositories check their configs
    against it."""
    kind = FILE_FORMATS.get(path.suffix)
    if kind not in ("export", "onnx"):
        raise ModelFileError(f"model file {path.name!r}: no signature in a {kind} file")
    try:
        return _export_tensors(path) if kind == "export" else _onnx_tensors(path)
    except ModelFileError:
        raise
    except Exception as exc:
        raise ModelFileError(
            f"model file {path.name!r} does not load as {kind}: {type(exc).__name__}: {exc}"
        ) from exc


def _merge_inputs(
    fname: str, found: tuple[TensorSpec, ...], given: tuple[TensorSpec, ...]
) -> tuple[TensorSpec, ...]:
    """The file's inputs, with what the registration gave filling in open shapes; a given
    input that contradicts the file is an error."""
    if not given or found is given:
        out = found
    else:
        if len(given) != len(found):
            raise ModelFileError(
                f"model file {fname!r} takes {len(found)} input(s)"
                f" ({', '.join(t.name for t in found)}); the registration gives {len(given)}"
            )
        merged = []
        for f, g in zip(found, given, strict=True):
            if f.shape is not None and g.shape is not None and f.shape != g.shape:
                raise ModelFileError(
                    f"model file {fname!r}: input {f.name!r} takes shape {list(f.shape)},"
                    f" the registration says {list(g.shape)}"
                )
            if f.dtype and g.dtype and f.dtype != g.dtype:
                raise ModelFileError(
                    f"model file {fname!r}: input {f.name!r} takes {f.dtype},"
                    f" the registration says {g.dtype}"
                )
            merged.append(TensorSpec(f.name, f.dtype or g.dtype, f.shape or g.shape, g.high))
        out = tuple(merged)
    for t in out:
        if t.shape is None or not t.dtype:
            raise ModelFileError(
                f"model file {fname!r}: input {t.name!r} has an open shape or dtype; register"
                " it with inputs: [{name, datatype, shape}]"
            )
    return out


def check_torchscript(path: Path) -> None:
    """A TorchScript archive (``torch.jit.save``), not a ``torch.save`` pickle."""
    if not zipfile.is_zipfile(path):
        raise ModelFileError(
            f"model file {path.name!r} is not a TorchScript archive (not a zip file: a legacy"
            " torch.save pickle or another file); save it with torch.jit.save"
        )
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    has_code = any("/code/" in n for n in names)
    has_constants = any(n.endswith("/constants.pkl") for n in names)
    if not (has_code and has_constants):
        raise ModelFileError(
            f"model file {path.name!r} is a torch.save pickle, not a TorchScript archive"
            " (no code/ in it); pickled modules never load: save it with torch.jit.save, or"
            " torch.export.save as .pt2"
        )


def _weights_only(data: bytes, fname: str, member: str) -> None:
    import io

    import torch

    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:
        raise ModelFileError(
            f"model file {fname!r}: {member} holds a pickle that is not plain tensors"
            f" (torch.load weights_only refuses it: {type(exc).__name__}); refused"
        ) from None


def check_export(path: Path) -> None:
    """A ``torch.export.save`` archive whose pickled payloads are plain tensors only."""
    from torch.export.pt2_archive.constants import (
        CUSTOM_OBJ_FILENAME_PREFIX,
        OPAQUE_OBJ_FILENAME_PREFIX,
    )

    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"model file {path.name!r} is not a torch.export archive (no zip)")
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        if not any("/models/" in n and n.endswith(".json") for n in names):
            raise ModelFileError(
                f"model file {path.name!r} is not a torch.export archive (no models/*.json);"
                " save it with torch.export.save"
            )
        for n in sorted(names):
            if n.endswith((".pt", ".pkl")):
                _weights_only(z.read(n), path.name, n)
            if "/data/" in n and n.endswith("_config.json"):
                config = json.loads(z.read(n)).get("config", {})
                folder = n.rsplit("/", 1)[0]
                for fqn, meta in config.items():
                    pn = str(meta.get("path_name", ""))
                    if pn.startswith((CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX)):
                        raise ModelFileError(
                            f"model file {path.name!r}: constant {fqn!r} is a pickled object;"
                            " refused"
                        )
                    if meta.get("use_pickle"):
                        member = f"{folder}/{pn}"
                        if member not in names:
                            raise ModelFileError(f"model file {path.name!r}: {member} missing")
                        _weights_only(z.read(member), path.name, member)


_EXPORT_LOAD = threading.Lock()


def export_load(path: Path) -> Any:
    """``torch.export.load``, one call at a time in this process: it sets a module-global
    deserializer and fails ("_CURRENT_DESERIALIZER is already set") when two threads load at
    once (the daemon inspects a file in a request thread while its profiler loads it)."""
    import torch

    with _EXPORT_LOAD:
        return torch.export.load(str(path))


def _np_dtype_of_torch(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _export_tensors(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    import torch

    check_export(path)
    ep = export_load(path)
    user_inputs = list(ep.graph_signature.user_inputs)
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}

    def spec(name: str, val: Any, what: str) -> TensorSpec:
        if not isinstance(val, torch.Tensor):
            raise ModelFileError(f"model file {path.name!r}: {what} {name!r} is not a tensor")
        dims = tuple(val.shape)
        rest = dims[1:]
        if not dims or not all(isinstance(d, int) for d in rest):
            raise ModelFileError(
                f"model file {path.name!r}: {what} {name!r} has shape {list(dims)}; export it"
                " with the batch as its first, dynamic dimension and fixed sample dimensions"
            )
        return TensorSpec(name, _np_dtype_of_torch(val.dtype), tuple(int(d) for d in rest))

    ins = tuple(spec(str(n), vals.get(str(n)), "input") for n in user_inputs)
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    outs_val = out_node.meta.get("val")
    if not isinstance(outs_val, tuple | list):
        outs_val = (outs_val,)
    names = list(ep.graph_signature.user_outputs)
    outs = tuple(
        spec(names[k] if k < len(names) else f"output_{k}", v, "output")
        for k, v in enumerate(outs_val[-len(names) :] if names else outs_val)
    )
    return ins, outs


def _onnx_model(path: Path) -> Any:
    """The ONNX model proto, without external data (refused)."""
    onnx: Any = importlib.import_module("onnx")
    model = onnx.load(str(path), load_external_data=False)
    ext = importlib.import_module("onnx.external_data_helper")
    for t in ext._get_all_tensors(model):
        if ext.uses_external_data(t):
            raise ModelFileError(
                f"model file {path.name!r}: tensor {t.name!r} keeps its data in an external"
                " file; external data is refused (save the model as one .onnx file)"
            )
    return model


def _onnx_tensors(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    if importlib.util.find_spec("onnx") is None:
        raise ModelFileError(
            f"model file {path.name!r}: ONNX models need the onnx and onnxruntime packages"
            " (pip install 'stgs[onnx]')"
        )
    helper: Any = importlib.import_module("onnx.helper")
    model = _onnx_model(path)
    init = {i.name for i in model.graph.initializer}

    def spec(vi: Any, what: str) -> TensorSpec:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if not dims:
            raise ModelFileError(
                f"model file {path.name!r}: {what} {vi.name!r} has no batch dimension"
            )
        if dims[0] is not None and dims[0] != 1:
            raise ModelFileError(
                f"model file {path.name!r}: {what} {vi.name!r} has a fixed batch of {dims[0]};"
                " export it with a dynamic first (batch) dimension"
            )
        rest = dims[1:]
        shape = None if any(d is None for d in rest) else tuple(int(d or 0) for d in rest)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
        return TensorSpec(vi.name, dtype, shape)

    ins = tuple(spec(v, "input") for v in model.graph.input if v.name not in init)
    outs = tuple(spec(v, "output") for v in model.graph.output)
    return ins, outs


# ---------------------------------------------------------------------- building
def _tiny_mlp() -> torch.nn.Module:
    import torch

    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def _tiny_cnn() -> torch.nn.Module:
    import torch

    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def bert_encoder(
    *,
    vocab: int = BERT_VOCAB,
    hidden: int = BERT_HIDDEN,
    layers: int = 12,
    heads: int = 12,
    ff: int = 3072,
    max_len: int = 512,
) -> torch.nn.Module:
    """A BERT-base shaped encoder from ``torch.nn`` alone: token ids in, the last hidden state
    out (bert_base's stand-in where transformers is not installed)."""
    import torch

    nn = torch.nn

    class BertEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(vocab, hidden)
            self.pos = nn.Embedding(max_len, hidden)
            self.norm = nn.LayerNorm(hidden)
            layer = nn.TransformerEncoderLayer(
                hidden, heads, ff, activation="gelu", batch_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(ids.shape[1], device=ids.device)
            out: torch.Tensor = self.encoder(self.norm(self.tok(ids) + self.pos(pos)))
            return out

    return BertEncoder()


def _bert_base() -> torch.nn.Module:
    if importlib.util.find_spec("transformers") is None:
        return bert_encoder()
    import torch

    tf: Any = importlib.import_module("transformers")

    class Bert(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = tf.BertModel(tf.BertConfig(), add_pooling_layer=False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.bert(input_ids=ids, return_dict=False)[0]
            return out

    return Bert()


def _wav2vec2_base() -> torch.nn.Module:
    import torch

    ta: Any = importlib.import_module("torchaudio")

    class W2V(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = ta.models.wav2vec2_base()

        def forward(self, wave: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.m(wave)[0]  # frame features
            return out

    return W2V()


def _torchvision(name: str) -> torch.nn.Module:
    ok, why = _torchvision_status()
    if not ok:
        raise ConfigError(f"model {name!r}: {why}")
    tvm: Any = importlib.import_module("torchvision.models")
    kwargs: dict[str, Any] = {"weights": None}
    if name in ("inception_v3", "googlenet"):
        # no auxiliary heads at inference; skip scipy's slow truncated-normal init
        kwargs.update(aux_logits=False, init_weights=False)
    module: torch.nn.Module = tvm.get_model(name, **kwargs)
    return module


def _test_module(name: str) -> torch.nn.Module:
    """echo, sleep:<ms>, fail as torch modules (the profiler times them)."""
    import torch

    sleep_s = float(name.split(":", 1)[1]) / 1000.0 if name.startswith("sleep:") else 0.0

    class Echo(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if name == "fail":
                raise RuntimeError("the 'fail' model always fails")
            if sleep_s:
                time.sleep(sleep_s)
            return x

    return Echo()


_BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "tiny_mlp": _tiny_mlp,
    "tiny_cnn": _tiny_cnn,
    "bert_base": _bert_base,
    "wav2vec2_base": _wav2vec2_base,
}


def build_module(model: ModelEntry | str, device: str = "cpu") -> torch.nn.Module:
    """The torch module of ``model`` (an entry, or a built-in name), on the CPU, fp32, in eval
    mode (an exported program's module as exported), deterministic weights for built-ins. An
    ONNX model is an onnxruntime session wrapped as a module (torch tensors in and out) whose
    provider follows ``device``. Raises ConfigError (ModelFileError for files)."""
    import torch

    entry = model if isinstance(model, ModelEntry) else model_entry(model)
    path = Path(entry.target)
    loaded: torch.nn.Module
    if entry.kind == "torchscript":
        check_torchscript(path)
        loaded = _file_load(path, lambda: _jit_load(path))
        return loaded
    if entry.kind == "export":
        check_export(path)
        loaded = _file_load(path, lambda: export_load(path).module())
        return loaded
    if entry.kind == "onnx":
        loaded = _file_load(path, lambda: onnx_module(entry, device))
        return loaded
    torch.manual_seed(0)
    if entry.kind == "test":
        module = _test_module(entry.target)
    elif entry.kind == "builtin":
        module = _BUILDERS[entry.target]()
    elif entry.kind == "torchvision":
        module = _torchvision(entry.target)
    else:
        raise ConfigError(f"model {entry.name!r}: unknown kind {entry.kind!r}")
    return module.eval()


def _jit_load(path: Path) -> Any:
    """``torch.jit.load`` (TorchScript is deprecated in favour of torch.export, and says so at
    every call; it still loads, and it is the format many model files come in)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()  # type: ignore[no-untyped-call]


def _file_load(path: Path, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except ModelFileError:
        raise
    except Exception as exc:
        raise ModelFileError(
            f"model file {path.name!r} does not load: {type(exc).__name__}: {exc}"
        ) from exc


def onnx_session(entry: ModelEntry, device: str = "cpu", threads: int = 0) -> Any:
    """An onnxruntime session for ``entry`` (external data refused). ``device`` cuda: the CUDA
    provider (an error where onnxruntime has none); ``threads``: intra-op threads (0: ORT's
    default)."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise ModelFileError(
            f"model file {Path(entry.target).name!r}: ONNX models need the onnxruntime package"
            " (pip install 'stgs[onnx]')"
        )
    ort: Any = importlib.import_module("onnxruntime")
    path = Path(entry.target)
    model = _onnx_model(path)
    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if importlib.util.find_spec("torch") is not None:
            # onnxruntime-gpu finds the CUDA and cuDNN libraries torch loads (its documented
            # way with pip-installed CUDA), as in the profiler's workers, which import torch
            importlib.import_module("torch")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ModelFileError(
                f"model file {path.name!r}: this onnxruntime has no CUDA provider (install"
                " onnxruntime-gpu to serve ONNX models on a GPU)"
            )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    if device.startswith("cuda") and "CUDAExecutionProvider" not in sess.get_providers():
        # onnxruntime falls back to the CPU, with a warning only, when its CUDA provider does
        # not load (CUDA or cuDNN libraries missing, or of another CUDA version than its build)
        raise ModelFileError(
            f"model file {path.name!r}: onnxruntime's CUDA provider did not load in this"
            f" process (the session would run on {', '.join(sess.get_providers())}): its CUDA"
            " and cuDNN libraries are missing or of another CUDA version than the"
            " onnxruntime-gpu build"
        )
    return sess


def onnx_module(entry: ModelEntry, device: str = "cpu") -> torch.nn.Module:
    """The ONNX model as a torch module: ``forward(*xs)`` runs the session on the entry's inputs
    in order (numpy across the boundary) and returns its output on the first input's device
    (a tuple of every output for a graph of several)."""
    import torch

    threads = torch.get_num_threads() if not device.startswith("cuda") else 0
    sess = onnx_session(entry, device, threads)
    first = sess.get_inputs()[0]
    in_names = [i.name for i in sess.get_inputs()]
    per_row = isinstance(first.shape[0], int)  # a fixed batch of 1: one run per sample
    in_dtypes = [t.dtype or "float32" for t in entry.inputs]
    out_names = [o.name for o in sess.get_outputs()]

    class OnnxModule(torch.nn.Module):
        def forward(self, *xs: torch.Tensor) -> Any:
            arrs = [
                x.detach().cpu().numpy().astype(d, copy=False)
                for x, d in zip(xs, in_dtypes, strict=True)
            ]
            feeds = dict(zip(in_names, arrs, strict=True))
            if per_row:
                runs = [
                    sess.run(out_names, {k: v[r : r + 1] for k, v in feeds.items()})
                    for r in range(len(arrs[0]))
                ]
                outs = [np.concatenate([run[j] for run in runs]) for j in range(len(out_names))]
            else:
                outs = list(sess.run(out_names, feeds))
            dev = xs[0].device
            got = [torch.from_numpy(np.ascontiguousarray(o)).to(dev) for o in outs]
            return got[0] if len(got) == 1 else tuple(got)

    return OnnxModule().eval()


def valid_dtype(dtype: str) -> bool:
    return dtype in DTYPES
