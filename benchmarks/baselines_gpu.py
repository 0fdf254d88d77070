"""Baselines comparison (issue #4): the highest load factor each way of sharing one GPU carries.

For one mix of models with SLOs (``--models name:slo_ms:rate_rps,...``; default: serve_gpu.py's
five zoo models at SLOs of 10-25 ms) and a load factor ``f`` that scales every model's base
rate, this finds, per system, the highest ``f`` at which every model keeps >= 99% (``--target``)
of its requests within SLO:

``stgs``
    the plan the ``stgs`` policy makes for the rates at ``f`` on one H100 (``mig: false``,
    shipped measured profiles), applied with ``Runtime`` + ``NvmlBackend`` as serve_gpu.py does
    (MPS partitions, duty cycles, CUDA graphs, the stgs worker). Re-planned for every ``f``; the
    search starts at the planner's own peak factor (the largest ``f`` it can plan on one GPU).
``timeslice``
    one process per model on the whole GPU, no MPS: the GPU time-slices between the processes'
    contexts.
``mps``
    one process per model under one MPS control daemon (started and quit by this script under
    ``--runtime-dir``, as stgs does) with ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=100/N`` each.
``streams``
    one process serving every model, each on its own CUDA stream with its own batching thread
    (Triton's default: one instance per model, concurrent execution); ``_baseline_server.py``.

Every baseline gets the care stgs's workers get, by running the same worker code: the process
per model of ``timeslice`` and ``mps`` is a stgs worker holding one model, and the ``streams``
server holds one stgs worker object per model in one process. So each model has fp16 weights,
one CUDA graph per batch bucket (powers of two up to its max batch; a batch is padded to its
bucket), a work-conserving dynamic batcher (every queued request up to the max batch, as soon as
the model's previous batch finished; no batching delay) and the same deadline drop (a request
that can no longer meet its SLO is answered "deadline exceeded" without running). The max batch
of a model is the largest power of two whose latency on the process's own partition, alone, is
<= SLO / 2: with a work-conserving batcher a request may wait for the batch in progress, then
run in the next one, so two batch latencies must fit in the SLO (the rule the planner and the
fluid bound use too; ``partitioner.policies.sharing.sharing_max_batch``, which the placements
of ``benchmarks/triton_gpu.py`` use too). The latency is the planner's latency model's, from the
measured profiles: for ``timeslice`` and ``streams`` on the whole GPU, for ``mps`` at its share
(100/N %) (``--mps-batch full``: the full-GPU rule there too). A batch of 64
resnet50 images takes 7.2 ms on the whole GPU but ~25 ms at 20%: with the full-GPU rule an
overloaded MPS client would run batches that miss a 15 ms SLO by construction.
Requests travel over the same socket transport (``stgs.runtime.transport``), one connection per
model (stgs: one per partition).

Load (serve_gpu.py's generator, reused): open-loop Poisson per model, arrivals drawn in advance
(``--seed``), ``--senders`` threads per model sending each request at its scheduled time; latency
= completion - scheduled arrival; deadline = arrival + SLO; within SLO = answered OK within the
SLO (deadline exceeded, errors and late answers are misses). A trial is ``--warmup-s`` of load
(not counted) then ``--trial-s`` measured. Processes of a baseline start once and serve every
trial; stgs applies the plan of each factor before its trial.

Search per system: start at ``--start`` (baselines; default the factor stgs reached in this run,
else 1.0) or at the planner's peak (stgs, which cannot go higher); multiply by ``--step`` after a
pass, divide after a failure, until one factor passed and one failed; then bisect
(geometrically) until fail / pass <= 1 + ``--tol``, at most ``--max-trials`` trials per system,
and none started that would overrun ``--time-budget-s``. The result is the highest factor that
passed. Also printed: the fluid bound's factor (``partitioner.fluid``: every model at its most
efficient partition and batch, packed fractionally) and the ratios stgs / each baseline and
stgs / fluid, as a markdown table after each system (a run cut short still reports what it
finished). JSON (every trial, per model) goes to ``--json`` (default ``$OUT/baselines_gpu.json``),
rewritten after every trial.

    # a GPU (MIG off), e.g. in two calls under 560 s each (docs/baselines.md):
    python -m benchmarks.baselines_gpu --systems stgs,timeslice --time-budget-s 520 --json a.json
    python -m benchmarks.baselines_gpu --systems mps,streams --start 0.8 --time-budget-s 520 \\
        --json b.json
    python -m benchmarks.baselines_gpu --combine a.json b.json   # the table of both (no GPU)
    # anywhere: the simulated node, CPU workers serving sleep:<ms> stand-ins, low rates
    python -m benchmarks.baselines_gpu --simulated
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from benchmarks.lib.loadgen import (
    DEFAULT_MODELS,
    NOT_SENT,
    PLAN_SKU,
    DirectRouter,
    LoadGen,
    ModelCfg,
    describe_plan,
    parse_models,
    plan_checks,
    plan_for,
    poisson_arrivals,
    relabel,
    window_stats,
)
from benchmarks.lib.node import open_backend, stop_daemons
from benchmarks.lib.runs import run_header, summary_path
from partitioner.fluid import fluid_bound
from partitioner.planner import make_plan
from partitioner.policies.sharing import sharing_batches
from partitioner.problem import Problem
from stgs.backend.base import Backend, DeviceRef
from stgs.errors import ProfileError, StgsError
from stgs.plan import Plan
from stgs.profiles import ProfileTable, default_profiles_path, read_profiles
from stgs.runtime import Runtime
from stgs.runtime.models import model_entry
from stgs.runtime.process import WorkerProcess
from stgs.runtime.transport import Array, SocketTransport
from stgs.runtime.worker import ModelSlot, WorkerSpec
from stgs.scenario import Scenario, scenario_from_mapping

SYSTEMS = ("stgs", "timeslice", "mps", "streams")
LABELS = {
    "stgs": "stgs plan (MPS partitions, duty cycles)",
    "timeslice": "time slicing, 1 process per model",
    "mps": "MPS equal shares, 1 process per model",
    "streams": "1 process, concurrent streams",
}
TARGETS = {"timeslice": 3.0, "mps": 2.0, "streams": 1.5}  # stgs / baseline (issue #4)
FLUID_TARGET = 0.7  # stgs / fluid bound
SERVER = Path(__file__).resolve().with_name("_baseline_server.py")
ENV_FACTS = ("CUDA_VISIBLE_DEVICES", "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
GPU0 = DeviceRef(0)


# ---------------------------------------------------------------------- the models' max batch
def _batches(
    models: Sequence[ModelCfg], mps_pct: int | None, headroom: float, table: ProfileTable | None
) -> dict[str, int]:
    """Per model: the sharing policies' max-batch rule (:func:`partitioner.policies.sharing.
    sharing_max_batch`) on one GPU, whole or at an MPS share; ValueError without a profile."""
    sc = _scenario(models, headroom)
    try:
        prob = Problem.from_scenario(sc, table)
        return {k: b for k, (b, _) in sharing_batches(prob, mps_pct).items()}
    except ProfileError as exc:
        raise ValueError(str(exc)) from exc


def max_batches(models: Sequence[ModelCfg], table: ProfileTable | None = None) -> dict[str, int]:
    """Per model: the largest power-of-two batch whose full-GPU latency is <= SLO / 2 (the
    planner's latency model, fitted to the profiled rows of ``table``, default the shipped
    profiles, without headroom); 1 when batch 1 already misses."""
    return _batches(models, None, 0.0, table)


def mps_max_batches(models: Sequence[ModelCfg], pct: int, headroom: float) -> dict[str, int]:
    """Per model: the largest power-of-two batch whose latency at an MPS share of ``pct`` percent,
    alone, is <= SLO / 2: the planner's latency model (fitted to the measured MPS profiles, here
    interpolating between the profiled shares), without headroom or interference."""
    return _batches(models, pct, headroom, None)


# ---------------------------------------------------------------------- search
@dataclass
class SearchResult:
    best: float  # the highest factor that passed; 0.0 when none did
    lo: float | None  # = best, None when nothing passed
    hi: float | None  # the lowest factor that failed; None when nothing failed
    # ok: True pass, False the system failed, None inconclusive (the load generator's limit)
    trials: list[tuple[float, bool | None]] = field(default_factory=list)
    reason: str = ""
    limited: float | None = None  # the lowest factor the load generator could not drive

    def summary(self, base_rps: float) -> dict[str, Any]:
        """The result as the summaries write it (``base_rps``: the mix's rate at factor 1)."""
        return {
            "factor": self.best,
            "rate_rps": round(self.best * base_rps, 1),
            "lo": self.lo,
            "hi": self.hi,
            "load_generator_limited_at": self.limited,
            "reason": self.reason,
        }


def search(
    passes: Callable[[float], bool | None],
    start: float,
    *,
    step: float = 1.5,
    tol: float = 0.05,
    max_trials: int = 7,
    cap: float | None = None,
    floor: float = 0.0,
    budget_ok: Callable[[], bool] = lambda: True,
) -> SearchResult:
    """Bracket then bisect the highest factor ``f`` with ``passes(f)``.

    From ``start`` (at most ``cap``): x ``step`` after a pass, / ``step`` after a failure, until
    a pass and a failure bracket the threshold; then the geometric mean of the bracket until
    hi / lo <= 1 + ``tol``. ``passes`` returning None means inconclusive: the load generator,
    not the system, could not keep up at that factor. Such a factor is no failure of the system
    (``hi`` stays as it was; it goes to ``limited``), but nothing at or above it is tried again:
    the search goes on below it as after a failure. Stops early at ``max_trials``, when
    ``budget_ok()`` is false, when a pass at ``cap`` leaves nothing higher to try, or when the
    next factor would be below ``floor``. New factors are always inside the bracket, so the
    result stays consistent even when ``passes`` is noisy.
    """
    if start <= 0:
        raise ValueError(f"start must be > 0, got {start}")
    res = SearchResult(0.0, None, None)
    f = min(start, cap) if cap is not None else start
    while True:
        if len(res.trials) >= max_trials:
            res.reason = "max trials"
            break
        if not budget_ok():
            res.reason = "time budget"
            break
        ok = passes(f)
        res.trials.append((f, ok))
        if ok:
            res.lo = f if res.lo is None else max(res.lo, f)
        elif ok is None:
            res.limited = f if res.limited is None else min(res.limited, f)
        else:
            res.hi = f if res.hi is None else min(res.hi, f)
        upper = min((x for x in (res.hi, res.limited) if x is not None), default=None)
        by_lg = upper is not None and upper == res.limited and res.hi != upper
        if upper is None:
            assert res.lo is not None
            if cap is not None and res.lo >= cap * (1 - 1e-9):
                res.reason = "passed at the cap"
                break
            f = res.lo * step if cap is None else min(res.lo * step, cap)
        elif res.lo is None:
            f = upper / step
            if f < floor:
                res.reason = "failed down to the floor" + (" (load generator limited)" * by_lg)
                break
        else:
            if upper / res.lo <= 1 + tol:
                res.reason = "load generator limited above" if by_lg else "converged"
                break
            f = math.sqrt(res.lo * upper)
    if res.limited is not None and "limited" not in res.reason:
        res.reason += f"; load generator limited at {res.limited:.3f}"
    res.best = res.lo or 0.0
    return res


# ---------------------------------------------------------------------- systems
def env_facts(pid: int) -> dict[str, str | None]:
    """The pinning variables a process runs with (from /proc; empty where unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)
    return {k: env.get(k) for k in ENV_FACTS}


class ProcessPerModel:
    """``timeslice`` (``mps_pct`` None) and ``mps``: one stgs worker process per model."""

    def __init__(
        self,
        backend: Backend,
        label: str,
        names: Sequence[str],
        batches: Sequence[int],
        mps_pct: int | None,
    ) -> None:
        self.backend = backend
        self.label = label
        self.names = list(names)
        self.batches = list(batches)
        self.mps_pct = mps_pct
        self.procs: list[WorkerProcess] = []

    def start(self, ready_timeout_s: float) -> None:
        if self.mps_pct is not None:
            self.backend.start_mps(GPU0)
        for i, (name, b) in enumerate(zip(self.names, self.batches, strict=True)):
            spec = WorkerSpec(name=f"{self.label}-{i}", models=(ModelSlot(name, b),))
            self.procs.append(WorkerProcess(self.backend, GPU0, self.mps_pct, spec))
        end = time.monotonic() + ready_timeout_s
        for p in self.procs:  # they load in parallel
            if not p.wait_ready(max(0.1, end - time.monotonic())):
                raise RuntimeError(f"{p.spec.name} ({p.spec.models[0].name}): not ready")

    @property
    def router(self) -> DirectRouter:
        return DirectRouter({p.spec.models[0].name: p.transport for p in self.procs})

    def processes(self) -> list[dict[str, Any]]:
        return [
            {
                "pid": p.pid,
                "models": [p.spec.models[0].name],
                "max_batch": p.spec.models[0].batch,
                "mps_pct": self.mps_pct,
                "env": env_facts(p.pid),
                "ready": _ready_info(p.transport),
            }
            for p in self.procs
        ]

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.kill()


class OneProcessStreams:
    """``streams``: one server process (``_baseline_server.py``), a connection per model."""

    def __init__(
        self, backend: Backend, names: Sequence[str], batches: Sequence[int], python: str
    ) -> None:
        self.backend = backend
        self.names = list(names)
        self.batches = list(batches)
        self.python = python
        self.proc: Any = None
        self.transports: dict[str, SocketTransport] = {}

    def start(self, ready_timeout_s: float) -> None:
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in self.names]
        specs = [
            json.loads(WorkerSpec(name=f"streams-{i}", models=(ModelSlot(n, b),)).to_json())
            for i, (n, b) in enumerate(zip(self.names, self.batches, strict=True))
        ]
        fds = [c.fileno() for _, c in pairs]
        argv = [
            self.python,
            str(SERVER),
            "--fds",
            ",".join(str(fd) for fd in fds),
            "--specs",
            json.dumps(specs),
        ]
        try:
            self.proc = self.backend.spawn_worker(GPU0, None, argv, pass_fds=fds)
        except BaseException:
            for p, _ in pairs:
                p.close()
            raise
        finally:
            for _, c in pairs:
                c.close()  # the server holds the only copies now
        self.transports = {
            n: SocketTransport(p, [n], name=f"streams-{n}")
            for n, (p, _) in zip(self.names, pairs, strict=True)
        }
        end = time.monotonic() + ready_timeout_s
        for n, t in self.transports.items():
            while not t.ready.wait(0.05):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"streams server exited ({self.proc.returncode}) loading")
                if time.monotonic() > end:
                    raise RuntimeError(f"streams server: {n} not ready in {ready_timeout_s:g} s")

    @property
    def router(self) -> DirectRouter:
        return DirectRouter(self.transports)

    def processes(self) -> list[dict[str, Any]]:
        first = next(iter(self.transports.values()), None)
        return [
            {
                "pid": self.proc.pid if self.proc is not None else None,
                "models": self.names,
                "max_batch": dict(zip(self.names, self.batches, strict=True)),
                "mps_pct": None,
                "env": env_facts(self.proc.pid) if self.proc is not None else {},
                "ready": _ready_info(first) if first is not None else None,
            }
        ]

    def close(self) -> None:
        for t in self.transports.values():
            t.close()  # the server's connections end, so do its serving threads
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(5.0)
            except Exception:
                self.proc.kill()
                self.proc.wait()


def _ready_info(t: SocketTransport) -> dict[str, Any] | None:
    if t.ready_info is None:
        return None
    with contextlib.suppress(ValueError):
        info = json.loads(t.ready_info.text())
        return info if isinstance(info, dict) else None
    return None


class StgsSystem:
    """``stgs``: the planner's plan for the rates at ``f``, applied by the runtime."""

    def __init__(
        self,
        backend: Backend,
        models: Sequence[ModelCfg],
        headroom: float,
        live_sku: str,
        names: dict[str, str] | None,
        slos: dict[str, float],
        peak_plan: Plan,
        peak_k: float,
        over_peak: bool = False,
        peak_always: bool = False,
    ) -> None:
        self.models = list(models)
        self.over_peak = over_peak
        self.peak_always = peak_always
        self.headroom = headroom
        self.live_sku = live_sku
        self.names = names
        self.peak_plan = peak_plan
        self.peak_k = peak_k
        self.runtime = Runtime(backend, slos=slos, admission=True)
        self.runtime.start_monitor()

    def prepare(self, f: float) -> tuple[bool, dict[str, Any]]:
        """Apply the plan for ``f``; (ready, facts). Above the planner's peak (``over_peak``):
        the peak plan, unchanged, takes the higher load (the planner has nothing bigger)."""
        above = self.over_peak and f > self.peak_k * (1 + 1e-9)
        if above or self.peak_always or math.isclose(f, self.peak_k, rel_tol=1e-9):
            plan = self.peak_plan
        else:
            plan = plan_for(self.models, None, f, self.headroom)
        info: dict[str, Any] = {"plan": describe_plan(plan), "checks": plan_checks(plan)}
        if plan is self.peak_plan:
            info["plan_k"] = self.peak_k  # the load the plan was made for
        if not plan.feasible:
            info["note"] = "no plan at this factor"
            return False, info
        t = time.monotonic()
        try:
            self.runtime.apply(relabel(plan, self.live_sku, self.names))
        except StgsError as exc:
            info["note"] = f"apply failed: {type(exc).__name__}: {exc}"
            return False, info
        info["apply_s"] = round(time.monotonic() - t, 2)
        states = self.runtime.describe()
        info["partitions"] = states
        if any(s["state"] != "ready" for s in states):
            info["note"] = "not every partition is ready"
            return False, info
        return True, info

    @property
    def router(self) -> Runtime:
        return self.runtime

    def close(self) -> None:
        self.runtime.close()


# ---------------------------------------------------------------------- one trial
@dataclass(frozen=True)
class LoadCfg:
    models: tuple[ModelCfg, ...]
    serve_names: tuple[str, ...]
    inputs: tuple[Array, ...]
    load_scale: float  # x the base rates (the simulated mode's low rates)
    warmup_s: float
    trial_s: float
    drain_s: float
    senders: int
    seed: int
    target: float
    max_lag_ms: float = 2.0  # a failed trial with a larger sender lag p99: load generator limited


def run_trial(router: Any, cfg: LoadCfg, f: float) -> dict[str, Any]:
    """Open-loop Poisson load at ``f`` x the base rates; per-model attainment and pass/fail."""
    rates = [m.rate_rps * f * cfg.load_scale for m in cfg.models]
    horizon = cfg.warmup_s + cfg.trial_s
    t_sched, m_idx = poisson_arrivals(rates, horizon, cfg.seed)
    lg = LoadGen(
        cast(Runtime, router),  # anything with Runtime.submit's signature
        cfg.serve_names,
        [m.slo_ms for m in cfg.models],
        cfg.inputs,
        t_sched,
        m_idx,
        cfg.senders,
    )
    gc.collect()
    gc.freeze()
    t0 = time.monotonic() + 0.2
    lg.start(t0)
    lg.join()
    end = time.monotonic() + cfg.drain_s
    while lg.pending() and time.monotonic() < end:
        time.sleep(0.02)
    win = window_stats(lg, cfg.models, rates, cfg.warmup_s, horizon)
    per = win["rows"][:-1]
    sel = (lg.t >= cfg.warmup_s) & (lg.status != NOT_SENT)
    lag = (lg.sent - (lg.t0 + lg.t))[sel] * 1e3
    return {
        **trial_verdict(f, rates, per, lag, cfg.target, cfg.max_lag_ms),
        # "deadline exceeded" answers per model (whole run, warmup included): refused on the
        # predicted batch latency (admission) or found late in the worker's queue
        "deadline_kinds": {
            cfg.models[mi].name: {k: v for (mj, k), v in lg.deadline_kinds.items() if mj == mi}
            for mi in sorted({mj for mj, _ in lg.deadline_kinds})
        },
        "errors": dict(lg.errors),
        "error_examples": lg.examples,
        "rows": win["rows"],
    }


def trial_outcome(tr: dict[str, Any]) -> bool | None:
    """What the search sees: True pass, False the system failed, None load generator limited."""
    if tr.get("passed"):
        return True
    return None if tr.get("load_generator_limited") else False


def trial_line(name: str, tr: dict[str, Any]) -> str:
    extra = f"; setup {tr['setup_s']:.1f} s" if tr.get("setup_s") is not None else ""
    note = f"; {tr['note']}" if tr.get("note") else ""
    if not tr.get("rows"):  # no load ran (no plan, apply failed)
        return f"  [{name}] f={tr['factor']:.3f} ({tr['rate_rps']:.0f} req/s): FAIL{extra}{note}"
    worst = next(r for r in tr["rows"] if r["model"] == tr["worst_model"])
    p99 = "-" if worst["p99_ok_ms"] is None else f"{worst['p99_ok_ms']:.2f}"
    allrow = tr["rows"][-1]
    lag = tr["sender_lag_ms"]["p99"]
    verdict = {True: "PASS", False: "FAIL", None: "LOAD GENERATOR LIMITED"}[trial_outcome(tr)]
    refused = tr.get("deadline_kinds", {}).get(tr["worst_model"], {}).get("predicted")
    why = f", {refused} refused by admission" if refused else ""
    return (
        f"  [{name}] f={tr['factor']:.3f} ({tr['rate_rps']:.0f} req/s): "
        f"{verdict}  worst {tr['worst_model']} "
        f"{100 * tr['worst_attainment']:.2f}% (p99 of ok {p99} ms{why}); "
        f"all {100 * (allrow['attainment'] or 0):.2f}% of {allrow['sent']}; "
        f"sender lag p99 {lag if lag is not None else '-'} ms{extra}{note}"
    )


def failed_trial(f: float, cfg: LoadCfg, note: str) -> dict[str, Any]:
    rate = sum(m.rate_rps for m in cfg.models) * f * cfg.load_scale
    return {
        "factor": round(f, 5),
        "rate_rps": round(rate, 1),
        "passed": False,
        "worst_model": None,
        "worst_attainment": 0.0,
        "note": note,
        "rows": [],
    }


# ---------------------------------------------------------------------- the table
def _fmt(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def summary_table(
    res: dict[str, Any],
    labels: Mapping[str, str] = LABELS,
    targets: Mapping[str, float] = TARGETS,
    fluid_target: float = FLUID_TARGET,
) -> str:
    """The markdown table: factor per system (``labels``' order), stgs / baseline and
    stgs / fluid with targets."""
    base = float(res["base_rps"])
    systems = res.get("systems", {})
    stgs_f = (systems.get("stgs", {}).get("result") or {}).get("factor")
    head = (
        "| system | max load factor | req/s | bracket (pass .. fail) | trials | stop | "
        "stgs / this | target | met |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for name in labels:
        if name not in systems:
            continue
        s = systems[name]
        r = s.get("result") or {}
        f = r.get("factor")
        lo_bound = r.get("hi") is None and f  # nothing failed: a lower bound
        fs = "-" if f is None else ("&ge; " if lo_bound else "") + f"{f:.3f}"
        rps = "-" if f is None else f"{f * base:.0f}"
        bracket = f"{_fmt(r.get('lo'))} .. {_fmt(r.get('hi'))}"
        lim = r.get("load_generator_limited_at")
        if lim is not None:  # not a failure of the system: the load generator fell behind
            bracket += f"; load generator limited at {lim:.3f}"
        trials = s.get("trials", [])
        n_lim = sum(1 for t in trials if t.get("load_generator_limited"))
        n_trials = f"{len(trials)}" + (f" ({n_lim} load generator limited)" if n_lim else "")
        ratio = stgs_f / f if stgs_f and f else None
        target = targets.get(name)
        met = "-" if target is None or ratio is None else ("yes" if ratio >= target else "no")
        label = labels[name]
        if name == "stgs" and s.get("plan_mode") == "peak":
            label += f"; the planner's peak plan (k = {_fmt(res.get('planner_peak_k'))}) at every f"
        elif name == "stgs" and s.get("over_peak"):
            label += f"; above its planner's peak ({_fmt(res.get('planner_peak_k'))}) the peak plan"
        lines.append(
            f"| {label} | {fs} | {rps} | {bracket} | {n_trials} | "
            f"{str(r.get('reason', '-'))[:60]} | {_fmt(ratio, 2) if name != 'stgs' else '1.00'} | "
            f"{'-' if target is None else f'>= {target:g}'} | {met} |"
        )
    fk = res.get("fluid_k")
    ratio = stgs_f / fk if stgs_f and fk else None
    met = "-" if ratio is None else ("yes" if ratio >= fluid_target else "no")
    lines.append(
        f"| fluid bound (LP; not a system) | {_fmt(fk)} | "
        f"{'-' if fk is None else f'{fk * base:.0f}'} | - | - | - | {_fmt(ratio, 2)} | "
        f">= {fluid_target:g} | {met} |"
    )
    pk = res.get("planner_peak_k")
    lines.append(
        f"| stgs planner's peak (plannable; not measured) | {_fmt(pk)} | "
        f"{'-' if pk is None else f'{pk * base:.0f}'} | - | - | - | "
        f"{_fmt(stgs_f / pk if stgs_f and pk else None, 2)} | - | - |"
    )
    return "\n".join(lines)


def print_summary(res: dict[str, Any], **table: Any) -> None:
    """The heading and :func:`summary_table` (``table``: its labels, targets, fluid_target)."""
    scale = float(res.get("load_scale", 1.0))
    sim = f"; simulated: rates x {scale:g}" if scale != 1.0 else ""
    print(
        f"\n## Highest load factor with >= {100 * res['target']:g}% within SLO for every model "
        f"(factor 1 = {res['base_rps']:.0f} req/s: {res['models_text']}{sim})\n"
    )
    print(summary_table(res, **table))
    print(
        "\n'stgs / this' is stgs's factor over the row's; for the fluid bound, stgs / fluid. "
        "'&ge;' marks a factor that passed with nothing above it tried (a lower bound).",
        flush=True,
    )


# ---------------------------------------------------------------------- per system
@dataclass
class Ctx:
    """What every system's run needs."""

    args: argparse.Namespace
    backend: Backend
    models: tuple[ModelCfg, ...]
    cfg: LoadCfg
    batches: dict[str, int]  # full-GPU rule (timeslice, streams)
    mps_batches: dict[str, int]  # the MPS baseline's
    names: dict[str, str]  # model -> the name served (simulated: its sleep stand-in)
    live_sku: str
    peak: Plan
    peak_k: float
    fluid_k: float
    res: dict[str, Any]
    json_path: str | None
    t_start: float

    @property
    def trial_cost_s(self) -> float:
        a = self.args
        return float(a.warmup_s + a.trial_s + a.drain_s + 1.0)

    def fits(self, extra_s: float) -> bool:
        """Whether ``extra_s`` more seconds stay within ``--time-budget-s``."""
        budget = float(self.args.time_budget_s)
        return budget <= 0 or time.monotonic() - self.t_start + extra_s <= budget

    def save(self) -> None:
        self.res["elapsed_s"] = round(time.monotonic() - self.t_start, 1)
        self.res["table"] = summary_table(self.res)
        if self.json_path:
            Path(self.json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.json_path).write_text(json.dumps(self.res, indent=1, default=str))


def run_stgs(ctx: Ctx, sres: dict[str, Any]) -> SearchResult:
    """Re-plan and apply per factor, from the planner's peak (the cap) downwards."""
    a = ctx.args
    st = StgsSystem(
        ctx.backend,
        ctx.models,
        a.headroom,
        ctx.live_sku,
        ctx.names if a.simulated else None,
        {ctx.names[m.name]: m.slo_ms for m in ctx.models},
        ctx.peak,
        ctx.peak_k,
        over_peak=a.stgs_over_peak,
        peak_always=a.stgs_plan == "peak",
    )
    last_setup = [2.0 if a.simulated else 25.0]  # the next apply's estimate (budget)

    def passes(f: float) -> bool | None:
        ok, info = st.prepare(f)
        last_setup[0] = info.get("apply_s", last_setup[0])
        tr = run_trial(st.router, ctx.cfg, f) if ok else failed_trial(f, ctx.cfg, info["note"])
        tr.update(setup_s=info.get("apply_s"), plan=info["plan"], plan_checks=info["checks"])
        if "plan_k" in info:
            tr["plan_k"] = info["plan_k"]
        if "note" in info:
            tr["note"] = info["note"]
        sres["trials"].append(tr)
        print("\n".join(["  plan:", *info["plan"]]))
        print(trial_line("stgs", tr), flush=True)
        ctx.save()
        return trial_outcome(tr)

    start = a.stgs_start or ctx.peak_k
    if not a.stgs_over_peak:
        start = min(start, ctx.peak_k)  # the planner cannot go higher
    sres["start_factor"] = start
    sres["over_peak"] = bool(a.stgs_over_peak)
    sres["plan_mode"] = a.stgs_plan
    try:
        return search(
            passes,
            start,
            step=a.step,
            tol=a.tol,
            max_trials=a.max_trials,
            cap=1.5 * ctx.fluid_k if a.stgs_over_peak else ctx.peak_k,
            floor=ctx.peak_k / 50,
            budget_ok=lambda: ctx.fits(last_setup[0] + ctx.trial_cost_s),
        )
    finally:
        st.close()
        sres["cleanup"] = stop_daemons(ctx.backend)


def run_baseline(ctx: Ctx, name: str, sres: dict[str, Any]) -> SearchResult | None:
    """Start the baseline's processes once, then search; None when skipped (time budget)."""
    a = ctx.args
    serve_names = ctx.cfg.serve_names
    by_model = ctx.mps_batches if name == "mps" else ctx.batches
    batches = [by_model[m.name] for m in ctx.models]
    sres["max_batch"] = dict(by_model)
    srv: ProcessPerModel | OneProcessStreams
    if name == "streams":
        srv = OneProcessStreams(ctx.backend, serve_names, batches, sys.executable)
    else:
        pct = 100 // len(ctx.models) if name == "mps" else None
        srv = ProcessPerModel(ctx.backend, name, serve_names, batches, pct)
    stgs_best = (ctx.res["systems"].get("stgs", {}).get("result") or {}).get("factor")
    start = float(a.start or stgs_best or 1.0)
    sres["start_factor"] = start
    if not ctx.fits((2.0 if a.simulated else 40.0) + ctx.trial_cost_s):
        sres["result"] = {"factor": None, "reason": "skipped: time budget"}
        print("  skipped: not enough time budget left")
        return None
    try:
        t = time.monotonic()
        srv.start(a.ready_timeout_s)
        sres["startup_s"] = round(time.monotonic() - t, 2)
        sres["processes"] = srv.processes()
        print(f"  {len(sres['processes'])} process(es) ready in {sres['startup_s']} s")
        for p in sres["processes"]:
            print(f"    pid {p['pid']} {p['models']} env {p['env']}")
        router = srv.router

        def passes(f: float) -> bool | None:
            tr = run_trial(router, ctx.cfg, f)
            sres["trials"].append(tr)
            print(trial_line(name, tr), flush=True)
            ctx.save()
            return trial_outcome(tr)

        return search(
            passes,
            start,
            step=a.step,
            tol=a.tol,
            max_trials=a.max_trials,
            cap=1.5 * ctx.fluid_k,
            floor=start / 50,
            budget_ok=lambda: ctx.fits(ctx.trial_cost_s),
        )
    finally:
        srv.close()
        sres["cleanup"] = stop_daemons(ctx.backend) if name == "mps" else []


# ---------------------------------------------------------------------- main
def _scenario(models: Sequence[ModelCfg], headroom: float) -> Scenario:
    return scenario_from_mapping(
        {
            "headroom": headroom,
            "gpus": [{"sku": PLAN_SKU, "count": 1, "mig": False}],
            "models": [
                {"name": m.name, "slo_ms": m.slo_ms, "rate_rps": m.rate_rps} for m in models
            ],
        }
    )


def _stand_ins(models: Sequence[ModelCfg], table: ProfileTable) -> dict[str, str]:
    """Simulated mode: a distinct ``sleep:<ms>`` per model, its full-GPU batch-1 latency."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for m in models:
        rows = [r for r in table.rows_for(PLAN_SKU, m.name) if r.batch == 1]
        ms = round(min((r.latency_ms for r in rows), default=1.0), 3)
        while f"sleep:{ms:.3f}" in used:
            ms += 0.001
        out[m.name] = f"sleep:{ms:.3f}"
        used.add(out[m.name])
    return out


def _sigterm(_sig: int, _frame: Any) -> None:
    raise SystemExit(143)  # so that the finally blocks stop the workers and quit MPS


def combine(paths: Sequence[str], out: str | None, **table: Any) -> int:
    """Merge result files of several calls (later files win per system); print the table
    (``table``: :func:`summary_table`'s labels, targets, fluid_target)."""
    merged: dict[str, Any] | None = None
    for p in paths:
        res = json.loads(Path(p).read_text())
        if merged is None:
            merged = res
        else:
            merged["systems"].update(res.get("systems", {}))
    if merged is None:
        return 2
    print_summary(merged, **table)
    merged["table"] = summary_table(merged, **table)
    if out:
        Path(out).write_text(json.dumps(merged, indent=1, default=str))
        print(f"wrote {out}")
    return 0


def trial_verdict(
    f: float,
    rates: Sequence[float],
    per: Sequence[dict[str, Any]],
    lag_ms: np.ndarray,
    target: float,
    max_lag_ms: float,
) -> dict[str, Any]:
    """A trial's verdict (this script's and benchmarks/triton_gpu.py's): passed when every
    model (``per``: rows with ``model`` and ``attainment``) has >= ``target`` within SLO; "load
    generator limited" when it failed while the client's lag p99 (``lag_ms``) exceeded
    ``max_lag_ms``: the misses may then be the load generator's, not the system's."""
    atts = [r["attainment"] if r["attainment"] is not None else 0.0 for r in per]
    worst = int(np.argmin(atts))
    passed = all(a >= target for a in atts)
    lag_p99 = float(np.percentile(lag_ms, 99)) if lag_ms.size else None
    limited = not passed and lag_p99 is not None and lag_p99 > max_lag_ms
    return {
        "factor": round(f, 5),
        "rate_rps": round(sum(rates), 1),
        "passed": passed,
        "load_generator_limited": limited,
        "verdict": "pass" if passed else ("load generator limited" if limited else "fail"),
        "worst_model": per[worst]["model"],
        "worst_attainment": atts[worst],
        "attainment": {r["model"]: r["attainment"] for r in per},
        "sender_lag_ms": {
            "p50": round(float(np.percentile(lag_ms, 50)), 3) if lag_ms.size else None,
            "p99": None if lag_p99 is None else round(lag_p99, 3),
            "max_allowed_p99": max_lag_ms,
        },
    }


def add_search_arguments(
    ap: argparse.ArgumentParser, *, trial_s: float, warmup_s: float, max_trials: int
) -> None:
    """The trials and the search's options (this script's and benchmarks/triton_gpu.py's)."""
    ap.add_argument("--trial-s", type=float, default=trial_s, help="measured load per trial")
    ap.add_argument("--warmup-s", type=float, default=warmup_s, help="load before it, not counted")
    ap.add_argument("--max-trials", type=int, default=max_trials, help="per system")
    ap.add_argument("--step", type=float, default=1.5, help="bracketing step (x or /)")
    ap.add_argument("--tol", type=float, default=0.05, help="bisect until fail/pass <= 1+tol")
    ap.add_argument("--target", type=float, default=0.99, help="within-SLO share, every model")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help="name:slo_ms:base_rate_rps,...")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="in this order")
    add_search_arguments(ap, trial_s=15.0, warmup_s=3.0, max_trials=7)
    ap.add_argument("--drain-s", type=float, default=2.0, help="wait for answers after a trial")
    ap.add_argument("--start", type=float, default=None, help="baselines' first factor")
    ap.add_argument(
        "--stgs-start",
        type=float,
        default=None,
        help="stgs's first factor (default and at most: the planner's peak)",
    )
    ap.add_argument(
        "--stgs-plan",
        choices=("per-factor", "peak"),
        default="per-factor",
        help="per-factor: the plan for the rates at f, the fewest resources (idle GPU left "
        "idle); peak: the planner's peak plan at every f, the whole GPU serving the mix's "
        "proportions (what a dedicated GPU would run; the spare capacity is headroom)",
    )
    ap.add_argument(
        "--stgs-over-peak",
        action="store_true",
        help="above the planner's peak, drive stgs's peak plan with the higher load (the "
        "search then goes up to 1.5 x the fluid bound) instead of stopping there",
    )
    ap.add_argument("--time-budget-s", type=float, default=0.0, help="0: none")
    ap.add_argument("--headroom", type=float, default=0.1, help="stgs planner latency margin")
    ap.add_argument(
        "--mps-batch",
        choices=("share", "full"),
        default="share",
        help="MPS baseline's max batch: from the latency at its share (default) or full GPU",
    )
    ap.add_argument(
        "--senders", type=int, default=1, help="sender threads per model (0: one for all)"
    )
    ap.add_argument(
        "--max-lag-ms",
        type=float,
        default=2.0,
        help="a failed trial whose sender lag p99 exceeds this is 'load generator limited'",
    )
    ap.add_argument("--switch-interval-us", type=float, default=200.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ready-timeout-s", type=float, default=240.0)
    ap.add_argument("--simulated", action="store_true", help="simulated node, CPU workers")
    ap.add_argument("--load-scale", type=float, default=None, help="x rates (simulated: 0.02)")
    ap.add_argument("--runtime-dir", default=None, help="MPS pipe/log dirs (default: tmp)")
    ap.add_argument("--json", default=None, help="default $OUT/baselines_gpu.json")
    ap.add_argument("--combine", nargs="+", default=None, help="result files to merge, print")
    args = ap.parse_args(argv)
    json_path = summary_path(args.json, "baselines_gpu")
    if args.combine:
        return combine(args.combine, args.json)

    t_start = time.monotonic()
    signal.signal(signal.SIGTERM, _sigterm)
    sys.setswitchinterval(args.switch_interval_us / 1e6)
    models = parse_models(args.models)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        print(f"unknown systems {unknown}; known: {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    off = [m.name for m in models if not 10 <= m.slo_ms <= 40]
    if len(models) < 4 or off:
        print(f"note: issue #4 asks for >= 4 models with SLOs in 10..40 ms (outside: {off})")
    load_scale = (
        args.load_scale if args.load_scale is not None else (0.02 if args.simulated else 1.0)
    )
    runtime_dir = Path(args.runtime_dir or f"/tmp/stgs-baselines-{os.getpid()}")
    runtime_dir.mkdir(parents=True, exist_ok=True)

    # ---- plans, bounds, batches (no GPU)
    table = read_profiles(default_profiles_path())
    batches = max_batches(models, table)
    mps_pct = 100 // len(models)
    mps_batches = (
        batches if args.mps_batch == "full" else mps_max_batches(models, mps_pct, args.headroom)
    )
    scenario = _scenario(models, args.headroom)
    t = time.monotonic()
    peak = make_plan(scenario, "stgs", peak=True)
    peak_k = float(peak.k or 0.0)
    problem = Problem.from_scenario(scenario)
    fluid_k = fluid_bound(problem)
    fluid_classic = fluid_bound(problem, rate_aware=False)
    base_rps = sum(m.rate_rps for m in models)
    print(
        f"models (name:SLO ms:rate at factor 1): {args.models}\n"
        f"max batch (largest power of two with full-GPU latency <= SLO/2): {batches}\n"
        f"max batch under MPS at {mps_pct}% ({args.mps_batch} rule): {mps_batches}\n"
        f"stgs planner's peak factor on 1 {PLAN_SKU} (mig off, headroom {args.headroom:g}): "
        f"{peak_k:.3f} ({peak_k * base_rps:.0f} req/s; {time.monotonic() - t:.1f} s)\n"
        f"fluid bound factor: {fluid_k:.3f} ({fluid_k * base_rps:.0f} req/s; "
        f"any batch: {fluid_classic:.3f})"
    )
    print("\n".join(describe_plan(peak)), flush=True)
    if peak_k <= 0:
        print("the planner cannot serve these models at any load on one GPU", file=sys.stderr)
        return 2

    # ---- backend
    opened = open_backend(args.simulated, runtime_dir)
    if opened is None:
        return 2
    backend, label = opened
    live_sku = backend.sku(0).name
    print(f"device: {label}; live SKU {live_sku}", flush=True)
    names = _stand_ins(models, table) if args.simulated else {m.name: m.name for m in models}
    serve_names = tuple(names[m.name] for m in models)
    if args.simulated:
        inputs = tuple(np.zeros(16, np.float32) for _ in models)
    else:
        inputs = tuple(model_entry(m.name).example(seed=i) for i, m in enumerate(models))
    cfg = LoadCfg(
        tuple(models),
        serve_names,
        inputs,
        load_scale,
        args.warmup_s,
        args.trial_s,
        args.drain_s,
        args.senders,
        args.seed,
        args.target,
        args.max_lag_ms,
    )
    res: dict[str, Any] = {
        "device": label,
        "live_sku": live_sku,
        **run_header("baselines_gpu", argv),  # command, machine, date
        "args": vars(args),
        "models": [asdict(m) for m in models],
        "models_text": args.models,
        "base_rps": base_rps,
        "load_scale": load_scale,
        "target": args.target,
        "max_batch": batches,
        "max_batch_mps": mps_batches,
        "planner_peak_k": round(peak_k, 5),
        "planner_peak_plan": describe_plan(peak),
        "fluid_k": round(fluid_k, 5),
        "fluid_k_any_batch": round(fluid_classic, 5),
        "systems": {},
        "cleanup": [],
    }

    ctx = Ctx(
        args=args,
        backend=backend,
        models=tuple(models),
        cfg=cfg,
        batches=batches,
        mps_batches=mps_batches,
        names=names,
        live_sku=live_sku,
        peak=peak,
        peak_k=peak_k,
        fluid_k=fluid_k,
        res=res,
        json_path=json_path,
        t_start=t_start,
    )
    try:
        for name in systems:
            sres: dict[str, Any] = {"system": name, "label": LABELS[name], "trials": []}
            res["systems"][name] = sres
            print(f"\n# {name}: {LABELS[name]}", flush=True)
            t_sys = time.monotonic()
            try:
                sr = run_stgs(ctx, sres) if name == "stgs" else run_baseline(ctx, name, sres)
            except Exception as exc:  # one system's failure must not cost the others' results
                sres["error"] = f"{type(exc).__name__}: {exc}"
                sres["result"] = {"factor": None, "reason": f"error: {sres['error'][:200]}"}
                print(f"  {name} FAILED: {sres['error']}", file=sys.stderr, flush=True)
                ctx.save()
                continue
            if sr is None:
                continue
            sres["result"] = sr.summary(base_rps)
            sres["wall_s"] = round(time.monotonic() - t_sys, 1)
            for note in sres.get("cleanup", []):
                print(f"  {note}")
            print(f"  -> {name}: {sr.best:.3f} ({sr.reason}; {sres['wall_s']} s)")
            ctx.save()
            print_summary(res)
    finally:
        res["cleanup"] = stop_daemons(backend)
        backend.close()
        ctx.save()
        if json_path:
            print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
