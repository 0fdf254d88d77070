"""The daemon's core, without HTTP: registered models, profiling, admission, plans, inference.

The REST layer (:mod:`api.app`, :mod:`api.kserve`) and the controller (:mod:`api.controller`)
call this one object; it is the one place that decides a plan and hands it to the runtime.
Every registration and every plan is written to the store before a call returns.

Model statuses (``GET /v1/models/{name}``):

* ``profiling``: no profile on this node's GPU type yet; measuring in the background;
* ``pending``: profiled, admitted, waiting for its plan to be applied;
* ``ready``: served by the current plan;
* ``refused``: admission control said no (the planner's reason is the detail);
* ``failed``: profiling or applying its plan failed (the detail says why).

Plans are made by the configured policy, incrementally from the current plan (the policy
weighs reconfiguration cost), and applied through :meth:`stgs.runtime.Runtime.apply`.

Planning is bounded and off the lock: every plan runs in a planner process
(:mod:`api.planproc`) within ``planner.time_budget_s``, after a check that refuses rates
above the node's fluid bound in milliseconds; and it runs on a snapshot of the state without
``_lock`` (which register, delete and apply need), optimistically: the lock is taken to check
that nothing changed meanwhile (a generation counter) and to apply, else the plan is made
again. A slow plan therefore never makes a deletion wait.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from api import inference, repository
from api.config import DaemonConfig
from api.inference import ModelIO
from api.planproc import PlanJob, PlannerDiedError, PlannerPool
from api.store import Event, ModelRecord, Store
from partitioner.replan import diff
from stgs.backend.base import Backend
from stgs.catalog import get_sku
from stgs.errors import (
    BeyondCapacityError,
    ConfigError,
    DeadlineExceededError,
    NoWorkerError,
    PlanningTimeoutError,
    ProfileError,
    StgsError,
    TransitionError,
)
from stgs.plan import Plan, empty_plan
from stgs.profiles import ProfileRow, ProfileTable, default_profiles_path, read_profiles
from stgs.registry import (
    FILE_FORMATS,
    ModelEntry,
    TensorSpec,
    file_entry,
    model_entry,
    resolve_model_file,
)
from stgs.runtime import PartitionState, Runtime, TransitionRecord
from stgs.scenario import Scenario
from stgs.types import GpuSpec, ModelSpec

log = logging.getLogger(__name__)

PROFILING, PENDING, READY, REFUSED, FAILED = "profiling", "pending", "ready", "refused", "failed"
LIVE = (PENDING, READY)  # statuses of models that belong in the plan
MODEL_FILE_SUFFIXES = tuple(FILE_FORMATS)
OPTIMISTIC_TRIES = 3  # plans made off the lock before the last one is made holding it

T = TypeVar("T")
R = TypeVar("R")

ProfileFn = Callable[[ModelEntry, str], list[ProfileRow]]
"""(the model's registry entry, GPU SKU) -> measured profile rows of that model on that SKU."""

__all__ = ["ProfileFn", "Service", "cpu_profiler", "gpu_profiler", "resolve_model_file"]


class NotFoundError(StgsError):
    """No such model (HTTP 404)."""


class ConflictError(StgsError):
    """The request conflicts with the daemon's state (HTTP 409)."""


class RefusedError(StgsError):
    """Admission control refused a model (HTTP 422); the planner's reason is the message."""


class UnavailableError(StgsError):
    """The daemon cannot do it now: the plan could not be applied or made in time (HTTP 503)."""


def _tensor(t: Mapping[str, Any], default: str = "input") -> TensorSpec:
    """A registration's tensor (``TensorSpec`` of :mod:`api.app`: KServe datatype names)."""
    dtype = inference.DTYPES.get(str(t.get("datatype", "FP32")), "")
    return TensorSpec(str(t.get("name", default)), dtype, tuple(int(d) for d in t["shape"]))


@dataclass
class Observer:
    """Hooks for metrics and the controller's meters; every one optional."""

    on_request: Callable[[str, int, float, bool, str], None] | None = None
    on_reconfig: Callable[[bool, float], None] | None = None
    on_plan: Callable[[str], None] | None = None  # a plan's result: ok, timeout, refused, error


def clean_stale_profiling(work_dir: Path) -> list[str]:
    """Remove what profiling runs killed with the daemon left in ``work_dir``; their names.

    Call it at start, before anything profiles. The profilers write only files there (the GPU
    profiler's resumable CSVs, kept); every directory is a CPU profiling run's temporary one,
    which a daemon killed mid-run (SIGKILL, power loss) never removed.
    """
    if not work_dir.is_dir():
        return []
    stale = sorted(p for p in work_dir.iterdir() if p.is_dir() and not p.is_symlink())
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in stale]


