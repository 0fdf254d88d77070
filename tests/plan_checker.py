"""An independent validity check of a plan (``stgs.plan/v1``) against its scenario.

Written apart from the planner: nothing here comes from ``partitioner`` (no schedule, shapes,
curves or packing). Everything is re-derived from the plan's JSON form (``Plan.to_dict()``),
the GPU catalog (SKU and MIG profile data only: placement rules are re-implemented here) and
the latency / interference models fitted to the scenario's profile tables.

Per partition, with headroom ``h`` and duty cycle ``d``, each model ``m`` with batch ``b_m``
and rate ``r_m`` has planning latency

    L_m = (1 + h) * l_m(b_m, sm_count[, mig_profile]) * slowdown_m + host_batch + b_m host_item

where ``slowdown_m`` is the interference model's factor for the *actual* MPS neighbours of the
partition (the other MPS shares on the same non-MIG GPU or in the same MIG instance, each with
the largest batch it runs, for its neighbour weight; none for whole GPUs and whole MIG
instances), and the plan is valid when

    sum_m L_m <= d,   b_m >= r_m d / 1000,   d + L_m + host_request <= slo_m,
    sum_m mem_m(b_m) <= memory

(``host_*``: the scenario's ``planner.host_*_ms``, the host time around a batch and a
request's way to the worker and back). Below the smallest SM count its latency function
measured for the partition's kind, ``l_m`` is multiplied by ``planner.extrapolation_margin``;
with ``"forbid"`` such a partition is a violation.

Tolerances: 1e-6, plus the rounding of the plan's JSON (duty cycles to 1e-4 ms, rates to 1e-6
request/s, latencies to 1e-4 ms, memory to 0.1 MiB).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from stgs.catalog import GpuSku, MigProfile, get_sku
from stgs.errors import MigLayoutError, UnknownSkuError
from stgs.latency import InterferenceModel, LatencyModel, build_latency_models
from stgs.plan import Plan
from stgs.profiles import (
    default_interference_path,
    default_profiles_path,
    read_interference,
    read_profiles,
)
from stgs.scenario import Scenario

__all__ = [
    "assert_valid",
    "build_models",
    "check_plan",
    "mig_layout_violations",
]

PLAN_FORMAT = "stgs.plan/v1"  # spelled out here on purpose, not imported from stgs.plan

EPS = 1e-6
D_ROUND = 0.5e-4  # duty_cycle_ms is rounded to 4 decimals in the JSON
RATE_ROUND = 0.5e-6  # rate_rps to 6 decimals
LAT_ROUND = 0.5e-4  # latency_ms to 4 decimals
MEM_ROUND = 0.05  # memory_mib to 1 decimal
LATENCY_REL_TOL = 0.01  # reported latency vs re-derived latency


# ------------------------------------------------------------------------------ models
def build_models(
    scenario: Scenario,
) -> tuple[dict[tuple[str, str], LatencyModel], InterferenceModel]:
    """Latency models and interference model of a scenario, as its own documentation says:
    the scenario's profile table, else the shipped one; its interference table, else the
    shipped one when the profiles are the shipped ones, else none."""
    table = read_profiles(
        scenario.profiles if scenario.profiles is not None else default_profiles_path()
    )
    if scenario.interference is not None:
        rows = read_interference(scenario.interference)
    elif scenario.profiles is None:
        rows = read_interference(default_interference_path())
    else:
        rows = []
    interference = InterferenceModel.from_rows(
        rows, default_gamma=scenario.options.interference_gamma
    )
    return build_latency_models(table), interference


# ------------------------------------------------------------------------------ MIG layout
def mig_layout_violations(sku: GpuSku, instances: Sequence[tuple[int, str]]) -> list[str]:
    """Why the GPU instances ``(start, profile)`` are not a valid MIG layout of ``sku``.

    From scratch: each instance starts where its profile may start and spans its profile's
    memory slices; no two instances share a memory slice; at most ``sku.compute_slices``
    compute slices in all; at most ``max_count`` instances of a profile.
    """
    out: list[str] = []
    if not sku.mig_profiles:
        return [f"{sku.name} has no MIG profiles but the plan places MIG instances on it"]
    profiles: dict[str, MigProfile] = {p.name: p for p in sku.mig_profiles}
    owner: dict[int, str] = {}  # memory slice -> instance label
    compute = 0
    counts: dict[str, int] = defaultdict(int)
    for start, name in sorted(instances):
        label = f"{name}@{start}"
        prof = profiles.get(name)
        if prof is None:
            out.append(f"{label}: {sku.name} has no MIG profile {name!r}")
            continue
        if start not in prof.starts:
            out.append(f"{label}: {name} may only start at memory slices {list(prof.starts)}")
        end = start + prof.memory_slices
        if start < 0 or end > sku.memory_slices:
            last = sku.memory_slices - 1
            out.append(f"{label}: spans memory slices {start}..{end - 1}, outside 0..{last}")
        for s in range(start, end):
            if s in owner:
                out.append(f"{label} overlaps {owner[s]} at memory slice {s}")
                break
        for s in range(start, end):
            owner.setdefault(s, label)
        compute += prof.compute_slices
        counts[name] += 1
    if compute > sku.compute_slices:
        out.append(f"{compute} compute slices in use, more than {sku.compute_slices}")
    for name, n in sorted(counts.items()):
        if name in profiles and n > profiles[name].max_count:
            out.append(f"{n} instances of {name}, at most {profiles[name].max_count}")
    return out


# ------------------------------------------------------------------------------ helpers
def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def _int(x: Any) -> int | None:
    if isinstance(x, bool) or not isinstance(x, int):
        return None
    return x


def _sku(name: str) -> GpuSku | None:
    try:
        return get_sku(name)
    except UnknownSkuError:
        return None


def _profile(sku: GpuSku, name: Any) -> MigProfile | None:
    if not isinstance(name, str):
        return None
    try:
        return sku.mig_profile(name)
    except MigLayoutError:
        return None


# ------------------------------------------------------------------------------ the check
def check_plan(
    plan: Plan | Mapping[str, Any],
    scenario: Scenario,
    latency_models: Mapping[tuple[str, str], LatencyModel],
    interference: InterferenceModel,
) -> list[str]:
    """Every way ``plan`` breaks the rules for ``scenario``; empty when it is valid."""
    data: Mapping[str, Any] = plan.to_dict() if isinstance(plan, Plan) else plan
    v: list[str] = []
    if data.get("format") != PLAN_FORMAT:
        v.append(f"format is {data.get('format')!r}, expected {PLAN_FORMAT!r}")

    models = {m.name: m for m in scenario.models}
    opts = scenario.options
    h = scenario.headroom
    served: dict[str, float] = defaultdict(float)
    n_assign: dict[str, int] = defaultdict(int)

    gpus = data.get("gpus")
    if not isinstance(gpus, list):
        return [*v, "plan has no list of gpus"]
    if len(gpus) != len(scenario.gpus):
        v.append(f"plan has {len(gpus)} GPUs, the scenario {len(scenario.gpus)}")
    n_used = 0
    for pos, g in enumerate(gpus):
        idx = g.get("index")
        where = f"gpu {idx}"
        if idx != pos:
            v.append(f"{where}: at position {pos} of the GPU list, expected index {pos}")
        if pos >= len(scenario.gpus):
            v.append(f"{where}: the scenario has no GPU {pos}")
            continue
        spec = scenario.gpus[pos]
        sku = _sku(str(g.get("sku")))
        want = get_sku(spec.sku)
        if sku is None or sku.name != want.name:
            v.append(f"{where}: sku {g.get('sku')!r}, the scenario has {want.name}")
            continue
        mig = g.get("mig")
        if not isinstance(mig, bool):
            v.append(f"{where}: mig is {mig!r}, not a boolean")
            mig = bool(mig)
        if mig and not sku.mig_profiles:
            v.append(f"{where}: MIG mode on {sku.name}, which has no MIG")
        if mig and not spec.mig:
            v.append(f"{where}: MIG mode, but the scenario does not allow MIG on this GPU")
        parts = g.get("partitions") or []
        if parts:
            n_used += 1
        kinds = {p.get("kind") for p in parts}
        if not parts:
            mode = "idle"
        elif mig:
            mode = "mig+mps" if "mps" in kinds else "mig"
        else:
            mode = "mps" if "mps" in kinds else "whole"
        if g.get("mode") != mode:
            v.append(f"{where}: mode {g.get('mode')!r}, its partitions make it {mode!r}")
        v.extend(
            _check_gpu(where, sku, bool(mig), parts, models, latency_models, interference, h, opts)
        )
        for p in parts:
            for m in p.get("models") or []:
                r = _num(m.get("rate_rps"))
                if r is not None:
                    served[str(m.get("name"))] += r
                    n_assign[str(m.get("name"))] += 1
    if data.get("gpus_used") != n_used:
        v.append(f"gpus_used is {data.get('gpus_used')!r}, {n_used} GPUs have partitions")

    # ------------------------------------------------------------------ coverage
    unserved: dict[str, float] = {}
    for u in data.get("unserved") or []:
        name = str(u.get("name"))
        r = _num(u.get("rate_rps"))
        if name not in models:
            v.append(f"unserved lists {name!r}, not a model of the scenario")
        if r is None or r < 0:
            v.append(f"unserved {name}: rate_rps {u.get('rate_rps')!r} is not a rate >= 0")
            continue
        if not str(u.get("reason") or "").strip():
            v.append(f"unserved {name}: no reason given")
        unserved[name] = unserved.get(name, 0.0) + r
    for name in served:
        if name not in models:
            v.append(f"plan serves {name!r}, not a model of the scenario")
    feasible = data.get("feasible")
    if not isinstance(feasible, bool):
        v.append(f"feasible is {feasible!r}, not a boolean")
    for name, m in models.items():
        slack = m.rate_rps * 1e-6 + RATE_ROUND * (n_assign[name] + 1)
        if feasible is True:
            if served[name] < m.rate_rps - slack:
                v.append(
                    f"{name}: serves {served[name]:.6g} rps of its rate {m.rate_rps:g} in a "
                    f"plan marked feasible"
                )
        elif served[name] + unserved.get(name, 0.0) < m.rate_rps - slack:
            v.append(
                f"{name}: served {served[name]:.6g} + unserved {unserved.get(name, 0.0):.6g} rps < "
                f"its rate {m.rate_rps:g}"
            )
    if feasible is True and unserved:
        v.append(f"plan marked feasible lists unserved models: {sorted(unserved)}")
    if feasible is False and not data.get("unserved"):
        v.append("plan marked infeasible lists no unserved model")
    return v


def _check_gpu(
    where: str,
    sku: GpuSku,
    mig: bool,
    parts: Sequence[Mapping[str, Any]],
    models: Mapping[str, Any],
    latency_models: Mapping[tuple[str, str], LatencyModel],
    interference: InterferenceModel,
    h: float,
    opts: Any,
) -> list[str]:
    v: list[str] = []
    # Expected SMs / memory and neighbour share per partition (None: shape invalid, skip).
    # per partition: SMs, memory, its MPS neighbours (share, largest batch), MIG profile
    shape: list[tuple[int, float, list[tuple[float, int | None]], str | None] | None] = []

    mig_whole: dict[int, str] = {}  # start -> profile, instances used whole
    whole_list: list[tuple[int, str]] = []  # every whole instance, duplicates included
    mps_in: dict[int, list[tuple[int, str, int]]] = defaultdict(list)  # start -> (i, prof, pct)
    flat_mps: list[tuple[int, int]] = []  # (i, pct)
    fulls: list[int] = []

    for i, p in enumerate(parts):
        pw = f"{where} partition {i}"
        kind = p.get("kind")
        prof_name, start, pct = p.get("mig_profile"), p.get("mig_start"), p.get("mps_pct")
        shape.append(None)
        if kind == "full":
            if mig:
                v.append(f"{pw}: a whole-GPU partition on a GPU in MIG mode")
            if prof_name is not None or start is not None or pct is not None:
                v.append(f"{pw}: whole-GPU partition with MIG/MPS fields set")
            fulls.append(i)
            shape[i] = (sku.sm_count, float(sku.memory_mib), [], None)
        elif kind == "mig":
            prof = _profile(sku, prof_name)
            if not mig:
                v.append(f"{pw}: a MIG instance on a GPU not in MIG mode")
            if pct is not None:
                v.append(f"{pw}: MIG instance with mps_pct {pct!r}")
            if prof is None:
                v.append(f"{pw}: {sku.name} has no MIG profile {prof_name!r}")
                continue
            if _int(start) is None:
                v.append(f"{pw}: MIG instance without an integer mig_start ({start!r})")
                continue
            if start in mig_whole:
                v.append(
                    f"{pw}: mig_start {start} is also the start of another MIG partition "
                    f"({mig_whole[start]}@{start})"
                )
            else:
                mig_whole[start] = prof.name
            whole_list.append((start, prof.name))
            shape[i] = (prof.sm_count, float(prof.memory_mib), [], prof.name)
        elif kind == "mps":
            if _int(pct) is None or not 0 < pct <= 100:
                v.append(f"{pw}: mps_pct {pct!r} is not a percentage in 1..100")
                continue
            if pct not in opts.mps_shares:
                v.append(f"{pw}: mps_pct {pct} is not one of the scenario's shares")
            if prof_name is None and start is None:
                if mig:
                    v.append(f"{pw}: a GPU-wide MPS share on a GPU in MIG mode")
                flat_mps.append((i, pct))
                shape[i] = (
                    sku.mps_sm_count(pct),
                    sku.memory_mib * pct / 100.0,
                    [],
                    None,
                )
            else:
                prof = _profile(sku, prof_name)
                if not mig:
                    v.append(f"{pw}: MPS inside a MIG instance on a GPU not in MIG mode")
                if not opts.mps_in_mig:
                    v.append(f"{pw}: MPS inside MIG, which the scenario turns off")
                if prof is None:
                    v.append(f"{pw}: {sku.name} has no MIG profile {prof_name!r}")
                    continue
                if _int(start) is None:
                    v.append(f"{pw}: MPS inside MIG without an integer mig_start ({start!r})")
                    continue
                mps_in[start].append((i, prof.name, pct))
                shape[i] = (
                    sku.mps_sm_count(pct, within_sm=prof.sm_count),
                    prof.memory_mib * pct / 100.0,
                    [],
                    prof.name,
                )
        else:
            v.append(f"{pw}: unknown kind {kind!r}")

    # ------------------------------------------------------------- spatial layout
    if fulls and len(parts) > 1:
        v.append(f"{where}: a whole-GPU partition shares the GPU with {len(parts) - 1} other(s)")
    flat_sum = sum(pct for _, pct in flat_mps)
    if flat_sum > 100:
        v.append(f"{where}: MPS shares sum to {flat_sum}%, more than 100%")
    if len(flat_mps) > sku.mps_max_clients:
        v.append(f"{where}: {len(flat_mps)} MPS clients, at most {sku.mps_max_clients}")
    for i, _ in flat_mps:
        beside = [(float(q), _largest_batch(parts[j])) for j, q in flat_mps if j != i]
        base = shape[i]
        assert base is not None
        shape[i] = (base[0], base[1], beside, None)

    instances: list[tuple[int, str]] = list(whole_list)
    for start, members in sorted(mps_in.items()):
        names = {n for _, n, _ in members}
        if len(names) > 1:
            v.append(
                f"{where}: MPS partitions at mig_start {start} name different profiles "
                f"{sorted(names)}"
            )
        if start in mig_whole:
            v.append(
                f"{where}: MIG instance {mig_whole[start]}@{start} is used whole and also "
                f"holds MPS shares"
            )
        else:
            instances.append((start, members[0][1]))
        total = sum(pct for _, _, pct in members)
        if total > 100:
            v.append(f"{where}: MPS shares in instance @{start} sum to {total}%, more than 100%")
        for i, prof_name, _ in members:
            base = shape[i]
            assert base is not None
            beside = [(float(q), _largest_batch(parts[j])) for j, _, q in members if j != i]
            shape[i] = (base[0], base[1], beside, prof_name)
    if instances:
        v.extend(f"{where}: {msg}" for msg in mig_layout_violations(sku, instances))

    # ------------------------------------------------------------- per partition
    for i, p in enumerate(parts):
        if shape[i] is None:
            continue
        sm, mem, neighbours, prof_name = shape[i]  # type: ignore[misc]
        v.extend(
            _check_partition(
                f"{where} partition {i} ({p.get('kind')}"
                + (f" {prof_name}@{p.get('mig_start')}" if prof_name else "")
                + (f" mps:{p.get('mps_pct')}" if p.get("kind") == "mps" else "")
                + ")",
                sku,
                p,
                sm,
                mem,
                neighbours,
                prof_name,
                models,
                latency_models,
                interference,
                h,
                opts,
            )
        )
    return v


def _largest_batch(p: Mapping[str, Any]) -> int | None:
    """The largest batch a partition of the plan's JSON runs (None: none stated)."""
    batches = [_int(m.get("batch")) for m in p.get("models") or []]
    return max((b for b in batches if b is not None), default=None)


