"""The model repository's models: Triton's load, unload and repository index, and the start-up
registration of every repository model, over :class:`~api.roles.registration.Registration`.
"""

from __future__ import annotations

import logging
from typing import Any

from api import repository
from api.roles.common import (
    FAILED,
    PENDING,
    PROFILING,
    READY,
    REFUSED,
    ConflictError,
    NotFoundError,
)
from api.roles.registration import Registration
from api.store import ModelRecord, Store
from stgs.errors import StgsError

log = logging.getLogger(__name__)


class Loading:
    """Loads from ``registration.repository`` (None: no repository configured)."""

    def __init__(self, store: Store, registration: Registration) -> None:
        self.store = store
        self.registration = registration
        self.repository = registration.repository

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
        reg = self.registration
        if self.repository is None or not self.repository.has(name):
            old = reg.get(name)
            if old.status not in (REFUSED, FAILED):
                return old
            spec = dict(old.spec)
            if slo_ms is not None:
                spec["slo_ms"] = float(slo_ms)
            if rate_rps is not None:
                spec["rate_rps"] = float(rate_rps)
            return reg.register(spec)[0]
        repo = self.repository
        try:
            spec = self.repository_spec(name, slo_ms, rate_rps)
            reg.validate(spec)  # the config against the file, before the old one goes
            same = reg.registered_as(spec)
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
                reg.delete(name)
            rec, _ = reg.register(spec)
        except StgsError as exc:
            repo.errors[name] = str(exc)
            raise
        repo.errors.pop(name, None)
        return rec

    def unload(self, name: str) -> None:
        """Triton's unload: the registration goes (:meth:`Registration.delete`); a repository
        model that is not registered is already unloaded. NotFoundError when neither."""
        repo = self.repository
        if self.store.get_model(name) is None and repo is not None and repo.has(name):
            repo.errors.pop(name, None)
            return
        self.registration.delete(name)

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