def cpu_profiler(
    work_dir: Path,
    batches: Sequence[int] = (1, 2, 4, 8, 16),
    iters: int = 5,
) -> ProfileFn:
    """Profile on the CPU with the profiler's CPU mode (simulated node): the rows it measures
    stand in for the simulated GPU's whole-GPU rows (``full`` at the SKU's SM count); the
    latency functions scale them to smaller partitions."""

    def run(entry: ModelEntry, sku: str) -> list[ProfileRow]:
        from profiler.measure import TimingOptions
        from profiler.models import ModelSpec as ProfiledModel
        from profiler.run import ProfileConfig, run_profile

        model = entry.name

        work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            out = Path(tmp) / "profile.csv"
            cfg = ProfileConfig(
                models=(ProfiledModel.of(entry),),
                out=out,
                device="cpu",
                batches=tuple(batches),
                timing=TimingOptions(iters=iters, min_iters=min(3, iters), warmup=2),
                gpu_label=sku,
                quiet=True,
            )
            summary = run_profile(cfg)
            if summary.load_failures:
                raise ProfileError("; ".join(summary.load_failures.values()))
            if not out.is_file():
                raise ProfileError(f"profiling {model} measured nothing")
            sms = get_sku(sku).sm_count
            return [
                ProfileRow(sku, r.model, "full", sms, r.batch, r.latency_ms, r.memory_mib)
                for r in read_profiles(out)
            ]

    return run


def gpu_profiler(work_dir: Path, device: str = "0") -> ProfileFn:
    """Profile on a real GPU with the profiler's default grid (whole GPU, MPS shares)."""

    def run(entry: ModelEntry, sku: str) -> list[ProfileRow]:
        from profiler.models import ModelSpec as ProfiledModel
        from profiler.run import ProfileConfig, run_profile

        model = entry.name
        work_dir.mkdir(parents=True, exist_ok=True)
        out = work_dir / f"{model}.csv"  # resumable across restarts
        summary = run_profile(
            ProfileConfig(
                models=(ProfiledModel.of(entry),),
                out=out,
                device=device,
                gpu_label=sku,  # the rows are the planning SKU's, as the backend names it
                quiet=True,
            )
        )
        if summary.load_failures:
            raise ProfileError("; ".join(summary.load_failures.values()))
        return [r for r in read_profiles(out) if r.model == model]

    return run


@dataclass
class _Inflight:
    counts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, model: str, n: int) -> None:
        with self.lock:
            self.counts[model] = self.counts.get(model, 0) + n


