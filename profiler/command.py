"""``stgs profile``: its arguments and its command (called from :mod:`api.cli`)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from profiler.errors import ProfilerError
from profiler.grid import DEFAULT_BATCHES, parse_batches, parse_partitions
from profiler.measure import TimingOptions
from profiler.models import parse_shape, resolve_spec
from profiler.run import ProfileConfig

__all__ = ["add_arguments", "config_from_args", "profile_command"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="torchvision:<name> (or a zoo name: resnet50, ...), bert_base, wav2vec2_base, "
        "tiny_mlp, tiny_cnn, or a TorchScript/.pt2 file; NAME=SPEC names it",
    )
    p.add_argument("--out", required=True, help="profile CSV to append to (resumable)")
    p.add_argument("--device", default="0", help="GPU index, or 'cpu' (default: 0)")
    p.add_argument(
        "--partitions",
        nargs="+",
        help="e.g. full green:16..128/16 mps:100,75,50 mig:3g.40gb (default: full, green "
        "contexts from 16 SMs in steps of 16, MPS 100/75/50/37/25/12 %%; CPU: full)",
    )
    p.add_argument("--batches", nargs="+", help="e.g. 1..128 or 1,2,4,8 (default: 1..128)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--iters", type=int, default=50, help="most timed runs per point")
    p.add_argument("--min-iters", type=int, default=5, help="fewest timed runs per point")
    p.add_argument("--warmup", type=int, default=3, help="untimed graph replays per point")
    p.add_argument(
        "--time-cap", type=float, default=0.3, help="stop timing a point after this many seconds"
    )
    p.add_argument("--input-shape", help="one sample's shape for model files, e.g. 3x224x224")
    p.add_argument("--gpu-label", help="GPU name for the rows (default: read from the device)")
    p.add_argument("--mps-pipe-dir", help="use this running MPS daemon instead of starting one")
    p.add_argument("--point-timeout", type=float, default=300.0, help="seconds per point")
    p.add_argument("--interference", action="store_true", help="also run co-location pairs")
    p.add_argument("--pairs", nargs="+", metavar="A+B", help="model pairs (default: consecutive)")
    p.add_argument("--interference-out", help="default: <out stem>-interference.csv")
    p.add_argument("--interference-batches", nargs="+", help="default: 8,32")
    p.add_argument(
        "--interference-splits", nargs="+", help="MPS shares of a pair, default: 50:50 25:75"
    )
    p.add_argument("--interference-seconds", type=float, default=1.0)
    p.add_argument("--no-fit", action="store_true", help="skip the fit report")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-prewarm",
        action="store_true",
        help="do not start, load and warm a model's workers in parallel before timing it",
    )


def _splits(items: list[str]) -> tuple[tuple[float, float], ...]:
    out = []
    for item in items:
        for t in item.split(","):
            a, sep, b = t.partition(":")
            try:
                pa, pb = float(a), float(b)
            except ValueError:
                raise ProfilerError(f"interference split {t!r}: expected A:B, e.g. 50:50") from None
            if not sep or not (0 < pa <= 100 and 0 < pb <= 100):
                raise ProfilerError(f"interference split {t!r}: shares must be in (0, 100]")
            out.append((pa, pb))
    return tuple(out)


def config_from_args(args: argparse.Namespace) -> ProfileConfig:
    shape = parse_shape(args.input_shape) if args.input_shape else None
    specs = tuple(resolve_spec(m, shape) for m in args.models)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ProfilerError(f"a model is named twice: {names}")
    if args.iters < 1 or args.min_iters < 1 or args.warmup < 0 or args.time_cap <= 0:
        raise ProfilerError("--iters and --min-iters must be >= 1, --warmup >= 0, --time-cap > 0")
    pairs = None
    if args.pairs:
        pairs = []
        for t in args.pairs:
            a, sep, b = t.partition("+")
            if not sep or not a or not b:
                raise ProfilerError(f"pair {t!r}: expected A+B")
            pairs.append((a, b))
    return ProfileConfig(
        models=specs,
        out=Path(args.out),
        device=str(args.device).strip().lower(),
        partitions=parse_partitions(args.partitions) if args.partitions else None,
        batches=parse_batches(args.batches) if args.batches else DEFAULT_BATCHES,
        dtype=args.dtype,
        timing=TimingOptions(
            iters=args.iters,
            min_iters=min(args.min_iters, args.iters),
            warmup=args.warmup,
            time_cap_s=args.time_cap,
        ),
        point_timeout_s=args.point_timeout,
        gpu_label=args.gpu_label,
        mps_pipe_dir=Path(args.mps_pipe_dir) if args.mps_pipe_dir else None,
        interference=args.interference,
        interference_pairs=tuple(pairs) if pairs else None,
        interference_splits=_splits(args.interference_splits)
        if args.interference_splits
        else ((50.0, 50.0), (25.0, 75.0)),
        interference_batches=parse_batches(args.interference_batches)
        if args.interference_batches
        else (8, 32),
        interference_seconds=args.interference_seconds,
        interference_out=Path(args.interference_out) if args.interference_out else None,
        quiet=args.quiet,
        prewarm=not args.no_prewarm,
    )


def profile_command(args: argparse.Namespace) -> int:
    """Run ``stgs profile``; 0 when every model loaded, 2 when some did not."""
    from profiler.report import fit_rows, print_fit
    from profiler.run import run_profile
    from stgs.profiles import read_profiles

    cfg = config_from_args(args)

    def _terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds: workers closed, the MPS daemon quit

    signal.signal(signal.SIGTERM, _terminate)
    s = run_profile(cfg)
    err = sys.stderr
    print(
        f"stgs profile: {s.gpu} ({s.device_name}, {s.sm_count} SMs"
        + (f", driver {s.driver}" if s.driver else "")
        + f", torch {s.torch}): {s.measured} points measured, {s.skipped} already in "
        f"{cfg.out}, {s.failed} failed, in {s.seconds:.0f} s",
        file=err,
    )
    for model, secs in s.seconds_per_model.items():
        print(f"  {model}: {secs:.1f} s", file=err)
    if s.eager_points:
        print(f"  {s.eager_points} point(s) timed eagerly (CUDA graph capture failed)", file=err)
    if s.failed:
        print(f"  failures: {s.failures_out}", file=err)
    if s.interference_rows:
        print(f"  co-location rows: {s.interference_rows} -> {s.interference_out}", file=err)
    for note in s.notes:
        print(f"  note: {note}", file=err)
    if not args.no_fit and cfg.out.is_file():
        rows = fit_rows(read_profiles(cfg.out), gpu=s.gpu)
        if rows:
            print_fit(rows)
    if s.load_failures:
        for e in s.load_failures.values():
            print(f"stgs: error: {e}", file=err)
        return 2
    return 0
