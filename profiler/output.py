"""Writing measurements as they come: the profile CSV, its failures side file, and the
interference companion, appended and flushed row by row so that a crash loses nothing.

The profile CSV is the format of :mod:`stgs.profiles` (validated through
:class:`stgs.profiles.ProfileRow`) plus extra columns, which readers ignore:

* ``p99_ms``: the 99th percentile of the timed runs (their maximum when there were few);
* ``graph``: ``cuda`` (a captured CUDA graph was replayed) or ``eager`` (capture failed or CPU);
* ``iters``: timed runs; ``dtype``; ``seconds``: wall time spent on the point (load excluded).

Failures go to ``<out stem>.failures.csv`` (``gpu,model,partition,batch,error``); a later run
retries them. The interference companion (default ``<out stem>-interference.csv``) has the
columns of :data:`stgs.profiles.INTERFERENCE_COLUMNS` plus ``neighbour_model``,
``neighbour_batch``, ``p99_ms`` and ``graph``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import astuple
from pathlib import Path
from typing import Any

from stgs.errors import ProfileError
from stgs.profiles import (
    INTERFERENCE_COLUMNS,
    PROFILE_COLUMNS,
    InterferenceRow,
    ProfileRow,
    read_interference,
    read_profiles,
)

__all__ = [
    "FAILURE_COLUMNS",
    "INTERFERENCE_EXTRA",
    "PROFILE_EXTRA",
    "CsvAppender",
    "failures_path",
    "interference_path",
    "measured_interference",
    "measured_points",
]

PROFILE_EXTRA = ("p99_ms", "graph", "iters", "dtype", "seconds")
INTERFERENCE_EXTRA = ("neighbour_model", "neighbour_batch", "p99_ms", "graph")
FAILURE_COLUMNS = ("gpu", "model", "partition", "batch", "error")


def failures_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.failures.csv")


def interference_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}-interference.csv")


def _fmt(x: object) -> str:
    if isinstance(x, float):
        if x.is_integer():
            return str(int(x))
        return f"{x:.6g}" if abs(x) >= 1e-3 else repr(x)
    return str(x)


class CsvAppender:
    """Appends rows to a CSV, writing the header when the file is new or empty.

    An existing file keeps its own header: values are written under the columns it has (extra
    values it lacks are dropped; missing ones left empty). ``required`` columns must be in an
    existing header, else :class:`ProfileError`.
    """

    def __init__(self, path: Path, columns: Sequence[str], required: Sequence[str] = ()) -> None:
        self.path = path
        header: list[str] | None = None
        if path.is_file() and path.stat().st_size > 0:
            with open(path, newline="", encoding="utf-8") as f:
                header = [h.strip() for h in next(csv.reader(f), [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise ProfileError(f"{path}:1: missing column(s) {', '.join(missing)}")
            with open(path, "rb") as fb:  # a file cut mid-line: start a fresh line
                fb.seek(-1, os.SEEK_END)
                needs_newline = fb.read(1) != b"\n"
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            needs_newline = False
        self.columns = tuple(header) if header else tuple(columns)
        self._f = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        if needs_newline:
            self._f.write("\n")
        self._w = csv.writer(self._f, lineterminator="\n")
        if header is None:
            self._w.writerow(self.columns)
            self._f.flush()

    def append(self, values: Mapping[str, Any]) -> None:
        self._w.writerow([_fmt(values[c]) if c in values else "" for c in self.columns])
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def profile_values(row: ProfileRow, extra: Mapping[str, Any]) -> dict[str, Any]:
    """A validated row's values by column, with the extra columns."""
    return {**dict(zip(PROFILE_COLUMNS, astuple(row), strict=True)), **extra}


def interference_values(row: InterferenceRow, extra: Mapping[str, Any]) -> dict[str, Any]:
    return {**dict(zip(INTERFERENCE_COLUMNS, astuple(row), strict=True)), **extra}


def measured_points(out: Path) -> set[tuple[str, str, str, int]]:
    """(gpu, model, partition, batch) of the rows already in ``out`` (none if it is missing)."""
    if not out.is_file() or out.stat().st_size == 0:
        return set()
    return {(r.gpu, r.model, r.partition, r.batch) for r in read_profiles(out)}


def measured_interference(path: Path) -> set[tuple[str, str, float, int, float, str]]:
    """(gpu, model, mps_pct, batch, neighbour_pct, neighbour_model) already in an interference
    CSV (validated by :func:`stgs.profiles.read_interference` first)."""
    if not path.is_file() or path.stat().st_size == 0:
        return set()
    rows = read_interference(path)
    with open(path, newline="", encoding="utf-8") as f:
        neighbours = [d.get("neighbour_model") or "" for d in csv.DictReader(f) if any(d.values())]
    if len(neighbours) != len(rows):
        neighbours = [""] * len(rows)
    return {
        (r.gpu, r.model, r.mps_pct, r.batch, r.neighbour_pct, n)
        for r, n in zip(rows, neighbours, strict=True)
    }
