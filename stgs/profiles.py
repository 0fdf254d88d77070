"""Profile tables: measured batch latency and memory per (GPU, model, partition, batch).

Profile table (CSV, one row per measurement), header::

    gpu,model,partition,sm_count,batch,latency_ms,memory_mib

* ``gpu``: a SKU name of :mod:`stgs.catalog`; aliases are normalised to the catalog name
  (``H200`` -> ``H200-141GB``). A name the catalog lacks is kept as written: profiles may come
  from GPUs the catalog does not know.
* ``model``: the model's name (e.g. ``resnet50``, ``bert_base``).
* ``partition``: ``full`` (the whole GPU), ``mps:<pct>`` (an MPS client at
  ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=pct``, e.g. ``mps:50``), ``mig:<profile>`` (a MIG GPU
  instance, e.g. ``mig:3g.40gb``) or ``green:<sms>`` (a green context of that many SMs).
* ``sm_count``: the SMs the partition gave the model (an integer > 0; for MPS the count the
  client saw, for MIG the instance's SM count).
* ``batch``: batch size (an integer > 0).
* ``latency_ms``: median latency of one batch, in milliseconds (> 0).
* ``memory_mib``: device memory the model needs at that batch, in MiB (>= 0).

Extra columns are allowed and ignored (e.g. ``p99_ms``, ``graph``). Several rows with the same
(gpu, model, partition, batch) are repeated measurements; the latency functions take their
median. A missing required column, a non-numeric value, a non-positive latency, batch or
sm_count, a negative memory or an unparsable partition raises :class:`stgs.errors.ProfileError`
with a one-line message ``<file>:<line>: <what is wrong>``.

Interference table (optional companion CSV), header::

    gpu,model,mps_pct,batch,neighbour_pct,latency_ms,solo_latency_ms

One row per co-location measurement: ``model`` at MPS share ``mps_pct`` (percent, in (0, 100])
and batch ``batch``, running beside MPS neighbours whose shares total ``neighbour_pct`` percent
(> 0; on the same GPU or the same MIG instance); ``latency_ms`` its median batch latency so,
``solo_latency_ms`` its median latency alone at the same share and batch. Same rules for extra
columns and errors as above. :class:`stgs.latency.InterferenceModel` fits slowdowns from it.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import astuple, dataclass
from importlib import resources
from pathlib import Path
from typing import TypeVar

from stgs.catalog import get_sku
from stgs.errors import ProfileError, UnknownSkuError

__all__ = [
    "INTERFERENCE_COLUMNS",
    "PARTITION_KINDS",
    "PROFILE_COLUMNS",
    "InterferenceRow",
    "ProfileRow",
    "ProfileTable",
    "default_interference_path",
    "default_profiles_path",
    "example_interference_path",
    "example_profiles_path",
    "measured_interference_path",
    "measured_profiles_path",
    "normalise_gpu",
    "parse_partition",
    "read_interference",
    "read_profiles",
    "write_interference",
    "write_profiles",
]

PROFILE_COLUMNS = ("gpu", "model", "partition", "sm_count", "batch", "latency_ms", "memory_mib")
INTERFERENCE_COLUMNS = (
    "gpu",
    "model",
    "mps_pct",
    "batch",
    "neighbour_pct",
    "latency_ms",
    "solo_latency_ms",
)
PARTITION_KINDS = ("full", "mps", "mig", "green")

_MIG_PROFILE = re.compile(r"^\d+g\.\d+gb(\+me)?$")


def normalise_gpu(name: str) -> str:
    """The catalog name of ``name`` when the catalog knows it, else ``name`` stripped."""
    try:
        return get_sku(name).name
    except UnknownSkuError:
        return name.strip()


def _fmt_num(x: float) -> str:
    """Shortest round-tripping text of a number (``50`` rather than ``50.0``)."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def parse_partition(s: str) -> tuple[str, str | None]:
    """Split a partition into (kind, argument): ``"mps:50"`` -> ``("mps", "50")``.

    ``full`` -> ``("full", None)``; ``mig:3g.40gb`` -> ``("mig", "3g.40gb")``;
    ``green:32`` -> ``("green", "32")``. The argument comes back normalised (``mps:50.0`` ->
    ``"50"``). Raises :class:`ProfileError` for anything else.
    """
    text = s.strip()
    kind, sep, arg = text.partition(":")
    kind = kind.strip().lower()
    arg = arg.strip()
    if kind == "full":
        if sep:
            raise ProfileError(f"partition {s!r}: 'full' takes no argument")
        return "full", None
    if kind not in PARTITION_KINDS or not sep or not arg:
        raise ProfileError(
            f"unparsable partition {s!r}: expected full, mps:<pct>, mig:<profile> or green:<sms>"
        )
    if kind == "mps":
        try:
            pct = float(arg)
        except ValueError:
            raise ProfileError(f"partition {s!r}: MPS share {arg!r} is not a number") from None
        if not 0 < pct <= 100:
            raise ProfileError(f"partition {s!r}: MPS share must be in (0, 100]")
        return "mps", _fmt_num(pct)
    if kind == "green":
        if not arg.isdigit() or int(arg) <= 0:
            raise ProfileError(f"partition {s!r}: green-context SM count must be an integer > 0")
        return "green", str(int(arg))
    arg = arg.lower()
    if not _MIG_PROFILE.match(arg):
        raise ProfileError(f"partition {s!r}: MIG profile {arg!r} is not like '3g.40gb'")
    return "mig", arg


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ProfileError(f"{name} must be finite, got {value}")


