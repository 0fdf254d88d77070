"""Plots of a comparison (matplotlib, Agg backend: no display needed). With two seeds or more,
the curves over the loads carry error bars: the 95 % confidence interval of each mean."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from partitioner.sim.compare import CI_SUFFIX

if TYPE_CHECKING:
    from partitioner.sim.compare import Experiment


def series(
    summary: Sequence[dict[str, Any]], gs: str, wl: str, pol: str, key: str
) -> tuple[list[float], list[float], list[float] | None]:
    """One policy's curve of ``key`` over the loads: x, the means, and the error bars (the 95 %
    confidence half-widths over the seeds; None where no point has two seeds or more)."""
    pts = sorted(
        (s["load"], s[key], s.get(key + CI_SUFFIX, math.nan))
        for s in summary
        if s["gpu_set"] == gs and s["workload"] == wl and s["policy"] == pol
    )
    err = [0.0 if math.isnan(p[2]) else p[2] for p in pts]
    has_ci = any(not math.isnan(p[2]) for p in pts)
    return [p[0] for p in pts], [p[1] for p in pts], err if has_ci else None


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def make_plots(
    exp: Experiment,
    rows: Sequence[dict[str, Any]],
    summary: Sequence[dict[str, Any]],
    out: Path,
) -> list[Path]:
    if not rows:  # every cell failed: nothing to draw
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    policies = list(exp.spec.policies)
    workloads = [w.name for w in exp.spec.workloads]
    gsets = [name for name, _ in exp.gpu_sets]
    written: list[Path] = []
    markers = "os^vD<>p*h"

    def save(fig: Any, title: str, fname: str, gs: str) -> None:
        """Title, lay out, write ``fname.png`` (``fname_<gpu set>.png`` with several) and close."""
        fig.suptitle(f"{exp.spec.name}: {title}", fontsize=11)
        fig.tight_layout()
        suffix = "" if len(gsets) == 1 else f"_{_safe(gs)}"
        p = out / f"{fname}{suffix}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    for key, ylabel, fname in (
        ("slo_attainment", "SLO attainment", "attainment_vs_load"),
        ("goodput_rps", "goodput (requests/s within SLO)", "goodput_vs_load"),
        ("gpus_used_mean", "GPUs used (time average)", "gpus_needed"),
        ("reconfigurations", "reconfigurations per run", "reconfigurations"),
    ):
        for gs in gsets:
            nr, nc = _grid(len(workloads))
            fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 3.3 * nr), squeeze=False)
            for i, wl in enumerate(workloads):
                ax = axes[i // nc][i % nc]
                for j, pol in enumerate(policies):
                    x, y, err = series(summary, gs, wl, pol, key)
                    ax.errorbar(
                        x,
                        y,
                        yerr=err,
                        marker=markers[j % len(markers)],
                        label=pol,
                        lw=1.4,
                        ms=4,
                        capsize=2.5 if err is not None else 0,
                        elinewidth=0.9,
                    )
                ax.set_title(wl, fontsize=10)
                ax.set_xlabel("load (x scenario rates)")
                ax.set_ylabel(ylabel, fontsize=9)
                if key == "slo_attainment":
                    ax.set_ylim(-0.02, 1.02)
                    ax.axhline(0.99, color="grey", lw=0.8, ls=":")
                ax.grid(alpha=0.3)
            for k in range(len(workloads), nr * nc):
                axes[k // nc][k % nc].axis("off")
            axes[0][0].legend(fontsize=8)
            save(fig, f"{ylabel} ({gs})", fname, gs)

    # attainment and GPUs over time: the workload with the most reconfigurations, at the
    # largest load where the best policy still attains >= 0.9 (else the smallest load).
    for gs in gsets:
        wl_score = {
            wl: sum(
                r["reconfigurations"] for r in rows if r["gpu_set"] == gs and r["workload"] == wl
            )
            for wl in workloads
        }
        wl = max(workloads, key=lambda w: (wl_score[w], -workloads.index(w)))
        loads = sorted({r["load"] for r in rows})
        good = [
            ld
            for ld in loads
            if max(
                (
                    s["slo_attainment"]
                    for s in summary
                    if s["gpu_set"] == gs and s["workload"] == wl and s["load"] == ld
                ),
                default=0.0,
            )
            >= 0.9
        ]
        load = good[-1] if good else loads[0]
        seed = exp.spec.seeds[0]
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
        for j, pol in enumerate(policies):
            run = next(
                (
                    r
                    for r in rows
                    if r["gpu_set"] == gs
                    and r["workload"] == wl
                    and r["load"] == load
                    and r["policy"] == pol
                    and r["seed"] == seed
                ),
                None,
            )
            if run is None:
                continue
            ts = run["timeseries"]
            t = np.asarray(ts["t_s"], dtype=np.float64)
            line = ax1.plot(t, ts["slo_attainment"], label=pol, lw=1.3)[0]
            ax2.step(
                t,
                ts["gpus_used"],
                where="mid",
                color=line.get_color(),
                lw=1.3,
                marker=markers[j % len(markers)],
                ms=3,
                markevery=max(1, len(t) // 12),
            )
            for x in ts["reconfig_start_s"]:
                ax1.axvline(x, color=line.get_color(), lw=0.8, ls="--", alpha=0.6)
        ax1.set_ylabel("SLO attainment")
        ax1.set_ylim(-0.02, 1.02)
        ax1.grid(alpha=0.3)
        ax1.legend(fontsize=8, loc="lower left")
        ax2.set_ylabel("GPUs used")
        ax2.set_xlabel("time (s); dashed: reconfiguration started")
        ax2.grid(alpha=0.3)
        save(fig, f"{wl} at load {load:g} ({gs}, seed {seed})", "attainment_over_time", gs)
    return written


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)
