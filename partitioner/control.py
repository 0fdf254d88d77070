"""When to re-plan, and with which rates: the one rule set of the daemon and the simulator.

Pure and clock-injected (no threads, no I/O, no wall clock): the daemon's reconcile loop
(``api/controller.py``) calls it every ``interval_s`` of the wall clock, the simulator
(``partitioner/sim/engine.py``) every ``interval_s`` of virtual time. Each pass:

1. :class:`LoadEstimator` folds the requests answered since the last pass (arrivals, and how
   many of them met their SLO) into an EWMA of each model's arrival rate (half-life
   ``rate_halflife_s``) and of its SLO attainment (the share of requests answered within the
   SLO, weighted by the EWMA of the request count);
2. :class:`ReplanRules` compares them with the plan: a model whose measured rate leaves the
   hysteresis band ``[planned / (1 + h), planned * (1 + h)]``, or whose attainment falls below
   ``min_attainment`` (once ``MIN_SAMPLES`` requests back it), is *out of band* from that
   moment on;
3. once a model has stayed out of band for ``hold_s`` (reconfiguration costs: a short burst
   must not move partitions), the pass returns a re-plan: the measured rates of the models due
   by rate (at least ``MIN_RATE_RPS``), ``planned * (1 + h)`` for a model missing its SLO at
   its planned rate (capped, see :meth:`ReplanRules.decide`), the planned rate for the others;
4. a re-plan that could not be applied (the policy's plan drops a live model, the transition
   failed) is reported back (:meth:`ReplanRules.failed`): the next attempt waits ``hold_s`` x
   2^failures (at most ``MAX_BACKOFF`` x ``hold_s``) instead of ``hold_s``, so a policy that
   cannot serve the load does not fail every ``hold_s``; a success resets it.

:class:`ControlLoop` is both in one object (the simulator's); the daemon keeps the estimator
behind its thread-safe :class:`api.controller.LoadMeter` and calls :class:`ReplanRules` itself.

The glue around a pass is here too, so that the daemon and the simulator run the same code:
:func:`planned_rates` (what the controller compares the load with: the plan's rate of each
model, or the rate asked for when the plan serves none of it), :func:`check_keeps_live` (a
re-plan that serves none of a live model is not applied) and :meth:`ReplanRules.attempt` (a
re-plan carried out: a failure backs off, a success resets the back-off).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

from stgs.errors import StgsError
from stgs.plan import Plan

MIN_RATE_RPS = 1.0  # a registered model keeps a partition even when idle
MIN_SAMPLES = 20.0  # requests (EWMA-weighted) before attainment is trusted

T = TypeVar("T")


class ControlRules(BaseModel):
    """The controller's parameters (the daemon's ``[controller]``, the simulator's
    ``simulator.controller``); the defaults are the daemon's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interval_s: float = Field(5.0, gt=0, description="reconcile loop period")
    rate_halflife_s: float = Field(30.0, gt=0, description="EWMA half-life of measured rates")
    hysteresis: float = Field(
        0.2, ge=0.0, description="re-plan when a rate leaves [r/(1+h), r(1+h)] of the plan's"
    )
    hold_s: float = Field(30.0, ge=0.0, description="a change must hold this long before acting")
    min_attainment: float = Field(
        0.99, ge=0.0, le=1.0, description="re-plan when a model's SLO attainment falls below"
    )


@dataclass
class Counts:
    """Requests answered since the last pass: arrived, done (with an outcome), met (in SLO)."""

    arrived: int = 0
    done: int = 0
    met: int = 0


@dataclass
class ModelLoad:
    rate_rps: float  # EWMA
    attainment: float = 1.0  # EWMA of the share of requests within SLO
    weight: float = 0.0  # EWMA of the request count behind ``attainment``


