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
series, and the cells that failed), ``summary.csv`` (means over seeds with the half-width of
their 95 % confidence interval, Student's t), ``experiment.resolved.json`` (the resolved config,
versions included) and ``plots/*.png`` (error bars: the same intervals).

Settings that cannot run or mean nothing are refused before any run (a policy that does not
resolve, an unreadable trace, warm-up past the duration, a seed listed twice, ...). A cell that
raises while running is recorded as failed with its error; the other cells' results are kept.
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
from scipy import stats

from partitioner.policies import get_policy
from partitioner.problem import Problem
from partitioner.sim.config import SimOptions
from partitioner.sim.engine import NoiseModel
from partitioner.sim.noise import load_runtime_noise
from partitioner.sim.run import fresh_problem, noise_for, runtime_noise_path, simulate
from partitioner.sim.workload import WorkloadSpec, generate, read_trace, trace_rates
from stgs.errors import ConfigError, validation_message
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
        if len(set(self.loads)) != len(self.loads):
            raise ValueError("a load is listed twice")
        if any(s < 0 for s in self.seeds):
            raise ValueError("seeds must be >= 0")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("a seed is listed twice (its runs would count twice in the means)")
        duration = self.simulator.duration_s
        for w in self.workloads:
            if w.kind == "step" and w.at_s >= duration:
                raise ValueError(
                    f"workload {w.name!r}: the step at at_s={w.at_s:g} s never happens within"
                    f" simulator.duration_s={duration:g} s"
                )
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
        raise ConfigError(f"{source}: {validation_message(exc)}") from exc
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
    exp = Experiment(spec, base_dir, scenario, tuple(sets))
    _check_runnable(exp, source)
    return exp


def _check_runnable(exp: Experiment, source: str) -> None:
    """Refuse before any run what would fail or mean nothing in every cell: a policy that does
    not resolve, a trace that cannot be read or names other models, a workload with no
    request (every rate 0)."""
    _setup_path(exp)
    for name in exp.spec.policies:
        try:
            get_policy(name)
        except ConfigError as exc:
            raise ConfigError(f"{source}: policies: {exc}") from exc
    names = [m.name for m in exp.scenario.models]
    for w in exp.spec.workloads:
        if w.kind == "trace":
            assert w.path is not None
            p = Path(w.path)
            p = p if p.is_absolute() else exp.base_dir / p
            trace = read_trace(p)
            unknown = sorted(set(trace) - set(names))
            if unknown:
                raise ConfigError(
                    f"{source}: workload {w.name!r}: trace {p} names models not in the scenario:"
                    f" {', '.join(unknown)}"
                )
            if not any(ts.size for ts in trace.values()):
                raise ConfigError(f"{source}: workload {w.name!r}: trace {p} has no request")
        elif not any(m.rate_rps > 0 for m in exp.scenario.models):
            raise ConfigError(
                f"{source}: workload {w.name!r} sends no request: every model's rate_rps is 0"
            )


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


@dataclass(frozen=True)
class CellFailure:
    """A cell whose runs raised (a policy or the simulator failed): none of its seeds count."""

    policy: str
    workload: str
    gpu_set: str
    load: float
    error: str  # "ExceptionType: message"

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "workload": self.workload,
            "gpu_set": self.gpu_set,
            "load": self.load,
            "error": self.error,
        }

    def __str__(self) -> str:
        return f"{self.gpu_set} x {self.workload} x {self.load:g} x {self.policy}: {self.error}"


def _failure(exp: Experiment, c: Cell, exc: BaseException) -> CellFailure:
    msg = " ".join(str(exc).split()) or "(no message)"
    return CellFailure(
        c.policy,
        exp.spec.workloads[c.workload].name,
        exp.gpu_sets[c.gpu_set][0],
        c.load,
        f"{type(exc).__name__}: {msg}",
    )


def run_experiment(
    exp: Experiment,
    jobs: int = 1,
    progress: bool = True,
    failures: list[CellFailure] | None = None,
) -> list[dict[str, Any]]:
    """Every run of the grid, in grid order (cells, then seeds).

    A cell that raises: without ``failures`` the error propagates (the grid stops); with a
    ``failures`` list it is recorded there and the other cells run on, their rows kept.
    """
    todo = cells(exp)
    results: dict[int, list[dict[str, Any]]] = {}
    failed_cells: dict[int, CellFailure] = {}

    def failed(c: Cell, exc: Exception) -> None:
        if failures is None:
            raise exc
        failed_cells[c.index] = _failure(exp, c, exc)

    with _progress(len(todo), progress) as advance:
        if jobs <= 1:
            for c in todo:
                try:
                    results[c.index] = run_cell(exp, c)
                except Exception as exc:
                    failed(c, exc)
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
                    try:
                        results[c.index] = f.result()
                    except Exception as exc:  # the cell's error, or its process died
                        failed(c, exc)
                    advance(c)
    if failures is not None:
        failures.extend(failed_cells[i] for i in sorted(failed_cells))
    return [row for c in todo if c.index in results for row in results[c.index]]


def infeasible_runs(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs whose first plan was infeasible (some rate not served from the start)."""
    return [r for r in rows if not r["plan_feasible"]]


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


CI_LEVEL = 0.95
CI_SUFFIX = "_ci95"  # summary column of a metric's confidence half-width


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """The mean of ``values`` (NaN ignored) and the half-width of its 95 % confidence interval
    over them (Student's t with n - 1 degrees of freedom: the seeds are a small sample); the
    half-width is NaN with fewer than two values."""
    vals = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if vals.size == 0:
        return float("nan"), float("nan")
    mean = float(vals.mean())
    if vals.size < 2:
        return mean, float("nan")
    sem = float(vals.std(ddof=1)) / math.sqrt(vals.size)
    return mean, float(stats.t.ppf(0.5 + CI_LEVEL / 2, vals.size - 1)) * sem


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means over seeds per (gpu_set, workload, load, policy), in first-seen order, with the
    half-width of each mean's 95 % confidence interval (``<metric>_ci95``; NaN with one seed)."""
    groups: dict[tuple[str, str, float, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["gpu_set"], r["workload"], r["load"], r["policy"]), []).append(r)
    out = []
    for (gs, wl, load, pol), rs in groups.items():
        d: dict[str, Any] = {"gpu_set": gs, "workload": wl, "load": load, "policy": pol}
        for k in SUMMARY_METRICS:
            d[k], d[k + CI_SUFFIX] = mean_ci([float(r[k]) for r in rs])
        d["seeds"] = len(rs)
        d["infeasible"] = sum(1 for r in rs if not r["plan_feasible"])
        out.append(d)
    return out


SUMMARY_COLUMNS = (
    "gpu_set",
    "workload",
    "load",
    "policy",
    *(c for k in SUMMARY_METRICS for c in (k, k + CI_SUFFIX)),
    "seeds",
    "infeasible",
)


def write_outputs(
    exp: Experiment,
    rows: Sequence[dict[str, Any]],
    out: Path,
    failures: Sequence[CellFailure] = (),
) -> list[Path]:
    """The result files and the plots; ``failures`` (cells that raised) go to results.json."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([_fmt(r[c]) for c in CSV_COLUMNS])
    doc = {
        "format": "stgs.compare/v1",
        "runs": _jsonable(rows),
        "failed": [f.to_dict() for f in failures],
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    summary = summarise(rows)
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as f:
        cols = SUMMARY_COLUMNS
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

        def cell(key: str, digits: int, s: dict[str, Any] = s) -> str:
            text = f"{s[key]:.{digits}f}"
            ci = s[key + CI_SUFFIX]
            return text if math.isnan(ci) else f"{text} ± {ci:.{digits}f}"

        yield [
            s["gpu_set"],
            s["workload"],
            f"{s['load']:g}",
            s["policy"],
            cell("slo_attainment", 4),
            cell("goodput_rps", 0),
            cell("p99_ms", 1),
            cell("gpus_used_mean", 2),
            cell("dropped", 0),
            cell("reconfigurations", 1),
        ]


def default_jobs() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
