"""How an event is logged: the one rule for the daemon's store and for the runtime and the data
plane when no owner takes their events (each event is logged once, by whoever ends up with it).
"""

from __future__ import annotations

import logging

__all__ = ["WARNING_EVENTS", "level"]

# event kinds logged as WARNING besides every "*_failed" one
WARNING_EVENTS = frozenset({"refused", "plan_timeout", "repository_error", "controller_error"})


def level(kind: str) -> int:
    """WARNING for failures (``*_failed``) and refusals (:data:`WARNING_EVENTS`), else INFO."""
    return logging.WARNING if kind in WARNING_EVENTS or kind.endswith("_failed") else logging.INFO
