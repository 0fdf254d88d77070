"""The serving runtime: worker processes per partition, the transport, plan transitions.

Importing this package never imports torch: only the worker process does, when it loads a
model (:mod:`stgs.runtime.models`).
"""

from stgs.runtime.runtime import (
    PartitionKey,
    PartitionRuntime,
    PartitionState,
    Runtime,
    TransitionRecord,
    TransitionState,
)
from stgs.runtime.transport import MockTransport, SocketTransport, Transport
from stgs.runtime.worker import ModelSlot, WorkerSpec

__all__ = [
    "MockTransport",
    "ModelSlot",
    "PartitionKey",
    "PartitionRuntime",
    "PartitionState",
    "Runtime",
    "SocketTransport",
    "TransitionRecord",
    "TransitionState",
    "Transport",
    "WorkerSpec",
]
