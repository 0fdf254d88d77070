"""Planning: the plan for the live models, made in a planner process, applied through the
runtime; the one lock every plan decision and transition takes.

Plans are made by the configured policy, incrementally from the current plan (the policy
weighs reconfiguration cost), and applied through :meth:`stgs.runtime.Runtime.apply`. Every
plan is written to the store before a call returns.

Planning is bounded and off the lock: every plan runs in a planner process
(:mod:`api.planproc`) within ``planner.time_budget_s``, after a check that refuses rates
above the node's fluid bound in milliseconds; and it runs on a snapshot of the state without
:attr:`Planning.lock` (which register, delete and apply need), optimistically
(:meth:`Planning.optimistic`): the lock is taken to check that nothing changed meanwhile (a
generation counter) and to apply, else the plan is made again. A slow plan therefore never
makes a deletion wait.

Registration shares the lock, the generation and the set of models in admission control
(:meth:`Planning.begin_admission`): a model in admission is planned by its own registration
only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from api.config import DaemonConfig
from api.planproc import PlanJob, PlannerDiedError, PlannerPool
from api.roles.common import (
    LIVE,
    PENDING,
    READY,
    ConflictError,
    NotFoundError,
    Observer,
    RefusedError,
    UnavailableError,
)
from api.roles.node import Node
from api.roles.profiles import Profiles
from api.store import ModelRecord, Store
from partitioner import control
from partitioner.replan import diff
from stgs.errors import BeyondCapacityError, PlanningTimeoutError, TransitionError
from stgs.plan import Plan, empty_plan
from stgs.runtime import Runtime, TransitionRecord
from stgs.scenario import Scenario
from stgs.types import ModelSpec

OPTIMISTIC_TRIES = 3  # plans made off the lock before the last one is made holding it

T = TypeVar("T")
R = TypeVar("R")


class Planning:
    """See the module docstring."""

    def __init__(
        self,
        cfg: DaemonConfig,
        store: Store,
        runtime: Runtime,
        node: Node,
        profiles: Profiles,
        observer: Observer,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.runtime = runtime
        self.node = node
        self.profiles = profiles
        self.observer = observer
        self.lock = threading.RLock()  # one plan decision and transition at a time
        # Bumped (under the lock, after the change) by every change a plan depends on: the
        # live models, their rates, the current plan. A plan made off the lock is applied only
        # if the generation it started from is still the current one.
        self._generation = 0
        self._admitting: set[str] = set()  # in admission control: only their own plan has them
        self._pool = PlannerPool()
        self.last_error: str | None = None

    def start(self) -> None:
        """Start the planner processes."""
        self._pool.start()

    def close(self) -> None:
        self._pool.close()

    # ------------------------------------------------------------------ what plans see
    def current_plan(self) -> Plan | None:
        """The plan in force (None before the first apply)."""
        return self.runtime.current_plan

    def last_transition(self) -> TransitionRecord | None:
        return self.runtime.history[-1] if self.runtime.history else None

    def live(self) -> list[ModelRecord]:
        """The models that belong in every plan: live, and out of admission control (a model
        in admission is planned by its own registration only, so that other calls, a delete
        above all, never plan with its rate before it is admitted)."""
        admitting = set(self._admitting)
        return [r for r in self.store.models() if r.status in LIVE and r.name not in admitting]

    def planned_rates(self) -> dict[str, float]:
        """Each model's rate in the current plan (its registered rate when not planned yet):
        :func:`partitioner.control.planned_rates`, as the simulator reads it."""
        plan = self.runtime.current_plan
        asked = {rec.name: float(rec.spec["rate_rps"]) for rec in self.live()}
        return control.planned_rates(plan, asked)

    def _specs(self, rates: Mapping[str, float], extra: ModelRecord | None = None) -> list[Any]:
        recs = self.live()
        if extra is not None and all(r.name != extra.name for r in recs):
            recs.append(extra)
        return [
            ModelSpec(r.name, float(r.spec["slo_ms"]), float(rates.get(r.name, r.spec["rate_rps"])))
            for r in recs
        ]

    # ------------------------------------------------------------------ plans
    def plan(
        self,
        rates: Mapping[str, float] | None = None,
        *,
        policy: str | None = None,
        extra: ModelRecord | None = None,
        incremental: bool = True,
        clip: bool = False,
    ) -> Plan:
        """The plan ``policy`` chooses now for the live models at ``rates`` (pure: no apply),
        made in a planner process within ``planner.time_budget_s``.

        Raises RefusedError for rates above the node's fluid bound (``clip``: plan at the bound
        instead, for re-plans on measured load) and UnavailableError when the budget ran out.
        """
        pol = policy or self.cfg.planner.policy
        gpus = self.node.gpu_specs()
        models = self._specs(rates if rates is not None else self.planned_rates(), extra)
        if not models:
            return empty_plan(pol, [(g.sku, g.mig) for g in gpus])
        sc = Scenario(
            gpus=gpus,
            models=tuple(models),
            headroom=self.cfg.planner.headroom,
            options=self.cfg.planner.options(),
        )
        table = self.profiles.table()
        job = PlanJob(
            sc, pol, self.runtime.current_plan if incremental else None, hash(table.rows), clip=clip
        )
        result = "error"
        try:
            out = self._pool.plan(job, table, self.cfg.planner.time_budget_s)
            result = "ok"
            return out
        except BeyondCapacityError as exc:
            result = "refused"
            raise RefusedError(str(exc)) from exc
        except PlanningTimeoutError as exc:
            result = "timeout"
            self.store.log_event("plan_timeout", str(exc))
            raise UnavailableError(str(exc)) from exc
        except PlannerDiedError as exc:
            raise UnavailableError(str(exc)) from exc
        finally:
            if self.observer.on_plan is not None:
                self.observer.on_plan(result)

    def optimistic(self, decide: Callable[[], T], commit: Callable[[T], R]) -> R:
        """``commit(decide())`` where ``decide`` (planning) runs off the lock on a snapshot and
        ``commit`` under it, only when no change happened meanwhile (the generation), else
        ``decide`` runs again; the last try holds the lock throughout (bounded by the time
        budget), so that a stream of changes cannot starve the call."""
        for _ in range(OPTIMISTIC_TRIES - 1):
            gen = self._generation
            out = decide()
            with self.lock:
                if gen == self._generation:
                    return commit(out)
        with self.lock:
            return commit(decide())

    def changed(self) -> None:
        """A plan made before now is stale (call under :attr:`lock`, after the change)."""
        self._generation += 1

    def begin_admission(self, name: str) -> None:
        """``name`` enters admission control: out of every plan but its own (under the lock)."""
        with self.lock:
            self._admitting.add(name)
            self.changed()

    def end_admission(self, name: str) -> None:
        """``name`` leaves admission control: every plan keeps it from now on (under the lock;
        right after its apply, in the same lock hold, so that no plan made without it can
        commit and drop it)."""
        with self.lock:
            self._admitting.discard(name)
            self.changed()

    def preview(
        self, rates: Mapping[str, float] | None = None, policy: str | None = None
    ) -> tuple[Plan, dict[str, Any]]:
        plan = self.plan(self._merged_rates(rates), policy=policy)
        cur = self.runtime.current_plan or empty_plan(plan.policy, [])
        return plan, diff(cur, plan).to_dict()

    def _merged_rates(self, rates: Mapping[str, float] | None) -> dict[str, float]:
        out = self.planned_rates()
        for name, r in (rates or {}).items():
            if name not in out:
                raise NotFoundError(f"no live model {name!r} to set a rate for")
            out[name] = float(r)
        return out

    # ------------------------------------------------------------------ apply
    def apply(self, plan: Plan, reason: str) -> Plan:
        """Apply ``plan`` through the runtime; stored first, then marked by its outcome."""
        with self.lock:
            self.store.save_plan(plan, "current", "applying", reason)
            t0 = time.perf_counter()
            try:
                rec = self.runtime.apply(plan)
            except TransitionError as exc:
                self.changed()
                secs = time.perf_counter() - t0
                self.store.save_plan(plan, "tried", "failed", exc.reason)
                good = self.runtime.last_good
                if good is not None:
                    self.store.save_plan(good, "current", "ready", "rolled back")
                self.store.log_event("apply_failed", str(exc), reason=reason)
                self._reconfig(False, secs)
                self.last_error = str(exc)
                raise UnavailableError(str(exc)) from exc
            secs = time.perf_counter() - t0
            self.changed()
            self.store.save_plan(plan, "current", "ready", reason)
            self.store.save_plan(plan, "last_good", "ready", reason)
            self.store.prune_plans()
            served = {m.name for _, p in plan.partitions() for m in p.models}
            for r in self.store.models():
                if r.name in served and r.status != READY:
                    self.store.set_model_status(r.name, READY, "serving")
                elif r.status == READY and r.name not in served:
                    self.store.set_model_status(r.name, PENDING, "not in the current plan")
            self.store.log_event(
                "apply",
                f"applied a {plan.policy} plan ({reason}): {len(rec.started)} started, "
                f"{len(rec.stopped)} stopped, {len(rec.kept)} kept in {secs:.2f} s",
                reason=reason,
                changes=plan.info.get("changes"),
            )
            self._reconfig(True, secs)
            return plan

    def _reconfig(self, ok: bool, secs: float) -> None:
        if self.observer.on_reconfig is not None:
            self.observer.on_reconfig(ok, secs)

    def replan(
        self,
        rates: Mapping[str, float] | None = None,
        *,
        reason: str,
        policy: str | None = None,
        clip: bool = False,
    ) -> Plan:
        """Plan (off the lock, see :meth:`optimistic`) and apply. A plan that drops a live
        model entirely is not applied (:func:`partitioner.control.check_keeps_live`: the
        simulator's rule too; ConflictError). ``clip``: rates above the node's bound are planned
        at the bound instead of refused (the controller's measured load)."""

        def commit(plan: Plan) -> Plan:
            try:
                control.check_keeps_live(plan, self.planned_rates())
            except control.DropsLiveModelError as exc:
                raise ConflictError(str(exc)) from exc
            return self.apply(plan, reason)

        return self.optimistic(
            lambda: self.plan(self._merged_rates(rates), policy=policy, clip=clip), commit
        )
