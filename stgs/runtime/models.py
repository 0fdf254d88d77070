"""The models a worker can serve, by name, and the batch runners that execute them.

Names:

* ``tiny_mlp``, ``tiny_cnn``: small built-in networks for CI (CPU, milliseconds);
* ``bert_base``: BERT-base, sequence 128, input token ids: transformers ``BertModel`` (the model
  the shipped profiles measured) where transformers is installed, else an encoder of the same
  shape built from ``torch.nn`` alone (12 layers, 768 wide, 12 heads);
* ``wav2vec2_base``: torchaudio's wav2vec2 base on 1 s of 16 kHz audio, where torchaudio is
  installed;
* any ``torchvision.models`` name (``resnet50``, ``vit_b_16``, ...) when torchvision is
  installed, with random weights (``weights=None``): latency does not depend on the weights;
* ``echo`` (returns its input, any shape), ``sleep:<ms>`` (echo after ``ms`` milliseconds per
  batch) and ``fail`` (raises): transport benchmarks and tests, no torch needed.

The profiler has a similar loader (``profiler/``); this one lives in the core because the core
may not import ``profiler/``. Metadata (:func:`model_entry`) never imports torch; the runners
(:func:`load_runner`) do, lazily, inside the worker process.

Runners take a list of single-sample arrays and return one output array per sample. On the CPU
they run plain torch (inference mode, batches stacked). On a GPU they capture one CUDA graph per
batch-size bucket (powers of two up to the planned batch, and the batch itself) and pad a batch
to its bucket on the GPU: the real rows are copied into the static input, the rest keep stale
rows whose outputs are dropped. A worker replays its graphs one after another (time sharing),
which is the safe way to run graphs of several models in one process.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from stgs.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["BatchRunner", "ModelEntry", "batch_buckets", "load_runner", "model_entry"]

Array = npt.NDArray[Any]

_IMAGE = (3, 224, 224)
_TV_INPUT = {"inception_v3": (3, 299, 299)}
BERT_SEQ_LEN = 128
WAV2VEC2_SAMPLES = 16000  # 1 s of 16 kHz audio, as profiled


@dataclass(frozen=True)
class ModelEntry:
    """What a client must send to a model: one sample's shape (None: any), dtype ("": any)."""

    name: str
    input_shape: tuple[int, ...] | None
    input_dtype: str
    needs_torch: bool

    def example(self, seed: int = 0) -> Array:
        """A valid random input sample."""
        rng = np.random.default_rng(seed)
        shape = self.input_shape or (4,)
        if self.input_dtype == "int64":
            return rng.integers(0, 1000, size=shape, dtype=np.int64)
        return rng.standard_normal(shape, dtype=np.float32)


def _torchvision_names() -> set[str]:
    if importlib.util.find_spec("torchvision") is None:
        return set()
    tvm = importlib.import_module("torchvision.models")
    return set(tvm.list_models(module=tvm))


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; :class:`ConfigError` for an unknown model."""
    if name in ("echo", "fail") or name.startswith("sleep:"):
        if name.startswith("sleep:"):
            try:
                float(name.split(":", 1)[1])
            except ValueError:
                raise ConfigError(f"bad sleep model {name!r}: use sleep:<ms>") from None
        return ModelEntry(name, None, "", needs_torch=False)  # any shape, any dtype
    if name == "tiny_mlp":
        return ModelEntry(name, (64,), "float32", needs_torch=True)
    if name == "tiny_cnn":
        return ModelEntry(name, (3, 32, 32), "float32", needs_torch=True)
    if name == "bert_base":
        return ModelEntry(name, (BERT_SEQ_LEN,), "int64", needs_torch=True)
    if name == "wav2vec2_base" and importlib.util.find_spec("torchaudio") is not None:
        return ModelEntry(name, (WAV2VEC2_SAMPLES,), "float32", needs_torch=True)
    if name in _torchvision_names():
        return ModelEntry(name, _TV_INPUT.get(name, _IMAGE), "float32", needs_torch=True)
    hint = "" if _torchvision_names() else " (torchvision is not installed)"
    raise ConfigError(
        f"unknown model {name!r}{hint}; built in: tiny_mlp, tiny_cnn, bert_base, echo, sleep:<ms>"
    )


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes with a captured graph: powers of two below ``max_batch``, and it."""
    if max_batch < 1:
        raise ValueError(f"batch must be >= 1, got {max_batch}")
    out = []
    b = 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return tuple(out)


class BatchRunner(ABC):
    """Runs one batch of samples of one model; a worker loads each model once."""

    entry: ModelEntry

    @abstractmethod
    def run(self, samples: list[Array]) -> list[Array]:
        """One output per sample, in order."""


class _Echo(BatchRunner):
    def __init__(self, entry: ModelEntry, sleep_s: float = 0.0, fail: bool = False) -> None:
        self.entry = entry
        self._sleep_s = sleep_s
        self._fail = fail

    def run(self, samples: list[Array]) -> list[Array]:
        if self._fail:
            raise RuntimeError("the 'fail' model always fails")
        if self._sleep_s:
            time.sleep(self._sleep_s)
        return samples


