"""Planning in child processes, each call within a time budget.

The planner is CPU-bound Python: in the daemon's process it holds the GIL and slows the
serving threads (6-25x while a preview of absurd rates planned for 77 s), and a heuristic
cannot be interrupted from another thread. So every plan runs in a child process: the
daemon only waits on a pipe, and a plan that outlives its budget is abandoned by killing its
process (the planner stays pure: it never looks at a clock). ``docs/operations.md`` "Planner
limits" has the measurements behind this choice.

Children are forked from a forkserver that has the planner imported, so a new one is ready
in tens of milliseconds; idle ones are kept (each with the latency models of the last
profile table it was sent) and one more is started when every child is busy, so a slow plan
never makes another call wait for it. Before planning, a child refuses rates above the
fluid bound (:func:`partitioner.fluid.rate_excess`, milliseconds) or, for re-plans on
measured load, clips them to it.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from typing import Any

from partitioner.fluid import clipped_to_bound, rate_excess
from partitioner.planner import make_plan
from partitioner.problem import Problem
from stgs.errors import (
    BeyondCapacityError,
    PlanningError,
    PlanningTimeoutError,
    StgsError,
)
from stgs.latency import LatencyModel
from stgs.plan import Plan
from stgs.profiles import ProfileTable
from stgs.scenario import Scenario

log = logging.getLogger(__name__)

MAX_CHILDREN = 4  # concurrent plans; one more call waits for a child within its budget
_PRELOAD = ["api.planproc"]  # the forkserver imports the planner once for every child


class PlannerDiedError(PlanningError):
    """The planner process died during a plan (the OOM killer, a crash): try again later."""


@dataclass(frozen=True)
class PlanJob:
    """One plan to make: ``table`` travels only when the child has another ``table_key``."""

    scenario: Scenario
    policy: str
    current: Plan | None
    table_key: int
    table: ProfileTable | None = None
    clip: bool = False  # rates above the bound: plan at the bound (True) or refuse (False)


@dataclass
class ChildCache:
    table_key: int | None = None
    latency: dict[tuple[str, str], LatencyModel] = field(default_factory=dict)


def run_job(job: PlanJob, cache: ChildCache) -> Plan:
    """In the child: the problem (latency models cached per table), the bound, the plan."""
    if job.table is not None:
        prob = Problem.from_scenario(job.scenario, job.table)
        cache.table_key, cache.latency = job.table_key, prob.latency
    elif cache.table_key == job.table_key:
        prob = Problem.from_scenario(job.scenario, latency=cache.latency)
    else:
        raise PlanningError("planner process: no profile table for this job")
    excess = rate_excess(prob)
    if excess is not None:
        if not job.clip:
            raise BeyondCapacityError(excess.message)
        prob = clipped_to_bound(prob)
    return make_plan(job.scenario, job.policy, current=job.current, problem=prob)


def _serve(conn: Connection) -> None:
    """The child's loop: a job in, ("ok", plan) or ("error", exception) out, until EOF."""
    cache = ChildCache()
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        out: tuple[str, Any]
        try:
            out = ("ok", run_job(job, cache))
        except StgsError as exc:  # rebuilt from its text: every class pickles that way
            try:
                err: StgsError = type(exc)(str(exc))
            except TypeError:  # a class with another constructor
                err = PlanningError(str(exc))
            out = ("error", err)
        except Exception as exc:  # a planner bug: the caller gets it, the child goes on
            out = ("error", PlanningError(f"planner failed: {type(exc).__name__}: {exc}"))
        conn.send(out)


class _Child:
    def __init__(self, ctx: ForkServerContext) -> None:
        parent, child = ctx.Pipe()
        self.proc: BaseProcess = ctx.Process(
            target=_serve, args=(child,), name="stgs-planner", daemon=True
        )
        self.proc.start()
        child.close()
        self.conn: Connection = parent
        self.table_key: int | None = None

    def kill(self) -> None:
        self.conn.close()
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5.0)
        self.proc.close()


class PlannerPool:
    """Plans in child processes (see the module docstring); thread-safe."""

    def __init__(self) -> None:
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(_PRELOAD)
        self._lock = threading.Lock()
        self._idle: list[_Child] = []
        self._slots = threading.Semaphore(MAX_CHILDREN)
        self._closed = False

    def start(self) -> None:
        """Start one child now (with the forkserver), so that the first plan finds it warm."""
        child = _Child(self._ctx)
        with self._lock:
            self._idle.append(child)

    def plan(self, job: PlanJob, table: ProfileTable, budget_s: float) -> Plan:
        """Make ``job``'s plan within ``budget_s`` seconds (waiting for a free child counts).

        Raises BeyondCapacityError (rates above the bound, unless ``job.clip``),
        PlanningTimeoutError (over budget: the child is killed), PlannerDiedError, or the
        planner's error.
        """
        deadline = time.monotonic() + budget_s
        if not self._slots.acquire(timeout=budget_s):
            raise PlanningTimeoutError(
                f"no planner process came free within the time budget ({budget_s:g} s):"
                f" {MAX_CHILDREN} plans are running"
            )
        try:
            with self._lock:
                if self._closed:
                    raise PlanningError("the planner is shut down")
                child = self._idle.pop() if self._idle else None
            if child is None or not child.proc.is_alive():
                if child is not None:
                    child.kill()
                child = _Child(self._ctx)
            kind, value = self._ask(child, job, table, deadline, budget_s)
            with self._lock:
                if self._closed:
                    child.kill()
                else:
                    self._idle.append(child)
        finally:
            self._slots.release()
        if kind == "ok":
            assert isinstance(value, Plan)
            return value
        assert isinstance(value, StgsError)
        raise value

    def _ask(
        self, child: _Child, job: PlanJob, table: ProfileTable, deadline: float, budget_s: float
    ) -> tuple[str, Any]:
        """Send the job (with the table when the child lacks it) and wait until the deadline;
        a child that does not answer in time is killed (the only way to stop a heuristic)."""
        send = job if child.table_key == job.table_key else replace(job, table=table)
        try:
            child.conn.send(send)
            child.table_key = job.table_key
            if not child.conn.poll(max(0.0, deadline - time.monotonic())):
                log.warning(
                    "a %s plan of %d models ran past its %g s budget: planner process %s killed",
                    job.policy,
                    len(job.scenario.models),
                    budget_s,
                    child.proc.pid,
                )
                child.kill()
                raise PlanningTimeoutError(
                    f"planning took longer than its time budget (planner.time_budget_s ="
                    f" {budget_s:g} s) and was abandoned; the rates or the policy need less"
                    f" planning (or raise the budget)"
                )
            out: tuple[str, Any] = child.conn.recv()
            return out
        except (EOFError, OSError) as exc:
            child.kill()
            raise PlannerDiedError(f"the planner process died during the plan: {exc!r}") from exc

    def close(self) -> None:
        """Kill every idle child; a busy one is killed when its call returns."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for child in idle:
            child.kill()
