"""The batch margin: how many Poisson arrivals per cycle a batch can take and keep a share of
the requests within their SLO (docs/planner.md "Batch margin").

The model (one model of a partition, as the worker serves it): the worker visits the model once
per cycle of at most ``C`` ms (the partition's busy time, every model's planned batch with
headroom and host time: the executor is work conserving, so a cycle is never longer) and takes
up to ``b`` queued requests, oldest first. Between two visits ``N ~ Poisson(lam)`` requests
arrive, ``lam = rate x C / 1000``. A request must *start* its batch within ``W = slo - L``
(``L`` its batch's latency) of its arrival; one that arrives ``u`` before a visit may be served
at that visit or the ``floor((W - u) / C)`` after it. With ``W = (k + f) C`` (``k >= 1`` whole
cycles, the planner's rule ``d + L <= slo`` with ``C <= d``; ``0 <= f < 1``), a request that
arrives in the last ``f C`` of a cycle may wait ``k`` more visits, an earlier one ``k - 1``.
A request past its deadline misses its SLO; the worker drops it (admission), so it takes no
batch room.

Deadlines grow with arrival order, so oldest first is earliest deadline first: a request is
served iff the requests ahead of it that will be served leave it a place by its deadline, i.e.
fewer than ``b (1 + its extra visits)`` are ahead of it when it arrives; otherwise it misses,
as if it never joined. With ``Q`` the requests carried over a visit (``0 <= Q <= k b``),
``N_e ~ Poisson(lam (1 - f))`` early and ``N_l ~ Poisson(lam f)`` late arrivals:

    X1 = min(Q + N_e, k b),   X2 = min(X1 + N_l, (k + 1) b),   Q' = max(0, X2 - b),
    missed per cycle = (Q + N_e - k b)+ + (X1 + N_l - (k + 1) b)+,

a Markov chain whose stationary distribution gives the share of requests that miss:
E[missed] / lam (request-weighted, not cycle-weighted). With ``k = 1, f = 0`` it is
``E[(N - b)+] / lam = P(N >= b) - (b / lam) P(N >= b + 1)``.

:func:`cycle_capacity` is the largest ``lam`` (at most ``b``) whose miss share is at most
``1 - target``: the requests per cycle that a batch ``b`` serves. Only the chain's cycle
``C`` is an approximation, and a safe one: a cycle whose batches are not full is shorter, and
fewer requests arrive in it. ``k`` above :data:`MAX_CYCLES` is taken as :data:`MAX_CYCLES` with
``f = 0`` and ``f`` is rounded down to a multiple of 1/:data:`SLACK_STEPS` (less slack: a
smaller capacity, the safe side), so that capacities are cached per ``(b, k, f, target)``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from scipy import special, stats

__all__ = [
    "MAX_CYCLES",
    "SLACK_STEPS",
    "cycle_capacity",
    "miss_share",
    "patience",
    "z_capacity",
]

FloatArray = npt.NDArray[np.float64]

MAX_CYCLES = 4
SLACK_STEPS = 8
_REL_TOL = 1e-4  # the capacity's bisection stops at this relative width


def patience(slack_ms: float, cycle_ms: float) -> tuple[int, int]:
    """``(k, f_steps)``: a request may start ``slack_ms`` (``slo - L``) after it arrives, in
    cycles of ``cycle_ms``: ``k`` whole cycles (at least 1, at most :data:`MAX_CYCLES`) and the
    fraction ``f = f_steps / SLACK_STEPS`` of one more, rounded down."""
    if cycle_ms <= 0 or not math.isfinite(slack_ms / cycle_ms):
        return MAX_CYCLES, 0
    x = max(slack_ms / cycle_ms, 1.0) + 1e-9
    k = math.floor(x)
    if k >= MAX_CYCLES:
        return MAX_CYCLES, 0
    return k, min(SLACK_STEPS - 1, math.floor((x - k) * SLACK_STEPS))


def _pmf(lam: float, n: int) -> FloatArray:
    """Poisson(``lam``) probabilities of 0..n-1."""
    x = np.arange(n, dtype=np.float64)
    if lam <= 0:
        out = np.zeros(n)
        out[0] = 1.0
        return out
    return np.asarray(np.exp(x * math.log(lam) - lam - special.gammaln(x + 1.0)))


def _tail_excess(lam: float, c: FloatArray) -> FloatArray:
    """``E[(N - c)+]`` for ``N ~ Poisson(lam)`` at each integer ``c >= 0``."""
    if lam <= 0:
        return np.zeros_like(c, dtype=np.float64)
    # sum_{n > c} (n - c) p(n) = lam P(N >= c) - c P(N >= c + 1)
    return np.asarray(lam * stats.poisson.sf(c - 1, lam) - c * stats.poisson.sf(c, lam))


def _capped(lam: float, start: FloatArray, cap: int) -> FloatArray:
    """Rows: the distribution of ``min(s + N, cap)`` for each ``s`` in ``start`` (integers <=
    cap), N ~ Poisson(lam); columns 0..cap."""
    pmf = _pmf(lam, cap + 1)
    idx = np.arange(cap + 1)[None, :] - start[:, None].astype(np.int64)
    out = np.where(idx >= 0, pmf[np.clip(idx, 0, cap)], 0.0)
    out[:, cap] = 0.0
    out[:, cap] = np.clip(1.0 - out.sum(axis=1), 0.0, None)  # N >= cap - s
    return np.asarray(out)


def miss_share(lam: float, batch: int, cycles: int, slack_fraction: float = 0.0) -> float:
    """Share of requests that miss their deadline: Poisson(``lam``) arrivals per cycle, at most
    ``batch`` served per visit, oldest first; a request may wait ``cycles - 1`` more visits, or
    ``cycles`` when it arrives in the last ``slack_fraction`` of a cycle (module docstring)."""
    if batch < 1 or cycles < 1 or not 0 <= slack_fraction < 1:
        raise ValueError(
            f"batch, cycles >= 1 and slack_fraction in [0, 1), got {batch}, {cycles},"
            f" {slack_fraction}"
        )
    if lam <= 0:
        return 0.0
    b, k, f = int(batch), int(cycles), float(slack_fraction)
    if k == 1 and f == 0:
        return float(_tail_excess(lam, np.array([float(b)]))[0]) / lam
    lam_e, lam_l = lam * (1.0 - f), lam * f
    q = np.arange(k * b + 1, dtype=np.float64)  # carried over a visit: 0..k b
    a = _capped(lam_e, q, k * b)  # X1 | Q
    lost = _tail_excess(lam_e, k * b - q)
    if f > 0:
        x1 = np.arange(k * b + 1, dtype=np.float64)
        b2 = _capped(lam_l, x1, (k + 1) * b)  # X2 | X1
        lost = lost + a @ _tail_excess(lam_l, (k + 1) * b - x1)
        x2 = a @ b2  # X2 | Q, columns 0..(k+1) b
    else:
        x2 = a  # X2 = X1, columns 0..k b
    full = np.zeros((q.size, (k + 1) * b + 1))
    full[:, : x2.shape[1]] = x2
    trans = np.zeros((q.size, q.size))
    trans[:, 0] = full[:, : b + 1].sum(axis=1)
    trans[:, 1:] = full[:, b + 1 :]
    # stationary distribution: pi (T - I) = 0, sum pi = 1
    m = trans.T - np.eye(q.size)
    m[-1, :] = 1.0
    rhs = np.zeros(q.size)
    rhs[-1] = 1.0
    pi = np.clip(np.linalg.solve(m, rhs), 0.0, None)
    pi /= pi.sum()
    return float(np.dot(pi, lost)) / lam


@lru_cache(maxsize=8192)
def cycle_capacity(batch: int, cycles: int, slack_steps: int, target: float) -> float:
    """The requests per cycle that a batch of ``batch`` serves, keeping a share ``target`` of
    them in time, when a request may wait ``cycles`` cycles and ``slack_steps /``
    :data:`SLACK_STEPS` of one more (:func:`patience`): the largest ``lam <= batch`` with
    ``miss_share(lam, batch, cycles, f) <= 1 - target``."""
    if not 0 < target < 1:
        raise ValueError(f"target must be in (0, 1), got {target}")
    b = int(batch)
    k = max(1, min(MAX_CYCLES, int(cycles)))
    f = 0.0 if k == MAX_CYCLES else max(0, min(SLACK_STEPS - 1, slack_steps)) / SLACK_STEPS
    eps = 1.0 - target
    if miss_share(float(b), b, k, f) <= eps:
        return float(b)
    lo, hi = 0.0, float(b)
    while hi - lo > _REL_TOL * max(hi, 1e-6):
        mid = 0.5 * (lo + hi)
        if miss_share(mid, b, k, f) <= eps:
            lo = mid
        else:
            hi = mid
    return lo


def z_capacity(batch: float, z: float) -> float:
    """The former fixed margin (``batch_margin = "z"``): the ``n`` with ``n + z sqrt(n) =
    batch``, the requests a cycle may expect when a batch keeps ``z`` standard deviations of
    Poisson room."""
    if z <= 0:
        return float(batch)
    root = (-z + math.sqrt(z * z + 4.0 * batch)) / 2.0
    return root * root
