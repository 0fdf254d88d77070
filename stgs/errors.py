"""The one exception tree of stgs.

    StgsError
    ├── ConfigError            bad input from a user: scenario, profile table, options (CLI exit 2)
    │   ├── UnknownSkuError     a GPU SKU that is not in the catalog
    │   ├── ProfileError        a profile table that cannot be read, or a model/GPU it lacks
    │   └── PolicyNotFoundError a policy name or dotted path that does not resolve
    ├── MigLayoutError         a MIG layout that breaks the placement rules
    ├── PlanningError          the planner could not produce a plan (not: "infeasible", which
    │   │                      is a valid plan with ``feasible = False``)
    │   ├── BeyondCapacityError  rates above the node's capacity bound, refused before planning
    │   └── PlanningTimeoutError planning ran past its time budget and was abandoned
    ├── BackendError           the hardware (NVML, MPS) or the simulated node refused a step
    │   ├── BackendUnavailableError  no driver, no NVML, no such GPU or instance
    │   ├── InUseError              processes are still attached (NVML_ERROR_IN_USE)
    │   ├── InsufficientResourcesError  no room: slices taken, MPS client limit reached
    │   ├── GpuLostError            the GPU fell off the bus or is unhealthy (Xid 79)
    │   ├── NotSupportedError       not supported on this GPU or driver
    │   ├── NoPermissionError       needs root (MIG changes) or access to the MPS pipes
    │   └── MpsError                an MPS control daemon failed to start, answer or stop
    ├── ServingError           a request could not be served
    │   ├── DeadlineExceededError   the request can no longer meet its deadline
    │   ├── WorkerDiedError         its worker died with the request in flight
    │   ├── WorkerTimeoutError      no answer by the deadline and a grace: the worker is hung
    │   ├── NoWorkerError           no ready worker serves that model
    │   ├── InvalidRequestError     wrong model, shape or dtype
    │   └── WorkerError             the model raised inside the worker
    └── TransitionError        a plan transition failed (and was rolled back); ``reason`` kept

Lower-level errors (YAML, CSV, pydantic, NVML) are mapped at the boundary with
``raise X(...) from exc``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


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


class BeyondCapacityError(PlanningError):
    """Rates above an upper bound of what the node could ever serve: refused before planning
    (admission control says no; HTTP 422)."""


class PlanningTimeoutError(PlanningError):
    """Planning took longer than its time budget and was abandoned (HTTP 503)."""


class BackendError(StgsError):
    """The hardware (NVML, MPS) or the simulated node refused or failed an operation."""


class BackendUnavailableError(BackendError):
    """No driver or NVML library, or no such GPU, MIG instance or MPS daemon."""


class InUseError(BackendError):
    """Processes are still attached to the instance, GPU or MPS daemon."""


class InsufficientResourcesError(BackendError):
    """No room: the memory slices are taken, or the MPS client limit is reached."""


class GpuLostError(BackendError):
    """The GPU fell off the bus or is unhealthy; nothing on it can be trusted."""


class NotSupportedError(BackendError):
    """The operation is not supported on this GPU or driver."""


class NoPermissionError(BackendError):
    """The operation needs privileges the daemon does not have (MIG changes need root)."""


class MpsError(BackendError):
    """An MPS control daemon failed to start, to answer or to stop."""


class ServingError(StgsError):
    """A request could not be served."""


class DeadlineExceededError(ServingError):
    """The request can no longer meet its deadline; the worker did not run it."""


class WorkerDiedError(ServingError):
    """The worker serving the request died with the request in flight."""


class WorkerTimeoutError(ServingError):
    """No answer came by the request's deadline plus a grace period (the worker is hung or
    stopped; the supervisor kills and restarts it)."""


class NoWorkerError(ServingError):
    """No ready worker serves the requested model."""


class InvalidRequestError(ServingError):
    """The request names an unknown model or has the wrong shape or dtype."""


class WorkerError(ServingError):
    """The model raised inside the worker; the message is the worker's."""


class TransitionError(StgsError):
    """A plan transition failed; the runtime rolled back to the last good plan.

    ``reason`` is why the transition failed; ``rolled_back`` whether the rollback succeeded.
    """

    def __init__(self, reason: str, *, rolled_back: bool) -> None:
        suffix = "rolled back to the last good plan" if rolled_back else "ROLLBACK FAILED"
        super().__init__(f"plan transition failed: {reason} ({suffix})")
        self.reason = reason
        self.rolled_back = rolled_back


def validation_message(exc: ValidationError) -> str:
    """A pydantic ValidationError as one line, every error ``location: message``, for the
    ConfigError that reports it."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
