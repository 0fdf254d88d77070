"""``stgs compare EXPERIMENT.yaml``: a grid of policies x workloads x GPU sets x loads x seeds.

Experiment file (every key checked; paths relative to the file)::

    name: compare-zoo
    scenario: scenario.yaml            # or an inline mapping: gpus, models, profiles, ...
    gpu_sets:                          # optional; default: the scenario's GPUs
      - {name: 1xH100, gpus: [{sku: H100-80GB, count: 1}]}
    policies: [stgs, temporal, mig-only, mps-only, my_policy:Overprovisioned]
    workloads: [{name: poisson, kind: poisson}, {name: bursty, kind: gamma, cv: 3}]
    loads: [0.5, 1.0, 2.0]             # factors on the scenario's rates
    seeds: [0, 1]
    simulator: {duration_s: 30, warmup_s: 2, controller: {enabled: true}}
    python_path: [.]                   # where dotted-path policies are imported from

Each run (one cell x seed) is independent and deterministic; runs go to a process pool, and the
results are sorted in grid order, so ``--jobs`` never changes them. Outputs in ``--out``:
``results.csv`` (one row per run), ``results.json`` (rows with per-model metrics and time
series), ``summary.csv`` (means over seeds), ``experiment.resolved.json`` (the resolved config,
versions included) and ``plots/*.png``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from partitioner.policies import get_policy
from partitioner.problem import Problem
from partitioner.sim.config import SimOptions
from partitioner.sim.engine import NoiseModel
from partitioner.sim.noise import load_runtime_noise
from partitioner.sim.run import fresh_problem, noise_for, runtime_noise_path, simulate
from partitioner.sim.workload import WorkloadSpec, generate, trace_rates
from stgs.errors import ConfigError
from stgs.profiles import default_profiles_path
from stgs.scenario import GpuEntry, Scenario, scenario_from_mapping

EXPERIMENT_FORMAT = "stgs.experiment/v1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuSet(_Strict):
    name: str = Field(min_length=1, max_length=64)
    gpus: list[GpuEntry] = Field(min_length=1)


class ExperimentFile(_Strict):
    name: str = Field(default="experiment", min_length=1, max_length=128)
    scenario: str | dict[str, Any]
    gpu_sets: list[GpuSet] = Field(default_factory=list)
    policies: list[str] = Field(min_length=1)
    workloads: list[WorkloadSpec] = Field(default_factory=lambda: [WorkloadSpec(name="poisson")])
    loads: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    simulator: SimOptions = SimOptions()
    python_path: list[str] = Field(default_factory=lambda: ["."])

    @model_validator(mode="after")
    def _checks(self) -> ExperimentFile:
        for what, names in (
            ("workload", [w.name for w in self.workloads]),
            ("gpu set", [g.name for g in self.gpu_sets]),
            ("policy", self.policies),
        ):
            if len(set(names)) != len(names):
                raise ValueError(f"a {what} name is listed twice")
        if any(not (x > 0 and math.isfinite(x)) for x in self.loads):
            raise ValueError("loads must be > 0")
        return self


@dataclass(frozen=True)
class Experiment:
    spec: ExperimentFile
    base_dir: Path
    scenario: Scenario  # models, profiles, planner options; GPUs replaced per gpu set
    gpu_sets: tuple[tuple[str, Scenario], ...]

    def resolved(self) -> dict[str, Any]:
        d = self.spec.model_dump(mode="json")
        d["format"] = EXPERIMENT_FORMAT
        d["base_dir"] = str(self.base_dir)
        d["resolved_gpu_sets"] = {
            name: [g.sku + (" (mig)" if g.mig else "") for g in sc.gpus]
            for name, sc in self.gpu_sets
        }
        d["models"] = [
            {"name": m.name, "slo_ms": m.slo_ms, "rate_rps": m.rate_rps, "profile": m.profile}
            for m in self.scenario.models
        ]
        d["profiles"] = str(self.scenario.profiles or default_profiles_path())
        d["versions"] = {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "stgs": _stgs_version(),
        }
        return d


def _stgs_version() -> str:
    from stgs import __version__

    return __version__


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def load_experiment(path: str | Path) -> Experiment:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read experiment {p}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: malformed YAML: {exc}") from exc
    return experiment_from_mapping(data, p.parent.resolve(), str(p))


def experiment_from_mapping(data: Any, base_dir: Path, source: str = "experiment") -> Experiment:
    try:
        spec = ExperimentFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_one_line(exc)}") from exc
    if isinstance(spec.scenario, str):
        sp = Path(spec.scenario)
        sp = sp if sp.is_absolute() else base_dir / sp
        try:
            sdata = yaml.safe_load(sp.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{source}: cannot read scenario {sp}: {exc}") from exc
        sdir = sp.parent
    else:
        sdata, sdir = spec.scenario, base_dir
    scenario = scenario_from_mapping(sdata, sdir, f"{source}: scenario")
    sets: list[tuple[str, Scenario]] = []
    for gs in spec.gpu_sets:
        mapping = dict(sdata)
        mapping["gpus"] = [g.model_dump(exclude_none=True) for g in gs.gpus]
        sets.append((gs.name, scenario_from_mapping(mapping, sdir, f"{source}: {gs.name}")))
    if not sets:
        sets.append((_gpus_name(scenario), scenario))
    rn = runtime_noise_path(spec.simulator, base_dir)
    if rn is not None:  # a bad factors file is an error now, not in every worker of the pool
        try:
            load_runtime_noise(rn)
        except ConfigError as exc:
            raise ConfigError(f"{source}: simulator.{exc}") from exc
    return Experiment(spec, base_dir, scenario, tuple(sets))


def _gpus_name(sc: Scenario) -> str:
    counts: dict[str, int] = {}
    for g in sc.gpus:
        counts[g.sku] = counts.get(g.sku, 0) + 1
    return "+".join(f"{n}x{sku}" for sku, n in counts.items())


# ------------------------------------------------------------------------------------ runs
@dataclass(frozen=True)
class Cell:
    index: int
    policy: str
    workload: int  # index into spec.workloads
    gpu_set: int
    load: float


def cells(exp: Experiment) -> list[Cell]:
    out: list[Cell] = []
    for gi in range(len(exp.gpu_sets)):
        for wi in range(len(exp.spec.workloads)):
            for load in exp.spec.loads:
                for pol in exp.spec.policies:
                    out.append(Cell(len(out), pol, wi, gi, load))
    return out


# Per process: the problem and the noise model of each scenario, made once and shared by the
# cells that run on it. Keyed by the scenario itself (a frozen dataclass), not by its index in
# one experiment (a second experiment run in the same process has other scenarios at the same
# indices), and by what the noise model is made of (sigma default, runtime-noise file).
_PROBLEMS: dict[tuple[Scenario, float, Path | None], tuple[Problem, NoiseModel]] = {}


def _setup_path(exp: Experiment) -> None:
    for d in exp.spec.python_path:
        p = str((exp.base_dir / d).resolve())
        if p not in sys.path:
            sys.path.insert(0, p)


def run_cell(exp: Experiment, cell: Cell) -> list[dict[str, Any]]:
    """All seeds of one cell (the plan is made once and shared by the seeds)."""
    _setup_path(exp)
    gs_name, sc = exp.gpu_sets[cell.gpu_set]
    sim = exp.spec.simulator
    key = (sc, sim.default_sigma, runtime_noise_path(sim, exp.base_dir))
    cached = _PROBLEMS.get(key)
    if cached is None:
        profiles = sc.profiles or default_profiles_path()
        cached = (Problem.from_scenario(sc), noise_for(sim, profiles, exp.base_dir))
        _PROBLEMS[key] = cached
    prob, noise = cached
    wl = exp.spec.workloads[cell.workload]
    names = [m.name for m in sc.models]
    if wl.kind == "trace":
        base = {m: r * cell.load for m, r in trace_rates(wl, names, exp.base_dir).items()}
    else:
        base = {m.name: m.rate_rps * cell.load for m in sc.models}
    opts = exp.spec.simulator
    if wl.controller is not None:
        ctrl = opts.controller.model_copy(update={"enabled": wl.controller})
        opts = opts.model_copy(update={"controller": ctrl})
    policy = get_policy(cell.policy)
    t0 = time.perf_counter()
    plan = policy.plan(
        fresh_problem(prob, [replace(m, rate_rps=base[m.name]) for m in prob.models])
    )
    plan_s = time.perf_counter() - t0
    rows = []
    for seed in exp.spec.seeds:
        t1 = time.perf_counter()
        arrivals = generate(wl, base, opts.duration_s, seed, load=cell.load, base_dir=exp.base_dir)
        _, met = simulate(prob, policy, arrivals, base, opts, seed=seed, noise=noise, plan=plan)
        rows.append(
            {
                "policy": cell.policy,
                "workload": wl.name,
                "gpu_set": gs_name,
                "load": cell.load,
                "seed": seed,
                **met.summary,
                "plan_s": round(plan_s, 4),
                "wall_s": round(time.perf_counter() - t1, 4),
                "per_model": met.per_model,
                "timeseries": met.timeseries,
            }
        )
    return rows


def run_experiment(exp: Experiment, jobs: int = 1, progress: bool = True) -> list[dict[str, Any]]:
    """Every run of the grid, in grid order (cells, then seeds)."""
    todo = cells(exp)
    results: dict[int, list[dict[str, Any]]] = {}
    with _progress(len(todo), progress) as advance:
        if jobs <= 1:
            for c in todo:
                results[c.index] = run_cell(exp, c)
                advance(c)
        else:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")  # no fork of a threaded parent
            with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
                futs: dict[Future[list[dict[str, Any]]], Cell] = {
                    pool.submit(run_cell, exp, c): c for c in todo
                }
                from concurrent.futures import as_completed

                for f in as_completed(futs):
                    c = futs[f]
                    results[c.index] = f.result()
                    advance(c)
    return [row for c in todo for row in results[c.index]]


class _progress:
    def __init__(self, total: int, on: bool) -> None:
        self.total, self.on = total, on
        self._p: Any = None
        self._task: Any = None

    def __enter__(self) -> Any:
        if self.on:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._p = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[last]}"),
                transient=False,
            )
            self._p.__enter__()
            self._task = self._p.add_task("compare", total=self.total, last="")

        def advance(c: Cell) -> None:
            if self._p is not None:
                self._p.update(self._task, advance=1, last=f"{c.policy} x{c.load:g}")

        return advance

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.__exit__(None, None, None)


# ------------------------------------------------------------------------------------ output
CSV_COLUMNS = (
    "policy",
    "workload",
    "gpu_set",
    "load",
    "seed",
    "requests",
    "slo_attainment",
    "goodput_rps",
    "offered_rps",
    "p50_ms",
    "p99_ms",
    "dropped",
    "dropped_deadline",
    "dropped_no_worker",
    "late",
    "gpus_used",
    "gpus_used_mean",
    "gpus_used_max",
    "partitions",
    "partitions_mean",
    "utilisation",
    "mean_batch",
    "replans",
    "controller_passes",
    "reconfigurations",
    "reconfig_s",
    "partitions_started",
    "partitions_stopped",
    "plan_feasible",
    "plan_s",
    "wall_s",
)
SUMMARY_METRICS = (
    "slo_attainment",
    "goodput_rps",
    "p99_ms",
    "gpus_used_mean",
    "dropped",
    "reconfigurations",
)


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means over seeds per (gpu_set, workload, load, policy), in first-seen order."""
    groups: dict[tuple[str, str, float, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["gpu_set"], r["workload"], r["load"], r["policy"]), []).append(r)
    out = []
    for (gs, wl, load, pol), rs in groups.items():
        d: dict[str, Any] = {"gpu_set": gs, "workload": wl, "load": load, "policy": pol}
        for k in SUMMARY_METRICS:
            vals = [float(r[k]) for r in rs if not math.isnan(float(r[k]))]
            d[k] = float(np.mean(vals)) if vals else float("nan")
        d["seeds"] = len(rs)
        out.append(d)
    return out


