"""The daemon's core, without HTTP: one facade over the service's roles.

The REST layer (:mod:`api.app`, :mod:`api.kserve`, :mod:`api.triton`), the gRPC server and the
controller (:mod:`api.controller`) call this one object; the HTTP layer imports nothing else of
the service (import-linter). Each job is a role of its own (:mod:`api.roles`), with its own
state, composed here:

* :class:`~api.roles.node.Node`: the GPUs as the planner sees them, the node view;
* :class:`~api.roles.profiles.Profiles`: profile tables, background profiling (the profiler's
  adapters: :mod:`profiler.adapters`);
* :class:`~api.roles.planning.Planning`: plans made off the lock in planner processes, apply,
  re-plan (the controller's glue is :mod:`partitioner.control`'s, the simulator's too); the one
  lock every plan decision and transition takes, which registration shares;
* :class:`~api.roles.registration.Registration`: registration, admission control, deletion;
* :class:`~api.roles.loading.Loading`: the model repository's load, unload and index;
* :class:`~api.roles.serving.Serving`: inference, counted against the SLO.

:meth:`Service.restore` (at start) is the one method that composes them: the registered models
serve again. Model statuses and errors: :mod:`api.roles.common` (exported here).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from api import repository
from api.config import DaemonConfig
from api.inference import ModelIO
from api.roles.common import (
    FAILED,
    LIVE,
    PENDING,
    PROFILING,
    READY,
    REFUSED,
    ConflictError,
    NotFoundError,
    Observer,
    RefusedError,
    UnavailableError,
)
from api.roles.loading import Loading
from api.roles.node import Node
from api.roles.planning import Planning
from api.roles.profiles import Profiles
from api.roles.registration import Registration
from api.roles.serving import Inflight, Serving
from api.store import Event, ModelRecord, Store
from profiler.adapters import ProfileFn
from stgs.backend.base import Backend
from stgs.errors import ConfigError, StgsError
from stgs.plan import Plan
from stgs.registry import ModelEntry
from stgs.runtime import Runtime, TransitionRecord

log = logging.getLogger(__name__)

__all__ = [
    "FAILED",
    "LIVE",
    "PENDING",
    "PROFILING",
    "READY",
    "REFUSED",
    "ConflictError",
    "NotFoundError",
    "Observer",
    "RefusedError",
    "Service",
    "UnavailableError",
]


class Service:
    """See the module docstring. ``background`` False: profile inline (tests);
    ``mig_allowed``: per GPU, whether the daemon may turn MIG on there (:class:`Node`)."""

    def __init__(
        self,
        cfg: DaemonConfig,
        store: Store,
        backend: Backend,
        runtime: Runtime,
        *,
        profiler: ProfileFn | None = None,
        observer: Observer | None = None,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
        mig_allowed: Sequence[bool] | None = None,
    ) -> None:
        self.store = store
        self.backend = backend
        self.runtime = runtime
        self.observer = observer or Observer()
        self.clock = clock
        self.restored = False
        repo = cfg.models.repository
        self.repository = (
            None
            if repo is None
            else repository.Repository(repo, int(cfg.models.max_file_mb * 2**20))
        )
        self.node = Node(cfg, backend, mig_allowed)
        self.profiles = Profiles(cfg, store, self.node, profiler, background=background)
        self.planning = Planning(cfg, store, runtime, self.node, self.profiles, self.observer)
        self.registration = Registration(
            cfg, store, runtime, self.node, self.planning, self.profiles, self.repository
        )
        self.loading = Loading(store, self.registration)
        self.serving = Serving(runtime, self.registration, self.observer)
        self._cfg = cfg

    # ------------------------------------------------------------------ shared settings
    @property
    def cfg(self) -> DaemonConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: DaemonConfig) -> None:
        """A new configuration for every role (the planner's budget, the policy, ...)."""
        self._cfg = cfg
        for role in (self.node, self.profiles, self.planning, self.registration):
            role.cfg = cfg

    @property
    def profiler(self) -> ProfileFn | None:
        return self.profiles.profiler

    @profiler.setter
    def profiler(self, fn: ProfileFn | None) -> None:
        self.profiles.profiler = fn

    @property
    def background(self) -> bool:
        """Whether profiling runs in background threads (False: inline, tests)."""
        return self.profiles.background

    @background.setter
    def background(self, on: bool) -> None:
        self.profiles.background = on

    @property
    def last_error(self) -> str | None:
        """The last failed apply or restore (``GET /v1/status``)."""
        return self.planning.last_error

    @last_error.setter
    def last_error(self, why: str | None) -> None:
        self.planning.last_error = why

    @property
    def inflight(self) -> Inflight:
        return self.serving.inflight

    def log_event(self, kind: str, message: str, **data: Any) -> None:
        self.store.log_event(kind, message, **data)

    # ------------------------------------------------------------------ read views
    def current_plan(self) -> Plan | None:
        """The plan in force (None before the first apply)."""
        return self.planning.current_plan()

    def last_transition(self) -> TransitionRecord | None:
        return self.planning.last_transition()

    def partitions(self) -> list[dict[str, Any]]:
        """Every partition the runtime holds and its state (:meth:`Runtime.describe`)."""
        return self.serving.partitions()

    def node_view(self, kind: str) -> dict[str, Any]:
        """``GET /v1/gpus``: the backend's GPUs (``kind``: which backend), their MIG devices
        and partitions, the MPS daemons; a failing read is reported, not raised."""
        return self.node.view(kind, self.partitions())

    def events(self, limit: int = 100, kind: str | None = None) -> list[Event]:
        return self.store.events(limit=limit, kind=kind)

    def state_schema(self) -> int:
        """The state database's schema version (after the migrations at start)."""
        return self.store.schema_version

    def record(self, name: str) -> ModelRecord | None:
        """The registration of ``name`` as stored now (None when there is none)."""
        return self.registration.record(name)

    def batch_totals(self) -> dict[str, tuple[int, int]]:
        """Per model: batches its current workers ran and their run time (ns)."""
        return self.serving.batch_totals()

    def models(self) -> list[ModelRecord]:
        return self.registration.models()

    def get(self, name: str) -> ModelRecord:
        """The registration of ``name``; NotFoundError when there is none."""
        return self.registration.get(name)

    def entry(self, rec: ModelRecord) -> ModelEntry:
        """The registry entry of a registered model (cached)."""
        return self.registration.entry(rec)

    # ------------------------------------------------------------------ planning
    def planned_rates(self) -> dict[str, float]:
        """Each live model's rate in the current plan (the controller's reference)."""
        return self.planning.planned_rates()

    def preview(
        self, rates: Mapping[str, float] | None = None, policy: str | None = None
    ) -> tuple[Plan, dict[str, Any]]:
        """The plan ``policy`` would make at ``rates`` and its changes (nothing applied)."""
        return self.planning.preview(rates, policy)

    def replan(
        self,
        rates: Mapping[str, float] | None = None,
        *,
        reason: str,
        policy: str | None = None,
        clip: bool = False,
    ) -> Plan:
        """Plan and apply (:meth:`Planning.replan`)."""
        return self.planning.replan(rates, reason=reason, policy=policy, clip=clip)

    # ------------------------------------------------------------------ registration
    def registered_as(self, spec: Mapping[str, Any]) -> ModelRecord | None:
        return self.registration.registered_as(spec)

    def register(self, spec: Mapping[str, Any]) -> tuple[ModelRecord, bool]:
        """Register a model (:meth:`Registration.register`): (record, done)."""
        return self.registration.register(spec)

    def delete(self, name: str) -> None:
        self.registration.delete(name)

    def repository_spec(
        self, name: str, slo_ms: float | None = None, rate_rps: float | None = None
    ) -> dict[str, Any]:
        return self.loading.repository_spec(name, slo_ms, rate_rps)

    def load(
        self, name: str, slo_ms: float | None = None, rate_rps: float | None = None
    ) -> ModelRecord:
        """Triton's load (:meth:`Loading.load`)."""
        return self.loading.load(name, slo_ms, rate_rps)

    def unload(self, name: str) -> None:
        """Triton's unload (:meth:`Loading.unload`)."""
        self.loading.unload(name)

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        return self.loading.repository_index(ready_only)

    def wait_background(self, timeout_s: float = 60.0) -> None:
        """Join the profiling threads (tests, shutdown)."""
        self.profiles.wait(timeout_s)

    # ------------------------------------------------------------------ serving
    def model_ready(self, name: str) -> bool:
        return self.serving.model_ready(name)

    def model_io(self, model: str, version: str = "") -> ModelIO:
        """(InferenceBackend) the registered model's tensors; InferError(404) when unknown."""
        return self.serving.model_io(model, version)

    async def infer_arrays(
        self, model: str, arrays: tuple[np.ndarray, ...], arrival_ns: int | None
    ) -> tuple[np.ndarray, ...]:
        """(InferenceBackend) the batch through the model, one request per row."""
        return await self.serving.infer_arrays(model, arrays, arrival_ns)

    def infer(self, name: str, samples: list[Any]) -> list[Any]:
        """Blocking inference for callers without an event loop (tests, scripts)."""
        return self.serving.infer(name, samples)

    async def infer_async(
        self, name: str, samples: list[Any], *, arrival_ns: int | None = None
    ) -> list[Any]:
        """Run ``samples`` through the model (:meth:`Serving.infer_async`)."""
        return await self.serving.infer_async(name, samples, arrival_ns=arrival_ns)

    # ------------------------------------------------------------------ restart
    def restore(self) -> None:
        """At start: the registered models serve again (the last good plan, else a new one)."""
        planning = self.planning
        planning.start()
        models = self.store.models()
        for r in models:
            self.runtime.slos[r.name] = float(r.spec["slo_ms"])
            try:
                self.registration.entry(r)  # model files: the workers need their entries
            except ConfigError as exc:  # the file went away or changed: that model fails
                log.warning("model %s: %s", r.name, exc)
                if r.status in LIVE or r.status == PROFILING:
                    self.store.set_model_status(r.name, FAILED, str(exc))
        models = self.store.models()
        found = self.node.observed_layout()
        self.store.log_event("start", f"daemon start; node: {found}", node=found)
        live = {r.name for r in models if r.status in LIVE}
        good = self.store.latest_plan("last_good")
        with planning.lock:
            if good is not None and live:
                names = {m.name for _, p in good.plan.partitions() for m in p.models}
                if names <= live:
                    try:
                        planning.apply(good.plan, "restart: last good plan")
                    except (UnavailableError, ConfigError) as exc:
                        log.warning("last good plan did not apply: %s", exc)
            cur = self.runtime.current_plan
            if live and (cur is None or any(cur.served_rate(n) <= 0 for n in live)):
                try:
                    planning.replan(reason="restart: rebuild")
                except StgsError as exc:
                    log.warning("rebuild at start failed: %s", exc)
                    self.last_error = str(exc)
                    self.store.log_event("restore_failed", str(exc))
        for r in models:
            if r.status == PROFILING:
                self.registration.start_profiling(r.name)
        self.loading.register_repository()
        self.restored = True

    def close(self) -> None:
        self.wait_background(1.0)
        self.planning.close()
