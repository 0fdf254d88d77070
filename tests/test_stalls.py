"""The daemon's stall probe: a thread that sleeps and measures how late it wakes."""

from __future__ import annotations

import random
import time

import pytest

from api.metrics import Metrics
from stgs.runtime.stalls import StallProbe


def test_probe_sees_a_stall_of_its_process() -> None:
    seen: list[float] = []
    probe = StallProbe(seen.append, interval_s=0.005)
    probe.start()
    time.sleep(0.1)
    data = [random.random() for _ in range(1_500_000)]
    t = time.monotonic()
    sorted(data)  # list.sort holds the GIL throughout: the probe cannot wake meanwhile
    held = time.monotonic() - t
    time.sleep(0.1)
    probe.stop()
    assert held > 0.03, "the sort was too quick to stall anything on this machine"
    assert len(seen) >= 10
    assert max(seen) > 0.5 * held and probe.worst_s == max(seen)
    assert sorted(seen)[len(seen) // 2] < 0.5 * held  # most wake-ups are not late


def test_stall_histogram_in_the_metrics() -> None:
    m = Metrics()
    probe = StallProbe(m.stall.observe, interval_s=0.002)
    probe.start()
    time.sleep(0.05)
    probe.stop()
    text = m.render().decode()
    assert "stgs_process_stall_seconds_bucket" in text
    count = [ln for ln in text.splitlines() if ln.startswith("stgs_process_stall_seconds_count")]
    assert count and float(count[0].split()[-1]) >= 5


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        StallProbe(lambda _x: None, interval_s=0)
