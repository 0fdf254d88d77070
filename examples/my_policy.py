"""An out-of-tree planning policy in one small file: stgs with a safety margin for bursts.

It plans every model at 1.25x its rate (spare capacity for bursts and noise) and falls back to
the plain rates when the margin does not fit on the GPUs. Compare it with the built-in policies:

    stgs compare examples/compare-zoo.yaml          # lists it as my_policy:Overprovisioned

A policy is a ``partitioner.policies.Policy`` subclass with one method, ``plan``; name it by
dotted path (``module:Class``) in an experiment's ``policies`` or with ``stgs plan --policy``.
"""

from __future__ import annotations

from partitioner.policies import Policy, get_policy
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
        if not plan.feasible:  # no room for the margin: serve the plain rates
            plan = stgs.plan(problem, current)
        return plan.with_info(margin=self.margin)
