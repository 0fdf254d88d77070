"""The one exception tree of stgs.

    StgsError
    ├── ConfigError            bad input from a user: scenario, profile table, options (CLI exit 2)
    │   ├── UnknownSkuError     a GPU SKU that is not in the catalog
    │   ├── ProfileError        a profile table that cannot be read, or a model/GPU it lacks
    │   └── PolicyNotFoundError a policy name or dotted path that does not resolve
    ├── MigLayoutError         a MIG layout that breaks the placement rules
    └── PlanningError          the planner could not produce a plan (not: "infeasible", which
                               is a valid plan with ``feasible = False``)

Lower-level errors (YAML, CSV, pydantic) are mapped at the boundary with ``raise X(...) from exc``.
"""

from __future__ import annotations


class StgsError(Exception):
    """Base class of every error stgs raises on purpose."""


class ConfigError(StgsError):
    """Invalid user input: a scenario, a profile table, an option."""


class UnknownSkuError(ConfigError):
    """A GPU SKU that the catalog does not know."""


class ProfileError(ConfigError):
    """A profile table that cannot be read, or that lacks a (GPU, model) the plan needs."""


class PolicyNotFoundError(ConfigError):
    """A planning policy that is neither registered nor importable by dotted path."""


class MigLayoutError(StgsError):
    """A MIG layout that breaks the placement rules of its GPU."""


class PlanningError(StgsError):
    """The planner failed to produce a plan at all."""