class LoadEstimator:
    """EWMAs of each model's rate and attainment, folded at each pass (see the module doc)."""

    def __init__(self, halflife_s: float) -> None:
        self.halflife_s = halflife_s
        self.loads: dict[str, ModelLoad] = {}
        self.last: float | None = None

    def fold(
        self, now: float, planned: Mapping[str, float], counts: Mapping[str, Counts]
    ) -> dict[str, ModelLoad]:
        """Fold ``counts`` (since the last fold) at time ``now``; models not in ``planned`` are
        forgotten; a new model's rate starts at its planned rate (no spurious re-plan at
        start). The first fold only starts the clock. Returns copies."""
        dt = 0.0 if self.last is None else max(0.0, now - self.last)
        self.last = now
        a = 0.5 ** (dt / self.halflife_s) if dt > 0 else 1.0
        for name in list(self.loads):
            if name not in planned:
                del self.loads[name]
        none = Counts()
        for name, rate in planned.items():
            m = self.loads.get(name)
            if m is None:
                m = self.loads[name] = ModelLoad(rate_rps=rate)
            if dt > 0:
                c = counts.get(name, none)
                m.rate_rps = a * m.rate_rps + (1 - a) * (c.arrived / dt)
                m.weight = a * m.weight + c.done
                if c.done:
                    frac = c.met / c.done
                    w_new = c.done / m.weight if m.weight > 0 else 1.0
                    m.attainment = (1 - w_new) * m.attainment + w_new * frac
        return {k: ModelLoad(v.rate_rps, v.attainment, v.weight) for k, v in self.loads.items()}


@dataclass
class Decision:
    """One pass's verdict: ``out`` every model out of band (name -> why), ``due`` those out of
    band for ``hold_s`` or longer; ``rates`` the rates to re-plan with (None: no re-plan)."""

    out: dict[str, str] = field(default_factory=dict)
    due: dict[str, str] = field(default_factory=dict)
    rates: dict[str, float] | None = None

    @property
    def reason(self) -> str:
        return "; ".join(f"{n}: {w}" for n, w in sorted(self.due.items()))


MAX_BACKOFF = 64.0  # x hold_s: the longest wait after failed re-plans


def planned_rates(plan: Plan | None, asked: Mapping[str, float]) -> dict[str, float]:
    """Each model's planned rate, as the controller compares the load with it: what ``plan``
    (the plan in force) serves of it, or the rate ``asked`` for it (its registered rate, or the
    last re-plan's) when the plan serves none of it yet. ``asked``: the live models."""
    out = {}
    for name, rate in asked.items():
        served = plan.served_rate(name) if plan is not None else 0.0
        out[name] = served if served > 0 else float(rate)
    return out


class DropsLiveModelError(StgsError):
    """A re-plan's plan serves none of a live model: it is not applied."""


def check_keeps_live(plan: Plan, planned: Mapping[str, float]) -> None:
    """Raise DropsLiveModelError when ``plan`` serves none of a model planned at a rate
    above 0 (``planned``: :func:`planned_rates`), with the policy's reasons. A policy that
    cannot serve everyone must not take a live model's partitions away: the plan in force
    stays, and the controller backs off (:meth:`ReplanRules.attempt`)."""
    missing = [n for n, r in planned.items() if plan.served_rate(n) <= 0 < r]
    if missing:
        why = "; ".join(u.reason for u in plan.unserved) or "not placed"
        raise DropsLiveModelError(
            f"the {plan.policy} plan would serve none of {', '.join(missing)}: {why}"
        )


