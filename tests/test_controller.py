"""The reconcile loop on virtual time, with a fake planner (no runtime, no workers)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from api.config import ControllerConfig
from api.controller import Controller
from partitioner.control import MAX_BACKOFF


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakePlanner:
    def __init__(self, rates: dict[str, float]) -> None:
        self.rates = dict(rates)
        self.calls: list[tuple[dict[str, float], str]] = []
        self.events: list[tuple[str, str]] = []
        self.fail = 0

    def planned_rates(self) -> dict[str, float]:
        return dict(self.rates)

    def replan(self, rates: dict[str, float], *, reason: str, clip: bool = False) -> Any:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("backend exploded")
        self.calls.append((dict(rates), reason))
        self.rates = dict(rates)

    def log_event(self, kind: str, message: str, **data: Any) -> None:
        self.events.append((kind, message))


CFG = ControllerConfig(
    interval_s=1.0, rate_halflife_s=2.0, hysteresis=0.2, hold_s=5.0, min_attainment=0.9
)


def drive(ctl: Controller, clock: Clock, model: str, rps: float, seconds: int) -> int:
    """``seconds`` steps of 1 s, ``rps`` requests each (all within SLO); returns re-plans."""
    n = 0
    for _ in range(seconds):
        ctl.meter.arrived(model, int(rps))
        ctl.meter.finished(model, int(rps), True)
        clock.t += 1.0
        n += ctl.step()
    return n


def test_steady_load_in_band_never_replans() -> None:
    clock = Clock()
    fp = FakePlanner({"a": 100.0})
    ctl = Controller(fp, CFG, clock=clock)
    assert drive(ctl, clock, "a", 110, 60) == 0  # +10% is inside the 20% band
    assert fp.calls == [] and ctl.state == "idle"
    assert ctl.meter.snapshot()["a"][0] == pytest.approx(110, rel=0.01)


def test_sustained_rise_replans_after_hold_at_measured_rate() -> None:
    clock = Clock()
    fp = FakePlanner({"a": 100.0, "b": 50.0})
    ctl = Controller(fp, CFG, clock=clock)
    drive(ctl, clock, "b", 50, 1)
    for _ in range(30):
        ctl.meter.arrived("a", 300)
        ctl.meter.arrived("b", 50)
        clock.t += 1.0
        if ctl.step():
            break
    assert len(fp.calls) == 1
    rates, reason = fp.calls[0]
    assert "a: rate" in reason
    assert 240 < rates["a"] <= 300  # the EWMA, close to the new rate
    assert rates["b"] == 50.0  # untouched: it stayed in band
    # it held: out of band from ~2 s on, acted only >= hold_s later
    assert ctl.replans == 1 and ctl.state == "idle"


def test_short_burst_is_ignored() -> None:
    clock = Clock()
    fp = FakePlanner({"a": 100.0})
    ctl = Controller(fp, CFG, clock=clock)
    drive(ctl, clock, "a", 100, 2)
    assert drive(ctl, clock, "a", 250, 1) == 0  # the EWMA leaves the band for ~3 s < hold_s
    assert ctl.state == "holding"
    assert drive(ctl, clock, "a", 100, 30) == 0
    assert fp.calls == [] and ctl.out_since == {}


def test_idle_model_shrinks_to_the_floor() -> None:
    clock = Clock()
    fp = FakePlanner({"a": 100.0})
    ctl = Controller(fp, CFG, clock=clock)
    n = drive(ctl, clock, "a", 0, 60)
    assert 1 <= n <= 4  # each re-plan at the decaying EWMA, each after hold_s
    assert fp.rates["a"] == pytest.approx(1.0)  # MIN_RATE_RPS: it keeps a partition
    assert drive(ctl, clock, "a", 0, 30) == 0  # and stays there


def test_low_attainment_asks_for_more_room() -> None:
    clock = Clock()
    fp = FakePlanner({"a": 100.0})
    ctl = Controller(fp, CFG, clock=clock)
    for _ in range(20):
        ctl.meter.arrived("a", 100)
        ctl.meter.finished("a", 100, False)  # every request misses its SLO
        clock.t += 1.0
        if ctl.step():
            break
    assert len(fp.calls) == 1
    rates, reason = fp.calls[0]
    assert "attainment" in reason
    assert rates["a"] == pytest.approx(120.0)


def test_persistent_slo_misses_raise_the_room_once() -> None:
    """Every request misses at a steady 100 rps: one re-plan for 120 (1 + h), then none: room
    is capped at (1 + h) x the measured rate, so the controller neither escalates nor
    oscillates with the rate band; the model stays listed as out of band."""
    clock = Clock()
    fp = FakePlanner({"a": 100.0})
    ctl = Controller(fp, CFG, clock=clock)
    for _ in range(90):
        ctl.meter.arrived("a", 100)
        ctl.meter.finished("a", 100, False)
        clock.t += 1.0
        ctl.step()
    assert [r["a"] for r, _ in fp.calls] == [pytest.approx(120.0)]
    assert ctl.state == "holding" and "a" in ctl.status()["holding"]
    # the load then grows to 130 rps: the room follows the measured rate up to 1.2 x 130 (raises
    # of more than h / 4 only), then stops again
    for _ in range(60):
        ctl.meter.arrived("a", 130)
        ctl.meter.finished("a", 130, False)
        clock.t += 1.0
        ctl.step()
    asked = [r["a"] for r, _ in fp.calls[1:]]
    assert asked == sorted(asked) and 156.0 / 1.05 <= asked[-1] <= 156.0 * 1.0001
    n = len(fp.calls)
    for _ in range(60):
        ctl.meter.arrived("a", 130)
        ctl.meter.finished("a", 130, False)
        clock.t += 1.0
        ctl.step()
    assert len(fp.calls) == n


def test_loop_survives_exceptions_and_records_them() -> None:
    clock = Clock()
    fp = FakePlanner({"a": 10.0})
    fp.fail = 2
    ctl = Controller(fp, CFG, clock=clock)
    errors = []
    ctl.on_error = lambda: errors.append(1)
    replans = 0
    for _ in range(40):
        ctl.meter.arrived("a", 100)
        clock.t += 1.0
        replans += ctl.step()  # never raises
    assert ctl.errors == 2 and len(errors) == 2
    assert [k for k, _ in fp.events] == ["controller_error", "controller_error"]
    assert "backend exploded" in (ctl.last_error or "")
    assert replans == 1 and fp.rates["a"] > 50  # and then it went on and re-planned


def test_failed_replans_back_off() -> None:
    """A re-plan that keeps failing (e.g. the policy's plan drops a model, which the service
    refuses) is tried again after hold_s x 2, x 4, ... (at most MAX_BACKOFF x hold_s), not
    every hold_s; the first success resets the back-off."""
    clock = Clock()
    fp = FakePlanner({"a": 10.0})
    fp.fail = 10**6
    ctl = Controller(fp, CFG, clock=clock)
    attempts: list[float] = []
    ctl.on_error = lambda: attempts.append(clock.t)
    for _ in range(300):
        ctl.meter.arrived("a", 100)  # 10x the planned rate: out of band throughout
        clock.t += 1.0
        ctl.step()
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert 4 <= len(attempts) <= 7  # every hold_s (5 s) would be ~55
    assert gaps == sorted(gaps) and gaps[0] >= 2 * CFG.hold_s and gaps[-1] >= 8 * CFG.hold_s
    assert "backing off" in ctl.status()["reasons"]["a"]
    fp.fail = 0
    for _ in range(int(MAX_BACKOFF * CFG.hold_s) + 10):
        ctl.meter.arrived("a", 100)
        clock.t += 1.0
        ctl.step()
    assert len(fp.calls) == 1 and fp.rates["a"] > 50  # it got through, once
    assert ctl.rules.failures == 0


def test_planner_failure_to_read_is_survived_too() -> None:
    class Broken(FakePlanner):
        def planned_rates(self) -> dict[str, float]:
            raise OSError("database is locked")

    ctl = Controller(Broken({}), CFG, clock=Clock())
    assert ctl.step() is False and ctl.errors == 1 and ctl.state == "error"


def test_models_removed_from_the_plan_are_forgotten() -> None:
    clock = Clock()
    fp = FakePlanner({"a": 100.0, "b": 100.0})
    ctl = Controller(fp, CFG, clock=clock)
    drive(ctl, clock, "a", 400, 2)
    assert "a" in ctl.out_since
    fp.rates = {"b": 100.0}
    clock.t += 1
    ctl.step()
    assert "a" not in ctl.out_since and "a" not in ctl.meter.snapshot()


def test_threaded_loop_starts_and_stops() -> None:
    fp = FakePlanner({"a": 1.0})
    ctl = Controller(fp, ControllerConfig(interval_s=0.01))
    ctl.start()
    import time

    end = time.monotonic() + 5
    while ctl.last_step is None and time.monotonic() < end:
        time.sleep(0.01)
    ctl.stop()
    assert ctl.last_step is not None and ctl.errors == 0