def _integral(name: str, value: float) -> int:
    """``value`` as an int when it is a whole number (66.0 -> 66), else ProfileError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProfileError(f"{name} must be a number, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ProfileError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _positive(name: str, value: float) -> None:
    _finite(name, value)
    if value <= 0:
        raise ProfileError(f"{name} must be > 0, got {_fmt_num(value)}")


@dataclass(frozen=True)
class ProfileRow:
    """One measurement. Validated and normalised on construction (gpu alias, partition text)."""

    gpu: str
    model: str
    partition: str
    sm_count: int
    batch: int
    latency_ms: float
    memory_mib: float

    def __post_init__(self) -> None:
        if not self.gpu.strip():
            raise ProfileError("gpu is empty")
        if not self.model.strip():
            raise ProfileError("model is empty")
        kind, arg = parse_partition(self.partition)
        object.__setattr__(self, "gpu", normalise_gpu(self.gpu))
        object.__setattr__(self, "model", self.model.strip())
        object.__setattr__(self, "partition", kind if arg is None else f"{kind}:{arg}")
        object.__setattr__(self, "sm_count", _integral("sm_count", self.sm_count))
        object.__setattr__(self, "batch", _integral("batch", self.batch))
        object.__setattr__(self, "latency_ms", float(self.latency_ms))
        object.__setattr__(self, "memory_mib", float(self.memory_mib))
        _positive("sm_count", self.sm_count)
        _positive("batch", self.batch)
        _positive("latency_ms", self.latency_ms)
        _finite("memory_mib", self.memory_mib)
        if self.memory_mib < 0:
            raise ProfileError(f"memory_mib must be >= 0, got {_fmt_num(self.memory_mib)}")

    @property
    def kind(self) -> str:
        """``full``, ``mps``, ``mig`` or ``green``."""
        return self.partition.partition(":")[0]

    @property
    def partition_arg(self) -> str | None:
        """The partition's argument: MPS percent, MIG profile, green SM count; None for full."""
        return self.partition.partition(":")[2] or None


class ProfileTable:
    """An immutable collection of :class:`ProfileRow`, indexed by (gpu, model)."""

    def __init__(self, rows: Iterable[ProfileRow] = ()) -> None:
        self.rows: tuple[ProfileRow, ...] = tuple(rows)
        index: dict[tuple[str, str], list[ProfileRow]] = {}
        for r in self.rows:
            index.setdefault((r.gpu, r.model), []).append(r)
        self._index = {k: tuple(v) for k, v in index.items()}

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[ProfileRow]:
        return iter(self.rows)

    def __repr__(self) -> str:
        return f"ProfileTable({len(self.rows)} rows, {len(self._index)} (gpu, model) pairs)"

    def gpus(self) -> list[str]:
        """GPU names in the table, sorted."""
        return sorted({g for g, _ in self._index})

    def models(self, gpu: str | None = None) -> list[str]:
        """Model names, sorted; only those profiled on ``gpu`` when given."""
        if gpu is None:
            return sorted({m for _, m in self._index})
        g = normalise_gpu(gpu)
        return sorted({m for gg, m in self._index if gg == g})

    def rows_for(self, gpu: str, model: str) -> tuple[ProfileRow, ...]:
        """Rows of (gpu, model), in file order; empty when there are none."""
        return self._index.get((normalise_gpu(gpu), model.strip()), ())

    def has(self, gpu: str, model: str) -> bool:
        return bool(self.rows_for(gpu, model))

    def merge(self, other: ProfileTable | Iterable[ProfileRow]) -> ProfileTable:
        """A new table with the rows of both. Rows are not replaced: repeated measurements of
        one (gpu, model, partition, batch) are combined by median when latency is fitted."""
        return ProfileTable((*self.rows, *other))

    def content_hash(self) -> str:
        """sha256 (hex) of the normalised rows, independent of row order: a cache key."""
        lines = sorted(
            f"{r.gpu},{r.model},{r.partition},{r.sm_count},{r.batch},"
            f"{float(r.latency_ms)!r},{float(r.memory_mib)!r}"
            for r in self.rows
        )
        h = hashlib.sha256()
        h.update(",".join(PROFILE_COLUMNS).encode())
        for line in lines:
            h.update(b"\n")
            h.update(line.encode())
        return h.hexdigest()


