"""A Triton-style model repository: ``<repo>/<model>/config.pbtxt`` and
``<repo>/<model>/<version>/model.pt|model.pt2|model.onnx``.

The configuration is Triton's own: ``config.pbtxt`` is parsed by protobuf's text format into
Triton's published model-config schema as ``tritonclient`` ships it compiled
(``tritonclient.grpc.model_config_pb2.ModelConfig``); no pbtxt parser of our own. From it come:

* the tensors: ``input`` and ``output`` (name, ``data_type`` TYPE_FP32 ..., ``dims``), with the
  batch as Triton says it: ``max_batch_size > 0`` means the dims are one sample's and requests
  carry a batch dimension in front (at most ``max_batch_size``); ``max_batch_size: 0`` means the
  dims are the whole tensor, whose first dimension stgs batches along (it must be -1 or 1);
* the versions (``version_policy``: ``latest { num_versions }``, ``all``, ``specific
  { versions }``; default latest 1): stgs serves one version per model, the newest that the
  policy selects;
* the file: ``default_model_filename``, else Triton's default name for the platform or backend
  (``pytorch_libtorch`` / ``pytorch``: ``model.pt``, or ``model.pt2`` for a torch.export archive;
  ``onnxruntime_onnx`` / ``onnxruntime``: ``model.onnx``; neither given: whichever of the three
  exists);
* the SLO and the expected rate: ``parameters { key: "slo_ms" value { string_value: "50" } }``
  and ``rate_rps`` likewise (or from the REST registration, or a load request's parameters).

A config that disagrees with its file (input or output names, datatypes or dims against the
ONNX graph or the torch.export signature) is a :class:`RepositoryError` naming the model and the
mismatch. A model may have several inputs and outputs: the config lists every input of the
file (in any order; requests send them by name), and outputs the file has (ONNX: by name; a
torch.export or TorchScript file: in the file's order, the first ones). Files load under the
registry's rules (``stgs.registry``: no pickle, inside the repository, within
``models.max_file_mb``).

A repository model registers as ``source: repository:<model>/<version>`` through the same path as
``POST /v1/models`` (:meth:`api.service.Service.load_from_repository`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from google.protobuf.descriptor import FieldDescriptor
from tritonclient.grpc import model_config_pb2 as mc

from api.inference import ModelIO
from stgs.errors import ConfigError
from stgs.registry import (
    FILE_FORMATS,
    ModelEntry,
    ModelFileError,
    TensorSpec,
    file_entry,
    file_tensors,
    resolve_model_file,
)

CONFIG_FILE = "config.pbtxt"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
SOURCE_PREFIX = "repository:"

# Triton's TYPE_* -> numpy dtype name (TYPE_STRING and TYPE_BF16 are not served)
DATA_TYPES: dict[str, str] = {
    "TYPE_BOOL": "bool",
    "TYPE_UINT8": "uint8",
    "TYPE_UINT16": "uint16",
    "TYPE_UINT32": "uint32",
    "TYPE_UINT64": "uint64",
    "TYPE_INT8": "int8",
    "TYPE_INT16": "int16",
    "TYPE_INT32": "int32",
    "TYPE_INT64": "int64",
    "TYPE_FP16": "float16",
    "TYPE_FP32": "float32",
    "TYPE_FP64": "float64",
}
TYPE_OF = {v: k for k, v in DATA_TYPES.items()}

# platform or backend -> the file names Triton (and stgs) look for, in order
_FILES = {
    "pytorch_libtorch": ("model.pt", "model.pt2"),
    "pytorch": ("model.pt", "model.pt2"),
    "onnxruntime_onnx": ("model.onnx",),
    "onnxruntime": ("model.onnx",),
    "": ("model.pt", "model.pt2", "model.onnx"),
}
_PLATFORM_OF_KIND = {
    "torchscript": "pytorch_libtorch",
    "export": "pytorch_libtorch",
    "onnx": "onnxruntime_onnx",
}
_KINDS_OF = {
    "pytorch_libtorch": ("torchscript", "export"),
    "pytorch": ("torchscript", "export"),
    "onnxruntime_onnx": ("onnx",),
    "onnxruntime": ("onnx",),
}
_WHAT = {
    "torchscript": "TorchScript file",
    "export": "torch.export signature",
    "onnx": "ONNX graph",
}


class RepositoryError(ConfigError):
    """A repository model that cannot be served as configured: the message names the model and
    what is wrong (HTTP 400 on the Triton load API, 422 on REST, a logged error at start)."""


@dataclass(frozen=True)
class RepoModel:
    """One model of the repository, as its config and files say."""

    name: str
    config: Any  # model_config_pb2.ModelConfig
    version: int  # the served version: the newest the policy selects
    versions: tuple[int, ...]  # every version the policy selects (newest last)
    file: str  # relative to the repository: <name>/<version>/<file>
    slo_ms: float | None
    rate_rps: float | None
    fingerprint: str  # config text and the file's size and mtime: a change re-registers

    @property
    def source(self) -> str:
        return f"{SOURCE_PREFIX}{self.name}/{self.version}"


def parse_source(source: str) -> tuple[str, int | None]:
    """``repository:<model>[/<version>]`` -> (model, version or None)."""
    target = source.removeprefix(SOURCE_PREFIX)
    name, _, ver = target.partition("/")
    if not ver:
        return name, None
    try:
        return name, int(ver)
    except ValueError:
        raise ConfigError(f"source {source!r}: the version must be a number") from None


def is_repository_source(source: object) -> bool:
    return isinstance(source, str) and source.startswith(SOURCE_PREFIX)


def config_dict(msg: Any) -> dict[str, Any]:
    """A protobuf message as Triton's HTTP API writes it: ``MessageToDict`` with the proto's own
    field names and every field (defaults included), and 64-bit integers as JSON numbers
    (protobuf's JSON mapping writes them as strings; Triton turns them back into numbers)."""
    out: dict[str, Any] = json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _numbers(msg.DESCRIPTOR, out)
    return out


_INT64 = (
    FieldDescriptor.CPPTYPE_INT64,
    FieldDescriptor.CPPTYPE_UINT64,
)


def _numbers(desc: Any, d: dict[str, Any]) -> None:
    for f in desc.fields:
        if f.name not in d:
            continue
        v = d[f.name]
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            vf = f.message_type.fields_by_name["value"]
            for k, item in list(v.items()):
                if vf.message_type is not None:
                    _numbers(vf.message_type, item)
                elif vf.cpp_type in _INT64:
                    v[k] = int(item)
        elif f.message_type is not None:
            for item in v if isinstance(v, list) else [v]:
                _numbers(f.message_type, item)
        elif f.cpp_type in _INT64:
            d[f.name] = [int(x) for x in v] if isinstance(v, list) else int(v)


def _param(cfg: Any, key: str, name: str) -> float | None:
    p = cfg.parameters.get(key)
    if p is None or not p.string_value.strip():
        return None
    try:
        v = float(p.string_value)
    except ValueError:
        v = float("nan")
    if not (v == v and 0 <= v < float("inf")) or (key == "slo_ms" and v <= 0):
        raise RepositoryError(
            f"model {name!r}: config.pbtxt parameter {key} = {p.string_value!r} is not a"
            f" {'positive' if key == 'slo_ms' else 'non-negative'} number"
        )
    return v


class Repository:
    """The repository at ``root`` (``models.repository``); files up to ``max_bytes``."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.errors: dict[str, str] = {}  # model -> why its last load failed (the index says)

    # ------------------------------------------------------------------ reading
    def names(self) -> list[str]:
        """The model directories (hidden ones skipped), sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def has(self, name: str) -> bool:
        """A directory ``name`` is in the repository (a valid model or not)."""
        return "/" not in name and name not in ("", ".", "..") and (self.root / name).is_dir()

    def read_config(self, name: str) -> Any:
        """``<name>/config.pbtxt`` as a ``ModelConfig``; RepositoryError when missing or bad."""
        if not NAME_RE.match(name):
            raise RepositoryError(
                f"model directory {name!r}: not a valid model name (letters, digits, _ . -)"
            )
        path = self.root / name / CONFIG_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RepositoryError(
                f"model {name!r}: no {CONFIG_FILE} in {self.root / name} (stgs needs one: it"
                " does not complete configs from the files)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RepositoryError(f"model {name!r}: cannot read {CONFIG_FILE}: {exc}") from None
        cfg = mc.ModelConfig()
        try:
            text_format.Parse(text, cfg)
        except text_format.ParseError as exc:
            raise RepositoryError(f"model {name!r}: {CONFIG_FILE} does not parse: {exc}") from None
        if cfg.name and cfg.name != name:
            raise RepositoryError(
                f"model {name!r}: {CONFIG_FILE} names it {cfg.name!r}; the name must be the"
                " directory's"
            )
        cfg.name = name
        return cfg

    def inspect(self, name: str, version: int | None = None) -> RepoModel:
        """The model ``name`` as its config and version directories say (``version``: that
        one, which must be among those the policy selects; default the newest)."""
        cfg = self.read_config(name)
        if not len(cfg.input) or not len(cfg.output):
            raise RepositoryError(
                f"model {name!r}: {CONFIG_FILE} declares {len(cfg.input)} input(s) and"
                f" {len(cfg.output)} output(s); stgs serves models of at least one of each"
            )
        for what, ts in (("input", cfg.input), ("output", cfg.output)):
            names = [t.name for t in ts]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise RepositoryError(
                    f"model {name!r}: {CONFIG_FILE} declares {what} {dup[0]!r} twice"
                )
        present = sorted(
            int(p.name)
            for p in (self.root / name).iterdir()
            if p.is_dir() and p.name.isdigit() and not p.name.startswith("0")
        )
        vp = cfg.version_policy
        which = vp.WhichOneof("policy_choice")
        if which == "all":
            selected = present
            policy = "all"
        elif which == "specific":
            selected = [v for v in present if v in set(vp.specific.versions)]
            policy = f"specific {list(vp.specific.versions)}"
        else:
            n = vp.latest.num_versions if which == "latest" else 1
            if n < 1:
                raise RepositoryError(f"model {name!r}: version_policy latest num_versions < 1")
            selected = present[-n:]
            policy = f"latest {n}"
        if not selected:
            raise RepositoryError(
                f"model {name!r}: no version directory the version_policy ({policy}) selects"
                f" (found: {', '.join(map(str, present)) or 'none'})"
            )
        if version is None:
            version = selected[-1]
        elif version not in selected:
            raise RepositoryError(
                f"model {name!r}: version {version} is not among those the version_policy"
                f" selects ({', '.join(map(str, selected))})"
            )
        fname = self._file_name(cfg, name, version)
        rel = f"{name}/{version}/{fname}"
        path = resolve_model_file(self.root, rel)  # inside the repository, symlinks included
        kind = FILE_FORMATS[path.suffix]
        key = cfg.platform or cfg.backend
        if key in _KINDS_OF and kind not in _KINDS_OF[key]:
            raise RepositoryError(
                f"model {name!r}: {fname} is a {kind} file, but {CONFIG_FILE} says {key!r}"
            )
        st = path.stat()
        h = hashlib.sha256()
        h.update((self.root / name / CONFIG_FILE).read_bytes())
        h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        return RepoModel(
            name=name,
            config=cfg,
            version=version,
            versions=tuple(selected),
            file=rel,
            slo_ms=_param(cfg, "slo_ms", name),
            rate_rps=_param(cfg, "rate_rps", name),
            fingerprint=h.hexdigest()[:32],
        )

    def _file_name(self, cfg: Any, name: str, version: int) -> str:
        d = self.root / name / str(version)
        if cfg.default_model_filename:
            return str(cfg.default_model_filename)
        key = cfg.platform or cfg.backend
        if key not in _FILES:
            raise RepositoryError(
                f"model {name!r}: platform/backend {key!r} is not served by stgs (TorchScript"
                " pytorch_libtorch, torch.export .pt2 or onnxruntime_onnx files only)"
            )
        for f in _FILES[key]:
            if (d / f).is_file():
                return f
        raise RepositoryError(
            f"model {name!r}: version {version} has none of {', '.join(_FILES[key])}"
        )

    # ------------------------------------------------------------------ registration
    def spec(
        self,
        m: RepoModel,
        slo_ms: float | None = None,
        rate_rps: float | None = None,
    ) -> dict[str, Any]:
        """The registration of ``m``: SLO and rate from the arguments, else its config."""
        slo = slo_ms if slo_ms is not None else m.slo_ms
        rate = rate_rps if rate_rps is not None else m.rate_rps
        if slo is None or rate is None:
            raise RepositoryError(
                f"model {m.name!r}: no SLO or expected rate: add parameters slo_ms and rate_rps"
                f' to its {CONFIG_FILE} (parameters {{ key: "slo_ms" value {{ string_value:'
                ' "50" } }), or register it over REST with source repository:'
                f"{m.name} (or load it with parameters slo_ms and rate_rps)"
            )
        return {
            "name": m.name,
            "source": m.source,
            "slo_ms": float(slo),
            "rate_rps": float(rate),
            "dtype": "fp32",
            "inputs": [],
            "max_batch_size": int(m.config.max_batch_size),
            "fingerprint": m.fingerprint,
        }

    def entry(self, name: str, version: int | None) -> ModelEntry:
        """The registry entry of the model's version, its config checked against its file."""
        m = self.inspect(name, version)
        cfg = m.config
        path = resolve_model_file(self.root, m.file)
        kind = FILE_FORMATS[path.suffix]
        cins = [_tensor(t, cfg.max_batch_size, name, "input") for t in cfg.input]
        couts = [_tensor(t, cfg.max_batch_size, name, "output") for t in cfg.output]
        try:
            if kind == "torchscript":
                for t in (*cins, *couts):
                    if any(d < 1 for d in t.dims):
                        raise RepositoryError(
                            f"model {name!r}: {t.what} {t.name!r} has dims {list(t.dims)}; a"
                            " TorchScript file has no signature, so its config's dims must be"
                            " fixed"
                        )
                # no signature: the config's order is the module's argument order
                given = tuple(TensorSpec(c.name, c.dtype, c.dims) for c in cins)
                entry = file_entry(name, path, given, max_bytes=self.max_bytes)
                outs = tuple(TensorSpec(c.name, c.dtype, c.dims) for c in couts)
                return replace(entry, outputs=outs)
            found_in, found_out = file_tensors(path)
            what = _WHAT[kind]
            file_names = {f.name for f in found_in}
            for c in cins:
                if c.name not in file_names:
                    raise RepositoryError(
                        f"model {name!r}: {CONFIG_FILE} input {c.name!r} does not match the"
                        f" {what}, whose input{'s are' if len(found_in) > 1 else ' is'}"
                        f" {', '.join(repr(f.name) for f in found_in)}"
                    )
            by_name = {c.name: c for c in cins}
            given_list = []
            for f_in in found_in:  # the file's order: the order the runner passes them in
                cin = by_name.get(f_in.name)
                if cin is None:
                    raise RepositoryError(
                        f"model {name!r}: the {what} takes input {f_in.name!r}, which"
                        f" {CONFIG_FILE} does not declare"
                        f" (it declares {', '.join(c.name for c in cins)})"
                    )
                _agree(name, what, cin, f_in, names=True)
                shape = f_in.shape if f_in.shape is not None else cin.fixed()
                if shape is None:
                    raise RepositoryError(
                        f"model {name!r}: input {cin.name!r} has variable dims {list(cin.dims)}"
                        f" in {CONFIG_FILE} and in the {what}; stgs needs fixed sample dims"
                    )
                given_list.append(TensorSpec(f_in.name, f_in.dtype, shape))
            entry = file_entry(name, path, tuple(given_list), max_bytes=self.max_bytes)
            outs_list = []
            if kind == "onnx":  # by name: any subset of the graph's outputs, in any order
                found = {f.name: f for f in found_out}
                pairs = []
                for c in couts:
                    f_out = found.get(c.name)
                    if f_out is None:
                        raise RepositoryError(
                            f"model {name!r}: {CONFIG_FILE} output {c.name!r} does not match"
                            f" the {what}, whose outputs are"
                            f" {', '.join(repr(f.name) for f in found_out)}"
                        )
                    pairs.append((c, f_out))
            else:  # a torch.export program's outputs have no stable names: by position
                if len(couts) > len(found_out):
                    raise RepositoryError(
                        f"model {name!r}: {CONFIG_FILE} declares {len(couts)} outputs, the"
                        f" {what} has {len(found_out)}"
                    )
                pairs = list(zip(couts, found_out, strict=False))
            for c, f_out in pairs:
                _agree(name, what, c, f_out, names=False)
                out_shape = f_out.shape if f_out.shape is not None else c.fixed()
                outs_list.append(TensorSpec(c.name, f_out.dtype, out_shape))
            return replace(entry, outputs=tuple(outs_list))
        except ModelFileError as exc:
            if isinstance(exc, RepositoryError):
                raise
            raise RepositoryError(f"model {name!r}: {exc}") from None

    def config_json(self, m: RepoModel) -> dict[str, Any]:
        """The served config as Triton's HTTP API shows it (platform filled in)."""
        cfg = mc.ModelConfig()
        cfg.CopyFrom(m.config)
        if not cfg.platform and not cfg.backend:
            cfg.platform = _PLATFORM_OF_KIND[FILE_FORMATS[Path(m.file).suffix]]
        if not cfg.HasField("version_policy"):
            cfg.version_policy.latest.num_versions = 1
        return config_dict(cfg)


@dataclass(frozen=True)
class _ConfigTensor:
    what: str
    name: str
    dtype: str
    dims: tuple[int, ...]  # one sample's (-1: variable)

    def fixed(self) -> tuple[int, ...] | None:
        return None if any(d < 1 for d in self.dims) else self.dims


def _tensor(t: Any, max_batch_size: int, model: str, what: str) -> _ConfigTensor:
    dt = mc.DataType.Name(t.data_type)
    if dt not in DATA_TYPES:
        raise RepositoryError(
            f"model {model!r}: {what} {t.name!r} has data_type {dt}; stgs serves"
            f" {', '.join(DATA_TYPES)}"
        )
    if len(t.reshape.shape):
        raise RepositoryError(f"model {model!r}: {what} {t.name!r}: reshape is not supported")
    dims = tuple(int(d) for d in t.dims)
    if max_batch_size < 0:
        raise RepositoryError(f"model {model!r}: max_batch_size must be >= 0")
    if max_batch_size == 0:
        if not dims or dims[0] not in (-1, 1):
            raise RepositoryError(
                f"model {model!r}: {what} {t.name!r} has dims {list(dims)} with max_batch_size"
                " 0; stgs batches requests along the first dimension, so it must be -1 (or"
                " 1), or set max_batch_size > 0 and give one sample's dims"
            )
        dims = dims[1:]
    if any(d == 0 or d < -1 for d in dims):
        raise RepositoryError(f"model {model!r}: {what} {t.name!r} has bad dims {list(dims)}")
    return _ConfigTensor(what, t.name, DATA_TYPES[dt], dims)


def _agree(model: str, what: str, c: _ConfigTensor, f: TensorSpec, *, names: bool) -> None:
    """The config's tensor and the file's agree (names, datatype, dims); else RepositoryError."""
    if names and f.name != c.name:
        raise RepositoryError(
            f"model {model!r}: {CONFIG_FILE} {c.what} {c.name!r} does not match the {what},"
            f" whose {c.what} is {f.name!r}"
        )
    if f.dtype and f.dtype != c.dtype:
        raise RepositoryError(
            f"model {model!r}: {CONFIG_FILE} {c.what} {c.name!r} is {TYPE_OF[c.dtype]}, the"
            f" {what} has {TYPE_OF.get(f.dtype, f.dtype)}"
        )
    if f.shape is not None and (
        len(f.shape) != len(c.dims)
        or any(cd != -1 and cd != fd for cd, fd in zip(c.dims, f.shape, strict=False))
    ):
        raise RepositoryError(
            f"model {model!r}: {CONFIG_FILE} {c.what} {c.name!r} has dims {list(c.dims)}, the"
            f" {what} has {list(f.shape)} (one sample, without the batch dimension)"
        )


def io_config(io: ModelIO, spec: Mapping[str, Any]) -> dict[str, Any]:
    """A Triton config (JSON) for a model registered without a repository (a built-in or a
    file): its served tensors, the batch stgs accepts, its SLO and rate as parameters."""
    cfg = mc.ModelConfig(name=io.name, platform=io.platform, max_batch_size=io.max_batch)
    cfg.version_policy.latest.num_versions = 1
    for x, t in (
        *((cfg.input.add(), t) for t in io.inputs),
        *((cfg.output.add(), t) for t in io.outputs),
    ):
        x.name = t.name
        x.data_type = mc.DataType.Value(TYPE_OF.get(t.dtype or "float32", "TYPE_FP32"))
        x.dims.extend(t.shape if t.shape is not None else [-1])
    for key in ("slo_ms", "rate_rps"):
        if key in spec:
            cfg.parameters[key].string_value = f"{float(spec[key]):g}"
    return config_dict(cfg)
