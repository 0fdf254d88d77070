"""A stall probe for a serving process: how late a thread that only sleeps wakes up.

A serving process that stops for tens of milliseconds misses its SLOs with no sign on the GPU.
On some lent VMs (docs/serving-gpu.md, session 4) the process that routes requests stalled
for more than 15 ms about once a second while the host's CPU counters showed nothing; only a
thread that sleeps and measures how late it wakes saw it. The daemon runs one such thread and
exports the lateness as ``stgs_process_stall_seconds`` (a histogram:
``rate(..._bucket{le="0.01"})`` against ``rate(..._count)`` is the share of wake-ups more than
10 ms late), so an operator sees a stalling machine in the same dashboard as the SLO misses.
``benchmarks/serve_gpu.py`` runs one with a 1 ms interval beside its load generator (its
``client stalls`` line).

The probe sleeps ``interval_s`` (10 ms) at a time: 100 wake-ups a second, a few microseconds
of CPU each, and few GIL hand-offs (a 1 ms probe would add its own).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["StallProbe"]


class StallProbe:
    """Sleep ``interval_s``, then ``observe(late)``: how much later than that the thread woke
    (seconds; the wake-up is ``clock()`` - ``late`` - ``interval_s`` after the sleep began)."""

    def __init__(
        self,
        observe: Callable[[float], None],
        interval_s: float = 0.010,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.observe = observe
        self.interval_s = interval_s
        self.clock = clock
        self.worst_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="stgs-stall-probe", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _loop(self) -> None:
        clock, interval = self.clock, self.interval_s
        while not self._stop.is_set():
            t = clock()
            time.sleep(interval)
            late = max(0.0, clock() - t - interval)
            self.worst_s = max(self.worst_s, late)
            self.observe(late)
