"""The planner benchmarks' scenarios (``planner.py``, ``spare_time.py``): a mixed model zoo on
1 to 16 GPUs on the example profiles or the measured ones, and the solve-time cases."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from partitioner.fluid import fluid_bound
from partitioner.problem import Problem
from profiler.models import ZOO
from stgs.profiles import default_profiles_path
from stgs.scenario import scenario_from_mapping


@dataclass
class Case:
    name: str
    data: dict[str, object]
    small: bool = False  # small enough for the exact solver


def _models(rng: random.Random, n: int, rate_lo: float, rate_hi: float) -> list[dict[str, object]]:
    out = []
    names = rng.sample(ZOO, min(n, len(ZOO)))
    while len(names) < n:
        names.append(rng.choice(ZOO))
    for i, prof in enumerate(names):
        slo = rng.choice([10, 15, 20, 25, 30, 40, 50, 75, 100, 150, 200])
        rate = math.exp(rng.uniform(math.log(rate_lo), math.log(rate_hi)))
        out.append(
            {"name": f"{prof}-{i}", "profile": prof, "slo_ms": slo, "rate_rps": round(rate, 1)}
        )
    return out


def scenarios(quick: bool) -> list[Case]:
    rng = random.Random(SEED)
    cases = [
        Case(
            "small-1xH100-3m",
            {"gpus": [{"sku": "H100-80GB", "count": 1}], "models": _models(rng, 3, 10, 300)},
            small=True,
        ),
        Case(
            "small-1xL4-3m",
            {"gpus": [{"sku": "L4", "count": 1}], "models": _models(rng, 3, 10, 200)},
            small=True,
        ),
        Case(
            "small-1xH200nomig-4m",
            {"gpus": [{"sku": "H200-141GB", "count": 1, "mig": False}],
             "models": _models(rng, 4, 10, 500)},
            small=True,
        ),
        Case(
            "small-2xL4-4m",
            {"gpus": [{"sku": "L4", "count": 2}], "models": _models(rng, 4, 10, 300)},
            small=True,
        ),
        Case(
            "small-1xA100-40-2m",
            {"gpus": [{"sku": "A100-40GB", "count": 1}], "models": _models(rng, 2, 10, 800)},
            small=True,
        ),
        Case(
            "small-1xH100-2m-tight",
            {"gpus": [{"sku": "H100-80GB", "count": 1}],
             "models": [{**m, "slo_ms": min(float(m["slo_ms"]), 25.0)}  # type: ignore[arg-type]
                        for m in _models(rng, 2, 10, 800)]},
            small=True,
        ),
        Case(
            "mixed-2xH100-6m",
            {"gpus": [{"sku": "H100-80GB", "count": 2}], "models": _models(rng, 6, 10, 2000)},
        ),
        Case(
            "mixed-4xH100-10m",
            {"gpus": [{"sku": "H100-80GB", "count": 4}], "models": _models(rng, 10, 10, 5000)},
        ),
        Case(
            "hetero-2xH100+2xH200nomig-12m",
            {
                "gpus": [{"sku": "H100-80GB", "count": 2},
                         {"sku": "H200-141GB", "count": 2, "mig": False}],
                "models": _models(rng, 12, 10, 3000),
            },
        ),
        Case(
            "a100-4x-8m-tightslo",
            {"gpus": [{"sku": "A100-80GB", "count": 4}],
             "models": [{**m, "slo_ms": min(float(m["slo_ms"]), 30.0)}  # type: ignore[arg-type]
                        for m in _models(rng, 8, 10, 2000)]},
        ),
        Case(
            "l4-8x-10m",
            {"gpus": [{"sku": "L4", "count": 8}], "models": _models(rng, 10, 10, 1000)},
        ),
        Case(
            "many-small-8xH100-24m",
            {"gpus": [{"sku": "H100-80GB", "count": 8}], "models": _models(rng, 24, 10, 400)},
        ),
        Case(
            "big-16xmix-30m",
            {
                "gpus": [{"sku": "H100-80GB", "count": 8}, {"sku": "H200-141GB", "count": 4},
                         {"sku": "A100-80GB", "count": 4, "mig": False}],
                "models": _models(rng, 30, 10, 5000),
            },
        ),
    ]  # fmt: skip
    return cases[:6] if quick else cases


SEED = 20261122  # the scenario sets' draw; another seed gives held-out mixes of the same shape


def measured_scenarios(quick: bool, sku: str, profiles: str | None, seed: int = SEED) -> list[Case]:
    """The same shapes of mix on the GPU the shipped profiles were measured on (MIG on and off).

    ``profiles``: a profile CSV (None: the shipped default); its interference companion is read
    when the scenario names none (see stgs.scenario). ``seed``: the draw of models, rates and
    SLOs (another than :data:`SEED`: held-out scenarios of the same shapes)."""
    rng = random.Random(seed)

    def g(count: int, mig: bool = True) -> dict[str, object]:
        return {"sku": sku, "count": count, "mig": mig}

    def tight(ms: list[dict[str, object]], slo: float) -> list[dict[str, object]]:
        return [{**m, "slo_ms": min(float(m["slo_ms"]), slo)} for m in ms]  # type: ignore[arg-type]

    cases = [
        Case("small-1xMIG-3m", {"gpus": [g(1)], "models": _models(rng, 3, 10, 300)}, small=True),
        Case("small-1xnoMIG-3m", {"gpus": [g(1, False)], "models": _models(rng, 3, 10, 300)},
             small=True),
        Case("small-1xMIG-2m-tight", {"gpus": [g(1)],
             "models": tight(_models(rng, 2, 10, 800), 25)}, small=True),
        Case("small-1xnoMIG-4m-tight", {"gpus": [g(1, False)],
             "models": tight(_models(rng, 4, 10, 500), 30)}, small=True),
        Case("small-2xnoMIG-4m", {"gpus": [g(2, False)], "models": _models(rng, 4, 10, 600)},
             small=True),
        Case("mixed-2xMIG-6m", {"gpus": [g(2)], "models": _models(rng, 6, 10, 2000)}),
        Case("mixed-4xMIG-10m", {"gpus": [g(4)], "models": _models(rng, 10, 10, 5000)}),
        Case("hetero-2xMIG+2xnoMIG-12m", {"gpus": [g(2), g(2, False)],
             "models": _models(rng, 12, 10, 3000)}),
        Case("tight-4xnoMIG-8m", {"gpus": [g(4, False)],
             "models": tight(_models(rng, 8, 10, 2000), 30)}),
        Case("many-small-8xMIG-24m", {"gpus": [g(8)], "models": _models(rng, 24, 10, 400)}),
        Case("big-16x-30m", {"gpus": [g(8), g(8, False)], "models": _models(rng, 30, 10, 5000)}),
    ]  # fmt: skip
    if profiles is not None:
        for c in cases:
            c.data["profiles"] = profiles
    return cases[:6] if quick else cases


LOAD = 0.5  # the timing cases' load: this share of the classic fluid bound (below stgs's peak)


def timing_case(
    n_models: int, n_gpus: int, seed: int, sku: str | None = None, profiles: str | None = None
) -> Problem:
    """Half the GPUs with MIG, half without: ``sku`` for both (measured set), or H100 with MIG
    and H200 without (synthetic set, ``sku=None``, example profiles)."""
    rng = random.Random(seed)
    data: dict[str, object] = {
        "gpus": [{"sku": sku or "H100-80GB", "count": n_gpus // 2},
                 {"sku": sku or "H200-141GB", "count": n_gpus - n_gpus // 2, "mig": False}],
        "models": _models(rng, n_models, 10, 5000),
    }  # fmt: skip
    if sku is None:
        data_dir = default_profiles_path().parent
        data["profiles"] = str(data_dir / "example-profiles.csv")
        data["interference"] = str(data_dir / "example-interference.csv")
    elif profiles is not None:
        data["profiles"] = profiles
    prob = Problem.from_scenario(scenario_from_mapping(data))
    # scale to a load the GPUs can carry (LOAD x the classic fluid bound: any batch)
    k = LOAD * fluid_bound(prob, rate_aware=False)
    return prob.with_models([m.scaled(k) for m in prob.models])


def geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")
