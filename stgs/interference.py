"""MPS interference by what the neighbours run: the neighbour weights, stored once as data.

A batch in an MPS partition runs slower beside MPS neighbours on the same GPU (or MIG
instance): they share L2 and memory bandwidth. :class:`stgs.latency.InterferenceModel` says
how much slower:

    slowdown = 1 + gamma x sum over the neighbours of (share / 100) x w(their batch)

``gamma`` per (GPU, model) comes from the co-location rows (``interference.csv``; neighbours
running batches of 8 and 32); ``w(b)`` is the *neighbour weight* of a neighbour that runs
batches of ``b``: how much of a busy neighbour's cost it has, relative to one running the
*reference batch* (the smallest neighbour batch the gammas were fitted on). A neighbour that
runs batches of 1-2 launches small kernels and leaves bandwidth to the others; one running 32
does not.

The weights live in one file, ``stgs/data/interference-weights.json`` (format
``stgs.interference-weights/v1``; ``$STGS_INTERFERENCE_WEIGHTS`` names another), read by the
planner, the plan checker and the simulator through ``InterferenceModel``: per GPU (its
catalog SKU) the measured batches below the reference batch with their weights, the
provenance (command, run, device, date) and the fit's diagnostics. Written by
``python -m benchmarks.interference_gpu --fit RUN.json`` through :func:`fit_weights` below,
from ``benchmarks/interference_gpu.py`` runs (a victim's batch latency beside neighbours
running batches of 1, 2, 8, 32 back to back, against the victim alone).

Conservative where unmeasured: a GPU without an entry, a batch at or above the reference and
a batch between listed ones without a smaller-or-equal listed batch above it all weigh 1 (the
model before the weights: every neighbour counted as busy at a large batch). ``w(b)`` is the
weight of the smallest listed batch ``>= b``; weights never decrease with the batch (the fit
raises, never lowers, a value to make them so) and are at most 1.

Who uses what: the planner sizes a partition before it knows its neighbours, so its curves
charge the largest weight (1); a plan reports each partition's slowdown for its actual
neighbours at their largest planned batch, and the independent plan checker re-derives it so;
the simulator (``interference: busy``) charges a neighbour's weight at the batch it is running.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stgs.errors import ConfigError
from stgs.profiles import normalise_gpu

__all__ = [
    "BENCH_FORMAT",
    "FORMAT",
    "INTERFERENCE_WEIGHTS_ENV",
    "MIN_EFFECT",
    "GpuWeights",
    "WeightsFile",
    "default_weights_path",
    "fit_weights",
    "load_weights",
    "shipped_weights_path",
    "write_weights",
]

FORMAT = "stgs.interference-weights/v1"
BENCH_FORMAT = "stgs.interference-bench/v1"  # what benchmarks/interference_gpu.py writes
INTERFERENCE_WEIGHTS_ENV = "STGS_INTERFERENCE_WEIGHTS"
# A victim whose slowdown beside the reference batch is below this tells nothing about weights
# (its ratios are noise over a slowdown of almost nothing): it is left out of the fit.
MIN_EFFECT = 0.03


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightsProvenance(_Strict):
    command: str = Field(description="the command that wrote this entry")
    fitted: str = Field(description="when the fit was made")
    runs: list[dict[str, str]] = Field(
        min_length=1, description="the runs: their command, device and date"
    )


class GpuWeights(_Strict):
    """One GPU's neighbour weights (see the module docstring)."""

    reference_batch: int = Field(ge=2, description="the weight-1 neighbour batch")
    batches: list[int] = Field(min_length=1, description="neighbour batches below the reference")
    weights: list[float] = Field(min_length=1, description="their weights, in [0, 1]")
    provenance: WeightsProvenance
    fit: dict[str, Any] = Field(default_factory=dict, description="the fit's diagnostics")

    @model_validator(mode="after")
    def _consistent(self) -> GpuWeights:
        if len(self.batches) != len(self.weights):
            raise ValueError("batches and weights must have the same length")
        if self.batches != sorted(set(self.batches)) or self.batches[0] < 1:
            raise ValueError("batches must be increasing integers >= 1")
        if self.batches[-1] >= self.reference_batch:
            raise ValueError("batches must be below the reference batch")
        if any(not (math.isfinite(w) and 0 <= w <= 1) for w in self.weights):
            raise ValueError("weights must be in [0, 1]")
        if any(a > b for a, b in zip(self.weights, self.weights[1:], strict=False)):
            raise ValueError("weights must not decrease with the batch")
        return self

    def weight(self, batch: int | None) -> float:
        """The weight of a neighbour running batches of ``batch`` (None: not known, 1)."""
        if batch is None or batch >= self.reference_batch:
            return 1.0
        for b, w in zip(self.batches, self.weights, strict=True):
            if batch <= b:
                return w
        return 1.0  # between the largest listed batch and the reference: not measured


class WeightsFile(_Strict):
    format: Literal["stgs.interference-weights/v1"]
    about: str = ""
    gpus: dict[str, GpuWeights] = Field(default_factory=dict)

    def weight(self, gpu: str, batch: int | None) -> float:
        """The weight of a neighbour on ``gpu`` running batches of ``batch`` (1 when the GPU
        has no entry or the batch is not known)."""
        entry = self.gpus.get(normalise_gpu(gpu))
        return 1.0 if entry is None else entry.weight(batch)


def shipped_weights_path() -> Path:
    """The shipped file, ``stgs/data/interference-weights.json``."""
    return Path(str(resources.files("stgs").joinpath("data", "interference-weights.json")))