@dataclass(frozen=True)
class InterferenceRow:
    """One co-location measurement (see the module docstring)."""

    gpu: str
    model: str
    mps_pct: float
    batch: int
    neighbour_pct: float
    latency_ms: float
    solo_latency_ms: float

    def __post_init__(self) -> None:
        if not self.gpu.strip():
            raise ProfileError("gpu is empty")
        if not self.model.strip():
            raise ProfileError("model is empty")
        object.__setattr__(self, "gpu", normalise_gpu(self.gpu))
        object.__setattr__(self, "model", self.model.strip())
        object.__setattr__(self, "batch", _integral("batch", self.batch))
        for name in ("mps_pct", "neighbour_pct", "latency_ms", "solo_latency_ms"):
            object.__setattr__(self, name, float(getattr(self, name)))
        _positive("mps_pct", self.mps_pct)
        if self.mps_pct > 100:
            raise ProfileError(f"mps_pct must be <= 100, got {_fmt_num(self.mps_pct)}")
        _positive("batch", self.batch)
        _positive("neighbour_pct", self.neighbour_pct)
        _positive("latency_ms", self.latency_ms)
        _positive("solo_latency_ms", self.solo_latency_ms)

    @property
    def slowdown(self) -> float:
        """Relative slowdown beside the neighbours: latency / solo latency - 1."""
        return self.latency_ms / self.solo_latency_ms - 1.0


# --- reading and writing -------------------------------------------------------------------

_R = TypeVar("_R")


