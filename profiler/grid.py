"""The measurement grid: partitions and batch sizes to profile, parsed from the command line.

Pure functions (no torch, no hardware): the orchestrator (:mod:`profiler.run`) turns a grid
into points and skips those already measured.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from profiler.errors import ProfilerError
from stgs.errors import ProfileError
from stgs.profiles import parse_partition

__all__ = [
    "DEFAULT_BATCHES",
    "DEFAULT_MPS_SHARES",
    "Point",
    "default_partitions",
    "parse_batches",
    "parse_partitions",
]

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
DEFAULT_MPS_SHARES = (100, 75, 50, 37, 25, 12)
DEFAULT_GREEN_STEP = 16

_RANGE = re.compile(r"^(\d+)\.\.(\d+)(?:/(\d+))?$")


@dataclass(frozen=True, order=True)
class Point:
    """One measurement to make: a model at a partition and a batch size."""

    model: str
    partition: str
    batch: int


def _expand(text: str, what: str) -> list[int]:
    """``"16..128/16"`` -> [16, 32, ..., 128]; ``"1..128"`` -> powers of two; ``"8"`` -> [8]."""
    m = _RANGE.match(text)
    if m is None:
        if not text.isdigit() or int(text) <= 0:
            raise ProfilerError(f"{what} {text!r}: expected a positive integer or a range A..B[/S]")
        return [int(text)]
    lo, hi = int(m.group(1)), int(m.group(2))
    if lo <= 0 or hi < lo:
        raise ProfilerError(f"{what} {text!r}: a range needs 0 < A <= B")
    if m.group(3):
        step = int(m.group(3))
        if step <= 0:
            raise ProfilerError(f"{what} {text!r}: the step must be > 0")
        return list(range(lo, hi + 1, step))
    out, b = [], lo
    while b <= hi:  # no step: doubling
        out.append(b)
        b *= 2
    return out


def _split(items: Iterable[str]) -> list[str]:
    return [t.strip() for item in items for t in item.replace(" ", ",").split(",") if t.strip()]


def parse_batches(items: Iterable[str]) -> tuple[int, ...]:
    """Batch sizes from ``["1,2,4", "8..64"]`` (a range without a step doubles): sorted, unique."""
    out: set[int] = set()
    for t in _split(items):
        out.update(_expand(t, "batch"))
    if not out:
        raise ProfilerError("no batch sizes given")
    return tuple(sorted(out))


def parse_partitions(items: Iterable[str]) -> tuple[str, ...]:
    """Partitions from ``["full", "green:16..128/16", "mps:50,25"]``, normalised, in order.

    ``green:A..B/S`` and ``mps:A..B/S`` expand to one partition per value; a bare number after a
    kind's partition continues that kind (``mps:50,25`` is ``mps:50,mps:25``).
    """
    out: list[str] = []
    kind: str | None = None
    for t in _split(items):
        head, sep, arg = t.partition(":")
        if not sep and head.lower() != "full":
            if kind is None or (not _RANGE.match(head) and not head.replace(".", "").isdigit()):
                raise ProfilerError(
                    f"partition {t!r}: expected full, green:<sms>, mps:<pct> or mig:<profile>"
                )
            head, arg, sep = kind, head, ":"
        kind = head.lower() if sep else None
        values = _expand(arg, f"{head} partition") if sep and _RANGE.match(arg) else [arg]
        for v in values:
            text = f"{head}:{v}" if sep else head
            try:
                k, a = parse_partition(text)
            except ProfileError as exc:
                raise ProfilerError(str(exc)) from None
            p = k if a is None else f"{k}:{a}"
            if p not in out:
                out.append(p)
    if not out:
        raise ProfilerError("no partitions given")
    return tuple(out)


def default_partitions(sm_count: int, *, mps: bool = True) -> tuple[str, ...]:
    """``full``, green contexts from 16 SMs in steps of 16 below ``sm_count``, and (``mps``)
    the MPS shares 100/75/50/37/25/12 %."""
    parts = ["full"]
    parts += [f"green:{s}" for s in range(DEFAULT_GREEN_STEP, sm_count, DEFAULT_GREEN_STEP)]
    if mps:
        parts += [f"mps:{p}" for p in DEFAULT_MPS_SHARES]
    return tuple(parts)


def partition_kind(partition: str) -> str:
    return partition.partition(":")[0]


def order_points(points: Sequence[Point]) -> list[Point]:
    """Points grouped by model (in first-seen order), then partition order, then batch."""
    models: dict[str, int] = {}
    parts: dict[str, int] = {}
    for p in points:
        models.setdefault(p.model, len(models))
        parts.setdefault(p.partition, len(parts))
    return sorted(points, key=lambda p: (models[p.model], parts[p.partition], p.batch))
