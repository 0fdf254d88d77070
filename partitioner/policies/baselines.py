"""The peers' policies, on the same engine and latency functions as ``stgs``.

* ``temporal``: whole GPUs, time-shared only: Nexus's squishy bin packing (saturated models get
  whole GPUs at their best batch, residual rates are merged onto shared GPUs by duty cycle).
* ``mig-only``: MIG instances, one model per instance, no time sharing (ParvaGPU/PARIS-like;
  the smallest instance that covers a residual). GPUs without MIG serve one model each, whole.
* ``mps-only``: MPS shares, one model per share, no time sharing (gpulet without time sharing).
"""

from __future__ import annotations

from partitioner.greedy import FULL, MIG, MPS, Greedy, GreedyConfig
from partitioner.policies import Policy, register
from partitioner.problem import Problem
from stgs.plan import Plan


class _GreedyPolicy(Policy):
    config: GreedyConfig

    def plan(self, problem: Problem, current: Plan | None = None) -> Plan:
        return Greedy(problem, self.config).run()


@register
class Temporal(_GreedyPolicy):
    name = "temporal"
    description = "whole GPUs, time-shared (Nexus squishy bin packing)"
    config = GreedyConfig("temporal", frozenset({FULL}), time_sharing=True, shrink=False)


@register
class MigOnly(_GreedyPolicy):
    name = "mig-only"
    description = "MIG instances, one model each, no time sharing (ParvaGPU/PARIS-like)"
    config = GreedyConfig("mig-only", frozenset({MIG}), time_sharing=False, shrink=False)


@register
class MpsOnly(_GreedyPolicy):
    name = "mps-only"
    description = "MPS shares, one model each, no time sharing (gpulet without time sharing)"
    config = GreedyConfig("mps-only", frozenset({MPS, FULL}), time_sharing=False, shrink=False)
