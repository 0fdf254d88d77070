"""What every role shares: the model statuses, the errors the HTTP layer maps to statuses, and
the observer hooks. :mod:`api.service` exports them to the HTTP layer.

Model statuses (``GET /v1/models/{name}``):

* ``profiling``: no profile on this node's GPU type yet; measuring in the background;
* ``pending``: profiled, admitted, waiting for its plan to be applied;
* ``ready``: served by the current plan;
* ``refused``: admission control said no (the planner's reason is the detail);
* ``failed``: profiling or applying its plan failed (the detail says why).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from stgs.errors import StgsError

PROFILING, PENDING, READY, REFUSED, FAILED = "profiling", "pending", "ready", "refused", "failed"
LIVE = (PENDING, READY)  # statuses of models that belong in the plan


class NotFoundError(StgsError):
    """No such model (HTTP 404)."""


class ConflictError(StgsError):
    """The request conflicts with the daemon's state (HTTP 409)."""


class RefusedError(StgsError):
    """Admission control refused a model (HTTP 422); the planner's reason is the message."""


class UnavailableError(StgsError):
    """The daemon cannot do it now: the plan could not be applied or made in time (HTTP 503)."""


@dataclass
class Observer:
    """Hooks for metrics and the controller's meters; every one optional."""

    on_request: Callable[[str, int, float, bool, str], None] | None = None
    on_reconfig: Callable[[bool, float], None] | None = None
    on_plan: Callable[[str], None] | None = None  # a plan's result: ok, timeout, refused, error
