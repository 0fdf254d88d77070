"""The reconcile loop: measure each model's load, re-plan when it moves, apply, never die.

Every ``interval_s`` :meth:`Controller.step`:

1. folds the requests counted since the last step into an EWMA of each model's arrival rate
   (half-life ``rate_halflife_s``) and of its SLO attainment (the share of requests answered
   within the SLO);
2. compares them with the plan: a model whose measured rate leaves the hysteresis band
   ``[planned / (1 + h), planned * (1 + h)]``, or whose attainment falls below
   ``min_attainment``, is *out of band* from that moment on;
3. re-plans once a model has stayed out of band for ``hold_s`` (reconfiguration costs: a short
   burst must not move partitions), with the measured rates (at least ``MIN_RATE_RPS``; a model
   missing its SLO at its planned rate asks for ``(1 + h)`` times it). The policy replans
   incrementally from the current plan and the service applies it through the runtime.

A step that raises is logged, recorded as an event and counted; the loop goes on (Ray Serve's
controller does the same). The clock is injected: tests step the loop on virtual time.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from api.config import ControllerConfig

log = logging.getLogger(__name__)

MIN_RATE_RPS = 1.0  # a registered model keeps a partition even when idle
MIN_SAMPLES = 20.0  # requests (EWMA-weighted) before attainment is trusted


class Planner(Protocol):
    """What the controller needs from the service (a fake in unit tests)."""

    def planned_rates(self) -> dict[str, float]: ...

    def replan(self, rates: dict[str, float], *, reason: str) -> Any: ...

    def log_event(self, kind: str, message: str, **data: Any) -> None: ...


@dataclass
class _ModelLoad:
    rate_rps: float  # EWMA
    attainment: float = 1.0  # EWMA of the share of requests within SLO
    weight: float = 0.0  # EWMA of the request count behind ``attainment``
    count: int = 0  # since the last step
    met: int = 0
    done: int = 0


@dataclass
class LoadMeter:
    """Thread-safe counters of arrivals and SLO outcomes, folded into EWMAs by :meth:`tick`."""

    halflife_s: float
    clock: Callable[[], float] = time.monotonic
    _models: dict[str, _ModelLoad] = field(default_factory=dict)
    _last: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def arrived(self, model: str, n: int = 1) -> None:
        with self._lock:
            m = self._models.get(model)
            if m is None:
                m = self._models[model] = _ModelLoad(rate_rps=-1.0)  # seeded at the next tick
            m.count += n

    def finished(self, model: str, n: int, slo_met: bool) -> None:
        with self._lock:
            m = self._models.get(model)
            if m is None:
                return
            m.done += n
            if slo_met:
                m.met += n

    def tick(self, planned: dict[str, float]) -> dict[str, _ModelLoad]:
        """Fold the counts since the last tick; models not in ``planned`` are forgotten; a new
        model's rate starts at its planned rate (no spurious re-plan at start)."""
        now = self.clock()
        with self._lock:
            dt = 0.0 if self._last is None else max(0.0, now - self._last)
            self._last = now
            a = 0.5 ** (dt / self.halflife_s) if dt > 0 else 1.0
            for name in list(self._models):
                if name not in planned:
                    del self._models[name]
            for name, rate in planned.items():
                m = self._models.setdefault(name, _ModelLoad(rate_rps=rate))
                if m.rate_rps < 0:
                    m.rate_rps = rate
                if dt > 0:
                    m.rate_rps = a * m.rate_rps + (1 - a) * (m.count / dt)
                    m.weight = a * m.weight + m.done
                    if m.done:
                        frac = m.met / m.done
                        w_new = m.done / m.weight if m.weight > 0 else 1.0
                        m.attainment = (1 - w_new) * m.attainment + w_new * frac
                m.count = m.done = m.met = 0
            return {
                k: _ModelLoad(v.rate_rps, v.attainment, v.weight) for k, v in self._models.items()
            }

    def snapshot(self) -> dict[str, tuple[float, float]]:
        """(rate_rps, attainment) per model as of the last tick."""
        with self._lock:
            return {k: (max(0.0, v.rate_rps), v.attainment) for k, v in self._models.items()}