def write_outputs(exp: Experiment, rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([_fmt(r[c]) for c in CSV_COLUMNS])
    (out / "results.json").write_text(
        json.dumps({"format": "stgs.compare/v1", "runs": _jsonable(rows)}, indent=1) + "\n",
        encoding="utf-8",
    )
    summary = summarise(rows)
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as f:
        cols = ["gpu_set", "workload", "load", "policy", *SUMMARY_METRICS, "seeds"]
        w = csv.writer(f)
        w.writerow(cols)
        for s in summary:
            w.writerow([_fmt(s[c]) for c in cols])
    (out / "experiment.resolved.json").write_text(
        json.dumps(exp.resolved(), indent=2) + "\n", encoding="utf-8"
    )
    from partitioner.sim.plots import make_plots

    return make_plots(exp, rows, summary, out / "plots")


def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) else x
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def summary_table(rows: Sequence[dict[str, Any]]) -> Iterator[list[str]]:
    """Rows of the printed table: header first."""
    yield [
        "gpus",
        "workload",
        "load",
        "policy",
        "SLO att.",
        "goodput/s",
        "p99 ms",
        "GPUs",
        "dropped",
        "reconf.",
    ]
    for s in summarise(rows):
        yield [
            s["gpu_set"],
            s["workload"],
            f"{s['load']:g}",
            s["policy"],
            f"{s['slo_attainment']:.4f}",
            f"{s['goodput_rps']:.0f}",
            f"{s['p99_ms']:.1f}",
            f"{s['gpus_used_mean']:.2f}",
            f"{s['dropped']:.0f}",
            f"{s['reconfigurations']:.1f}",
        ]


def default_jobs() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
