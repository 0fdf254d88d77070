"""Runtime noise (partitioner/sim/noise.py): the factors file, its errors, the experiment keys,
the engine's draws (exact with a one-point distribution, the empirical distribution with many,
the same seed the same results)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from partitioner.problem import Problem
from partitioner.sim import NoiseModel, SimOptions, Simulator
from partitioner.sim.compare import experiment_from_mapping
from partitioner.sim.config import HostCosts
from partitioner.sim.engine import OK
from partitioner.sim.noise import load_runtime_noise, quantiles, write_runtime_noise
from partitioner.sim.run import noise_for
from stgs.errors import ConfigError
from stgs.plan import GpuPlan, ModelAssignment, Partition, Plan
from stgs.scenario import scenario_from_mapping

SC = {
    "gpus": [{"sku": "H100-80GB", "count": 1, "mig": False}],
    "models": [{"name": "resnet50", "slo_ms": 500, "rate_rps": 100}],
}


@pytest.fixture(scope="module")
def problem() -> Problem:
    return Problem.from_scenario(scenario_from_mapping(SC))


def _plan() -> Plan:
    part = Partition("full", 132, 81559.0, 10.0, (ModelAssignment("resnet50", 1, 100, 1),))
    return Plan("hand", True, (GpuPlan(0, "H100-80GB", False, (part,)),))


def _file(tmp_path: Path, factors: object, name: str = "n.json", **extra: object) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps({"format": "stgs.runtime-noise/v1", "factors": factors, **extra}))
    return p


def _batch_ms(
    problem: Problem, opts: SimOptions, noise: NoiseModel | None, seed: int = 0
) -> np.ndarray:
    """Latency of 200 single-request batches that never queue (10 ms apart, 1 ms batches)."""
    arr = np.arange(200) * 0.01
    res = Simulator(problem, _plan(), {"resnet50": arr}, opts, seed=seed, noise=noise).run()
    assert (res.status == OK).all()
    return np.asarray(res.finish_ms - res.arrival_ms)


def _opts(**kw: object) -> SimOptions:
    return SimOptions(duration_s=3, admission=False, host=HostCosts(enabled=False), **kw)  # type: ignore[arg-type]


def test_one_point_distribution_scales_every_batch_exactly(
    problem: Problem, tmp_path: Path
) -> None:
    off = _batch_ms(problem, _opts(noise="off"), None)
    f = _file(tmp_path, {"resnet50": [1.5]})
    opts = _opts(noise="runtime", runtime_noise=str(f))
    got = _batch_ms(problem, opts, noise_for(opts, None))
    assert got == pytest.approx(off * 1.5, rel=1e-12)


def test_draws_follow_the_factors_and_the_seed(problem: Problem, tmp_path: Path) -> None:
    f = _file(tmp_path, {"*": [0.5, 1.0, 2.0]})  # "*": every profile without its own list
    opts = _opts(noise="runtime", runtime_noise=str(f))
    nm = noise_for(opts, None)
    off = _batch_ms(problem, _opts(noise="off"), None)
    a = _batch_ms(problem, opts, nm, seed=3)
    ratio = np.round(a / off, 9)
    assert set(ratio.tolist()) == {0.5, 1.0, 2.0}
    counts = np.asarray([np.sum(ratio == x) for x in (0.5, 1.0, 2.0)])
    assert counts.min() > 40  # about 200/3 each
    assert np.array_equal(a, _batch_ms(problem, opts, nm, seed=3))  # same seed: to the bit
    assert not np.array_equal(a, _batch_ms(problem, opts, nm, seed=4))


def test_profile_without_factors_is_an_error(problem: Problem, tmp_path: Path) -> None:
    f = _file(tmp_path, {"bert_base": [1.0]})
    opts = _opts(noise="runtime", runtime_noise=str(f))
    with pytest.raises(ConfigError, match=r"no factors for profile 'resnet50'.*bert_base"):
        _batch_ms(problem, opts, noise_for(opts, None))


def test_options_need_the_file_and_the_mode_together() -> None:
    with pytest.raises(ValidationError, match="needs runtime_noise"):
        SimOptions(noise="runtime")
    with pytest.raises(ValidationError, match="only read with noise: runtime"):
        SimOptions(noise="profile", runtime_noise="x.json")
    with pytest.raises(ValidationError):
        SimOptions(noise="runtimes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "cannot read"),
        ("{not json", "not JSON"),
        ({"format": "v0", "factors": {"a": [1.0]}}, "format 'v0'"),
        ({"format": "stgs.runtime-noise/v1", "factors": {"a": [1.0, -1.0]}}, "finite and > 0"),
        ({"format": "stgs.runtime-noise/v1", "factors": {"a": []}}, "0 factors"),
        ({"format": "stgs.runtime-noise/v1", "factors": {}}, "factors"),
        ({"format": "stgs.runtime-noise/v1", "factors": {"a": ["1"]}}, "factors.a.0"),
        ({"format": "stgs.runtime-noise/v1", "factors": {"a": [1]}, "sigma": 1}, "sigma"),
    ],
)
def test_bad_files_say_what_is_wrong(tmp_path: Path, content: object, match: str) -> None:
    p = tmp_path / "bad.json"
    if content is not None:
        p.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError, match=match) as err:
        load_runtime_noise(p)
    assert str(p) in str(err.value)


def test_experiment_keys(tmp_path: Path) -> None:
    f = _file(tmp_path, {"*": [1.0, 1.2]})
    base = {"scenario": SC, "policies": ["stgs"]}
    exp = experiment_from_mapping(
        {**base, "simulator": {"noise": "runtime", "runtime_noise": f.name}}, tmp_path
    )
    assert exp.spec.simulator.noise == "runtime"
    nm = noise_for(exp.spec.simulator, None, tmp_path)
    assert nm.factors["*"] == (1.0, 1.2)
    with pytest.raises(ConfigError, match=r"simulator\.runtime_noise .*missing\.json: cannot read"):
        experiment_from_mapping(
            {**base, "simulator": {"noise": "runtime", "runtime_noise": "missing.json"}}, tmp_path
        )
    with pytest.raises(ConfigError, match="needs runtime_noise"):
        experiment_from_mapping({**base, "simulator": {"noise": "runtime"}}, tmp_path)


def test_write_and_quantiles(tmp_path: Path) -> None:
    q = quantiles(list(np.linspace(0.5, 1.5, 10001)), 100)
    assert len(q) == 100 and q == sorted(q)
    assert q[0] == pytest.approx(0.505, abs=1e-3) and q[-1] == pytest.approx(1.495, abs=1e-3)
    assert quantiles([2.0, 1.0], 100) == [1.0, 2.0]
    p = tmp_path / "w.json"
    write_runtime_noise(p, {"resnet50": q}, "test")
    assert load_runtime_noise(p)["resnet50"] == tuple(q)


def test_committed_factors_file() -> None:
    """The shipped factors (session-4 H100 runs c and d): every served model and "*", median
    1 (the level is the calibration's), the runtime's spread far wider than the profiler's."""
    path = Path(__file__).resolve().parents[1] / "stgs/data/runtime-noise-h100.json"
    fs = load_runtime_noise(path)
    assert set(fs) == {
        "resnet50",
        "mobilenet_v3_large",
        "efficientnet_b0",
        "bert_base",
        "vit_b_16",
        "*",
    }
    for v in fs.values():
        x = np.asarray(v)
        assert np.median(x) == pytest.approx(1.0, abs=0.01)
        assert 1.05 < np.percentile(x, 99) < 1.6


def test_compare_with_runtime_noise_same_results_with_more_processes(tmp_path: Path) -> None:
    """`stgs compare` with `noise: runtime` (a relative file): the pool's processes read it from
    the experiment's folder, 1 or 2 processes give the same results, and they are not the
    profile noise's."""
    from partitioner.sim.compare import run_experiment

    _file(tmp_path, {"*": [0.8, 1.0, 1.6, 2.5]}, "f.json")
    base = {
        "scenario": {
            "gpus": [{"sku": "H100-80GB", "count": 1}],
            "models": [
                {"name": "resnet50", "slo_ms": 50, "rate_rps": 300},
                {"name": "bert_base", "slo_ms": 100, "rate_rps": 60},
            ],
        },
        "policies": ["stgs", "mps-only"],
        "loads": [2.0],
        "seeds": [0, 1],
    }

    def rows(sim: dict[str, object], jobs: int) -> str:
        exp = experiment_from_mapping({**base, "simulator": {"duration_s": 2, **sim}}, tmp_path)
        got = run_experiment(exp, jobs=jobs, progress=False)
        strip = [{k: v for k, v in r.items() if k not in ("wall_s", "plan_s")} for r in got]
        return json.dumps(strip, sort_keys=True)

    rt = {"noise": "runtime", "runtime_noise": "f.json"}
    one = rows(rt, 1)
    assert one == rows(rt, 2)
    assert one != rows({"noise": "profile"}, 1)
