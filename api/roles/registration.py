"""Registration and admission control: a model's checks, its profile, its plan.

``register`` checks the model against the node (:meth:`Registration.validate`), stores it, and
either profiles it first (:class:`~api.roles.profiles.Profiles`, in the background) or goes
straight to admission control: the planner's plan with the model in it is applied, or the model
is refused with the planner's reason. Every registration is written to the store before a call
returns. Admission plans off the lock (:meth:`api.roles.planning.Planning.optimistic`) and
shares the planning lock: until its plan is applied, a model is out of every other call's plan.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from api import inference, repository
from api.config import DaemonConfig
from api.roles.common import (
    FAILED,
    LIVE,
    PENDING,
    PROFILING,
    REFUSED,
    ConflictError,
    NotFoundError,
    RefusedError,
    UnavailableError,
)
from api.roles.node import Node
from api.roles.planning import Planning
from api.roles.profiles import Profiles
from api.store import ModelRecord, Store
from stgs.errors import ConfigError, StgsError
from stgs.plan import Plan
from stgs.registry import ModelEntry, TensorSpec, file_entry, model_entry, resolve_model_file
from stgs.runtime import Runtime

log = logging.getLogger(__name__)


def _tensor(t: Mapping[str, Any], default: str = "input") -> TensorSpec:
    """A registration's tensor (``TensorSpec`` of :mod:`api.app`: KServe datatype names)."""
    dtype = inference.DTYPES.get(str(t.get("datatype", "FP32")), "")
    return TensorSpec(str(t.get("name", default)), dtype, tuple(int(d) for d in t["shape"]))


class Registration:
    """The registered models: checks, entries, register, admission, delete. ``repo``: the
    model repository that ``repository:`` sources name (None: none configured)."""

    def __init__(
        self,
        cfg: DaemonConfig,
        store: Store,
        runtime: Runtime,
        node: Node,
        planning: Planning,
        profiles: Profiles,
        repo: repository.Repository | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.runtime = runtime
        self.node = node
        self.planning = planning
        self.profiles = profiles
        self.repository = repo
        self._entries: dict[str, tuple[tuple[str, str], ModelEntry]] = {}

    # ------------------------------------------------------------------ reads
    def models(self) -> list[ModelRecord]:
        return self.store.models()

    def get(self, name: str) -> ModelRecord:
        rec = self.store.get_model(name)
        if rec is None:
            raise NotFoundError(f"no model {name!r} is registered")
        return rec

    def record(self, name: str) -> ModelRecord | None:
        """The registration of ``name`` as stored now (None when there is none)."""
        return self.store.get_model(name)

    # ------------------------------------------------------------------ checks and entries
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

    # ------------------------------------------------------------------ register, admit, delete
    def register(self, spec: Mapping[str, Any]) -> tuple[ModelRecord, bool]:
        """Register a model. Returns (record, done): done False while it profiles.

        Raises ConflictError (already registered), RefusedError (admission control),
        ConfigError (invalid), UnavailableError (the plan could not be applied).
        """
        name = str(spec["name"])
        entry = self.validate(spec)
        with self.planning.lock:
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
            if not self.profiles.has_profile(name):
                if self.profiles.profiler is None:
                    raise ConfigError(f"no profile for {name!r} on {', '.join(self.node.skus())}")
                self.store.put_model(name, spec, PROFILING, "queued")
                self.store.log_event("register", f"model {name}: profiling", model=name)
                self.start_profiling(name)
                return self.get(name), False
            self.store.put_model(name, spec, PENDING, "admission")
            self.store.log_event("register", f"model {name}", model=name)
        self._admit(name)
        return self.get(name), True

    def start_profiling(self, name: str) -> None:
        """Profile ``name`` (in the background), then admit it."""
        self.profiles.start(name, self.entry, self._admit_profiled)

    def _admit_profiled(self, name: str) -> None:
        """After profiling (a background task): admission; its outcome is the status."""
        try:
            self._admit(name)
        except StgsError:
            pass  # the outcome is the model's status, and an event (logged) says why
        except Exception as exc:
            log.exception("admitting %s failed", name)
            self.store.set_model_status(name, FAILED, f"admission failed: {exc}")

    def _admit(self, name: str) -> None:
        """Admission control, then plan and apply; the outcome is the model's status.

        Plans off the lock (:meth:`Planning.optimistic`): until it is decided, the model is in
        admission control (:meth:`Planning.begin_admission`), out of every other call's plan."""
        planning = self.planning
        with planning.lock:
            rec = self.get(name)
            if rec.status != PENDING:
                self.store.set_model_status(name, PENDING, "admission control")
            planning.begin_admission(name)

        def decide() -> Plan:
            rec = self.store.get_model(name)
            if rec is None or rec.status not in LIVE:
                raise ConflictError(f"model {name!r} was deleted during its admission control")
            return planning.plan(extra=rec)

        try:
            planning.optimistic(decide, lambda plan: self._admit_plan(name, plan))
        except (ConfigError, RefusedError) as exc:  # the planner's reason, or the bound's
            with planning.lock:
                if self.store.get_model(name) is not None:
                    self.store.set_model_status(name, REFUSED, str(exc))
                    self.store.log_event("refused", f"model {name}: {exc}", model=name)
            raise RefusedError(f"model {name!r} refused: {exc}") from exc
        except UnavailableError as exc:
            with planning.lock:
                if self.store.get_model(name) is not None:
                    self.store.set_model_status(name, FAILED, str(exc))
                    self.store.log_event("admission_failed", f"model {name}: {exc}", model=name)
            raise
        finally:
            planning.end_admission(name)

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
        self.planning.apply(plan, f"register {name}")
        # In the plan now: from here every other call's plan must keep it. Under the same lock
        # hold as the apply, and stale-marking again, so that no plan made while it was still
        # out of the others' plans (a concurrent admission's) can commit and drop it.
        self.planning.end_admission(name)

    def delete(self, name: str) -> None:
        """Forget ``name`` at once; re-plan without it (off the lock) when it was served."""
        planning = self.planning
        with planning.lock:
            rec = self.get(name)
            self.store.delete_model(name)
            self.runtime.slos.pop(name, None)
            self.runtime.entries.pop(name, None)
            self._entries.pop(name, None)
            self.store.log_event("delete", f"model {name}", model=name)
            planning.changed()
            cur = planning.current_plan()
            served = rec.status in LIVE and cur is not None and cur.served_rate(name) > 0
        if served:
            planning.optimistic(planning.plan, lambda plan: planning.apply(plan, f"delete {name}"))
