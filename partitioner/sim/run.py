"""One simulated run: a policy plans the workload's base rates, the simulator serves its
arrivals, the controller (when on) re-plans with the same policy; metrics come out."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from partitioner.policies import Policy
from partitioner.problem import Problem
from partitioner.sim.config import SimOptions
from partitioner.sim.engine import NoiseModel, SimResult, Simulator
from partitioner.sim.metrics import RunMetrics, compute_metrics
from partitioner.sim.noise import load_runtime_noise
from partitioner.sim.workload import FloatArray
from stgs.errors import ProfileError
from stgs.plan import Plan
from stgs.profiles import normalise_gpu
from stgs.types import ModelSpec

_Z99 = 2.3263478740408408  # the standard normal's 99th percentile


def fit_noise(profiles: Path | None, default_sigma: float) -> NoiseModel:
    """Lognormal sigma per (gpu, model) from a profile CSV's optional ``p99_ms`` column:
    the median over its rows of ``ln(p99_ms / latency_ms) / z_0.99``; ``default_sigma`` for
    pairs without that column."""
    if profiles is None:
        return NoiseModel(default=default_sigma)
    per: dict[tuple[str, str], list[float]] = {}
    try:
        with open(profiles, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if "p99_ms" not in [h.strip() for h in reader.fieldnames or []]:
                return NoiseModel(default=default_sigma)
            for row in reader:
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                try:
                    p50, p99 = float(row["latency_ms"]), float(row["p99_ms"])
                except (KeyError, ValueError):
                    continue
                if p50 > 0 and p99 >= p50 and math.isfinite(p99):
                    key = (normalise_gpu(row["gpu"]), row["model"])
                    per.setdefault(key, []).append(math.log(p99 / p50) / _Z99)
    except OSError as exc:
        raise ProfileError(f"{profiles}: cannot read: {exc.strerror or exc}") from exc
    return NoiseModel({k: statistics.median(v) for k, v in per.items()}, default_sigma)


def runtime_noise_path(options: SimOptions, base_dir: Path | None = None) -> Path | None:
    """The ``runtime_noise`` file a run with ``options`` reads (a relative path: from
    ``base_dir``, the experiment's folder); None unless ``noise: runtime``."""
    if options.noise != "runtime" or not options.runtime_noise:
        return None
    path = Path(options.runtime_noise)
    return path if path.is_absolute() or base_dir is None else base_dir / path


def noise_for(
    options: SimOptions, profiles: Path | None, base_dir: Path | None = None
) -> NoiseModel:
    """The noise a run with ``options`` draws from: the profile's sigmas (:func:`fit_noise`)
    and, with ``noise: runtime``, the factors of :func:`runtime_noise_path`'s file."""
    model = fit_noise(profiles, options.default_sigma)
    path = runtime_noise_path(options, base_dir)
    return model if path is None else replace(model, factors=load_runtime_noise(path))


def fresh_problem(problem: Problem, models: Sequence[ModelSpec] | None = None) -> Problem:
    """The same GPUs and latency functions with an empty curve cache: a run's plans must not
    depend on what other runs in the same process planned before (same seed, same results)."""
    return Problem(
        problem.gpus,
        tuple(models if models is not None else problem.models),
        problem.latency,
        problem.interference,
        problem.headroom,
        problem.options,
    )


def simulate(
    problem: Problem,
    policy: Policy,
    arrivals: Mapping[str, FloatArray],
    base_rates: Mapping[str, float],
    options: SimOptions,
    *,
    seed: int = 0,
    noise: NoiseModel | None = None,
    plan: Plan | None = None,
    deadlines: Mapping[str, FloatArray] | None = None,
) -> tuple[SimResult, RunMetrics]:
    """Plan ``base_rates`` with ``policy`` (unless ``plan`` is given) and simulate.
    ``deadlines``: per model, each request's deadline (s; default arrival + SLO)."""
    models = [replace(m, rate_rps=float(base_rates.get(m.name, 0.0))) for m in problem.models]
    prob = fresh_problem(problem, models)
    first = plan if plan is not None else policy.plan(prob)

    def replan(rates: Mapping[str, float], current: Plan) -> Plan:
        ms = [replace(m, rate_rps=float(rates[m.name])) for m in models]
        return policy.plan(prob.with_models(ms), current)

    sim = Simulator(
        prob,
        first,
        arrivals,
        options,
        seed=seed,
        noise=noise,
        replan=replan,
        planned_rates=base_rates,
        deadlines=deadlines,
    )
    res = sim.run()
    return res, compute_metrics(res, options.timeseries_s)
