"""The reconcile loop: measure each model's load, re-plan when it moves, apply, never die.

Every ``interval_s`` :meth:`Controller.step` folds the requests answered since the last step
into the EWMAs of each model's rate and SLO attainment (:class:`LoadMeter`) and asks
:class:`partitioner.control.ReplanRules` whether to re-plan and with which rates: a model
whose measured rate leaves ``[planned / (1 + h), planned * (1 + h)]`` or whose attainment falls
below ``min_attainment`` for ``hold_s`` triggers a re-plan with the measured rates (at least
``MIN_RATE_RPS``; ``(1 + h)`` times the planned rate for an SLO miss). Those rules live in
``partitioner/control.py`` because the simulator runs the same ones on virtual time. The policy
replans incrementally from the current plan and the service applies it through the runtime.

A step that raises is logged, recorded as an event and counted; the loop goes on (Ray Serve's
controller does the same): a re-plan over the planner's time budget is one such failure, tried
again after the back-off. Measured rates above the node's capacity bound are planned at the
bound (``clip``), where API calls are refused. The clock is injected: tests step the loop on
virtual time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from api.config import ControllerConfig
from partitioner.control import (
    MIN_RATE_RPS,
    MIN_SAMPLES,
    Counts,
    LoadEstimator,
    ModelLoad,
    ReplanRules,
)

log = logging.getLogger(__name__)

__all__ = ["MIN_RATE_RPS", "MIN_SAMPLES", "Controller", "LoadMeter", "Planner"]


class Planner(Protocol):
    """What the controller needs from the service (a fake in unit tests)."""

    def planned_rates(self) -> dict[str, float]: ...

    def replan(self, rates: dict[str, float], *, reason: str, clip: bool) -> Any:
        """Plan at ``rates`` and apply; ``clip``: rates above the node's capacity bound are
        planned at the bound (overload still gets the best plan), not refused."""
        ...

    def log_event(self, kind: str, message: str, **data: Any) -> None: ...


@dataclass
class LoadMeter:
    """Thread-safe counters of arrivals and SLO outcomes, folded into EWMAs by :meth:`tick`
    (:class:`partitioner.control.LoadEstimator`)."""

    halflife_s: float
    clock: Callable[[], float] = time.monotonic
    _counts: dict[str, Counts] = field(default_factory=dict)
    _estimator: LoadEstimator = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._estimator = LoadEstimator(self.halflife_s)

    def arrived(self, model: str, n: int = 1) -> None:
        with self._lock:
            c = self._counts.get(model)
            if c is None:
                c = self._counts[model] = Counts()
            c.arrived += n

    def finished(self, model: str, n: int, slo_met: bool) -> None:
        with self._lock:
            c = self._counts.get(model)
            if c is None:
                return
            c.done += n
            if slo_met:
                c.met += n

    def tick(self, planned: dict[str, float]) -> dict[str, ModelLoad]:
        """Fold the counts since the last tick; models not in ``planned`` are forgotten; a new
        model's rate starts at its planned rate (no spurious re-plan at start)."""
        now = self.clock()
        with self._lock:
            loads = self._estimator.fold(now, planned, self._counts)
            self._counts = {name: Counts() for name in planned}
            return loads

    def snapshot(self) -> dict[str, tuple[float, float]]:
        """(rate_rps, attainment) per model as of the last tick."""
        with self._lock:
            out = {
                k: (max(0.0, v.rate_rps), v.attainment) for k, v in self._estimator.loads.items()
            }
            for k in self._counts:  # arrived, not folded yet
                out.setdefault(k, (0.0, 1.0))
            return out


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
        self.rules = ReplanRules(cfg)
        self.replans = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_step: float | None = None
        self.state = "idle"  # idle | holding | replanning | error
        self.last_out: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_replan: Callable[[str], None] | None = None
        self.on_error: Callable[[], None] | None = None

    @property
    def out_since(self) -> dict[str, float]:
        """Since when (controller clock) each out-of-band model has been out of band."""
        return self.rules.out_since

    # ------------------------------------------------------------------ one pass
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
        d = self.rules.decide(now, planned, loads)
        self.last_out = dict(d.out)
        if d.rates is None:
            self.state = "holding" if d.out else "idle"
            return False
        reason = d.reason
        self.state = "replanning"
        rates = d.rates
        self.rules.attempt(
            now, lambda: self.planner.replan(rates, reason=f"controller: {reason}", clip=True)
        )
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
            "reasons": dict(self.last_out),  # why each model is out of band, last pass
            "failed_replans": self.rules.failures,  # since the last success (back-off)
            "backoff_s": round(max(0.0, self.rules.not_before - self.clock()), 1),
            "models": {
                k: {"measured_rate_rps": round(r, 3), "slo_attainment": round(a, 4)}
                for k, (r, a) in sorted(snap.items())
            },
        }