def _beside(neighbours: Sequence[tuple[float, int | None]]) -> str:
    return ", ".join(f"{pct:g}% at batch {b}" for pct, b in neighbours) or "no neighbours"


def _check_partition(
    pw: str,
    sku: GpuSku,
    p: Mapping[str, Any],
    sm: int,
    mem: float,
    neighbours: list[tuple[float, int | None]],
    mig_profile: str | None,
    models: Mapping[str, Any],
    latency_models: Mapping[tuple[str, str], LatencyModel],
    interference: InterferenceModel,
    h: float,
    opts: Any,
) -> list[str]:
    v: list[str] = []
    if p.get("sm_count") != sm:
        v.append(f"{pw}: sm_count {p.get('sm_count')!r}, the catalog gives {sm}")
    rep_mem = _num(p.get("memory_mib"))
    if rep_mem is None or abs(rep_mem - mem) > MEM_ROUND + 1e-9 * mem:
        v.append(f"{pw}: memory_mib {p.get('memory_mib')!r}, the catalog gives {mem:.1f}")
    d = _num(p.get("duty_cycle_ms"))
    if d is None or d <= 0:
        return [*v, f"{pw}: duty_cycle_ms {p.get('duty_cycle_ms')!r} is not a positive time"]
    assigned = p.get("models") or []
    if not assigned:
        v.append(f"{pw}: serves no model")
    if len(assigned) > opts.max_models_per_partition:
        v.append(
            f"{pw}: {len(assigned)} models time-share it, at most {opts.max_models_per_partition}"
        )
    names = [str(m.get("name")) for m in assigned]
    if len(set(names)) != len(names):
        v.append(f"{pw}: a model appears twice: {names}")

    busy = 0.0
    memory = 0.0
    d_tol = EPS + D_ROUND
    for a in assigned:
        name = str(a.get("name"))
        mw = f"{pw} {name}"
        spec = models.get(name)
        if spec is None:
            v.append(f"{mw}: not a model of the scenario")
            continue
        b, r = _int(a.get("batch")), _num(a.get("rate_rps"))
        if b is None or b < 1:
            v.append(f"{mw}: batch {a.get('batch')!r} is not an integer >= 1")
            continue
        if opts.max_batch is not None and b > opts.max_batch:
            v.append(f"{mw}: batch {b} above the scenario's max_batch {opts.max_batch}")
        if r is None or r < 0:
            v.append(f"{mw}: rate_rps {a.get('rate_rps')!r} is not a rate >= 0")
            continue
        lm = latency_models.get((sku.name, spec.profile))
        if lm is None:
            v.append(f"{mw}: no profile of {spec.profile!r} on {sku.name}")
            continue
        # the latency function of the partition's kind (an MPS client is slower than a green
        # context or the whole GPU at the same SM count)
        kind = str(p.get("kind"))
        solo = lm.latency_ms(b, sm, mig_profile=mig_profile, kind=kind)
        floor = lm.smallest_measured(sm, mig_profile=mig_profile, kind=kind)
        if sm < floor:  # below the profiled range: the scenario's margin, or not at all
            if opts.extrapolation_margin == "forbid":
                v.append(
                    f"{mw}: {sm} SMs is below the smallest profiled {kind} partition ({floor}"
                    " SMs) and extrapolation_margin is 'forbid'"
                )
            else:
                solo *= float(opts.extrapolation_margin)
        slow = interference.slowdown_beside(spec.profile, sku.name, neighbours)
        raw = solo * slow
        lat = (1.0 + h) * raw + opts.host_batch_ms + b * opts.host_item_ms
        busy += lat
        memory += lm.memory_mib(b)
        # (2) a cycle's arrivals fit in one batch
        need = r * d / 1000.0
        slack = EPS + (RATE_ROUND * d + r * D_ROUND) / 1000.0
        if b < need - slack:
            v.append(
                f"{mw}: batch {b} < rate {r:g} rps x duty cycle {d:g} ms = {need:.4f} requests "
                f"per cycle"
            )
        # (3) wait one cycle, then run the batch
        if d + lat + opts.host_request_ms > spec.slo_ms + d_tol:
            v.append(
                f"{mw}: duty cycle {d:g} + latency {lat:.4f} ms (headroom, interference, host) "
                f"+ the request's host way {opts.host_request_ms:g} ms = "
                f"{d + lat + opts.host_request_ms:.4f} ms > slo {spec.slo_ms:g} ms"
            )
        rep = _num(a.get("latency_ms"))
        if rep is None or abs(rep - raw) > LATENCY_REL_TOL * raw + LAT_ROUND:
            v.append(
                f"{mw}: reported latency_ms {a.get('latency_ms')!r}, re-derived {raw:.4f} ms "
                f"(batch {b}, {sm} SMs, slowdown {slow:.4f} beside {_beside(neighbours)})"
            )
    # (1) every batch runs once per cycle
    if busy > d + d_tol:
        v.append(
            f"{pw}: batches take {busy:.4f} ms (headroom, interference, host) > duty cycle {d:g} ms"
        )
    # (4) memory
    if memory > mem + EPS:
        v.append(f"{pw}: models need {memory:.1f} MiB > the partition's {mem:.1f} MiB")
    return v


def assert_valid(
    plan: Plan | Mapping[str, Any],
    scenario: Scenario,
    latency_models: Mapping[tuple[str, str], LatencyModel],
    interference: InterferenceModel,
) -> None:
    """Raise AssertionError listing every violation of ``plan``."""
    violations = check_plan(plan, scenario, latency_models, interference)
    if violations:
        policy = plan.policy if isinstance(plan, Plan) else plan.get("policy")
        lines = "\n  ".join(violations)
        raise AssertionError(
            f"plan of policy {policy!r} breaks {len(violations)} rule(s):\n  {lines}"
        )