class Controller:
    """See the module docstring. ``step()`` is one reconcile pass; ``start()`` runs the loop."""

    def __init__(
        self,
        planner: Planner,
        cfg: ControllerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        meter: LoadMeter | None = None,
    ) -> None:
        self.planner = planner
        self.cfg = cfg
        self.clock = clock
        self.meter = meter or LoadMeter(cfg.rate_halflife_s, clock)
        self.out_since: dict[str, float] = {}
        self.replans = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_step: float | None = None
        self.state = "idle"  # idle | holding | replanning | error
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_replan: Callable[[str], None] | None = None
        self.on_error: Callable[[], None] | None = None

    # ------------------------------------------------------------------ one pass
    def _band(self, planned: float) -> tuple[float, float]:
        h = self.cfg.hysteresis
        return planned / (1.0 + h), planned * (1.0 + h)

    def step(self) -> bool:
        """One pass; True when it re-planned. Never raises."""
        try:
            return self._step()
        except Exception as exc:  # the loop survives every exception, and says so
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.state = "error"
            log.exception("controller step failed")
            if self.on_error is not None:
                self.on_error()
            try:
                self.planner.log_event("controller_error", self.last_error)
            except Exception:
                log.exception("could not record the controller error")
            return False
        finally:
            self.last_step = self.clock()

    def _step(self) -> bool:
        now = self.clock()
        planned = self.planner.planned_rates()
        loads = self.meter.tick(planned)
        reasons: dict[str, str] = {}
        by_rate: set[str] = set()
        for name, rate in planned.items():
            m = loads[name]
            lo, hi = self._band(rate)
            why = None
            if m.rate_rps > hi or (m.rate_rps < lo and rate > MIN_RATE_RPS):
                why = f"rate {m.rate_rps:.1f} rps outside [{lo:.1f}, {hi:.1f}]"
                by_rate.add(name)
            elif m.weight >= MIN_SAMPLES and m.attainment < self.cfg.min_attainment:
                why = f"SLO attainment {m.attainment:.3f} < {self.cfg.min_attainment:g}"
            if why is None:
                self.out_since.pop(name, None)
            else:
                self.out_since.setdefault(name, now)
                reasons[name] = why
        for name in list(self.out_since):
            if name not in planned:
                del self.out_since[name]
        due = {n: r for n, r in reasons.items() if now - self.out_since[n] >= self.cfg.hold_s}
        if not due:
            self.state = "holding" if reasons else "idle"
            return False
        rates = dict(planned)
        for name in due:
            if name in by_rate:
                measured = loads[name].rate_rps
                if math.isfinite(measured):
                    rates[name] = max(MIN_RATE_RPS, measured)
            else:  # missing its SLO at the planned rate: ask for more room
                rates[name] = planned[name] * (1.0 + self.cfg.hysteresis)
        reason = "; ".join(f"{n}: {w}" for n, w in sorted(due.items()))
        self.state = "replanning"
        self.out_since.clear()
        self.planner.replan(rates, reason=f"controller: {reason}")
        self.replans += 1
        self.state = "idle"
        if self.on_replan is not None:
            self.on_replan(reason)
        return True

    # ------------------------------------------------------------------ loop
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="stgs-controller", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.interval_s):
            self.step()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def status(self) -> dict[str, Any]:
        snap = self.meter.snapshot()
        return {
            "state": self.state,
            "replans": self.replans,
            "errors": self.errors,
            "last_error": self.last_error,
            "holding": sorted(self.out_since),
            "models": {
                k: {"measured_rate_rps": round(r, 3), "slo_attainment": round(a, 4)}
                for k, (r, a) in sorted(snap.items())
            },
        }
