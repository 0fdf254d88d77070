"""Latency functions fitted to a profile table, and an MPS interference model.

For each (gpu, model) a :class:`LatencyModel` predicts the latency of one batch on a partition of
``sm_count`` SMs. Rows of kind ``full``, ``mps:*`` and ``green:*`` form the *shared-GPU SM
curve* (x = SM count); ``mig:*`` rows form a separate *MIG curve*, used when the caller names a
MIG profile and the model has MIG measurements (a MIG instance also owns its memory slices, so
its latency differs from an MPS share of the same SM count). Repeated measurements of one
(curve, sm_count, batch) are combined by their median.

Interpolation (monotone by construction: a larger batch is never faster, more SMs never slower):

1. Per measured SM count, latency is piecewise linear in batch: linear between measured batches,
   clamped below the smallest, extended above the largest with the slope of the last segment
   (proportional to batch when only one batch was measured: no batching gain is assumed).
2. The grid is made monotone first, by raising values only: a cumulative max along batch, then
   along decreasing SM count (values and tail slopes). This yields the smallest monotone grid that
   is >= every measurement, so corrections err on the slow (SLO-safe) side; on monotone data
   it changes nothing and measured points are reproduced exactly. Ragged grids (different
   batches at different SM counts) are first put on the union of batches, each SM count through
   its own piecewise-linear function, which leaves those functions unchanged.
3. Across SM counts, latency is linear in x = 1/sm_count (Amdahl-like, l ~ a + c/s, which the
   analytic model and the H200 measurements of docs follow). Two virtual rows bound the range:
   at x = 0 (s -> infinity) the line through the two largest measured counts, kept within
   [0.9, 1] x the value at the largest count; at x = 1 (one SM) the line through the two
   smallest counts, with its slope made non-decreasing in batch. With one measured SM count,
   more SMs give no gain and fewer scale latency as 1/s (all work parallel: the pessimistic
   Amdahl case). Linear interpolation in x between monotone rows is monotone in both
   directions, and a whole row at a given SM count is a blend of two stored rows, so
   :meth:`LatencyModel.latency_curve` costs one ``np.interp`` per call (rows are cached).
4. Below the smallest SM count measured on a curve the line through the two smallest counts is
   an extrapolation, which can be optimistic (the work may scale closer to 1/s there): the
   planner multiplies it by its ``extrapolation_margin`` (``latency_curve(...,
   extrapolation_margin=f)``; :meth:`LatencyModel.extrapolates` says where) or, with
   ``"forbid"``, uses no such partition. The simulator predicts with the line as it is.

Partition kinds: an MPS client runs 4-7% slower than a green context or the whole GPU at the
same SM count (measured on an H100: the MPS server's per-launch overhead), so rows are also
fitted per *family* where rows of several kinds exist: ``mps`` (``mps:*`` rows), ``green``
(``green:*`` rows) and ``full`` (the whole GPU). ``latency_curve(..., kind="mps")`` uses the MPS
family when it has two or more SM counts; ``kind="full"`` the whole-GPU rows; ``"green"`` and
MIG predictions without MIG rows the green family (green contexts can be much slower than the
whole GPU at nearly its SM count: vit_b_16 at 128 of 132 SMs, +29%); else (and with
``kind=None``) the shared curve of all non-MIG rows.

Monotone splines (PCHIP) were considered: they are smoother but need >= 3 points per axis,
overshoot nothing yet extrapolate poorly, and cost more per evaluation; piecewise-linear is
exact at measurements and easy to reason about.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from stgs.errors import ProfileError
from stgs.interference import WeightsFile, load_weights
from stgs.profiles import InterferenceRow, ProfileRow, ProfileTable, normalise_gpu

__all__ = [
    "DEFAULT_INTERFERENCE_GAMMA",
    "FitReport",
    "InterferenceModel",
    "LatencyModel",
    "build_latency_models",
    "fit_report",
]

FloatArray = npt.NDArray[np.float64]

_CACHE_SIZE = 4096  # cached (sm_count, mig_profile) rows per model

SM_CEILING_FLOOR = 0.9
"""Above the largest measured SM count latency never drops below this x its value there."""


def _row_on_grid(grid: FloatArray, batches: FloatArray, lat: FloatArray, tail: float) -> FloatArray:
    """A piecewise-linear batch function (clamped below, ``tail`` slope above) on ``grid``."""
    out = np.interp(grid, batches, lat)
    above = grid > batches[-1]
    out[above] = lat[-1] + tail * (grid[above] - batches[-1])
    return out


@dataclass(frozen=True)
class _Curve:
    """A monotone latency grid: rows at knots ``xs`` (1/sm_count, ascending) over ``grid``."""

    xs: FloatArray  # (m,) ascending knots in 1/s; xs[0] == 0 (virtual row), m >= 2
    grid: FloatArray  # (n,) ascending batch grid
    values: FloatArray  # (m, n) latency at (xs[i], grid[j])
    tails: FloatArray  # (m,) slope d latency / d batch above grid[-1]
    sm_counts: tuple[int, ...]  # measured SM counts, ascending

    @staticmethod
    def fit(points: Mapping[tuple[int, int], float]) -> _Curve:
        """Fit from {(sm_count, batch): latency_ms}; see the module docstring."""
        by_sm: dict[int, list[tuple[int, float]]] = {}
        for (s, b), lat in points.items():
            by_sm.setdefault(s, []).append((b, lat))
        sms = sorted(by_sm, reverse=True)  # largest first: ascending x
        grid = np.array(sorted({b for _, b in points}), dtype=np.float64)
        rows: list[FloatArray] = []
        tails: list[float] = []
        for s in sms:
            pts = sorted(by_sm[s])
            bs = np.array([b for b, _ in pts], dtype=np.float64)
            ls = np.maximum.accumulate(np.array([v for _, v in pts], dtype=np.float64))
            if len(bs) >= 2:
                tail = float((ls[-1] - ls[-2]) / (bs[-1] - bs[-2]))
            else:
                tail = float(ls[-1] / bs[-1])
            rows.append(_row_on_grid(grid, bs, ls, tail))
            tails.append(tail)
        values = np.array(rows)
        _transfer_shape(values, grid, sms, by_sm)
        tail_arr = np.array(tails)
        # Fewer SMs are never faster: raise each row to the row of the next larger SM count.
        values = np.maximum.accumulate(values, axis=0)
        tail_arr = np.maximum.accumulate(tail_arr)
        xs = 1.0 / np.array(sms, dtype=np.float64)

        # Virtual row at x = 0 (infinitely many SMs).
        v_k, t_k, x_k = values[0], float(tail_arr[0]), float(xs[0])
        if len(sms) >= 2:
            dx = float(xs[1] - xs[0])
            d_v = (values[1] - v_k) / dx
            d_t = float(tail_arr[1] - t_k) / dx
            v_inf = np.maximum(v_k - x_k * d_v, SM_CEILING_FLOOR * v_k)
            v_inf = np.minimum(np.maximum.accumulate(v_inf), v_k)
            t_inf = min(max(t_k - x_k * d_t, SM_CEILING_FLOOR * t_k), t_k)
        else:
            v_inf, t_inf = v_k.copy(), t_k
        knots_x = [0.0, *xs.tolist()]
        knots_v = [v_inf, *values]
        knots_t = [t_inf, *tail_arr.tolist()]

        # Virtual row at x = 1 (one SM), when the smallest measured count is above one.
        x_1 = float(xs[-1])
        if x_1 < 1.0:
            v_1, t_1 = values[-1], float(tail_arr[-1])
            if len(sms) >= 2:
                dx = float(xs[-1] - xs[-2])
                c_v = np.maximum.accumulate(np.maximum((v_1 - values[-2]) / dx, 0.0))
                c_t = max(float(t_1 - tail_arr[-2]) / dx, 0.0)
            else:  # latency proportional to 1/s
                c_v, c_t = v_1 / x_1, t_1 / x_1
            knots_x.append(1.0)
            knots_v.append(v_1 + (1.0 - x_1) * c_v)
            knots_t.append(t_1 + (1.0 - x_1) * c_t)
        return _Curve(
            xs=np.array(knots_x, dtype=np.float64),
            grid=grid,
            values=np.array(knots_v, dtype=np.float64),
            tails=np.array(knots_t, dtype=np.float64),
            sm_counts=tuple(sorted(sms)),
        )

    def row(self, sm_count: float) -> tuple[FloatArray, float]:
        """The batch function at ``sm_count``: values on ``grid`` and the tail slope."""
        x = 1.0 / sm_count
        xs = self.xs
        i = int(np.searchsorted(xs, x, side="right")) - 1
        i = min(max(i, 0), len(xs) - 2)
        w = (x - xs[i]) / (xs[i + 1] - xs[i])
        w = min(max(float(w), 0.0), 1.0)
        if w == 0.0:
            return self.values[i], float(self.tails[i])
        if w == 1.0:
            return self.values[i + 1], float(self.tails[i + 1])
        vals = (1.0 - w) * self.values[i] + w * self.values[i + 1]
        return vals, float((1.0 - w) * self.tails[i] + w * self.tails[i + 1])


def _transfer_shape(
    values: FloatArray,
    grid: FloatArray,
    sms: Sequence[int],
    by_sm: Mapping[int, Sequence[tuple[int, float]]],
) -> None:
    """Fill a row's unmeasured interior grid batch from the shape of the nearest row that has it.

    Ragged grids (a batch measured at some SM counts, not at others) are first filled by each
    row's own linear interpolation; where the nearest row (in 1/SM count) measured the batch and
    the two around it, its deviation from that linear interpolation (e.g. a cuDNN algorithm
    switch at batch 8, which every SM count shows) is carried over as a ratio. Rows that measured
    every grid batch, and so every measured point, are untouched.
    """
    meas = {s: {b: v for b, v in pts} for s, pts in by_sm.items()}
    xs = {s: 1.0 / s for s in sms}
    for i, s in enumerate(sms):
        own = meas[s]
        bs = sorted(own)
        for j, g in enumerate(grid):
            gb = int(g)
            if gb in own or not bs[0] < gb < bs[-1]:
                continue
            lo = max(b for b in bs if b < gb)
            hi = min(b for b in bs if b > gb)
            donors = [q for q in sms if q != s and {gb, lo, hi} <= meas[q].keys()]
            if not donors:
                continue
            q = min(donors, key=lambda q: abs(xs[q] - xs[s]))
            mq = meas[q]
            lin = mq[lo] + (mq[hi] - mq[lo]) * (gb - lo) / (hi - lo)
            if lin > 0:
                values[i, j] *= mq[gb] / lin


def _eval(grid: FloatArray, vals: FloatArray, tail: float, batches: FloatArray) -> FloatArray:
    out = np.interp(batches, grid, vals)
    top = grid[-1]
    return np.where(batches > top, vals[-1] + tail * (batches - top), out)


def _median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def _check_sm(sm_count: float) -> None:
    if not sm_count >= 1:
        raise ValueError(f"sm_count must be >= 1, got {sm_count}")


class LatencyModel:
    """Latency and memory of one model on one GPU, fitted to its profile rows.

    ``LatencyModel(rows)`` needs rows of exactly one (gpu, model); see the module docstring for
    the interpolation. Raises :class:`ProfileError` for no rows or mixed (gpu, model).
    """

    def __init__(self, rows: Iterable[ProfileRow]) -> None:
        self.rows: tuple[ProfileRow, ...] = tuple(rows)
        if not self.rows:
            raise ProfileError("no profile rows to fit a latency model to")
        keys = {(r.gpu, r.model) for r in self.rows}
        if len(keys) > 1:
            raise ProfileError(f"rows of several (gpu, model) pairs: {sorted(keys)}")
        self.gpu, self.model = next(iter(keys))

        shared: dict[tuple[int, int], list[float]] = {}
        fam: dict[str, dict[tuple[int, int], list[float]]] = {"mps": {}, "green": {}, "full": {}}
        mig: dict[tuple[int, int], list[float]] = {}
        per_profile: dict[str, dict[tuple[int, int], list[float]]] = {}
        memory: dict[int, float] = {}
        for r in self.rows:
            key = (r.sm_count, r.batch)
            if r.kind == "mig":
                mig.setdefault(key, []).append(r.latency_ms)
                prof = per_profile.setdefault(r.partition_arg or "", {})
                prof.setdefault(key, []).append(r.latency_ms)
            else:
                shared.setdefault(key, []).append(r.latency_ms)
                fam[r.kind if r.kind in fam else "full"].setdefault(key, []).append(r.latency_ms)
            memory[r.batch] = max(memory.get(r.batch, 0.0), r.memory_mib)

        self.has_mig_measurements: bool = bool(mig)
        # Measured points, {(sm_count, batch): median latency}, kept for fit_report.
        self._shared_points = {k: _median(v) for k, v in shared.items()}
        self._profile_points = {
            name: {k: _median(v) for k, v in pts.items()} for name, pts in per_profile.items()
        }
        mig_curve = _Curve.fit({k: _median(v) for k, v in mig.items()}) if mig else None
        if shared:
            self._shared = _Curve.fit(self._shared_points)
        else:  # MIG rows only: they serve as the SM curve too
            assert mig_curve is not None
            self._shared = mig_curve
        self._mig: _Curve | None = mig_curve
        # Per-family curves (see the module docstring), where rows of several kinds exist: MPS
        # and green curves need >= 2 SM counts; the whole-GPU rows (one SM count) serve "full".
        self._family_points: dict[str, dict[tuple[int, int], float]] = {}
        self._families: dict[str, _Curve] = {}
        mixed = sum(1 for v in fam.values() if v) >= 2
        for name, fpts in fam.items():
            med = {k: _median(v) for k, v in fpts.items()}
            if mixed and med and (name == "full" or len({sm for sm, _ in med}) >= 2):
                self._family_points[name] = med
                self._families[name] = _Curve.fit(med)
        # A MIG profile measured at one SM count keeps its own batch curve (two profiles may
        # share an SM count but not memory slices, e.g. 1g.10gb and 1g.20gb on an A100).
        self._profiles: dict[str, tuple[int, _Curve]] = {}
        for name, pts in self._profile_points.items():
            sms = {s for s, _ in pts}
            if len(sms) == 1:
                self._profiles[name] = (sms.pop(), _Curve.fit(pts))

        mb = np.array(sorted(memory), dtype=np.float64)
        mm = np.maximum.accumulate(np.array([memory[int(b)] for b in mb], dtype=np.float64))
        self._mem_grid, self._mem_vals = mb, mm
        self._mem_tail = float((mm[-1] - mm[-2]) / (mb[-1] - mb[-2])) if len(mb) >= 2 else 0.0

        self.max_measured_batch: int = max(r.batch for r in self.rows)
        self.sm_counts: tuple[int, ...] = self._shared.sm_counts
        self.mig_profiles: tuple[str, ...] = tuple(sorted(per_profile))
        self._cache: dict[
            tuple[float, str | None, str | None], tuple[FloatArray, FloatArray, float]
        ] = {}

    @classmethod
    def from_table(cls, table: ProfileTable, gpu: str, model: str) -> LatencyModel:
        """The model of (gpu, model) in ``table``; :class:`ProfileError` if it has no rows."""
        rows = table.rows_for(gpu, model)
        if not rows:
            raise ProfileError(f"no profile rows for model {model!r} on GPU {gpu!r}")
        return cls(rows)

    def __repr__(self) -> str:
        return (
            f"LatencyModel({self.gpu}, {self.model}, sm_counts={list(self.sm_counts)}, "
            f"mig={list(self.mig_profiles)}, max_batch={self.max_measured_batch})"
        )

    def _curve(self, sm_count: float, mig_profile: str | None, kind: str | None) -> _Curve:
        """The curve a prediction at (``sm_count``, ``mig_profile``, ``kind``) comes from."""
        if mig_profile is not None and self._mig is not None:
            own = self._profiles.get(mig_profile)
            if own is not None and own[0] == sm_count:
                return own[1]
            return self._mig
        if kind == "mps":
            return self._families.get("mps", self._shared)
        if kind == "full" and "full" in self._families:
            full = self._families["full"]
            return full if sm_count in full.sm_counts else self._families.get("green", full)
        if kind in ("full", "green", "mig") or mig_profile is not None:
            # a MIG instance without MIG rows: predicted from the green-context SM curve
            return self._families.get("green", self._shared)
        return self._shared

    def smallest_measured(
        self, sm_count: float, *, mig_profile: str | None = None, kind: str | None = None
    ) -> int:
        """The smallest SM count measured on the curve a prediction at ``sm_count`` (of this
        partition kind) comes from: below it latency is extrapolated, not interpolated."""
        return self._curve(sm_count, mig_profile, kind).sm_counts[0]

    def extrapolates(
        self, sm_count: float, *, mig_profile: str | None = None, kind: str | None = None
    ) -> bool:
        """Whether a prediction at ``sm_count`` lies below the measured range of its curve
        (a partition smaller than the smallest profiled one of its kind)."""
        return sm_count < self.smallest_measured(sm_count, mig_profile=mig_profile, kind=kind)

    def _row(
        self, sm_count: float, mig_profile: str | None, kind: str | None = None
    ) -> tuple[FloatArray, FloatArray, float]:
        key = (sm_count, mig_profile, kind)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        _check_sm(sm_count)
        curve = self._curve(sm_count, mig_profile, kind)
        vals, tail = curve.row(sm_count)
        out = (curve.grid, vals, tail)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = out
        return out

    def latency_curve(
        self,
        batches: npt.ArrayLike,
        sm_count: float,
        *,
        mig_profile: str | None = None,
        kind: str | None = None,
        extrapolation_margin: float = 1.0,
    ) -> FloatArray:
        """Latency (ms) of each batch size in ``batches`` on ``sm_count`` SMs.

        ``kind`` is the partition kind (``full``, ``mps``, ``mig``, ``green``; None: any), which
        picks the row family the prediction comes from (see the module docstring).

        With ``mig_profile`` (a MIG instance of that profile and ``sm_count`` SMs) the MIG
        curve is used when this model has MIG measurements: the profile's own rows when it was
        measured at this SM count, else the MIG curve across SM counts; without MIG rows the
        shared-GPU SM curve predicts MIG latency at the instance's SM count.

        Below the smallest SM count measured on that curve (:meth:`extrapolates`) the
        prediction is multiplied by ``extrapolation_margin`` (the planner's
        ``PlannerOptions.extrapolation_margin``; 1: the extrapolation as it is).
        """
        b = np.asarray(batches, dtype=np.float64)
        if b.size and not bool(np.all(b > 0)):
            raise ValueError("batch sizes must be > 0")
        grid, vals, tail = self._row(sm_count, mig_profile, kind)
        out = _eval(grid, vals, tail, b)
        return out * self._margin(sm_count, mig_profile, kind, extrapolation_margin)

    def latency_ms(
        self,
        batch: float,
        sm_count: float,
        *,
        mig_profile: str | None = None,
        kind: str | None = None,
        extrapolation_margin: float = 1.0,
    ) -> float:
        """Latency (ms) of one batch of ``batch`` on ``sm_count`` SMs (see latency_curve)."""
        if not batch > 0:
            raise ValueError(f"batch size must be > 0, got {batch}")
        grid, vals, tail = self._row(sm_count, mig_profile, kind)
        out = float(_eval(grid, vals, tail, np.array([batch], dtype=np.float64))[0])
        return out * self._margin(sm_count, mig_profile, kind, extrapolation_margin)

    def _margin(
        self, sm_count: float, mig_profile: str | None, kind: str | None, margin: float
    ) -> float:
        if margin == 1.0:
            return 1.0
        if not (math.isfinite(margin) and margin >= 1.0):
            raise ValueError(f"extrapolation_margin must be a factor >= 1, got {margin}")
        return margin if self.extrapolates(sm_count, mig_profile=mig_profile, kind=kind) else 1.0

    def memory_mib(self, batch: float) -> float:
        """Device memory (MiB) at ``batch``: the largest measured over partitions, linear in
        batch between measured batches and above them (slope of the last segment), clamped
        below the smallest measured batch, never decreasing."""
        return float(
            _eval(
                self._mem_grid,
                self._mem_vals,
                self._mem_tail,
                np.array([batch], dtype=np.float64),
            )[0]
        )


def build_latency_models(table: ProfileTable) -> dict[tuple[str, str], LatencyModel]:
    """A :class:`LatencyModel` for every (gpu, model) of ``table``, keyed by (gpu, model)."""
    return {
        (gpu, model): LatencyModel(table.rows_for(gpu, model))
        for gpu in table.gpus()
        for model in table.models(gpu)
    }


# --- fit quality -------------------------------------------------------------------------


@dataclass(frozen=True)
class FitReport:
    """Leave-one-out absolute relative errors of a latency model (NaN when ``n_points`` is 0)."""

    gpu: str
    model: str
    n_points: int
    median_error: float
    p95_error: float
    max_error: float
    errors: tuple[float, ...]

    def __str__(self) -> str:
        return (
            f"{self.gpu} {self.model}: n={self.n_points} median={self.median_error:.2%} "
            f"p95={self.p95_error:.2%} max={self.max_error:.2%}"
        )


def _report(gpu: str, model: str, errors: list[float]) -> FitReport:
    if not errors:
        nan = math.nan
        return FitReport(gpu, model, 0, nan, nan, nan, ())
    e = np.asarray(errors, dtype=np.float64)
    return FitReport(
        gpu,
        model,
        len(errors),
        float(np.median(e)),
        float(np.percentile(e, 95)),
        float(e.max()),
        tuple(errors),
    )


def fit_report(
    model: LatencyModel | Iterable[ProfileRow],
    *,
    mode: Literal["point", "sm"] = "point",
) -> FitReport:
    """Leave-one-out error of the latency model of one (gpu, model).

    ``mode="point"``: each measured point (a curve, an SM count or MIG profile, a batch; the
    median of its repeated rows) is left out, the model refitted without it and the point
    predicted; only *interior* points count, those with measured batches below and above at
    the same SM count or MIG profile, since removing any other point would leave nothing to
    interpolate from (edges are extrapolated, not interpolated).
    ``mode="sm"``: each interior measured SM count of each family's curve (the MPS and the
    whole-GPU/green curves where both exist, else the shared curve; not the smallest or the
    largest count) is left out whole and its points predicted across SM counts (linear in 1/s).
    Errors are |predicted - measured| / measured. Each refit is of the one curve the point
    belongs to (the shared SM curve or the MIG profile's own curve), as the model would use it;
    a MIG profile measured at several SM counts (unusual) is not assessed.
    """
    lm = model if isinstance(model, LatencyModel) else LatencyModel(model)
    errors: list[float] = []

    def loo(points: dict[tuple[int, int], float], drop: set[tuple[int, int]]) -> None:
        curve = _Curve.fit({k: v for k, v in points.items() if k not in drop})
        for s, b in drop:
            vals, tail = curve.row(s)
            pred = float(_eval(curve.grid, vals, tail, np.array([b], dtype=np.float64))[0])
            errors.append(abs(pred - points[(s, b)]) / points[(s, b)])

    if mode == "point":
        # each point is predicted by the curve the planner would use for its partition kind
        if lm._family_points:
            families = [
                lm._family_points[f] for f in ("mps", "green", "full") if f in lm._family_points
            ]
        else:
            families = [lm._shared_points] if lm._shared_points else []
        families += [lm._profile_points[name] for name in sorted(lm._profiles)]
        for points in families:
            batches_at: dict[int, list[int]] = {}
            for s, b in points:
                batches_at.setdefault(s, []).append(b)
            for s, b in sorted(points):
                if min(batches_at[s]) < b < max(batches_at[s]):
                    loo(points, {(s, b)})
    elif mode == "sm":
        if lm._family_points:
            fams = [lm._family_points[f] for f in ("mps", "green") if f in lm._family_points]
        else:
            fams = [lm._shared_points]
        for points in fams:
            sms = sorted({s for s, _ in points})
            for sm in sms[1:-1]:
                loo(points, {k for k in points if k[0] == sm})
    else:
        raise ValueError(f"mode must be 'point' or 'sm', got {mode!r}")
    return _report(lm.gpu, lm.model, errors)


# --- interference ------------------------------------------------------------------------

DEFAULT_INTERFERENCE_GAMMA = 0.45


class InterferenceModel:
    """Slowdown of a model in an MPS partition beside co-located MPS neighbours.

    ``slowdown = 1 + gamma * sum_n (pct_n / 100) * w(b_n)`` over the partition's MPS neighbours
    on the same GPU (or the same MIG instance), ``pct_n`` their shares and ``w(b_n)`` the
    *neighbour weight* of the batches they run (:mod:`stgs.interference`: measured per GPU,
    1 where unmeasured or when the batch is not known, so ``1 + gamma * neighbour_pct / 100``).
    Separate MPS partitions still share L2 and memory bandwidth, so co-location costs latency.

    Default ``gamma = 0.45`` (no measurements for the pair): a stated, conservative default
    chosen to cover the co-location measurements of docs/gpu-facts.md (H200, CUDA graphs, fp16):
    a 50% neighbour cost +7% to +21% (resnet50 beside vgg16: +19%/+7%; bert beside
    densenet161: +21%/+19%), i.e. gamma 0.14-0.42; a 30/30/40 split cost +3% to +31% with
    60-70% of neighbours, i.e. gamma up to 0.44 when the +31% partition was a 30% one (70%
    neighbours: 0.45 x 0.7 = +31.5%). Caveat: had the +31% been the 40% partition (60%
    neighbours), gamma 0.52 would be needed; the source does not say which.
    Unpartitioned sharing (clients at 100%) is not modelled: it is unfair (5.5x measured).

    With interference rows for (gpu, model): gamma = the 90th percentile of
    ``(latency / solo - 1) / (neighbour_pct / 100)`` over those rows, never below 0.
    ``weights``: the neighbour weights (default: the file :func:`stgs.interference.load_weights`
    reads).
    """

    def __init__(
        self,
        gammas: Mapping[tuple[str, str], float] | None = None,
        default_gamma: float = DEFAULT_INTERFERENCE_GAMMA,
        weights: WeightsFile | None = None,
    ) -> None:
        if not (math.isfinite(default_gamma) and default_gamma >= 0):
            raise ValueError(f"default_gamma must be finite and >= 0, got {default_gamma}")
        self.default_gamma = float(default_gamma)
        self.gammas: dict[tuple[str, str], float] = {
            (normalise_gpu(g), m): float(v) for (g, m), v in (gammas or {}).items()
        }
        self.weights = weights if weights is not None else load_weights()

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[InterferenceRow],
        default_gamma: float = DEFAULT_INTERFERENCE_GAMMA,
        weights: WeightsFile | None = None,
    ) -> InterferenceModel:
        """Fit gamma per (gpu, model) from co-location rows (see the class docstring)."""
        ratios: dict[tuple[str, str], list[float]] = {}
        for r in rows:
            ratios.setdefault((r.gpu, r.model), []).append(r.slowdown / (r.neighbour_pct / 100.0))
        gammas = {
            k: max(0.0, float(np.percentile(np.asarray(v, dtype=np.float64), 90)))
            for k, v in ratios.items()
        }
        return cls(gammas, default_gamma, weights)

    def gamma(self, model: str, gpu: str) -> float:
        """The fitted gamma of (gpu, model), else the default."""
        return self.gammas.get((normalise_gpu(gpu), model.strip()), self.default_gamma)

    def is_fitted(self, model: str, gpu: str) -> bool:
        return (normalise_gpu(gpu), model.strip()) in self.gammas

    def neighbour_weight(self, gpu: str, batch: int | None) -> float:
        """The weight of a neighbour on ``gpu`` running batches of ``batch`` (None: not known,
        the largest weight)."""
        return self.weights.weight(gpu, batch)

    def slowdown(
        self, model: str, gpu: str, neighbour_pct: float, neighbour_batch: int | None = None
    ) -> float:
        """Multiplicative latency factor (>= 1) for ``model`` on ``gpu`` beside MPS neighbours
        holding ``neighbour_pct`` percent in total (0 -> 1.0) that run batches of at most
        ``neighbour_batch`` (None: not known, the worst case)."""
        if not (math.isfinite(neighbour_pct) and neighbour_pct >= 0):
            raise ValueError(f"neighbour_pct must be finite and >= 0, got {neighbour_pct}")
        w = self.neighbour_weight(gpu, neighbour_batch)
        return 1.0 + self.gamma(model, gpu) * neighbour_pct / 100.0 * w

    def slowdown_beside(
        self, model: str, gpu: str, neighbours: Iterable[tuple[float, int | None]]
    ) -> float:
        """The factor beside several neighbours: ``(share %, largest batch it runs)`` each."""
        load = 0.0
        for pct, batch in neighbours:
            if not (math.isfinite(pct) and pct >= 0):
                raise ValueError(f"a neighbour's share must be finite and >= 0, got {pct}")
            load += pct / 100.0 * self.neighbour_weight(gpu, batch)
        return 1.0 + self.gamma(model, gpu) * load
