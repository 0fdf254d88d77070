"""Profile tables and background profiling.

The planner's table is the shipped profiles (``stgs/data``), merged with
``planner.profiles`` and with every row measured on this node (stored). A model without a
profile on the node's GPU types is measured in the background by the configured
:data:`profiler.adapters.ProfileFn` (one SKU after another), then handed on (admission).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from api.config import DaemonConfig
from api.roles.common import FAILED, PROFILING
from api.roles.node import Node
from api.store import ModelRecord, Store
from profiler.adapters import ProfileFn
from stgs.errors import ProfileError
from stgs.profiles import ProfileTable, default_profiles_path, read_profiles
from stgs.registry import ModelEntry

log = logging.getLogger(__name__)


class Profiles:
    """The tables (:meth:`table`, cached base) and the profiling threads. ``background``
    False: profile inline, in the caller's thread (tests)."""

    def __init__(
        self,
        cfg: DaemonConfig,
        store: Store,
        node: Node,
        profiler: ProfileFn | None = None,
        *,
        background: bool = True,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.node = node
        self.profiler = profiler
        self.background = background
        self._base_table: ProfileTable | None = None
        self._threads: list[threading.Thread] = []
        # One model profiles at a time: runs side by side on one GPU (or the simulated node's
        # CPU) would time each other, and each GPU run starts workers in every partition.
        self._profiling = threading.Lock()

    def base_table(self) -> ProfileTable:
        if self._base_table is None:
            t = read_profiles(default_profiles_path())
            if self.cfg.planner.profiles is not None:
                t = t.merge(read_profiles(self.cfg.planner.profiles))
            self._base_table = t
        return self._base_table

    def table(self) -> ProfileTable:
        return self.base_table().merge(self.store.profiles())

    def has_profile(self, model: str) -> bool:
        return any(
            self.base_table().has(sku, model) or self.store.has_profile(sku, model)
            for sku in self.node.skus()
        )

    def start(
        self,
        name: str,
        entry_of: Callable[[ModelRecord], ModelEntry],
        then: Callable[[str], None],
    ) -> None:
        """Profile ``name`` (in a thread unless ``background`` is off), then ``then(name)``
        (admission) when it is still registered; ``entry_of``: its registry entry."""
        if not self.background:
            self._profile(name, entry_of, then)
            return
        t = threading.Thread(
            target=self._profile, args=(name, entry_of, then), name=f"profile-{name}"
        )
        t.daemon = True
        self._threads.append(t)
        t.start()

    def _profile(
        self,
        name: str,
        entry_of: Callable[[ModelRecord], ModelEntry],
        then: Callable[[str], None],
    ) -> None:
        """Background: profile ``name`` on every SKU of the node, then hand it on."""
        assert self.profiler is not None
        try:
            with self._profiling:  # waits here (detail "queued") while another model profiles
                for sku in self.node.skus():
                    if self.store.get_model(name) is None:
                        return  # deleted meanwhile
                    self.store.set_model_status(name, PROFILING, f"measuring on {sku}")
                    rec = self.store.get_model(name)
                    if rec is None:
                        return
                    t0 = time.monotonic()
                    rows = self.profiler(entry_of(rec), sku)
                    secs = round(time.monotonic() - t0, 2)
                    if not rows:
                        raise ProfileError(f"profiling {name} on {sku} measured nothing")
                    self.store.put_profiles(rows)
                    self.store.log_event(
                        "profiled",
                        f"{name} on {sku}: {len(rows)} rows in {secs:g} s",
                        model=name,
                        sku=sku,
                        rows=len(rows),
                        seconds=secs,
                    )
        except Exception as exc:  # a background task: record every failure, never raise
            if self.store.get_model(name) is not None:
                self.store.set_model_status(name, FAILED, f"profiling failed: {exc}")
            self.store.log_event("profile_failed", f"{name}: {exc}", model=name)
            return
        if self.store.get_model(name) is None:
            return
        self.store.set_model_status(name, PROFILING, "profiled; admission control")
        then(name)

    def wait(self, timeout_s: float = 60.0) -> None:
        """Join the profiling threads (tests, shutdown)."""
        end = time.monotonic() + timeout_s
        for t in list(self._threads):
            t.join(max(0.0, end - time.monotonic()))