class ReplanRules:
    """The band, attainment and hold rules; remembers since when each model is out of band,
    and the failed re-plans since the last success (back-off)."""

    def __init__(self, rules: ControlRules) -> None:
        self.rules = rules
        self.out_since: dict[str, float] = {}
        self.failures = 0
        self.not_before = -math.inf

    def failed(self, now: float) -> float:
        """A re-plan this pass asked for was not applied: back off. Returns the next time one
        may be asked for."""
        self.failures += 1
        wait = self.rules.hold_s * min(2.0**self.failures, MAX_BACKOFF)
        self.not_before = now + wait
        return self.not_before

    def succeeded(self) -> None:
        self.failures = 0
        self.not_before = -math.inf

    def attempt(self, now: float, replan: Callable[[], T]) -> T:
        """Carry out the re-plan a pass asked for (``replan()`` makes and applies it, and
        raises when it cannot: no plan in time, a failed transition, a plan that drops a live
        model, :func:`check_keeps_live`). A failure backs off (:meth:`failed`) and is raised
        again; a success resets the back-off."""
        try:
            out = replan()
        except Exception:
            self.failed(now)  # the next attempt waits hold_s x 2^failures
            raise
        self.succeeded()
        return out

    def band(self, planned: float) -> tuple[float, float]:
        h = self.rules.hysteresis
        return planned / (1.0 + h), planned * (1.0 + h)

    def decide(
        self, now: float, planned: Mapping[str, float], loads: Mapping[str, ModelLoad]
    ) -> Decision:
        d = Decision()
        by_rate: set[str] = set()
        for name, rate in planned.items():
            m = loads[name]
            lo, hi = self.band(rate)
            why = None
            if m.rate_rps > hi or (m.rate_rps < lo and rate > MIN_RATE_RPS):
                why = f"rate {m.rate_rps:.1f} rps outside [{lo:.1f}, {hi:.1f}]"
                by_rate.add(name)
            elif m.weight >= MIN_SAMPLES and m.attainment < self.rules.min_attainment:
                why = f"SLO attainment {m.attainment:.3f} < {self.rules.min_attainment:g}"
            if why is None:
                self.out_since.pop(name, None)
            else:
                self.out_since.setdefault(name, now)
                d.out[name] = why
        for name in list(self.out_since):
            if name not in planned:
                del self.out_since[name]
        d.due = {n: r for n, r in d.out.items() if now - self.out_since[n] >= self.rules.hold_s}
        if d.due and now < self.not_before:  # backing off after failed re-plans
            for n in d.due:
                d.out[n] += (
                    f" (backing off {self.not_before - now:.0f} s more after "
                    f"{self.failures} failed re-plan(s))"
                )
            d.due = {}
        if not d.due:
            return d
        rates = dict(planned)
        h = self.rules.hysteresis
        for name in list(d.due):
            measured = loads[name].rate_rps
            if name in by_rate:
                if math.isfinite(measured):
                    rates[name] = max(MIN_RATE_RPS, measured)
                continue
            # Missing its SLO at the planned rate: ask for more room, (1 + h) x the planned
            # rate, but never more than (1 + h) x the measured one, and only a raise of more
            # than h / 4. Room beyond that is not what it lacks (a latency model that is off, a
            # slow neighbour): asking again every hold_s would only escalate (or oscillate with
            # the rate band) under overload.
            cap = (1.0 + h) * max(MIN_RATE_RPS, measured) if math.isfinite(measured) else math.inf
            want = max(planned[name], min(planned[name] * (1.0 + h), cap))
            if want <= planned[name] * (1.0 + h / 4):  # a raise this small is not worth a move
                d.due.pop(name)  # at its room cap already: stays out (held), no re-plan
                d.out[name] += f" (room already {planned[name]:.1f} rps, the cap)"
                continue
            rates[name] = want
        if not d.due:
            return d
        d.rates = rates
        self.out_since.clear()  # a re-plan starts every hold afresh
        return d


class ControlLoop:
    """Estimator and rules in one object: ``step(now, planned, counts)`` is one pass."""

    def __init__(self, rules: ControlRules) -> None:
        self.rules = rules
        self.estimator = LoadEstimator(rules.rate_halflife_s)
        self.replan_rules = ReplanRules(rules)

    def step(
        self, now: float, planned: Mapping[str, float], counts: Mapping[str, Counts]
    ) -> Decision:
        loads = self.estimator.fold(now, planned, counts)
        return self.replan_rules.decide(now, planned, loads)
