"""Model specs: what ``stgs profile MODEL`` accepts, and how each is built with random weights.

Specs (nothing is ever downloaded; weights are random, which is fine for latency):

* ``torchvision:<name>`` (``torchvision:resnet50``): any torchvision classification model, built
  with ``weights=None``; input ``3x224x224`` (``3x299x299`` for inception_v3). The zoo names
  (``resnet50``, ``vgg16``, ...) are accepted bare.
* ``bert_base``: a transformers ``BertModel(BertConfig())`` (BERT-base shape), input ids of
  sequence length 128.
* ``wav2vec2_base``: ``torchaudio.models.wav2vec2_base()``, 1 s of 16 kHz audio.
* ``tiny_mlp``, ``tiny_cnn``: tiny built-in models (CPU mode, CI).
* a file: TorchScript (``.pt``/``.ts``, ``torch.jit.save``) or ``torch.export`` (``.pt2``);
  its input shape (one sample, without the batch dimension) comes from ``--input-shape``.

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

__all__ = ["BUILTIN", "ZOO", "ModelSpec", "build_model", "parse_shape", "resolve_spec"]

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
BUILTIN = ("bert_base", "wav2vec2_base", "tiny_mlp", "tiny_cnn")
ZOO = (*ZOO_TORCHVISION, "bert_base", "wav2vec2_base")
"""The shipped zoo: vision, language and speech."""

BERT_SEQ_LEN = 128
WAV2VEC2_SAMPLES = 16000  # 1 s of 16 kHz audio
_FILE_SUFFIXES = (".pt", ".pt2", ".ts", ".jit")


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model spec: ``name`` labels rows; ``kind`` picks the builder."""

    name: str
    kind: str  # torchvision | builtin | torchscript | export
    target: str  # torchvision name, builtin name or file path
    input_shape: tuple[int, ...] | None = None  # one sample; None: the kind's default

    def to_text(self) -> str:
        """A spec text that resolves back to this spec (sent to worker processes)."""
        return f"{self.name}={self.kind}:{self.target}"


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
    if sep and kind in ("torchvision", "builtin", "torchscript", "export"):
        if not target:
            raise ModelLoadError(f"model spec {text!r}: nothing after {kind}:")
        if kind == "builtin" and target not in BUILTIN:
            raise ModelLoadError(f"model spec {text!r}: unknown built-in model")
        if kind in ("torchscript", "export") and input_shape is None:
            raise ModelLoadError(
                f"model {text!r}: a model file needs --input-shape (e.g. 3x224x224)"
            )
        return ModelSpec(
            name or (Path(target).stem if kind in ("torchscript", "export") else target),
            kind,
            target,
            input_shape,
        )
    if raw in BUILTIN:
        return ModelSpec(name or raw, "builtin", raw, input_shape)
    if raw in ZOO_TORCHVISION:
        return ModelSpec(name or raw, "torchvision", raw, input_shape)
    path = Path(raw)
    if path.suffix in _FILE_SUFFIXES or path.is_file():
        if not path.is_file():
            raise ModelLoadError(f"model file {raw!r} does not exist")
        if input_shape is None:
            raise ModelLoadError(f"model file {raw!r} needs --input-shape (e.g. 3x224x224)")
        kind = "export" if path.suffix == ".pt2" else "torchscript"
        return ModelSpec(name or path.stem, kind, str(path.resolve()), input_shape)
    known = ", ".join((*ZOO, "tiny_mlp", "tiny_cnn"))
    raise ModelLoadError(
        f"unknown model {text!r}: expected torchvision:<name>, a .pt/.pt2 file, or one of {known}"
    )


# --- building (torch, lazily) -------------------------------------------------------------


def _tiny_mlp() -> Any:
    import torch.nn as nn

    return nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def _tiny_cnn() -> Any:
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