def default_weights_path() -> Path:
    """``$STGS_INTERFERENCE_WEIGHTS`` when set, else the shipped file."""
    env = os.environ.get(INTERFERENCE_WEIGHTS_ENV, "").strip()
    return Path(env) if env else shipped_weights_path()


def load_weights(path: Path | None = None) -> WeightsFile:
    """The weights file (default: :func:`default_weights_path`, read once); ConfigError when
    it is not a valid ``stgs.interference-weights/v1`` file."""
    return _default() if path is None else _read(Path(path))


@cache
def _default() -> WeightsFile:
    return _read(default_weights_path())


def _read(path: Path) -> WeightsFile:
    try:
        return WeightsFile.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, ValidationError) as exc:
        raise ConfigError(f"interference weights file {path}: {exc}") from None


def write_weights(path: Path, gpu: str, entry: GpuWeights) -> None:
    """Add or replace ``gpu``'s entry in the file at ``path`` (created when absent)."""
    old = _read(path) if path.is_file() else None
    gpus = {**(old.gpus if old else {}), normalise_gpu(gpu): entry}
    doc = WeightsFile(
        format=FORMAT, about=old.about if old else "", gpus=dict(sorted(gpus.items()))
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc.model_dump(), indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------------- the fit
def _ratios(run: Mapping[str, Any]) -> dict[int, dict[int | None, float]]:
    """Per victim batch: the victim's median latency beside each neighbour batch (None: the
    neighbours idle) over its median alone."""
    alone: dict[int, float] = {}
    beside: dict[int, dict[int | None, float]] = {}
    for p in run.get("points", []):
        vb = int(p["victim_batch"])
        ms = float(p["median_ms"])
        if not (math.isfinite(ms) and ms > 0):
            raise ConfigError(f"a point has median_ms {p['median_ms']!r}, not a time > 0")
        if p["phase"] == "alone":
            alone[vb] = ms
        elif p["phase"] in ("idle", "busy"):
            nb = None if p["phase"] == "idle" else int(p["neighbour_batch"])
            beside.setdefault(vb, {})[nb] = ms
        else:
            raise ConfigError(f"a point has phase {p['phase']!r} (alone, idle or busy)")
    out: dict[int, dict[int | None, float]] = {}
    for vb, row in beside.items():
        if vb not in alone:
            raise ConfigError(f"victim batch {vb} has no measurement alone")
        out[vb] = {nb: ms / alone[vb] for nb, ms in row.items()}
    return out


def fit_weights(
    runs: Sequence[Mapping[str, Any]], *, reference_batch: int, command: str, fitted: str
) -> tuple[str, GpuWeights]:
    """The neighbour weights of one GPU from ``benchmarks/interference_gpu.py`` runs (their
    ``--json``, format ``stgs.interference-bench/v1``): ``(gpu, entry)``.

    Per run and victim batch, ``ratio(b)`` is the victim's median latency beside neighbours
    running batches of ``b`` over its median alone, and the raw weight of ``b`` is
    ``(ratio(b) - 1) / (ratio(reference) - 1)``, clipped to [0, 1]; victims whose slowdown
    beside the reference batch is under :data:`MIN_EFFECT` are left out (their ratios are
    noise). A batch's weight is the largest raw weight over the victims (the safe side), raised
    where needed so that weights never decrease with the batch. Raises ConfigError when the
    runs are not of one GPU, lack the reference batch, or no victim shows an effect.
    """
    if not runs:
        raise ConfigError("no runs to fit")
    gpus = {normalise_gpu(str(r.get("gpu", ""))) for r in runs}
    if len(gpus) != 1:
        raise ConfigError(f"runs of several GPUs: {', '.join(sorted(gpus))}; fit one at a time")
    for r in runs:
        if r.get("format") != BENCH_FORMAT:
            raise ConfigError(f"a run of format {r.get('format')!r}, not {BENCH_FORMAT}")
    raw: dict[int, list[float]] = {}
    skipped: list[str] = []
    used: list[str] = []
    for i, r in enumerate(runs):
        for vb, row in sorted(_ratios(r).items()):
            name = f"run {i} victim {r.get('victim', {}).get('model', '?')} b{vb}"
            if reference_batch not in row:
                raise ConfigError(f"{name}: no neighbour batch {reference_batch} (the reference)")
            effect = row[reference_batch] - 1.0
            if effect < MIN_EFFECT:
                skipped.append(f"{name}: x{row[reference_batch]:.3f} beside the reference")
                continue
            used.append(name)
            for nb, ratio in row.items():
                if nb is not None and nb < reference_batch:
                    raw.setdefault(nb, []).append(min(1.0, max(0.0, (ratio - 1.0) / effect)))
    if not raw:
        why = "; ".join(skipped) or "no neighbour batch below the reference was measured"
        raise ConfigError(f"no victim shows interference to fit weights on ({why})")
    batches = sorted(raw)
    weights: list[float] = []
    for b in batches:
        w = round(max(raw[b]), 4)
        weights.append(max(w, weights[-1]) if weights else w)
    entry = GpuWeights(
        reference_batch=reference_batch,
        batches=batches,
        weights=weights,
        provenance=WeightsProvenance(
            command=command,
            fitted=fitted,
            runs=[
                {k: str(r.get(k, "")) for k in ("command", "device", "date", "simulated")}
                for r in runs
            ],
        ),
        fit={
            "victims": used,
            "left_out": skipped,
            "median_raw": {str(b): round(statistics.median(raw[b]), 4) for b in batches},
        },
    )
    return gpus.pop(), entry
