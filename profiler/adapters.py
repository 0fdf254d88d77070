"""The profiler as the daemon calls it: one model on one SKU -> profile rows.

A :data:`ProfileFn` measures one registered model (its registry entry) on one GPU SKU and
returns the rows the planner's profile table takes. The daemon picks one at start: on the
simulated node :func:`cpu_profiler` (the profiler's CPU mode, rows standing in for the
simulated GPU's whole-GPU rows), on a GPU node :func:`gpu_profiler` (the default grid). The
profiler's orchestrator (:mod:`profiler.run`) is imported when a model is profiled, not before.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from stgs.catalog import get_sku
from stgs.errors import BackendError, ProfileError
from stgs.profiles import ProfileRow, read_profiles
from stgs.registry import ModelEntry

__all__ = ["ProfileFn", "clean_stale_profiling", "cpu_profiler", "gpu_profiler"]

ProfileFn = Callable[[ModelEntry, str], list[ProfileRow]]
"""(the model's registry entry, GPU SKU) -> measured profile rows of that model on that SKU."""


def clean_stale_profiling(work_dir: Path) -> list[str]:
    """Remove what profiling runs killed with the daemon left in ``work_dir``; their names.

    Call it at start, before anything profiles. The profilers write only files there (the GPU
    profiler's resumable CSVs, kept); every directory is a CPU profiling run's temporary one,
    which a daemon killed mid-run (SIGKILL, power loss) never removed.
    """
    if not work_dir.is_dir():
        return []
    stale = sorted(p for p in work_dir.iterdir() if p.is_dir() and not p.is_symlink())
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in stale]


def cpu_profiler(
    work_dir: Path,
    batches: Sequence[int] = (1, 2, 4, 8, 16),
    iters: int = 5,
) -> ProfileFn:
    """Profile on the CPU with the profiler's CPU mode (simulated node): the rows it measures
    stand in for the simulated GPU's whole-GPU rows (``full`` at the SKU's SM count); the
    latency functions scale them to smaller partitions."""

    def run(entry: ModelEntry, sku: str) -> list[ProfileRow]:
        from profiler.measure import TimingOptions
        from profiler.models import ModelSpec as ProfiledModel
        from profiler.run import ProfileConfig, run_profile

        model = entry.name

        work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            out = Path(tmp) / "profile.csv"
            cfg = ProfileConfig(
                models=(ProfiledModel.of(entry),),
                out=out,
                device="cpu",
                batches=tuple(batches),
                timing=TimingOptions(iters=iters, min_iters=min(3, iters), warmup=2),
                gpu_label=sku,
                quiet=True,
            )
            summary = run_profile(cfg)
            if summary.load_failures:
                raise ProfileError("; ".join(summary.load_failures.values()))
            if not out.is_file():
                raise ProfileError(f"profiling {model} measured nothing")
            sms = get_sku(sku).sm_count
            return [
                ProfileRow(sku, r.model, "full", sms, r.batch, r.latency_ms, r.memory_mib)
                for r in read_profiles(out)
            ]

    return run


def gpu_profiler(
    work_dir: Path, device: str = "0", mps_pipe_dir: Callable[[], Path] | None = None
) -> ProfileFn:
    """Profile on a real GPU with the profiler's default grid (whole GPU, MPS shares).

    ``mps_pipe_dir``: the pipe directory of the MPS control daemon that already owns the GPU
    (the daemon's node backend starts it, or finds it running). A GPU takes one MPS control
    daemon: a second one, the profiler's own, fails to start while the serving plan's runs, and
    the plan's fails while the profiler's runs. Without it the profiler starts its own (the
    stand-alone ``python -m profiler``)."""

    def run(entry: ModelEntry, sku: str) -> list[ProfileRow]:
        from profiler.models import ModelSpec as ProfiledModel
        from profiler.run import ProfileConfig, run_profile

        model = entry.name
        work_dir.mkdir(parents=True, exist_ok=True)
        out = work_dir / f"{model}.csv"  # resumable across restarts
        try:
            pipe = mps_pipe_dir() if mps_pipe_dir is not None else None
        except BackendError as exc:
            raise ProfileError(f"profiling {model}: the GPU's MPS daemon: {exc}") from exc
        summary = run_profile(
            ProfileConfig(
                models=(ProfiledModel.of(entry),),
                out=out,
                device=device,
                gpu_label=sku,  # the rows are the planning SKU's, as the backend names it
                quiet=True,
                mps_pipe_dir=pipe,
            )
        )
        if summary.load_failures:
            raise ProfileError("; ".join(summary.load_failures.values()))
        return [r for r in read_profiles(out) if r.model == model]

    return run
