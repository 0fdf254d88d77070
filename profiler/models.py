"""Model specs: what ``stgs profile MODEL`` accepts. The models themselves are defined once, in
:mod:`stgs.registry` (the workers serve the same networks, built the same way).

Specs (nothing is ever downloaded; built-in weights are fixed and random, which is fine for
latency):

* ``torchvision:<name>`` (``torchvision:resnet50``): any torchvision classification model, built
  with ``weights=None``; input ``3x224x224`` (``3x299x299`` for inception_v3). Torchvision
  names (``resnet50``, ``mobilenet_v2``, ...) are accepted bare.
* ``bert_base`` (transformers ``BertModel``, last hidden state; sequence 128),
  ``wav2vec2_base`` (1 s of 16 kHz audio), ``tiny_mlp``, ``tiny_cnn`` (CPU mode, CI), and the
  test models ``echo``, ``sleep:<ms>``, ``fail``: see :mod:`stgs.registry`.
* a file: TorchScript (``.pt``/``.ts``, ``torch.jit.save``; its input shape, one sample without
  the batch dimension, comes from ``--input-shape``), ``torch.export`` (``.pt2``) or ONNX
  (``.onnx``), whose inputs come from the file (``--input-shape`` fills open dimensions).

``NAME=SPEC`` names the model in the profile table (default: the torchvision name, the
built-in name, or the file's stem).

:func:`resolve_spec` is pure (no torch); :func:`build_model` imports torch lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profiler.errors import ModelLoadError
from stgs import registry
from stgs.errors import ConfigError
from stgs.registry import BUILTIN, ZOO, ZOO_TORCHVISION, ModelEntry, TensorSpec

__all__ = ["BUILTIN", "ZOO", "ModelSpec", "build_model", "parse_shape", "resolve_spec"]

_FILE_SUFFIXES = (".pt", ".pt2", ".ts", ".jit", ".onnx")
_KINDS = ("torchvision", "builtin", "torchscript", "export", "onnx")


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model spec: ``name`` labels rows; ``kind`` picks the builder. ``entry``: a
    registry entry (:meth:`ModelEntry.to_dict`) that says it all (the daemon's model files)."""

    name: str
    kind: str  # torchvision | builtin | torchscript | export | onnx
    target: str  # torchvision name, builtin name or file path
    input_shape: tuple[int, ...] | None = None  # one sample; None: the model's own
    entry: dict[str, Any] | None = None

    def to_text(self) -> str:
        """A spec text that resolves back to this spec (sent to worker processes)."""
        return f"{self.name}={self.kind}:{self.target}"

    @classmethod
    def of(cls, entry: ModelEntry) -> ModelSpec:
        """The spec that profiles the registry's ``entry`` (under its name)."""
        return cls(entry.name, entry.kind, entry.target, None, entry.to_dict())

    def model_entry(self) -> ModelEntry:
        """The registry entry this spec measures (files: inspected; imports torch for .pt2)."""
        try:
            if self.entry is not None:
                entry = ModelEntry.from_dict(self.entry)
            elif self.kind in ("torchscript", "export", "onnx"):
                given = () if self.input_shape is None else (_input(self.input_shape),)
                entry = registry.file_entry(self.name, Path(self.target), given)
            else:
                entry = registry.model_entry(self.target)
        except ConfigError as exc:
            raise ModelLoadError(str(exc)) from exc
        if self.input_shape is not None and entry.input_shape != self.input_shape:
            first = entry.inputs[0]
            entry = ModelEntry(
                entry.name,
                entry.kind,
                entry.target,
                (TensorSpec(first.name, first.dtype, self.input_shape, first.high),),
                entry.outputs,
                entry.needs_torch,
            )
        return entry.renamed(self.name)


