"""Two GPUs of one host: a plan across both served under load, a model moved between them by a
load step, and a GPU given back when the load falls (issue 19).

    # on a host with >= 2 GPUs (MIG disabled; the daemon starts one MPS daemon per GPU it uses),
    # both: the zoo at planned rates (a, c), and the stand-ins (a, b, c; MPS shares as planned)
    python -m benchmarks.multi_gpu [--seconds 60] [--mix h100] [--clients 4] [--frontends 4]
        [--controller KEY=VALUE ...] [--planner KEY=VALUE ...] [--json OUT]
    python -m benchmarks.multi_gpu --mix sim --planner spare_factor=1
    # anywhere: the simulated node with two H100s and CPU workers (about 30 s)
    python -m benchmarks.multi_gpu --simulated --seconds 5

``stgs serve`` runs on the node (NVML, or ``--simulated``: ``[backend] simulated_gpus`` with
``count = 2``) with a controller that re-plans (``[controller]``: short ``hold_s`` and rate
half-life for the run, ``--controller`` overrides them) and the data plane (``--frontends``).
The mix's models are registered over REST (``POST /v1/models``: SLO and rate) at rates that
need both GPUs: ``h100`` (the default on GPUs) zoo models planned on the shipped H100 profiles;
``sim`` (the default with ``--simulated``) tiny_mlp, tiny_cnn and echo planned on profiles the
run writes (``SIM_PROFILE_MS``, ``[planner] profiles``: a batch takes 100 ms on a whole GPU)
with the fixed batch margin (``batch_margin = "z"``, unless ``--planner`` sets one), so that
tens of requests per second need two GPUs and the workers, far faster than planned, keep every
SLO on a loaded 2-core machine; the controller's decisions are the ones it makes on real
profiles. One open-loop load (``benchmarks.lib.kserve_load.PhasedLoad``: Poisson, KServe
v2 binary tensors over HTTP from ``--clients`` processes) runs from before the registrations
(the controller never sees a registered model idle) to the end; its rates change at each
phase, so the controller sees the load the phases describe and nothing else:

0. warm-up at the registered rates until ``GET /v1/plan`` has partitions on GPU 0 and GPU 1, no
   transition is under way and the controller measures the offered rates and holds nothing,
   for ``hold_s``;
a. **plan across both GPUs**: the registered rates for ``--seconds``; checked: the plan has
   partitions on both GPUs, and every model has >= 99% of its requests answered 200 within its
   SLO (from when the client meant to send it);
b. **load step**: one model's rate rises (``--step NAME:RATE``); the controller sees it and
   re-plans; checked: some model's GPUs change from one GPU to the other (a model served on GPU
   i and not j before, on j and not i after), within ``--move-timeout-s``; every request sent
   in the phase got an answer (none lost: a connection error or no answer at all; 429 and 503
   answers are counted apart and reported);
c. **load drop**: the rates fall (``--drop NAME:RATE,...``); checked: the controller's re-plan
   leaves a GPU without partitions (``GET /v1/gpus``), the worker processes that served on it
   (their pids from ``/v1/gpus``) are gone, and it has no MPS control daemon (on NVML: that
   daemon's process is gone too; the detail says when none ran there, a GPU planned whole),
   within ``--release-timeout-s``; none lost.

The ``h100`` mix, its step and its drop were chosen with ``stgs plan`` on the shipped profiles
(two GPUs at its rates, one at the drop's); whether its step moves a model whole from one GPU
to the other (the zoo's plans split models over GPUs) is what the first run on two GPUs tells;
``--step``/``--drop``/``--mix`` change them without editing.

Each phase prints a table (per model: sent, 200, 429, 503, other, lost, within SLO, p99); the
header names the GPUs (``nvidia-smi``). Exit 0 when every check passed, 1 (with the reasons)
when one failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from api.launch import LocalDaemon, wait_until
from benchmarks.lib.kserve_load import NO_ANSWER, PhasedLoad, PhasedRow, Target
from benchmarks.lib.node import daemon_sections, gpu_label, gpu_names, quit_mps
from benchmarks.lib.runs import run_header, write_summary
from stgs.catalog import get_sku
from stgs.runtime.models import model_entry


@dataclass(frozen=True)
class Model:
    name: str  # a built-in model (served under its own name)
    slo_ms: float
    rate_rps: float


# the mix (NAME:SLO_MS:RATE,...), the step and the drop (NAME:RATE,...)
MIXES: dict[str, tuple[str, str, str]] = {
    # the simulated node (CPU workers), planned on SIM_PROFILE_MS: a whole GPU holds tiny_mlp and
    # tiny_cnn at ~50 req/s together, echo fits beside either. Planned: tiny_mlp on one GPU,
    # tiny_cnn and echo on the other; tiny_cnn's step to 80 moves it (or echo) to the other GPU;
    # the drop fits one GPU.
    "sim": (
        "tiny_mlp:500:60,tiny_cnn:500:20,echo:500:10",
        "tiny_cnn:80",
        "tiny_mlp:8,tiny_cnn:8,echo:8",
    ),
    # two H100s on the shipped profiles: stgs plan (spare_factor "fill") needs both GPUs at these
    # rates and at the hysteresis band's lower edge (x 1/1.5; one GPU peaks at 0.89 of it),
    # one GPU at the drop's. For the step it grows vit_b_16's partitions in place (no model
    # moves whole in `stgs plan --current`): check (b) is the stand-ins' (--mix sim) on GPUs.
    "h100": (
        "vit_b_16:30:450,bert_base:40:1200,resnet50:20:4500",
        "vit_b_16:1500",
        "vit_b_16:200,bert_base:200,resnet50:200",
    ),
}

# The simulated node's profiles of the sim mix (``[planner] profiles``): a batch of 1 to 16 on a
# whole H100 takes this long (ms), so that tens of req/s need both GPUs; the CPU workers run
# the models far faster than planned, so the SLOs hold on a loaded machine.
SIM_PROFILE_MS = {"tiny_mlp": 100.0, "tiny_cnn": 100.0, "echo": 25.0}


def write_sim_profiles(path: Path) -> Path:
    """SIM_PROFILE_MS as whole-GPU rows of the H100 and the H200 (a real node's stand-ins)."""
    rows = ["gpu,model,partition,sm_count,batch,latency_ms,memory_mib"]
    for sku in ("H100-80GB", "H200-141GB"):
        sms = get_sku(sku).sm_count
        for name, ms in SIM_PROFILE_MS.items():
            rows += [f"{sku},{name},full,{sms},{b},{ms},64" for b in (1, 2, 4, 8, 16)]
    path.write_text("\n".join(rows) + "\n")
    return path


# The controller of the run: re-plans within seconds of a load change. Its pass is no shorter
# than the frontends' stats period (``api.frontend.STATS_INTERVAL_S``, 1 s) and the rate's
# half-life twice that: a shorter one reads the stats' lumps as rate swings of tens of percent.
# SLO misses re-plan only below 90% (the registrations' own transitions cost a few misses
# while the load runs; re-plans for them would blur the rate steps the run is about).
CONTROLLER = {
    "interval_s": "1.0",
    "rate_halflife_s": "2.0",
    "hysteresis": "0.5",
    "hold_s": "3.0",
    "min_attainment": "0.9",
}


def parse_mix(spec: str) -> list[Model]:
    """``NAME:SLO_MS:RATE,...`` (built-in models)."""
    out = []
    for item in spec.split(","):
        try:
            name, slo, rate = item.strip().rsplit(":", 2)
            out.append(Model(name, float(slo), float(rate)))
        except ValueError:
            raise ValueError(f"bad model {item!r}: use NAME:SLO_MS:RATE") from None
    if len({m.name for m in out}) != len(out):
        raise ValueError(f"a model is named twice in {spec!r}")
    return out


def parse_rates(spec: str, models: list[Model], what: str) -> list[float]:
    """The registered rates with ``NAME:RATE,...`` replacing some of them."""
    rates = {m.name: m.rate_rps for m in models}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, rate = item.rpartition(":")
        if name not in rates:
            raise ValueError(f"{what} {item!r}: no model {name!r} in the mix")
        try:
            rates[name] = float(rate)
        except ValueError:
            raise ValueError(f"{what} {item!r}: use NAME:RATE") from None
        if rates[name] < 0:
            raise ValueError(f"{what} {item!r}: a rate is >= 0")
    return [rates[m.name] for m in models]


# ---------------------------------------------------------------------- the daemon's views
def placement(view: dict[str, Any]) -> dict[str, set[int]]:
    """model -> the GPUs the plan (``GET /v1/plan``) serves it on."""
    out: dict[str, set[int]] = {}
    for g in (view.get("plan") or {}).get("gpus", []):
        for p in g["partitions"]:
            for m in p["models"]:
                out.setdefault(m["name"], set()).add(int(g["index"]))
    return out


def moved(before: dict[str, set[int]], after: dict[str, set[int]]) -> list[str]:
    """The models served on a GPU before that they left, and on one they were not on."""
    return sorted(
        f"{n}: GPU {sorted(before[n])} -> {sorted(g)}"
        for n, g in after.items()
        if n in before and before[n] - g and g - before[n]
    )


def settled(c: httpx.Client) -> bool:
    """No partition starting or draining (a transition done)."""
    parts = c.get("/v1/status").json()["partitions"]
    return bool(parts.get("starting", 0) == 0 and parts.get("draining", 0) == 0)


def measured(c: httpx.Client) -> dict[str, float]:
    """The controller's measured rate (EWMA) of each model."""
    ctl = c.get("/v1/status").json().get("controller") or {}
    return {n: float(m["measured_rate_rps"]) for n, m in ctl.get("models", {}).items()}


def pid_alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def poll(what: str, fn: Callable[[], Any], timeout_s: float, proc: Any) -> Any:
    """``wait_until`` that returns None on timeout instead of raising (a failed check)."""
    try:
        return wait_until(what, fn, timeout_s, proc)
    except RuntimeError as exc:
        if proc.poll() is not None:
            raise
        print(f"  {exc}")
        return None


# ---------------------------------------------------------------------- tables
def phase_table(title: str, rows: list[PhasedRow], k: int, models: list[Model]) -> dict[str, Any]:
    """Per model: sent, the answers by status, lost, within SLO, p99; printed and returned."""
    arr = np.array([r for r in rows if r[4] == k], dtype=np.float64).reshape(-1, 5)
    print(f"\n{title}")
    print(
        f"  {'model':12} {'sent':>7} {'200':>7} {'429':>6} {'503':>6} {'other':>6} {'lost':>5}"
        f" {'within SLO':>11} {'p99 ms':>8}"
    )
    out: dict[str, Any] = {}
    for i, m in enumerate(models):
        mine = arr[arr[:, 0] == i]
        code, lat = mine[:, 3].astype(int), mine[:, 2]
        n = len(mine)
        ok = int(((code == 200) & (lat <= m.slo_ms / 1e3)).sum())
        lost = int(((code == NO_ANSWER) | (code == -1)).sum())
        r = {
            "sent": n,
            "ok": int((code == 200).sum()),
            "429": int((code == 429).sum()),
            "503": int((code == 503).sum()),
            "lost": lost,
            "within_slo": ok / n if n else 0.0,
            "p99_ms": float(np.percentile(lat, 99) * 1e3) if n else 0.0,
        }
        r["other"] = n - r["ok"] - r["429"] - r["503"] - lost
        out[m.name] = r
        print(
            f"  {m.name:12} {n:7d} {r['ok']:7d} {r['429']:6d} {r['503']:6d} {r['other']:6d}"
            f" {lost:5d} {r['within_slo']:11.4f} {r['p99_ms']:8.1f}"
        )
    return out


class Checks:
    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str]] = []

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.results.append((name, ok, detail))
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        return ok

    @property
    def failed(self) -> list[str]:
        return [f"{n}: {d}" for n, ok, d in self.results if not ok]