def _as_int(name: str, text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise ProfileError(f"{name} {text!r} is not a number") from None
    if not math.isfinite(value) or not value.is_integer():
        raise ProfileError(f"{name} {text!r} is not an integer")
    return int(value)


def _as_float(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ProfileError(f"{name} {text!r} is not a number") from None


def _read_csv(
    path: str | os.PathLike[str],
    columns: tuple[str, ...],
    make: Callable[[Mapping[str, str]], _R],
) -> list[_R]:
    where = os.fspath(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            try:
                header = next(reader)
            except StopIteration:
                raise ProfileError(
                    f"{where}:1: empty file, expected header {','.join(columns)}"
                ) from None
            header = [h.strip() for h in header]
            missing = [c for c in columns if c not in header]
            if missing:
                raise ProfileError(
                    f"{where}:1: missing column(s) {', '.join(missing)}; "
                    f"expected header {','.join(columns)}"
                )
            pos = {c: header.index(c) for c in columns}
            out: list[_R] = []
            for fields in reader:
                line = reader.line_num
                if not fields or all(not x.strip() for x in fields):
                    continue
                if len(fields) < len(header):
                    raise ProfileError(
                        f"{where}:{line}: {len(fields)} fields, the header has {len(header)}"
                    )
                try:
                    out.append(make({c: fields[i].strip() for c, i in pos.items()}))
                except ProfileError as exc:
                    raise ProfileError(f"{where}:{line}: {exc}") from None
            return out
    except OSError as exc:
        raise ProfileError(f"{where}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{where}: not UTF-8 text: {exc.reason}") from exc
    except csv.Error as exc:
        raise ProfileError(f"{where}: malformed CSV: {exc}") from exc


def _profile_row(d: Mapping[str, str]) -> ProfileRow:
    return ProfileRow(
        gpu=d["gpu"],
        model=d["model"],
        partition=d["partition"],
        sm_count=_as_int("sm_count", d["sm_count"]),
        batch=_as_int("batch", d["batch"]),
        latency_ms=_as_float("latency_ms", d["latency_ms"]),
        memory_mib=_as_float("memory_mib", d["memory_mib"]),
    )


def _interference_row(d: Mapping[str, str]) -> InterferenceRow:
    return InterferenceRow(
        gpu=d["gpu"],
        model=d["model"],
        mps_pct=_as_float("mps_pct", d["mps_pct"]),
        batch=_as_int("batch", d["batch"]),
        neighbour_pct=_as_float("neighbour_pct", d["neighbour_pct"]),
        latency_ms=_as_float("latency_ms", d["latency_ms"]),
        solo_latency_ms=_as_float("solo_latency_ms", d["solo_latency_ms"]),
    )


def read_profiles(path: str | os.PathLike[str]) -> ProfileTable:
    """Read a profile table (format in the module docstring); :class:`ProfileError` if bad."""
    return ProfileTable(_read_csv(path, PROFILE_COLUMNS, _profile_row))


def read_interference(path: str | os.PathLike[str]) -> list[InterferenceRow]:
    """Read an interference table (format in the module docstring)."""
    return _read_csv(path, INTERFERENCE_COLUMNS, _interference_row)


def _write_csv(
    path: str | os.PathLike[str], columns: tuple[str, ...], rows: Iterable[tuple[object, ...]]
) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        for row in rows:
            w.writerow([_fmt_num(x) if isinstance(x, float) else x for x in row])


def write_profiles(rows: Iterable[ProfileRow], path: str | os.PathLike[str]) -> None:
    """Write rows (or a :class:`ProfileTable`) as a profile CSV, in the given order."""
    _write_csv(path, PROFILE_COLUMNS, (astuple(r) for r in rows))


def write_interference(rows: Iterable[InterferenceRow], path: str | os.PathLike[str]) -> None:
    """Write interference rows as CSV, in the given order."""
    _write_csv(path, INTERFERENCE_COLUMNS, (astuple(r) for r in rows))


def _data_file(name: str) -> Path:
    return Path(str(resources.files("stgs").joinpath("data", name)))


PROFILES_ENV = "STGS_PROFILES"
"""Environment variable naming the default profile table (a CSV path, or ``example``)."""
INTERFERENCE_ENV = "STGS_INTERFERENCE"
"""Environment variable naming the default interference table (a CSV path)."""


def measured_profiles_path() -> Path:
    """The shipped MEASURED profiles, ``stgs/data/profiles.csv`` (made by ``stgs profile``)."""
    return _data_file("profiles.csv")


def measured_interference_path() -> Path:
    """The shipped MEASURED co-location table, ``stgs/data/interference.csv``."""
    return _data_file("interference.csv")


def example_profiles_path() -> Path:
    """The shipped EXAMPLE profiles, ``stgs/data/example-profiles.csv``: SYNTHETIC rows for every
    catalog SKU (scripts/make_example_profiles.py), for GPUs nobody has measured yet."""
    return _data_file("example-profiles.csv")


def example_interference_path() -> Path:
    """The shipped EXAMPLE (synthetic) interference table."""
    return _data_file("example-interference.csv")


def default_profiles_path() -> Path:
    """The profile table used where a scenario names none.

    ``$STGS_PROFILES`` when set (a CSV path, or ``example`` for the synthetic example set),
    else the shipped measured profiles."""
    env = os.environ.get(PROFILES_ENV, "").strip()
    if env:
        return example_profiles_path() if env == "example" else Path(env)
    return measured_profiles_path()


def default_interference_path() -> Path:
    """The interference table that goes with :func:`default_profiles_path`.

    ``$STGS_INTERFERENCE`` when set; else the example table with ``STGS_PROFILES=example``,
    ``<stem>-interference.csv`` beside a ``$STGS_PROFILES`` file, or the shipped measured one.
    The file may not exist (then interference takes its stated default)."""
    env = os.environ.get(INTERFERENCE_ENV, "").strip()
    if env:
        return Path(env)
    prof = os.environ.get(PROFILES_ENV, "").strip()
    if prof == "example":
        return example_interference_path()
    if prof:
        p = Path(prof)
        return p.with_name(f"{p.stem}-interference.csv")
    return measured_interference_path()