# ---------------------------------------------------------------------- torch models
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
    vocab: int = 30522,
    hidden: int = 768,
    layers: int = 12,
    heads: int = 12,
    ff: int = 3072,
    max_len: int = 512,
) -> torch.nn.Module:
    """A BERT-base shaped encoder returning the pooled [CLS] vector (random weights)."""
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
            self.pool = nn.Linear(hidden, hidden)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(ids.shape[1], device=ids.device)
            x = self.norm(self.tok(ids) + self.pos(pos))
            x = self.encoder(x)
            return torch.tanh(self.pool(x[:, 0]))

    return BertEncoder()


def _bert_base() -> torch.nn.Module:
    """BERT-base as profiled (transformers ``BertModel(BertConfig())``, pooled output) where
    transformers is installed, so that the served model is the one the shipped profiles
    measured; else the torch.nn encoder of the same shape (CI, CPU machines)."""
    if importlib.util.find_spec("transformers") is None:
        return bert_encoder()
    import torch

    tf: Any = importlib.import_module("transformers")

    class _Bert(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = tf.BertModel(tf.BertConfig())

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.bert(input_ids=ids, return_dict=False)[1]  # pooled [CLS]
            return out

    return _Bert()


def _wav2vec2_base() -> torch.nn.Module:
    """torchaudio's wav2vec2 base (random weights), as profiled: 1 s of 16 kHz audio in."""
    import torch

    ta: Any = importlib.import_module("torchaudio")

    class _W2V(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = ta.models.wav2vec2_base()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.m(x)[0].mean(dim=1)  # pooled frame features
            return out

    return _W2V()


def build_module(name: str) -> torch.nn.Module:
    """A fresh ``torch.nn.Module`` for ``name`` (deterministic weights), in eval mode."""
    import torch

    torch.manual_seed(0)
    builders: dict[str, Callable[[], torch.nn.Module]] = {
        "tiny_mlp": _tiny_mlp,
        "tiny_cnn": _tiny_cnn,
        "bert_base": _bert_base,
        "wav2vec2_base": _wav2vec2_base,
    }
    if name in builders:
        module = builders[name]()
    else:
        model_entry(name)  # raises for unknown names
        tvm = importlib.import_module("torchvision.models")
        module = tvm.get_model(name, weights=None)
    return module.eval()


class _TorchCpu(BatchRunner):
    def __init__(self, entry: ModelEntry, module: torch.nn.Module) -> None:
        self.entry = entry
        self.module = module

    def run(self, samples: list[Array]) -> list[Array]:
        import torch

        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.stack(samples)))
            if isinstance(out, tuple | list):
                out = out[0]
            result = out.float().numpy()
        return list(result)


class _TorchCudaGraphs(BatchRunner):
    """One CUDA graph per batch bucket, static input and output buffers, fp16 weights."""

    def __init__(
        self, entry: ModelEntry, module: torch.nn.Module, max_batch: int, dtype: str
    ) -> None:
        import torch

        self.entry = entry
        self.buckets = batch_buckets(max_batch)
        dev = torch.device("cuda")
        float_in = entry.input_dtype.startswith("float")
        wdtype = getattr(torch, dtype)
        self.module = module.to(device=dev, dtype=wdtype)
        in_dtype = wdtype if float_in else torch.int64
        shape = entry.input_shape or (1,)
        top = self.buckets[-1]
        self.static_in = torch.zeros((top, *shape), dtype=in_dtype, device=dev)
        host_dtype = torch.float32 if float_in else torch.int64
        self.host_in = torch.zeros((top, *shape), dtype=host_dtype).pin_memory()
        self.stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        with torch.inference_mode():
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):  # warm up (cuDNN autotune, lazy init)
                for b in self.buckets:
                    for _ in range(3):
                        self._forward(self.static_in[:b])
            torch.cuda.current_stream().wait_stream(self.stream)
            torch.cuda.synchronize()
            pool = None
            for b in reversed(self.buckets):  # largest first: smaller graphs reuse its pool
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=self.stream):
                    out = self._forward(self.static_in[:b])
                pool = g.pool()
                self.graphs[b] = (g, out)
        torch.cuda.synchronize()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        out = self.module(x)
        if isinstance(out, tuple | list):
            out = out[0]
        assert isinstance(out, torch.Tensor)
        return out

    def run(self, samples: list[Array]) -> list[Array]:
        import torch

        n = len(samples)
        bucket = next(b for b in self.buckets if b >= n)
        host = self.host_in.numpy()  # the pinned buffer: one copy per sample, no np.stack
        for k, sample in enumerate(samples):
            host[k] = sample
        with torch.cuda.stream(self.stream):
            # Pad on the GPU: only the n real rows move; rows n..bucket keep stale inputs.
            self.static_in[:n].copy_(self.host_in[:n], non_blocking=True)
            graph, out = self.graphs[bucket]
            graph.replay()
            result = out[:n].float().cpu()  # synchronises the stream
        return list(result.numpy())


def load_runner(name: str, device: str, max_batch: int, *, dtype: str = "float16") -> BatchRunner:
    """Load ``name`` once for ``device`` (``cpu`` or ``cuda``) and return its runner."""
    entry = model_entry(name)
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}: cpu or cuda")
    if name == "echo":
        return _Echo(entry)
    if name == "fail":
        return _Echo(entry, fail=True)
    if name.startswith("sleep:"):
        return _Echo(entry, sleep_s=float(name.split(":", 1)[1]) / 1000.0)
    module = build_module(name)
    if device == "cpu":
        return _TorchCpu(entry, module)
    return _TorchCudaGraphs(entry, module, max_batch, dtype)
