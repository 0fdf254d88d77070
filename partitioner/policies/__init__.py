"""Planning policies: one abstract class, one decision method, a registry by name.

An out-of-tree policy is a ``Policy`` subclass named by dotted path (``pkg.module:Class`` or
``pkg.module.Class``); a new policy is one small file.
"""

from __future__ import annotations

import contextlib
import importlib
from abc import ABC, abstractmethod
from typing import ClassVar

from partitioner.problem import Problem
from stgs.errors import PolicyNotFoundError
from stgs.plan import Plan


class Policy(ABC):
    """Decides a plan. Pure: the result depends only on the problem and the current plan."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    @abstractmethod
    def plan(self, problem: Problem, current: Plan | None = None) -> Plan:
        """A plan serving ``problem.models`` at their rates on ``problem.gpus``.

        ``current``: the plan running now, for policies that replan incrementally.
        When the rates cannot all be served, return a plan with ``feasible=False`` that
        serves what it can and lists the rest under ``unserved`` with the reason.
        """


REGISTRY: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    from partitioner.policies import baselines, stgs_policy  # noqa: F401

    with contextlib.suppress(ImportError):  # the exact solver needs scipy.optimize.milp
        from partitioner.policies import optimal  # noqa: F401


def get_policy(name: str) -> Policy:
    """A policy instance by registered name or by dotted path to a ``Policy`` subclass."""
    _load_builtin()
    if name in REGISTRY:
        return REGISTRY[name]()
    if "." in name or ":" in name:
        mod_name, _, attr = name.replace(":", ".").rpartition(".")
        try:
            obj = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise PolicyNotFoundError(f"cannot import policy {name!r}: {exc}") from exc
        if not (isinstance(obj, type) and issubclass(obj, Policy)):
            raise PolicyNotFoundError(f"{name!r} is not a subclass of partitioner.policies.Policy")
        return obj()
    raise PolicyNotFoundError(
        f"unknown policy {name!r}; known: {', '.join(sorted(REGISTRY))}, or a dotted path"
    )


def policy_names() -> list[str]:
    _load_builtin()
    return sorted(REGISTRY)
