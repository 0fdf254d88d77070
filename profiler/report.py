"""Fit report of measured profiles: the held-out error of :mod:`stgs.latency`'s functions.

Two held-out errors per (gpu, model), both from :func:`stgs.latency.fit_report`:

* ``point``: each interior measured point (a batch between measured batches, at one SM count)
  left out and predicted from the rest;
* ``sm``: each interior measured SM count left out whole and its points predicted across SM
  counts (how well partitions that were not measured are predicted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stgs.latency import FitReport, build_latency_models, fit_report
from stgs.profiles import ProfileTable

__all__ = ["FitRow", "fit_markdown", "fit_rows", "print_fit"]

TARGET_MEDIAN = 0.05
TARGET_P95 = 0.12


@dataclass(frozen=True)
class FitRow:
    gpu: str
    model: str
    point: FitReport
    sm: FitReport

    def meets_target(self) -> bool:
        return all(
            r.n_points == 0 or (r.median_error <= TARGET_MEDIAN and r.p95_error <= TARGET_P95)
            for r in (self.point, self.sm)
        )


def fit_rows(table: ProfileTable, gpu: str | None = None) -> list[FitRow]:
    out = []
    for (g, m), lm in sorted(build_latency_models(table).items()):
        if gpu is not None and g != gpu:
            continue
        out.append(FitRow(g, m, fit_report(lm, mode="point"), fit_report(lm, mode="sm")))
    return out


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.1%}"


def print_fit(rows: list[FitRow]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Held-out error of the fitted latency functions (stgs.latency)")
    for col in ("gpu", "model", "pts", "median", "p95", "SMs out: pts", "median", "p95", "max"):
        t.add_column(col, justify="left" if col in ("gpu", "model") else "right")
    for r in rows:
        t.add_row(
            r.gpu,
            r.model,
            str(r.point.n_points),
            _pct(r.point.median_error),
            _pct(r.point.p95_error),
            str(r.sm.n_points),
            _pct(r.sm.median_error),
            _pct(r.sm.p95_error),
            _pct(r.sm.max_error),
        )
    Console().print(t)


def fit_markdown(rows: list[FitRow]) -> str:
    lines = [
        "| GPU | model | points (batch held out) | median | p95 | points (SM count held out) "
        "| median | p95 | max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.gpu} | {r.model} | {r.point.n_points} | {_pct(r.point.median_error)} | "
            f"{_pct(r.point.p95_error)} | {r.sm.n_points} | {_pct(r.sm.median_error)} | "
            f"{_pct(r.sm.p95_error)} | {_pct(r.sm.max_error)} |"
        )
    return "\n".join(lines)