def _input(shape: tuple[int, ...]) -> TensorSpec:
    return TensorSpec("input", "float32", shape)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3x224x224"`` (or ``3,224,224``) -> (3, 224, 224)."""
    parts = [p for p in text.lower().replace(",", "x").split("x") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ModelLoadError(f"input shape {text!r}: expected sizes like 3x224x224") from None
    if not shape or any(s <= 0 for s in shape):
        raise ModelLoadError(f"input shape {text!r}: sizes must be positive integers")
    return shape


def resolve_spec(text: str, input_shape: tuple[int, ...] | None = None) -> ModelSpec:
    """Resolve a MODEL argument (see the module docstring); :class:`ModelLoadError` if unknown."""
    raw = text.strip()
    name: str | None = None
    if "=" in raw:
        name, _, raw = raw.partition("=")
        name = name.strip()
        if not name:
            raise ModelLoadError(f"model spec {text!r}: empty name before '='")
    kind, sep, target = raw.partition(":")
    if sep and kind in _KINDS:
        if not target:
            raise ModelLoadError(f"model spec {text!r}: nothing after {kind}:")
        if kind == "builtin" and target not in BUILTIN:
            raise ModelLoadError(f"model spec {text!r}: unknown built-in model")
        if kind == "torchscript" and input_shape is None:
            raise ModelLoadError(
                f"model {text!r}: a TorchScript file needs --input-shape (e.g. 3x224x224)"
            )
        is_file = kind in ("torchscript", "export", "onnx")
        return ModelSpec(
            name or (Path(target).stem if is_file else target), kind, target, input_shape
        )
    if raw in BUILTIN or raw in ("echo", "fail") or raw.startswith("sleep:"):
        return ModelSpec(name or raw, "builtin", raw, input_shape)
    if raw in ZOO_TORCHVISION:
        return ModelSpec(name or raw, "torchvision", raw, input_shape)
    path = Path(raw)
    if path.suffix in _FILE_SUFFIXES or path.is_file():
        if not path.is_file():
            raise ModelLoadError(f"model file {raw!r} does not exist")
        kind = registry.FILE_FORMATS.get(path.suffix, "torchscript")
        if kind == "torchscript" and input_shape is None:
            raise ModelLoadError(f"model file {raw!r} needs --input-shape (e.g. 3x224x224)")
        return ModelSpec(name or path.stem, kind, str(path.resolve()), input_shape)
    if raw in registry.torchvision_names():
        return ModelSpec(name or raw, "torchvision", raw, input_shape)
    known = ", ".join((*ZOO, "tiny_mlp", "tiny_cnn"))
    raise ModelLoadError(
        f"unknown model {text!r}: expected torchvision:<name>, a .pt/.pt2/.onnx file, or one of"
        f" {known}"
    )


def build_model(spec: ModelSpec, device: Any, dtype: Any) -> tuple[Any, Callable[[int], Any]]:
    """Build ``spec`` (through :func:`stgs.registry.build_module`: the network a worker serves)
    on ``device`` in ``dtype`` (eval mode) and an input maker ``batch -> x``.

    Raises :class:`ModelLoadError` when it does not build or load (the cause chained).
    """
    import torch

    entry = spec.model_entry()
    try:
        model = registry.build_module(entry, device=str(device))
        if entry.kind != "onnx":
            model = model.to(device=device)
            if entry.kind != "export":
                model = model.eval()
            if dtype != torch.float32:
                model = model.to(dtype=dtype)
    except Exception as exc:  # any failure to build/load is the user's model's
        raise ModelLoadError(
            f"model {spec.name!r} does not load: {type(exc).__name__}: {exc}"
        ) from exc

    def maker(t: TensorSpec) -> Callable[[int], Any]:
        t_shape = t.shape if t.shape is not None else (4,)
        int_dtype = getattr(torch, t.dtype) if t.dtype.startswith(("int", "uint")) else None

        def make(batch: int) -> Any:
            gen = torch.Generator(device="cpu").manual_seed(batch)
            if t.dtype == "bool":
                return torch.randint(0, 2, (batch, *t_shape), generator=gen).bool().to(device)
            if int_dtype is not None:
                x = torch.randint(0, t.high or 2, (batch, *t_shape), generator=gen, dtype=int_dtype)
                return x.to(device)
            return torch.randn((batch, *t_shape), generator=gen).to(device=device, dtype=dtype)

        return make

    makers = [maker(t) for t in entry.inputs]
    if len(makers) == 1:
        return model, makers[0]

    # several inputs: the input is a tuple, the model (a module still: the profiler counts its
    # parameters) takes it unpacked
    class Unpack(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, xs: Any) -> Any:
            return self.inner(*xs)

    def make_input(batch: int) -> Any:
        return tuple(m(batch) for m in makers)

    return Unpack(model), make_input
