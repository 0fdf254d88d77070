"""Latency of one GPU's profile rows against another's, per model and partition kind.

    python -m benchmarks.profile_ratio [PROFILES.csv] [--gpu H200-141GB] [--base H100-80GB]
    python -m benchmarks.profile_ratio --reference      # the H200 rows vs gpu-facts.md

For every (model, partition, batch) measured on both GPUs (same partition name, e.g.
``mps:25`` or ``green:64``), the ratio ``latency(gpu) / latency(base)``; printed as the median
(min-max) per model and partition kind, and the median at batch 1 and batch 128. Default: the
shipped measured table, H200 against H100.

``--reference``: the table's H200 rows against the independent H200 measurements of the
project's GPU facts (``shared/docs/gpu-facts.md``, "Latency on a lent H200": resnet50 and
vit_b_16, CUDA graphs, fp16, median of 30, measured by other code than stgs's profiler),
transcribed below as :data:`GPU_FACTS_H200`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from stgs.errors import ProfileError
from stgs.profiles import measured_profiles_path, normalise_gpu, read_profiles

KINDS = ("full", "mps", "green", "mig")
# gpu-facts.md, "Latency on a lent H200 (measured, fp16, torchvision weights=None, median of
# 30)": (model, partition) -> latency ms at batches 1, 8, 32, 128 (reference data, not stgs's)
GPU_FACTS_BATCHES = (1, 8, 32, 128)
GPU_FACTS_H200 = {
    ("resnet50", "full"): (1.03, 1.55, 3.63, 12.5),
    ("resnet50", "mps:50"): (1.21, 2.24, 5.79, 20.5),
    ("resnet50", "mps:25"): (1.51, 3.54, 10.8, 40.8),
    ("resnet50", "mps:12"): (2.33, 6.57, 22.7, 86.4),
    ("vit_b_16", "full"): (0.69, 1.13, 3.30, 12.7),
}


def against_reference(path: Path) -> int:
    """Print the H200 rows of ``path`` against :data:`GPU_FACTS_H200`."""
    table = read_profiles(path)
    lat: dict[tuple[str, str, int], list[float]] = {}
    for r in table:
        if r.gpu == "H200-141GB":
            lat.setdefault((r.model, r.partition, r.batch), []).append(r.latency_ms)
    heads = " | ".join(f"b={b}: ours / ref" for b in GPU_FACTS_BATCHES)
    print(f"| model | partition | {heads} |")
    print("|---|---" + "|---" * len(GPU_FACTS_BATCHES) + "|")
    missing = 0
    for (model, part), ref in GPU_FACTS_H200.items():
        cells = []
        for b, want in zip(GPU_FACTS_BATCHES, ref, strict=True):
            got = lat.get((model, part, b))
            if got is None:
                missing += 1
                cells.append("-")
                continue
            ms = statistics.median(got)
            cells.append(f"{ms:.2f} / {want:.2f} ({ms / want - 1:+.1%})")
        print(f"| {model} | {part} | " + " | ".join(cells) + " |")
    if missing == len(GPU_FACTS_H200) * len(GPU_FACTS_BATCHES):
        print("profile_ratio: error: no H200 row of the reference points", file=sys.stderr)
        return 2
    return 0


def ratios(path: Path, gpu: str, base: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """model -> partition kind -> [(batch, ratio)] over the points both GPUs measured."""
    table = read_profiles(path)
    med: dict[tuple[str, str, str, int], list[float]] = {}
    for r in table:
        med.setdefault((r.gpu, r.model, r.partition, r.batch), []).append(r.latency_ms)
    lat = {k: statistics.median(v) for k, v in med.items()}
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for (g, model, part, batch), ms in sorted(lat.items()):
        other = lat.get((base, model, part, batch))
        if g != gpu or other is None:
            continue
        out.setdefault(model, {}).setdefault(part.split(":")[0], []).append((batch, ms / other))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profiles", nargs="?", type=Path, default=measured_profiles_path())
    ap.add_argument("--gpu", default="H200-141GB")
    ap.add_argument("--base", default="H100-80GB")
    ap.add_argument("--reference", action="store_true", help="H200 rows vs gpu-facts.md")
    args = ap.parse_args(argv)
    if args.reference:
        try:
            return against_reference(args.profiles)
        except ProfileError as exc:
            print(f"profile_ratio: error: {exc}", file=sys.stderr)
            return 2
    gpu, base = normalise_gpu(args.gpu), normalise_gpu(args.base)
    try:
        per = ratios(args.profiles, gpu, base)
    except ProfileError as exc:
        print(f"profile_ratio: error: {exc}", file=sys.stderr)
        return 2
    if not per:
        print(f"profile_ratio: error: no point measured on both {gpu} and {base}", file=sys.stderr)
        return 2
    kinds = [k for k in KINDS if any(k in d for d in per.values())]
    print(f"latency {gpu} / {base}, same partition and batch: median (min-max) [points]")
    print("| model | " + " | ".join(kinds) + " | b=1 | b=128 |")
    print("|---" * (len(kinds) + 3) + "|")
    every: list[float] = []
    for model, by_kind in per.items():
        cells = []
        for k in kinds:
            rs = [x for _, x in by_kind.get(k, [])]
            every += rs
            cells.append(
                f"{statistics.median(rs):.3f} ({min(rs):.2f}-{max(rs):.2f}) [{len(rs)}]"
                if rs
                else "-"
            )
        for b in (1, 128):
            rs = [x for pts in by_kind.values() for bb, x in pts if bb == b]
            cells.append(f"{statistics.median(rs):.3f}" if rs else "-")
        print(f"| {model} | " + " | ".join(cells) + " |")
    print(
        f"all {len(every)} points: median {statistics.median(every):.3f}, "
        f"range {min(every):.3f}-{max(every):.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