class _BertEncoder:
    """Wraps BertModel so that ``forward(ids)`` returns the last hidden state tensor."""

    @staticmethod
    def build() -> Any:
        import torch.nn as nn

        try:
            from transformers import BertConfig, BertModel
        except ImportError as exc:
            raise ModelLoadError(f"bert_base needs the transformers package: {exc}") from exc

        class Wrapped(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert = BertModel(BertConfig(), add_pooling_layer=False)

            def forward(self, ids: Any) -> Any:
                return self.bert(input_ids=ids, return_dict=False)[0]

        return Wrapped()


def _wav2vec2() -> Any:
    import torch.nn as nn

    try:
        import torchaudio
    except ImportError as exc:
        raise ModelLoadError(f"wav2vec2_base needs the torchaudio package: {exc}") from exc

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = torchaudio.models.wav2vec2_base()

        def forward(self, wave: Any) -> Any:
            return self.m(wave)[0]

    return Wrapped()


def _torchvision(name: str) -> Any:
    try:
        import torchvision.models as tvm
    except ImportError as exc:
        raise ModelLoadError(f"torchvision:{name} needs the torchvision package: {exc}") from exc
    try:
        builder = tvm.get_model_builder(name)
    except ValueError as exc:
        raise ModelLoadError(f"torchvision has no model {name!r}") from exc
    kwargs: dict[str, Any] = {"weights": None}
    if name in ("inception_v3", "googlenet"):
        # no auxiliary heads at inference; skip scipy's slow truncated-normal init
        kwargs.update(aux_logits=False, init_weights=False)
    return builder(**kwargs)


_BUILDERS: dict[str, Callable[[], Any]] = {
    "tiny_mlp": _tiny_mlp,
    "tiny_cnn": _tiny_cnn,
    "bert_base": _BertEncoder.build,
    "wav2vec2_base": _wav2vec2,
}


def default_input_shape(spec: ModelSpec) -> tuple[int, ...]:
    """One sample's shape (no batch dimension)."""
    if spec.input_shape is not None:
        return spec.input_shape
    if spec.kind == "builtin":
        return {
            "tiny_mlp": (256,),
            "tiny_cnn": (3, 32, 32),
            "bert_base": (BERT_SEQ_LEN,),
            "wav2vec2_base": (WAV2VEC2_SAMPLES,),
        }[spec.target]
    if spec.kind == "torchvision":
        return (3, 299, 299) if spec.target == "inception_v3" else (3, 224, 224)
    raise ModelLoadError(f"model {spec.name!r} needs --input-shape")


def build_model(spec: ModelSpec, device: Any, dtype: Any) -> tuple[Any, Callable[[int], Any]]:
    """Build ``spec`` on ``device`` in ``dtype`` (eval mode) and an input maker ``batch -> x``.

    Raises :class:`ModelLoadError` when it does not build or load (the cause chained).
    """
    import torch

    shape = default_input_shape(spec)
    try:
        with torch.device(device):
            if spec.kind == "torchvision":
                model = _torchvision(spec.target)
            elif spec.kind == "builtin":
                model = _BUILDERS[spec.target]()
            elif spec.kind == "torchscript":
                model = torch.jit.load(spec.target, map_location=device)
            elif spec.kind == "export":
                model = torch.export.load(spec.target).module()
            else:
                raise ModelLoadError(f"model {spec.name!r}: unknown kind {spec.kind!r}")
        model = model.to(device=device)
        if spec.kind != "export":
            model = model.eval()
        if dtype != torch.float32:
            model = model.to(dtype=dtype)
    except ModelLoadError:
        raise
    except Exception as exc:  # any failure to build/load is the user's model's
        raise ModelLoadError(
            f"model {spec.name!r} does not load: {type(exc).__name__}: {exc}"
        ) from exc

    token_ids = spec.kind == "builtin" and spec.target == "bert_base"

    def make_input(batch: int) -> Any:
        gen = torch.Generator(device="cpu").manual_seed(batch)
        if token_ids:
            x = torch.randint(0, 30522, (batch, *shape), generator=gen)
            return x.to(device)
        return torch.randn((batch, *shape), generator=gen).to(device=device, dtype=dtype)

    return model, make_input