class Service:
    """See the module docstring."""

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
        self.cfg = cfg
        self.store = store
        self.backend = backend
        self.runtime = runtime
        self.profiler = profiler
        self.observer = observer or Observer()
        self.clock = clock
        self.background = background  # False: profile inline (tests)
        self.mig_allowed = None if mig_allowed is None else list(mig_allowed)
        self._lock = threading.RLock()  # one plan decision and transition at a time
        # Bumped (under _lock, after the change) by every change a plan depends on: the live
        # models, their rates, the current plan. A plan made off the lock is applied only if
        # the generation it started from is still the current one.
        self._generation = 0
        self._admitting: set[str] = set()  # in admission control: only their own plan has them
        self._planner = PlannerPool()
        self._base_table: ProfileTable | None = None
        self._threads: list[threading.Thread] = []
        # One model profiles at a time: runs side by side on one GPU (or the simulated node's
        # CPU) would time each other, and each GPU run starts workers in every partition.
        self._profiling = threading.Lock()
        self.inflight = _Inflight()
        self.restored = False
        self.last_error: str | None = None
        self._entries: dict[str, tuple[tuple[str, str], ModelEntry]] = {}
        repo = cfg.models.repository
        self.repository = (
            None
            if repo is None
            else repository.Repository(repo, int(cfg.models.max_file_mb * 2**20))
        )

    def log_event(self, kind: str, message: str, **data: Any) -> None:
        self.store.log_event(kind, message, **data)

    # ------------------------------------------------------------------ node
    def gpu_specs(self) -> tuple[GpuSpec, ...]:
        out = []
        for info in self.backend.gpus():
            sku = self.backend.sku(info.index)
            if self.cfg.backend.allow_mig_changes:
                allowed = self.mig_allowed is None or (
                    info.index < len(self.mig_allowed) and self.mig_allowed[info.index]
                )
                mig = sku.supports_mig and allowed
            else:
                mig = info.mig_enabled
            out.append(GpuSpec(sku.name, mig))
        return tuple(out)

    def skus(self) -> list[str]:
        return sorted({g.sku for g in self.gpu_specs()})

    # ------------------------------------------------------------------ profiles
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
            for sku in self.skus()
        )

    # ------------------------------------------------------------------ planning
    def _live(self) -> list[ModelRecord]:
        """The models that belong in every plan: live, and out of admission control (a model
        in admission is planned by its own registration only, so that other calls, a delete
        above all, never plan with its rate before it is admitted)."""
        admitting = set(self._admitting)
        return [r for r in self.store.models() if r.status in LIVE and r.name not in admitting]

    def planned_rates(self) -> dict[str, float]:
        """Each model's rate in the current plan (its registered rate when not planned yet)."""
        plan = self.runtime.current_plan
        out = {}
        for rec in self._live():
            r = plan.served_rate(rec.name) if plan is not None else 0.0
            out[rec.name] = r if r > 0 else float(rec.spec["rate_rps"])
        return out

    def _specs(self, rates: Mapping[str, float], extra: ModelRecord | None = None) -> list[Any]:
        recs = self._live()
        if extra is not None and all(r.name != extra.name for r in recs):
            recs.append(extra)
        return [
            ModelSpec(r.name, float(r.spec["slo_ms"]), float(rates.get(r.name, r.spec["rate_rps"])))
            for r in recs
        ]

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
        gpus = self.gpu_specs()
        models = self._specs(rates if rates is not None else self.planned_rates(), extra)
        if not models:
            return empty_plan(pol, [(g.sku, g.mig) for g in gpus])
        sc = Scenario(
            gpus=gpus,
            models=tuple(models),
            headroom=self.cfg.planner.headroom,
            options=self.cfg.planner.options(),
        )
        table = self.table()
        job = PlanJob(
            sc, pol, self.runtime.current_plan if incremental else None, hash(table.rows), clip=clip
        )
        result = "error"
        try:
            out = self._planner.plan(job, table, self.cfg.planner.time_budget_s)
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

    def _optimistic(self, decide: Callable[[], T], commit: Callable[[T], R]) -> R:
        """``commit(decide())`` where ``decide`` (planning) runs off the lock on a snapshot and
        ``commit`` under it, only when no change happened meanwhile (the generation), else
        ``decide`` runs again; the last try holds the lock throughout (bounded by the time
        budget), so that a stream of changes cannot starve the call."""
        for _ in range(OPTIMISTIC_TRIES - 1):
            gen = self._generation
            out = decide()
            with self._lock:
                if gen == self._generation:
                    return commit(out)
        with self._lock:
            return commit(decide())

    def _changed(self) -> None:
        """A plan made before now is stale (call under ``_lock``, after the change)."""
        self._generation += 1

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

    def apply(self, plan: Plan, reason: str) -> Plan:
        """Apply ``plan`` through the runtime; stored first, then marked by its outcome."""
        with self._lock:
            self.store.save_plan(plan, "current", "applying", reason)
            t0 = time.perf_counter()
            try:
                rec = self.runtime.apply(plan)
            except TransitionError as exc:
                self._changed()
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
            self._changed()
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
        """Plan (off the lock, see ``_optimistic``) and apply. A plan that drops a live model
        entirely is not applied. ``clip``: rates above the node's bound are planned at the
        bound instead of refused (the controller's measured load)."""

        def commit(plan: Plan) -> Plan:
            planned = self.planned_rates()
            missing = [n for n in planned if plan.served_rate(n) <= 0 and planned[n] > 0]
            if missing:
                why = "; ".join(u.reason for u in plan.unserved) or "not placed"
                raise ConflictError(
                    f"the {plan.policy} plan would serve none of {', '.join(missing)}: {why}"
                )
            return self.apply(plan, reason)

        return self._optimistic(
            lambda: self.plan(self._merged_rates(rates), policy=policy, clip=clip), commit
        )

    # ------------------------------------------------------------------ models
    # ------------------------------------------------------------------ read views (the facade)
    # What the HTTP layer reads, so that it never reaches into the runtime, the store or the
    # backend itself.
    def current_plan(self) -> Plan | None:
        """The plan in force (None before the first apply)."""
        return self.runtime.current_plan

    def last_transition(self) -> TransitionRecord | None:
        return self.runtime.history[-1] if self.runtime.history else None

    def partitions(self) -> list[dict[str, Any]]:
        """Every partition the runtime holds and its state (:meth:`Runtime.describe`)."""
        return self.runtime.describe()

    def events(self, limit: int = 100, kind: str | None = None) -> list[Event]:
        return self.store.events(limit=limit, kind=kind)

    def state_schema(self) -> int:
        """The state database's schema version (after the migrations at start)."""
        return self.store.schema_version

    def record(self, name: str) -> ModelRecord | None:
        """The registration of ``name`` as stored now (None when there is none)."""
        return self.store.get_model(name)

    def batch_totals(self) -> dict[str, tuple[int, int]]:
        """Per model: batches its current workers ran and their run time (ns), from the workers'
        STATS (since each worker started)."""
        out: dict[str, tuple[int, int]] = {}
        for p in list(self.runtime.partitions.values()):
            w = p.worker
            for name, st in ({} if w is None else dict(w.transport.batch_stats)).items():
                b, ns = out.get(name, (0, 0))
                out[name] = (b + int(st.get("batches", 0)), ns + int(st.get("run_ns", 0)))
        return out

    def models(self) -> list[ModelRecord]:
        return self.store.models()

    def get(self, name: str) -> ModelRecord:
        rec = self.store.get_model(name)
        if rec is None:
            raise NotFoundError(f"no model {name!r} is registered")
        return rec

    def validate(self, spec: Mapping[str, Any]) -> ModelEntry:
        """Checks that need the node; the model's registry entry. A built-in must be known to
        the registry; a file must be in ``paths.model_dir``, within ``models.max_file_mb``, of
        a format that loads without pickle, with tensors the file and the request agree on.
        ConfigError (ModelFileError for files: it names the file and the reason)."""
        name = str(spec["name"])
        source = str(spec.get("source") or f"builtin:{name}")
        kind, _, target = source.partition(":")
        given = tuple(_tensor(t) for t in spec.get("inputs") or [])
        if kind == "file":
            path = resolve_model_file(self.cfg.paths.model_dir, target)
            max_bytes = int(self.cfg.models.max_file_mb * 2**20)
            entry = file_entry(name, path, given, max_bytes=max_bytes)
        elif kind == "repository":
            if self.repository is None:
                raise ConfigError(
                    f"source {source!r}: no model repository is configured (models.repository,"
                    " stgs serve --model-repository DIR)"
                )
            model, version = repository.parse_source(source)
            if model != name:
                raise ConfigError(
                    f"source {source!r}: a repository model is served under its own name"
                    f" ({model!r})"
                )
            if given:
                raise ConfigError(
                    f"model {name!r}: a repository model's inputs come from its config.pbtxt;"
                    " give none"
                )
            entry = self.repository.entry(model, version)
        elif kind == "builtin":
            if target != name:
                raise ConfigError(
                    f"source {source!r}: a built-in model is served under its own name"
                    f" (name {target!r})"
                )
            entry = model_entry(target)  # ConfigError for unknown names
            if len(given) > len(entry.inputs):
                raise ConfigError(
                    f"{target} takes {len(entry.inputs)} input(s); the registration gives"
                    f" {len(given)}"
                )
            if given:
                want = entry.input_shape
                shape = given[0].shape
                if want is not None and shape != want:
                    raise ConfigError(
                        f"input shape {list(shape or ())} does not match {target}'s sample shape"
                        f" {list(want)}"
                    )
        else:
            raise ConfigError(
                f"source {source!r}: expected builtin:<name>, file:<path> or repository:<model>"
            )
        outputs = tuple(_tensor(t, "output") for t in spec.get("outputs") or [])
        if outputs:
            if entry.kind != "torchscript":
                raise ConfigError(
                    f"model {name!r}: outputs are given only for a TorchScript file (it has no"
                    " signature); other models describe their own"
                )
            entry = replace(entry, outputs=outputs)
        return entry

    def entry(self, rec: ModelRecord) -> ModelEntry:
        """The registry entry of a registered model (cached; files are inspected once)."""
        key = (rec.name, repr(sorted(rec.spec.items())))
        got = self._entries.get(rec.name)
        if got is not None and got[0] == key:
            return got[1]
        entry = self.validate(rec.spec)
        self._entries[rec.name] = (key, entry)
        if entry.is_file:
            self.runtime.entries[rec.name] = entry
        else:
            self.runtime.entries.pop(rec.name, None)
        return entry

    def registered_as(self, spec: Mapping[str, Any]) -> ModelRecord | None:
        """The stored registration that ``spec`` repeats, if it still stands (not refused or
        failed): a client that lost the reply (the daemon was killed after storing it) retries
        the same request, and gets the registration it made instead of a conflict."""
        old = self.store.get_model(str(spec["name"]))
        if old is not None and old.spec == dict(spec) and old.status not in (REFUSED, FAILED):
            return old
        return None

    def register(self, spec: Mapping[str, Any]) -> tuple[ModelRecord, bool]:
        """Register a model. Returns (record, done): done False while it profiles.

        Raises ConflictError (already registered), RefusedError (admission control),
        ConfigError (invalid), UnavailableError (the plan could not be applied).
        """
        name = str(spec["name"])
        entry = self.validate(spec)
        with self._lock:
            old = self.store.get_model(name)
            if old is not None and old.status not in (REFUSED, FAILED):
                raise ConflictError(
                    f"model {name!r} is already registered ({old.status}); delete it first"
                )
            self.runtime.slos[name] = float(spec["slo_ms"])
            self._entries.pop(name, None)
            if entry.is_file:
                self.runtime.entries[name] = entry
            else:
                self.runtime.entries.pop(name, None)
            if not self.has_profile(name):
                if self.profiler is None:
                    raise ConfigError(f"no profile for {name!r} on {', '.join(self.skus())}")
                self.store.put_model(name, spec, PROFILING, "queued")
                self.store.log_event("register", f"model {name}: profiling", model=name)
                self._start_profiling(name)
                return self.get(name), False
            self.store.put_model(name, spec, PENDING, "admission")
            self.store.log_event("register", f"model {name}", model=name)
        self._admit(name)
        return self.get(name), True

    def _admit(self, name: str) -> None:
        """Admission control, then plan and apply; the outcome is the model's status.

        Plans off the lock (``_optimistic``): until it is decided, the model is in
        ``_admitting``, out of every other call's plan."""
        with self._lock:
            rec = self.get(name)
            if rec.status != PENDING:
                self.store.set_model_status(name, PENDING, "admission control")
            self._admitting.add(name)
            self._changed()

        def decide() -> Plan:
            rec = self.store.get_model(name)
            if rec is None or rec.status not in LIVE:
                raise ConflictError(f"model {name!r} was deleted during its admission control")
            return self.plan(extra=rec)

        try:
            self._optimistic(decide, lambda plan: self._admit_plan(name, plan))
        except (ConfigError, RefusedError) as exc:  # the planner's reason, or the bound's
            with self._lock:
                if self.store.get_model(name) is not None:
                    self.store.set_model_status(name, REFUSED, str(exc))
                    self.store.log_event("refused", f"model {name}: {exc}", model=name)
            raise RefusedError(f"model {name!r} refused: {exc}") from exc
        except UnavailableError as exc:
            with self._lock:
                if self.store.get_model(name) is not None:
                    self.store.set_model_status(name, FAILED, str(exc))
            raise
        finally:
            with self._lock:
                self._admitting.discard(name)
                self._changed()

    def _admit_plan(self, name: str, plan: Plan) -> None:
        """Under the lock: refuse ``name`` (RefusedError with the reason) for what ``plan``
        leaves unserved, or apply it."""
        mine = [u for u in plan.unserved if u.name == name]
        others = [u for u in plan.unserved if u.name != name]
        if mine or others or plan.served_rate(name) <= 0:
            if mine:
                why = mine[0].reason
            elif others:
                why = "admitting it would leave others unserved: " + "; ".join(
                    f"{u.name}: {u.reason}" for u in others
                )
            else:
                why = "the planner did not place it"
            raise RefusedError(why)
        self.apply(plan, f"register {name}")
        # In the plan now: from here every other call's plan must keep it. Under the same lock
        # hold as the apply, and stale-marking again, so that no plan made while it was still
        # out of the others' plans (a concurrent admission's) can commit and drop it.
        self._admitting.discard(name)
        self._changed()

    def _start_profiling(self, name: str) -> None:
        if not self.background:
            self._profile(name)
            return
        t = threading.Thread(target=self._profile, args=(name,), name=f"profile-{name}")
        t.daemon = True
        self._threads.append(t)
        t.start()

    def _profile(self, name: str) -> None:
        """Background: profile ``name`` on every SKU of the node, then admit it."""
        assert self.profiler is not None
        try:
            with self._profiling:  # waits here (detail "queued") while another model profiles
                for sku in self.skus():
                    if self.store.get_model(name) is None:
                        return  # deleted meanwhile
                    self.store.set_model_status(name, PROFILING, f"measuring on {sku}")
                    rec = self.store.get_model(name)
                    if rec is None:
                        return
                    t0 = time.monotonic()
                    rows = self.profiler(self.entry(rec), sku)
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
            log.warning("profiling %s failed: %s", name, exc)
            if self.store.get_model(name) is not None:
                self.store.set_model_status(name, FAILED, f"profiling failed: {exc}")
            self.store.log_event("profile_failed", f"{name}: {exc}", model=name)
            return
        if self.store.get_model(name) is None:
            return
        self.store.set_model_status(name, PROFILING, "profiled; admission control")
        try:
            self._admit(name)
        except StgsError as exc:
            log.info("model %s not admitted: %s", name, exc)
        except Exception as exc:
            log.exception("admitting %s failed", name)
            self.store.set_model_status(name, FAILED, f"admission failed: {exc}")

    def delete(self, name: str) -> None:
        """Forget ``name`` at once; re-plan without it (off the lock) when it was served."""
        with self._lock:
            rec = self.get(name)
            self.store.delete_model(name)
            self.runtime.slos.pop(name, None)
            self.runtime.entries.pop(name, None)
            self._entries.pop(name, None)
            self.store.log_event("delete", f"model {name}", model=name)
            self._changed()
            cur = self.runtime.current_plan
            served = rec.status in LIVE and cur is not None and cur.served_rate(name) > 0
        if served:
            self._optimistic(self.plan, lambda plan: self.apply(plan, f"delete {name}"))

    # ------------------------------------------------------------------ model repository
    def _repo(self) -> repository.Repository:
        if self.repository is None:
            raise NotFoundError(
                "no model repository is configured (models.repository, stgs serve"
                " --model-repository DIR)"
            )
        return self.repository

    def repository_spec(
        self, name: str, slo_ms: float | None = None, rate_rps: float | None = None
    ) -> dict[str, Any]:
        """The registration of the repository model ``name`` now (the newest version its policy
        selects). SLO and rate: the arguments, else its config's parameters, else those of its
        current registration (a model registered over REST keeps them across loads)."""
        repo = self._repo()
        if not repo.has(name):
            raise NotFoundError(f"no model {name!r} in the model repository {repo.root}")
        m = repo.inspect(name)
        old = self.store.get_model(name)
        if old is not None and repository.is_repository_source(old.spec.get("source")):
            if slo_ms is None and m.slo_ms is None:
                slo_ms = float(old.spec["slo_ms"])
            if rate_rps is None and m.rate_rps is None:
                rate_rps = float(old.spec["rate_rps"])
        return repo.spec(m, slo_ms, rate_rps)

    def load(
        self, name: str, slo_ms: float | None = None, rate_rps: float | None = None
    ) -> ModelRecord:
        """Triton's load. A repository model is registered from the repository: a stored
        registration of the same spec stands (a retry, a restart), one of another version or
        config is replaced (delete, then register); a model registered from another source under
        that name is a conflict. A model not in the repository but registered is registered
        again when it failed or was refused, else left as it is. NotFoundError: neither."""
        if self.repository is None or not self.repository.has(name):
            old = self.get(name)
            if old.status not in (REFUSED, FAILED):
                return old
            spec = dict(old.spec)
            if slo_ms is not None:
                spec["slo_ms"] = float(slo_ms)
            if rate_rps is not None:
                spec["rate_rps"] = float(rate_rps)
            return self.register(spec)[0]
        repo = self.repository
        try:
            spec = self.repository_spec(name, slo_ms, rate_rps)
            self.validate(spec)  # the config against the file, before the old one goes
            same = self.registered_as(spec)
            if same is not None:
                repo.errors.pop(name, None)
                return same
            prev = self.store.get_model(name)
            if prev is not None and prev.status not in (REFUSED, FAILED):
                if not repository.is_repository_source(prev.spec.get("source")):
                    raise ConflictError(
                        f"model {name!r} is registered from {prev.spec.get('source')!r}, not from"
                        " the model repository; delete it first"
                    )
                self.delete(name)
            rec, _ = self.register(spec)
        except StgsError as exc:
            repo.errors[name] = str(exc)
            raise
        repo.errors.pop(name, None)
        return rec

    def unload(self, name: str) -> None:
        """Triton's unload: the registration goes (:meth:`delete`); a repository model that is
        not registered is already unloaded. NotFoundError when neither."""
        repo = self.repository
        if self.store.get_model(name) is None and repo is not None and repo.has(name):
            repo.errors.pop(name, None)
            return
        self.delete(name)

    def register_repository(self) -> None:
        """At start: register every model of the repository (:meth:`load`: a stored
        registration of the same spec stands, so restarts change nothing). A model that cannot
        be served is logged, recorded as a ``repository_error`` event and shown by the
        repository index; the others go on."""
        if self.repository is None:
            return
        for name in self.repository.names():
            try:
                rec = self.load(name)
                log.info("model repository: %s %s (%s)", name, rec.status, rec.detail)
            except Exception as exc:  # one model's trouble never stops the others, or the start
                why = str(exc) if isinstance(exc, StgsError) else f"{type(exc).__name__}: {exc}"
                self.repository.errors[name] = why
                log.warning("model repository: %s", why)
                self.store.log_event("repository_error", why, model=name)

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: every model of the repository (registered or not) and
        every other registered model, as ``{name, version, state, reason}``; state READY,
        LOADING (profiling, admission) or UNAVAILABLE (with the reason: unloaded, refused,
        failed, a bad config)."""
        rows: dict[str, dict[str, str]] = {}
        if self.repository is not None:
            for n in self.repository.names():
                rows[n] = {
                    "name": n,
                    "version": "",
                    "state": "UNAVAILABLE",
                    "reason": self.repository.errors.get(n, "unloaded"),
                }
        for rec in self.store.models():
            src = str(rec.spec.get("source") or "")
            state = {READY: "READY", PROFILING: "LOADING", PENDING: "LOADING"}.get(
                rec.status, "UNAVAILABLE"
            )
            rows[rec.name] = {
                "name": rec.name,
                "version": src.rsplit("/", 1)[-1] if repository.is_repository_source(src) else "1",
                "state": state,
                "reason": rec.detail if state == "UNAVAILABLE" else "",
            }
        out = [rows[k] for k in sorted(rows)]
        return [r for r in out if r["state"] == "READY"] if ready_only else out

    def wait_background(self, timeout_s: float = 60.0) -> None:
        """Join the profiling threads (tests, shutdown)."""
        end = time.monotonic() + timeout_s
        for t in list(self._threads):
            t.join(max(0.0, end - time.monotonic()))

    # ------------------------------------------------------------------ restart
    def restore(self) -> None:
        """At start: the registered models serve again (the last good plan, else a new one)."""
        self._planner.start()
        models = self.store.models()
        for r in models:
            self.runtime.slos[r.name] = float(r.spec["slo_ms"])
            try:
                self.entry(r)  # model files: the workers need their entries
            except ConfigError as exc:  # the file went away or changed: that model fails
                log.warning("model %s: %s", r.name, exc)
                if r.status in LIVE or r.status == PROFILING:
                    self.store.set_model_status(r.name, FAILED, str(exc))
        models = self.store.models()
        found = self._observed_layout()
        self.store.log_event("start", f"daemon start; node: {found}", node=found)
        live = {r.name for r in models if r.status in LIVE}
        good = self.store.latest_plan("last_good")
        with self._lock:
            if good is not None and live:
                names = {m.name for _, p in good.plan.partitions() for m in p.models}
                if names <= live:
                    try:
                        self.apply(good.plan, "restart: last good plan")
                    except (UnavailableError, ConfigError) as exc:
                        log.warning("last good plan did not apply: %s", exc)
            cur = self.runtime.current_plan
            if live and (cur is None or any(cur.served_rate(n) <= 0 for n in live)):
                try:
                    self.replan(reason="restart: rebuild")
                except StgsError as exc:
                    log.warning("rebuild at start failed: %s", exc)
                    self.last_error = str(exc)
                    self.store.log_event("restore_failed", str(exc))
        for r in models:
            if r.status == PROFILING:
                self._start_profiling(r.name)
        self.register_repository()
        self.restored = True

    def _observed_layout(self) -> list[dict[str, Any]]:
        out = []
        for info in self.backend.gpus():
            layout: Iterable[Any] = ()
            if info.mig_enabled and info.healthy:
                try:
                    layout = self.backend.mig_layout(info.index)
                except StgsError:
                    layout = ()
            out.append(
                {"gpu": info.index, "mig": info.mig_enabled, "layout": [str(p) for p in layout]}
            )
        return out

    # ------------------------------------------------------------------ serving
    def model_ready(self, name: str) -> bool:
        return any(
            p.state is PartitionState.READY and name in p.rates
            for p in list(self.runtime.partitions.values())
        )

    def model_io(self, model: str, version: str = "") -> ModelIO:
        """(InferenceBackend) the registered model's tensors; InferError(404) when unknown."""
        return inference.model_io(self, model, version)

    async def infer_arrays(
        self, model: str, arrays: tuple[np.ndarray, ...], arrival_ns: int | None
    ) -> tuple[np.ndarray, ...]:
        """(InferenceBackend) the batch through the model, one request per row."""
        outs = await self.infer_async(model, inference.rows_of(arrays), arrival_ns=arrival_ns)
        return inference.stack_rows(outs)

    def infer(self, name: str, samples: list[Any]) -> list[Any]:
        """Blocking :meth:`infer_async` for callers without an event loop (tests, scripts)."""
        return asyncio.run(self.infer_async(name, samples))

    async def infer_async(
        self, name: str, samples: list[Any], *, arrival_ns: int | None = None
    ) -> list[Any]:
        """Run ``samples`` (one array per sample) through the model; ServingError on failure.

        The SLO clock starts at ``arrival_ns`` (when the request reached the server; default
        now): a request that already missed its deadline is shed at once
        (DeadlineExceededError), the worker sheds what cannot meet it, and whatever the worker
        does the call answers by the deadline plus ``inference.ANSWER_GRACE_S``
        (WorkerTimeoutError). Every outcome is counted, against the SLO, from the arrival."""
        slo_ms = self.runtime.slos.get(name)
        t0 = time.monotonic_ns() if arrival_ns is None else arrival_ns
        deadline_ns = 0 if slo_ms is None else t0 + int(slo_ms * 1e6)
        n = len(samples)

        def record(secs: float, met: bool, kind: str) -> None:
            if self.observer.on_request is not None:
                self.observer.on_request(name, n, secs, met, kind)

        self.inflight.add(name, n)
        try:
            return await inference.counted(
                self._serve(name, samples, deadline_ns), t0, slo_ms, record
            )
        finally:
            self.inflight.add(name, -n)

    async def _serve(self, name: str, samples: list[Any], deadline_ns: int) -> list[Any]:
        now = time.monotonic_ns()
        if deadline_ns and now >= deadline_ns:
            raise DeadlineExceededError(
                f"{name}: deadline passed {(now - deadline_ns) / 1e6:.1f} ms before the request"
                " reached a worker (the server is overloaded)"
            )
        futs = await self._submit(name, samples, deadline_ns)
        await inference.await_answers(
            name, [asyncio.wrap_future(f) for f in futs], now, deadline_ns
        )
        return [f.result() for f in futs]

    async def _submit(self, name: str, samples: list[Any], deadline_ns: int) -> list[Future[Any]]:
        """Submit every sample. With no ready worker, fail at once (NoWorkerError: 503), except
        during a transition (the break-first gap of a MIG change), where the request waits for
        the new worker until its deadline."""
        while True:
            first = self.runtime.submit(name, samples[0], deadline_ns=deadline_ns)
            if not (first.done() and isinstance(first.exception(), NoWorkerError)):
                break
            waiting = self.runtime.transitioning and name in self.runtime.slos
            if not waiting or time.monotonic_ns() + 5_000_000 >= (deadline_ns or 0):
                return [first]
            await asyncio.sleep(0.005)
        rest = [self.runtime.submit(name, s, deadline_ns=deadline_ns) for s in samples[1:]]
        return [first, *rest]

    def close(self) -> None:
        self.wait_background(1.0)
        self._planner.close()
