"""An out-of-tree planning policy in one small file: stgs with a safety margin for bursts.

It plans every model at 1.25x its rate (spare capacity for bursts and noise) and serves the real
rates on that plan (``at_rates``: batches and duty cycles sized for 1.25x, routing weights and
the controller's "planned" rates the real ones, so the controller does not see the margin as a
load drop and re-plan); it falls back to the plain rates when the margin does not fit on the
GPUs. Compare it with the built-in policies:

    stgs compare examples/compare-zoo.yaml --allow-infeasible  # lists my_policy:Overprovisioned

A policy is a ``partitioner.policies.Policy`` subclass with one method, ``plan``; name it by
dotted path (``module:Class``) in an experiment's ``policies`` or with ``stgs plan --policy``.
"""

from __future__ import annotations

from partitioner.policies import Policy, get_policy
from partitioner.policies.stgs_policy import at_rates
from partitioner.problem import Problem
from stgs.plan import Plan


class Overprovisioned(Policy):
    name = "stgs+25%"
    description = "stgs, planned at 1.25x the rates when that fits"
    margin = 1.25

    def plan(self, problem: Problem, current: Plan | None = None) -> Plan:
        stgs = get_policy("stgs")
        padded = problem.with_models([m.scaled(self.margin) for m in problem.models])
        plan = stgs.plan(padded, current)
        if plan.feasible:  # sized for the margin, serving the real rates
            return at_rates(plan, self.margin).with_info(margin=self.margin)
        return stgs.plan(problem, current).with_info(margin=1.0)  # no room: the plain rates