# ---------------------------------------------------------------------- the run
class _Stop(Exception):
    """A failed check that ends the run (the later phases need what it checked)."""


def run(args: argparse.Namespace, models: list[Model], work: Path, out: dict[str, Any]) -> Checks:
    ck = Checks()
    ctl = {**CONTROLLER, **dict(kv.split("=", 1) for kv in args.controller)}
    planner = [*args.planner]
    if all(m.name in SIM_PROFILE_MS for m in models):  # the stand-ins, on any node
        work.mkdir(parents=True, exist_ok=True)
        planner.append(f'profiles = "{write_sim_profiles(work / "sim-profiles.csv")}"')
        # the stand-ins' rates are sized for the fixed batch margin: with the per-model one
        # ("slo", the default) their long SLOs let one GPU hold the whole mix
        if not any(kv.replace(" ", "").startswith("batch_margin=") for kv in planner):
            planner.append('batch_margin = "z"')
    d = LocalDaemon(
        work / "daemon",
        daemon_sections(
            args.simulated, gpus=2, controller="".join(f"{k} = {v}\n" for k, v in ctl.items())
        )
        + ("[planner]\n" + "".join(f"{kv}\n" for kv in planner) if planner else ""),
        server_options=f"frontends = {args.frontends}\n",
    )
    base = [m.rate_rps for m in models]
    rates = [base, base, args.step_rates, args.drop_rates]  # warm-up, a, b, c
    load: PhasedLoad | None = None
    rows: list[PhasedRow] = []
    try:
        p = d.start()
        with d.client() as c:
            wait_until("the daemon", lambda: c.get("/v2/health/live").status_code == 200, 120, p)
            gpus = c.get("/v1/gpus").json()["gpus"]
            print("daemon's GPUs: " + "; ".join(f"{g['index']} {g['name']}" for g in gpus))
            out["daemon_gpus"] = [f"{g['index']} {g['name']}" for g in gpus]
            if len(gpus) < 2:
                ck.check("two GPUs", False, f"the node has {len(gpus)} GPU(s)")
                raise _Stop
            # the load runs from before the registrations: the controller never sees the
            # models idle (an idle model is re-planned at its least rate)
            targets = [
                Target(m.name, m.rate_rps, model_entry(m.name).example(seed=i)[None])
                for i, m in enumerate(models)
            ]
            load = PhasedLoad(
                "http", f"127.0.0.1:{d.port}", targets, rates, args.clients, work / "load"
            )
            t0 = time.monotonic()
            for m in models:
                r = c.post(
                    "/v1/models",
                    json={
                        "name": m.name,
                        "slo_ms": m.slo_ms,
                        "rate_rps": m.rate_rps,
                    },
                )
                if r.status_code not in (200, 201, 202):
                    raise RuntimeError(f"POST /v1/models {m.name}: {r.status_code} {r.text}")
            d.wait_all_ready(args.ready_timeout_s)
            print(f"{len(models)} models registered and ready in {time.monotonic() - t0:.1f} s")

            # 0: warm-up until the plan spans both GPUs and no transition is under way
            calm: list[float] = []  # since when the warm-up's conditions hold
            warm_why = [""]  # why they do not, last poll

            def spans_both() -> bool:
                """The plan spans GPUs 0 and 1, no transition is under way and the controller
                sees the offered rates (within its band) and holds nothing, for hold_s."""
                pl = placement(c.get("/v1/plan").json())
                ctl_st = c.get("/v1/status").json().get("controller") or {}
                rates_seen = measured(c)
                h = float(ctl["hysteresis"])
                off = [
                    m.name
                    for m in models
                    if not m.rate_rps / (1 + h)
                    <= rates_seen.get(m.name, 0.0)
                    <= m.rate_rps * (1 + h)
                ]
                why = (
                    "not every model is planned"
                    if len(pl) != len(models)
                    else "the plan is on one GPU"
                    if not {0, 1} <= set().union(*pl.values())
                    else "a transition is under way"
                    if not settled(c)
                    else f"the controller holds {ctl_st['holding']}: {ctl_st.get('reasons')}"
                    if ctl_st.get("holding")
                    else f"measured rates of {off} off the offered ones: {rates_seen}"
                    if off
                    else ""
                )
                warm_why[:] = [why]
                ok = not why
                if not ok:
                    calm.clear()
                    return False
                calm.append(time.monotonic())
                return calm[-1] - calm[0] >= float(ctl["hold_s"])

            print(f"\n0. warm-up at the registered rates {base}")
            t0 = time.monotonic()
            both = poll("a plan across GPUs 0 and 1", spans_both, args.move_timeout_s, p)
            print(f"  waited {time.monotonic() - t0:.1f} s; measured rates {measured(c)}")
            view = c.get("/v1/plan").json()
            before = placement(view)
            out["plan_a"] = view["plan"]
            print(
                "  plan: " + ", ".join(f"{n} on GPU {sorted(g)}" for n, g in sorted(before.items()))
            )
            if not ck.check(
                "a: plan across both GPUs",
                bool(both),
                f"models on GPUs {sorted(set().union(*before.values())) if before else []}"
                + ("" if both else f"; the warm-up did not settle: {warm_why[0]}"),
            ):
                raise _Stop

            # a: the registered rates for --seconds
            load.set_phase(1)
            changes: list[dict[str, set[int]]] = []
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                time.sleep(min(0.5, max(0.0, end - time.monotonic())))
                now = placement(c.get("/v1/plan").json())
                if now != before and (not changes or changes[-1] != now):
                    changes.append(now)
            print(f"  measured rates at the end: {measured(c)}")
            on_both = {0, 1} <= set().union(*placement(c.get("/v1/plan").json()).values())
            ck.check(
                "a: still across both GPUs",
                on_both,
                f"{len(changes)} re-placement(s) during the phase",
            )
            before = placement(c.get("/v1/plan").json())

            # b: the load step
            load.set_phase(2)
            print(f"\nb. load step: rates {args.step_rates}")
            t0 = time.monotonic()
            got = poll(
                "a model moved between GPUs",
                lambda: moved(before, placement(c.get("/v1/plan").json())),
                args.move_timeout_s,
                p,
            )
            dt = time.monotonic() - t0
            print(f"  measured rates: {measured(c)}")
            after = placement(c.get("/v1/plan").json())
            out["plan_b"] = c.get("/v1/plan").json()["plan"]
            ck.check(
                "b: a model moved to the other GPU",
                bool(got),
                (f"{'; '.join(got)} after {dt:.1f} s" if got else f"none in {dt:.0f} s")
                + "; plan: "
                + ", ".join(f"{n} on GPU {sorted(g)}" for n, g in sorted(after.items())),
            )
            poll("the transition done", lambda: settled(c), args.release_timeout_s, p)
            time.sleep(args.settle_s)  # the moved model's old workers drained, answers back

            # c: the load drop
            seen: dict[int, set[int]] = {0: set(), 1: set()}  # GPU -> worker pids seen on it
            mps_seen: dict[int, set[int]] = {0: set(), 1: set()}  # GPU -> MPS daemon pids
            mps_listed: set[int] = set()  # GPUs an MPS daemon was listed on during the phase

            def note(node: dict[str, Any]) -> None:
                for g in node["gpus"]:
                    for part in g["partitions"]:
                        if part.get("pid"):
                            seen.setdefault(g["index"], set()).add(int(part["pid"]))
                for m in node.get("mps_daemons", []):
                    gi = int(m["device"].removeprefix("gpu").split("/")[0])
                    mps_listed.add(gi)
                    if m.get("pid"):
                        mps_seen.setdefault(gi, set()).add(int(m["pid"]))

            load.set_phase(3)
            print(f"\nc. load drop: rates {args.drop_rates}")
            t0 = time.monotonic()

            def given_back() -> int | None:
                node = c.get("/v1/gpus").json()
                note(node)
                used = {g for gs in placement(c.get("/v1/plan").json()).values() for g in gs}
                empty = [
                    g["index"]
                    for g in node["gpus"]
                    if not g["partitions"] and g["index"] not in used and seen.get(g["index"])
                ]
                return empty[0] + 1 if empty else None  # +1: GPU 0 is true

            got_gpu = poll("a GPU given back", given_back, args.release_timeout_s, p)
            dt = time.monotonic() - t0
            print(f"  measured rates: {measured(c)}")
            out["plan_c"] = c.get("/v1/plan").json()["plan"]
            if not ck.check(
                "c: a GPU given back (no partition on it)",
                bool(got_gpu),
                f"GPU {got_gpu - 1} after {dt:.1f} s" if got_gpu else f"none in {dt:.0f} s",
            ):
                raise _Stop
            g = got_gpu - 1
            pids = sorted(seen.get(g, set()))
            alive = poll(
                "its workers gone",
                lambda: not [x for x in pids if pid_alive(x)],
                15.0,
                p,
            )
            ck.check(
                f"c: GPU {g}'s workers gone",
                bool(alive) and bool(pids),
                f"pids {pids}: "
                + ("all gone" if alive else f"alive {[x for x in pids if pid_alive(x)]}"),
            )
            node = c.get("/v1/gpus").json()
            mps_on = [
                m for m in node.get("mps_daemons", []) if m["device"].split("/")[0] == f"gpu{g}"
            ]
            mps_pids = sorted(mps_seen.get(g, set()))
            live_mps = [x for x in mps_pids if pid_alive(x)]
            ck.check(
                f"c: GPU {g}'s MPS control daemon stopped",
                not mps_on and not live_mps,
                f"MPS daemons listed on it now: {len(mps_on)}"
                + (
                    f"; one ran on it in the phase, pids seen {mps_pids}, alive {live_mps}"
                    if g in mps_listed
                    else "; none ran on it in the phase (its partitions were not MPS)"
                )
                + (" (the simulated node's daemons have no process)" if args.simulated else ""),
            )
            time.sleep(args.settle_s)
    except _Stop:  # a check failed: the phases after it cannot run
        pass
    finally:
        if load is not None:
            rows = load.stop()
        d.stop()
        if not args.simulated:
            quit_mps(d.work / "run")
        if args.keep:
            print(f"the daemon's log: {d.log_path}")
        elif ck.failed and d.log_path.is_file():
            tail = d.log_path.read_text(errors="replace").splitlines()[-30:]
            print("the daemon's log, last lines:\n  " + "\n  ".join(tail))
    out["phases"] = {}
    names = ["0. warm-up", "a. the registered rates", "b. load step", "c. load drop"]
    for k, title in enumerate(names):
        if any(r[4] == k for r in rows):
            out["phases"][title] = phase_table(title, rows, k, models)
    ph = out["phases"]
    if "a. the registered rates" in ph:
        worst = min(ph["a. the registered rates"].items(), key=lambda kv: kv[1]["within_slo"])
        ck.check(
            "a: every model >= 99% within SLO",
            worst[1]["within_slo"] >= 0.99
            and all(r["sent"] for r in ph["a. the registered rates"].values()),
            f"lowest {worst[0]} {worst[1]['within_slo']:.4f}",
        )
    for title in names[1:]:
        if title in ph:
            lost = sum(r["lost"] for r in ph[title].values())
            shed = {c: sum(r[c] for r in ph[title].values()) for c in ("429", "503")}
            ck.check(
                f"{title[0]}: none lost",
                lost == 0,
                f"{sum(r['sent'] for r in ph[title].values())} sent, {lost} lost;"
                f" answered 429: {shed['429']}, 503: {shed['503']}",
            )
    return ck


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--simulated", action="store_true", help="the simulated node with 2 GPUs")
    ap.add_argument("--mix", default=None, help="sim, h100 or NAME[=SOURCE]:SLO_MS:RATE,...")
    ap.add_argument("--step", default=None, help="the load step: NAME:RATE,...")
    ap.add_argument("--drop", default=None, help="the load drop: NAME:RATE,...")
    ap.add_argument("--seconds", type=float, default=60.0, help="phase a's length")
    ap.add_argument("--clients", type=int, default=None, help="load processes (default 4, sim 1)")
    ap.add_argument("--frontends", type=int, default=None, help="data plane (default 4, sim 1)")
    ap.add_argument(
        "--controller",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"a [controller] line (TOML) over the run's {CONTROLLER}; repeatable",
    )
    ap.add_argument(
        "--planner",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [planner] line of the daemon's config (TOML), e.g. spare_factor=1; repeatable",
    )
    ap.add_argument("--move-timeout-s", type=float, default=120.0)
    ap.add_argument("--release-timeout-s", type=float, default=120.0)
    ap.add_argument("--settle-s", type=float, default=3.0)
    ap.add_argument("--ready-timeout-s", type=float, default=600.0)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", default=None, help="summary path (default $OUT/multi_gpu-MIX.json)")
    args = ap.parse_args(argv)
    for kv in args.controller:
        if "=" not in kv:
            ap.error(f"--controller {kv!r}: use KEY=VALUE")
    mix = args.mix or ("sim" if args.simulated else "h100")
    spec, step, drop = MIXES.get(mix, (mix, "", ""))
    try:
        models = parse_mix(spec)
        args.step_rates = parse_rates(args.step or step, models, "--step")
        args.drop_rates = parse_rates(args.drop or drop, models, "--drop")
    except ValueError as exc:
        ap.error(str(exc))
    if args.step_rates == [m.rate_rps for m in models]:
        ap.error("--step: no rate changes (give NAME:RATE)")
    args.clients = args.clients or (1 if args.simulated else 4)
    args.frontends = args.frontends if args.frontends is not None else (1 if args.simulated else 4)
    names = gpu_names()
    device = "simulated node: 2 x H100-80GB (CPU workers)" if args.simulated else gpu_label()
    print(f"multi_gpu: {device}")
    for n in names:
        print(f"  nvidia-smi: {n}")
    if not args.simulated and len(names) < 2:
        print(f"FAIL: {len(names)} GPU(s) found by nvidia-smi; this benchmark needs >= 2")
        return 1
    print("mix: " + ", ".join(f"{m.name} SLO {m.slo_ms:g} ms {m.rate_rps:g}/s" for m in models))
    work = Path(tempfile.mkdtemp(prefix="stgs-multigpu-"))
    out: dict[str, Any] = {
        "mix": mix,
        "models": [m.__dict__ for m in models],
        "step_rates": args.step_rates,
        "drop_rates": args.drop_rates,
        "device": device,
        "gpus": names,
        **run_header("multi_gpu", argv),
    }
    try:
        ck = run(args, models, work, out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    out["checks"] = [{"check": n, "ok": ok, "detail": dtl} for n, ok, dtl in ck.results]
    write_summary(out, args.json, f"multi_gpu-{mix}")
    if ck.failed:
        print("\nFAILED:\n  " + "\n  ".join(ck.failed))
        return 1
    print(f"\nall {len(ck.results)} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
