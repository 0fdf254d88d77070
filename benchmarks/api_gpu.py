"""Goodput through the daemon's API against the in-process router, on the same plan (issue 14).

    # on a GPU (MIG disabled; the daemon and the in-process runtime start their own MPS daemons):
    python -m benchmarks.api_gpu [--mix serve|second|NAME:SLO_MS:RATE,...] [--scales 1,1.5,2]
        [--seconds 10] [--clients 4] [--client-cpus auto|none|N] [--frontends 4]
        [--protos http,grpc] [--json OUT]
    # anywhere: the simulated node with CPU workers and tiny models
    python -m benchmarks.api_gpu --simulated

1. ``stgs serve`` (NVML backend, or the simulated node; ``--planner KEY=VALUE``: lines of its
   ``[planner]`` section) with the data plane (``--frontends`` processes) and a controller
   that does not re-plan (the plan must stay the one measured)
   registers the mix's models over REST (``POST /v1/models``: SLO and rate; the shipped H100
   profiles plan the zoo models, nothing is profiled) and waits until every one is ready.
2. Through the API: for each scale s of the registered rates (``--scales``, ascending), an
   open-loop Poisson load of s x the rates for ``--seconds``, KServe v2 binary tensors over HTTP
   (and gRPC with ``--protos http,grpc``) from ``--clients`` processes of their own
   (``benchmarks/_kserve_load.py``). A request is within SLO when it got a 200 within its
   model's SLO of when the client meant to send it.
3. The daemon stops (its MPS daemons quit). The plan it served (``GET /v1/plan``) is applied by
   an in-process ``Runtime`` on the same backend, and ``serve_gpu.py``'s open-loop load
   generator (the in-process router: ``Runtime.submit``) drives the same scales; within SLO means
   the same (completed OK within SLO of the scheduled arrival).
4. With ``--trace`` the workers record their trace (``STGS_WORKER_TRACE``) on both paths, and
   each row gets the host breakdown of its window from it (p50/p99 ms, by the worker's clock,
   one ``CLOCK_MONOTONIC`` for the host): ``in`` from the request's arrival (where its deadline
   counts from: the frontend's HTTP arrival, or the in-process router's scheduled time) to the
   worker's queue, ``wait`` in the queue, ``run`` the batch, ``out`` the replies sent. The rest
   of what the client saw is the client's and the HTTP layer's. The frontends record their part
   too (``STGS_FRONTEND_TRACE``, ``api.frontend.FRONTEND_TRACE``): from the request's first byte,
   the body read whole, the KServe parse, routing to the worker's answer, the response written.
5. Goodput of each path: the highest scale whose share within SLO is >= 0.99, times the mix's
   total rate; a sweep stops at the first scale below 0.99. The ratio API / in-process is the
   figure issue 14 asks for (>= 0.9).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from api.frontend import FRONTEND_TRACE, FRONTEND_TRACE_ENV
from api.launch import LocalDaemon, wait_until
from benchmarks.lib import kserve_load
from benchmarks.lib.kserve_load import Target, summarize
from benchmarks.lib.loadgen import (
    DEADLINE,
    DEFAULT_MODELS,
    ERROR,
    NOT_SENT,
    OK,
    LoadGen,
    ModelCfg,
    describe_plan,
    parse_models,
    poisson_arrivals,
)
from benchmarks.lib.node import (
    daemon_sections,
    gpu_label,
    open_backend,
    quit_mps,
    stop_daemons,
)
from benchmarks.lib.probes import collect_traces
from benchmarks.lib.runs import run_header, write_summary
from stgs.plan import Plan
from stgs.runtime import Runtime
from stgs.runtime.models import model_entry
from stgs.runtime.worker import TRACE_BATCH, TRACE_ENV, TRACE_REQUEST

MIXES = {
    "serve": DEFAULT_MODELS,  # serve_gpu.py's mix
    # vision models of every size beside BERT: five partitions, tight SLOs
    "second": "resnet18:8:600,googlenet:10:300,densenet121:25:150,bert_base:30:200,"
    "mnasnet1_0:10:300",
    "sim": "tiny_mlp:100:100,tiny_cnn:500:20",  # the simulated node: CPU workers
}


def _row(path: str, scale: float, total: float, s: dict[str, Any]) -> dict[str, Any]:
    print(
        f"  {path:11} x{scale:<5g} {scale * total:7.0f}/s  n={s['n']:6d}"
        f"  within SLO {s['within_slo']:.4f}  p50 {s.get('p50_ms', 0):7.2f} ms"
        f"  p99 {s.get('p99_ms', 0):8.2f} ms  client lag p99 {s.get('lag_p99_ms', 0):6.2f} ms"
        f"  {s['codes']}{_worst(s)}",
        flush=True,
    )
    return {"path": path, "scale": scale, "offered_rps": scale * total, **s}


def _worst(s: dict[str, Any]) -> str:
    """The model furthest from its SLO in a row, when it is below 99%."""
    by = s.get("by_model") or {}
    if not by:
        return ""
    name, m = min(by.items(), key=lambda kv: kv[1]["within_slo"])
    if m["within_slo"] >= 0.99:
        return ""
    return f"  worst {name} {m['within_slo']:.4f} (p99 {m['p99_ms']:.2f} ms)"


def breakdown(
    traces: dict[str, np.ndarray], slo_ms: dict[str, float], t0_ns: int, t1_ns: int
) -> dict[str, Any]:
    """The worker trace's host breakdown (p50/p99 ms) of the requests that arrived in
    [t0_ns, t1_ns) and ran: arrival -> worker queue (``in``), queue (``wait``), batch (``run``),
    replies sent (``out``), and arrival -> replies sent (``worker_total``); per model
    (``by_model``) the median ``in`` and stay in the worker (queued -> replies sent)."""
    if not traces:
        return {}
    parts = json.loads(str(traces["w_parts"]))
    wb, wr = traces["wb"], traces["wr"]
    col_b = {c: k + 1 for k, c in enumerate(TRACE_BATCH)}
    col_r = {c: k + 1 for k, c in enumerate(TRACE_REQUEST)}
    # each worker's batches, by (worker, row in its own trace)
    first = {int(w): int(np.argmax(wb[:, 0] == w)) for w in np.unique(wb[:, 0])}
    pairs = wr[:, [0, col_r["slot"]]]
    slo_ns = np.array([slo_ms.get(parts[int(w)]["models"][int(s)], 0.0) * 1e6 for w, s in pairs])
    ran = (wr[:, col_r["ran"]] == 1) & (wr[:, col_r["deadline"]] > 0)
    arrival = wr[:, col_r["deadline"]] - slo_ns
    ran &= (arrival >= t0_ns) & (arrival < t1_ns)
    if not ran.any():
        return {}
    rows = np.array([first[int(w)] + int(b) for w, b in wr[ran][:, [0, col_r["batch"]]]])
    b = wb[rows]
    q = wr[ran][:, col_r["t_queued"]]
    a = arrival[ran]
    spans = {
        "in": q - a,
        "wait": b[:, col_b["t_run"]] - q,
        "run": b[:, col_b["t_ran"]] - b[:, col_b["t_run"]],
        "out": b[:, col_b["t_replied"]] - b[:, col_b["t_ran"]],
        "worker_total": b[:, col_b["t_replied"]] - a,
    }
    out: dict[str, Any] = {}
    for k, v in spans.items():
        out[f"{k}_p50_ms"] = float(np.percentile(v, 50)) / 1e6
        out[f"{k}_p99_ms"] = float(np.percentile(v, 99)) / 1e6
    # per model (the API way's fit, stgs.hostcosts.fit_api_way): arrival -> queue, and the
    # stay in the worker (queued -> replies sent)
    names = np.array([parts[int(w)]["models"][int(s)] for w, s in pairs[ran]])
    stay = b[:, col_b["t_replied"]] - q
    out["by_model"] = {
        str(name): {
            "n": int((names == name).sum()),
            "in_p50_ms": float(np.median(spans["in"][names == name])) / 1e6,
            "stay_p50_ms": float(np.median(stay[names == name])) / 1e6,
        }
        for name in np.unique(names)
    }
    return out


FRONTEND_SPANS = {  # name: (from, to) columns of FRONTEND_TRACE
    "body": ("t_arrival", "t_body"),  # the HTTP body read whole (limits)
    "parse": ("t_body", "t_parsed"),  # the KServe parse
    "serve": ("t_parsed", "t_answered"),  # routed, sent, the worker's answer back
    "respond": ("t_answered", "t_written"),  # encoded and written to the client
    "frontend_total": ("t_arrival", "t_written"),
}


def _add_frontend_breakdown(
    trace_dir: Path | None, windows: list[tuple[dict[str, Any], int, int]]
) -> None:
    """Each API row's frontend breakdown (p50/p99 ms of FRONTEND_SPANS, answers 200) from the
    frontends' trace files (``STGS_FRONTEND_TRACE``)."""
    if trace_dir is None:
        return
    parts = []
    for f in sorted((trace_dir / "frontends").glob("frontend-*.npz")):
        with np.load(f) as z:
            parts.append(z["requests"])
    if not parts:
        print("frontend trace: none written")
        return
    req = np.concatenate(parts)
    col = {c: k for k, c in enumerate(FRONTEND_TRACE)}
    print(f"frontend trace: {len(req)} requests")
    for row, t0, t1 in windows:
        a = req[:, col["t_arrival"]]
        sel = req[(a >= t0) & (a < t1) & (req[:, col["status"]] == 200)]
        if not len(sel):
            continue
        out: dict[str, float] = {}
        for name, (c0, c1) in FRONTEND_SPANS.items():
            v = (sel[:, col[c1]] - sel[:, col[c0]]) / 1e6
            out[f"{name}_p50_ms"] = float(np.percentile(v, 50))
            out[f"{name}_p99_ms"] = float(np.percentile(v, 99))
        row["frontend"] = out


def _print_breakdown(rows: list[dict[str, Any]]) -> None:
    keys = ("in", "wait", "run", "out", "worker_total")
    print("host breakdown from the worker trace (ms, p50/p99; client = what the client saw):")
    print(f"  {'path':11} {'scale':>6} " + " ".join(f"{k:>13}" for k in (*keys, "client")))
    for r in rows:
        bd = r.get("trace") or {}
        if not bd:
            continue
        cells = [f"{bd[k + '_p50_ms']:5.2f}/{bd[k + '_p99_ms']:6.2f}" for k in keys]
        cells.append(f"{r.get('p50_ms', 0):5.2f}/{r.get('p99_ms', 0):6.2f}")
        print(f"  {r['path']:11} x{r['scale']:<5g} " + " ".join(f"{c:>13}" for c in cells))
    fronts = [r for r in rows if r.get("frontend")]
    if fronts:
        print("the frontends' part (ms, p50/p99, from the request's first byte; answers 200):")
        print(f"  {'path':11} {'scale':>6} " + " ".join(f"{k:>14}" for k in FRONTEND_SPANS))
        for r in fronts:
            fe = r["frontend"]
            cells = [f"{fe[k + '_p50_ms']:5.2f}/{fe[k + '_p99_ms']:6.2f}" for k in FRONTEND_SPANS]
            print(f"  {r['path']:11} x{r['scale']:<5g} " + " ".join(f"{c:>14}" for c in cells))


def through_api(
    args: argparse.Namespace, models: list[ModelCfg], work: Path, protos: list[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Register the mix over REST, sweep the scales through the API; (plan view, rows)."""
    planner = "".join(f"{kv}\n" for kv in args.planner)  # TOML lines of [planner]
    d = LocalDaemon(
        work / "daemon",
        daemon_sections(args.simulated) + (f"[planner]\n{planner}" if planner else ""),
        server_options=f"frontends = {args.frontends}\n",
    )
    rows: list[dict[str, Any]] = []
    total = sum(m.rate_rps for m in models)
    trace_dir = work / "trace-api" if args.trace else None
    windows: list[tuple[dict[str, Any], int, int]] = []
    env = (
        {TRACE_ENV: str(trace_dir), FRONTEND_TRACE_ENV: str(trace_dir / "frontends")}
        if trace_dir
        else None
    )
    try:
        p = d.start(env=env)
        with d.client() as c:
            wait_until("the daemon", lambda: c.get("/v2/health/live").status_code == 200, 120, p)
            t0 = time.monotonic()
            for m in models:
                r = c.post(
                    "/v1/models", json={"name": m.name, "slo_ms": m.slo_ms, "rate_rps": m.rate_rps}
                )
                if r.status_code not in (200, 201, 202):
                    raise RuntimeError(f"POST /v1/models {m.name}: {r.status_code} {r.text}")
            d.wait_all_ready(args.ready_timeout_s)
            print(
                f"daemon: {len(models)} models registered and ready in"
                f" {time.monotonic() - t0:.1f} s"
            )
            view = c.get("/v1/plan").json()
            fronts = c.get("/v1/status").json().get("frontends", [])
            print(f"  frontends: {len(fronts)}")
        targets = [
            Target(m.name, m.rate_rps, model_entry(m.name).example(seed=i)[None])
            for i, m in enumerate(models)
        ]
        slos = [m.slo_ms / 1e3 for m in models]
        names = [m.name for m in models]
        for proto in protos:
            addr = f"127.0.0.1:{d.grpc_port if proto == 'grpc' else d.port}"
            warm = [Target(t.model, 20.0, t.x) for t in targets]
            kserve_load.load(proto, addr, warm, 2.0, 1, work / "warm")  # connections, caches
            for scale in args.scale_list:
                scaled = [Target(t.model, t.rate * scale, t.x) for t in targets]
                t0 = time.monotonic_ns()
                got = kserve_load.load(
                    proto,
                    addr,
                    scaled,
                    args.seconds,
                    args.clients,
                    work / "c",
                    cpus=args.client_cpus,
                )
                row = _row(f"api-{proto}", scale, total, summarize(got, slos, names))
                rows.append(row)
                windows.append((row, t0, time.monotonic_ns()))
                if row["within_slo"] < 0.99:
                    break
        if trace_dir is not None:  # workers write their trace when drained, not when killed
            with d.client() as c:
                for m in models:
                    c.delete(f"/v1/models/{m.name}")
                wait_until(
                    "the workers drained",
                    lambda: not any(c.get("/v1/status").json()["partitions"].values()),
                    60,
                    p,
                )
                time.sleep(1.0)  # the last worker writes its trace as it exits
    finally:
        d.stop()
        if not args.simulated:
            quit_mps(d.work / "run")
    _add_breakdown(trace_dir, models, windows)
    _add_frontend_breakdown(trace_dir, windows)
    return view, rows


def _add_breakdown(
    trace_dir: Path | None, models: list[ModelCfg], windows: list[tuple[dict[str, Any], int, int]]
) -> None:
    """Each row's host breakdown from the (drained) workers' trace files."""
    if trace_dir is None:
        return
    traces = collect_traces(trace_dir) if trace_dir.exists() else {}
    print(f"worker trace: {len(traces.get('wr', []))} requests")
    slo_ms = {m.name: m.slo_ms for m in models}
    for row, t0, t1 in windows:
        row["trace"] = breakdown(traces, slo_ms, t0, t1)


def in_process(
    args: argparse.Namespace, models: list[ModelCfg], plan: Plan, work: Path
) -> list[dict[str, Any]]:
    """The same plan on an in-process ``Runtime``; the same scales through its router."""
    opened = open_backend(args.simulated, work / "run")
    if opened is None:
        raise RuntimeError("no backend")
    backend, _ = opened
    names = [m.name for m in models]
    slos_ms = [m.slo_ms for m in models]
    inputs = [model_entry(m.name).example(seed=i) for i, m in enumerate(models)]
    total = sum(m.rate_rps for m in models)
    trace_dir = work / "trace-inproc" if args.trace else None
    if trace_dir is not None:
        os.environ[TRACE_ENV] = str(trace_dir)  # the workers inherit it
    runtime = Runtime(backend, slos=dict(zip(names, slos_ms, strict=True)), admission=True)
    rows: list[dict[str, Any]] = []
    windows: list[tuple[dict[str, Any], int, int]] = []
    try:
        runtime.start_monitor()
        t = time.monotonic()
        runtime.apply(plan)
        states = [s["state"] for s in runtime.describe()]
        print(f"in-process: plan applied in {time.monotonic() - t:.1f} s: {states}")
        if any(s != "ready" for s in states):
            raise RuntimeError(f"not every partition is ready: {states}")
        gc.collect()
        gc.freeze()
        slo_of = np.asarray(slos_ms) / 1e3
        for k, scale in enumerate([0.1, *args.scale_list]):  # 0.1: a warm-up, not reported
            seconds = 2.0 if k == 0 else args.seconds
            rates = [m.rate_rps * scale for m in models]
            t_sched, m_idx = poisson_arrivals(rates, seconds, args.seed + k)
            lg = LoadGen(runtime, names, slos_ms, inputs, t_sched, m_idx, 0)
            t0 = time.monotonic_ns()
            lg.start(time.monotonic() + 0.2)
            lg.join()
            end = time.monotonic() + max(slos_ms) / 1e3 + 2.0
            while lg.pending() and time.monotonic() < end:
                time.sleep(0.01)
            if k == 0:
                continue
            sent = lg.status != NOT_SENT
            lat = lg.done - (lg.t0 + lg.t)  # NaN where never answered
            code = np.select(
                [lg.status == OK, lg.status == DEADLINE, lg.status == ERROR], [200, 429, 500], -1
            )
            recs = [
                (int(mi), float(s - (lg.t0 + tt)), float(x) if np.isfinite(x) else 1e9, int(c))
                for mi, s, tt, x, c in zip(
                    m_idx[sent], lg.sent[sent], lg.t[sent], lat[sent], code[sent], strict=True
                )
            ]
            row = _row("in-process", scale, total, summarize(recs, list(slo_of), names))
            rows.append(row)
            windows.append((row, t0, time.monotonic_ns()))
            if row["within_slo"] < 0.99:
                break
        if trace_dir is not None:  # workers write their trace when drained, not when killed
            runtime.apply(dataclasses.replace(plan, gpus=()))
    finally:
        runtime.close()
        with contextlib.suppress(Exception):
            stop_daemons(backend)
        with contextlib.suppress(Exception):
            backend.close()
        os.environ.pop(TRACE_ENV, None)
    _add_breakdown(trace_dir, models, windows)
    return rows


SPLIT_MIN_CPUS = 12


def split_cpus(spec: str, clients: int) -> tuple[list[int] | None, list[int] | None]:
    """(the clients' CPUs, the server's CPUs) for ``--client-cpus``: the clients get the last
    cores of this process's set so that they never compete with what they measure."""
    have = sorted(os.sched_getaffinity(0))
    if spec == "none" or (spec == "auto" and len(have) < SPLIT_MIN_CPUS):
        return None, None
    n = clients if spec == "auto" else int(spec)
    if not 0 < n <= len(have) - 2:
        raise SystemExit(f"--client-cpus {spec}: {len(have)} CPUs, the server needs at least 2")
    return have[-n:], have[:-n]


def goodput(rows: list[dict[str, Any]], path: str) -> float:
    return max(
        (r["offered_rps"] for r in rows if r["path"] == path and r["within_slo"] >= 0.99),
        default=0.0,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mix", default=None, help="serve, second, sim or NAME:SLO_MS:RATE,...")
    ap.add_argument("--scales", default="1,1.5,2,2.5,3,3.5,4")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--frontends", type=int, default=4)
    ap.add_argument(
        "--client-cpus",
        default="auto",
        help="CPUs of their own for the client processes: N (the last N cores; the daemon, its"
        " frontends and workers and the in-process runtime get the others), none, or auto (as"
        f" many as --clients on a host of >= {SPLIT_MIN_CPUS} cores, else none)",
    )
    ap.add_argument("--protos", default="http")
    ap.add_argument("--simulated", action="store_true")
    ap.add_argument("--ready-timeout-s", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--trace", action="store_true", help="host breakdown from the worker trace")
    ap.add_argument("--api-only", action="store_true", help="no in-process run (no ratio)")
    ap.add_argument(
        "--planner",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [planner] line of the daemon's config (TOML), e.g. headroom=0.2; repeatable",
    )
    ap.add_argument("--json", default=None, help="summary path (default $OUT/api_gpu-MIX.json)")
    args = ap.parse_args(argv)
    sys.setswitchinterval(1e-3)  # as serve_gpu.py's in-process load generator runs
    mix = args.mix or ("sim" if args.simulated else "serve")
    models = parse_models(MIXES.get(mix, mix))
    args.scale_list = [float(s) for s in args.scales.split(",")]
    args.client_cpus, server_cpus = split_cpus(args.client_cpus, args.clients)
    if server_cpus:  # the daemon and its processes, or the in-process runtime, inherit it
        os.sched_setaffinity(0, server_cpus)
        print(f"CPUs: server {server_cpus[0]}-{server_cpus[-1]}, clients {args.client_cpus}")
    protos = args.protos.split(",")
    work = Path(tempfile.mkdtemp(prefix="stgs-apigpu-"))
    total = sum(m.rate_rps for m in models)
    out: dict[str, Any] = {
        "mix": mix,
        "models": [m.__dict__ for m in models],
        "args": {k: v for k, v in vars(args).items() if k != "scale_list"},
        "cpus": os.cpu_count(),
        "device": "simulated node (CPU workers)" if args.simulated else gpu_label(),
        **run_header("api_gpu", argv),
    }
    try:
        view, rows = through_api(args, models, work, protos)
        plan = Plan.from_dict(view["plan"])
        out["plan"] = view["plan"]
        print("the daemon's plan:\n" + "\n".join(describe_plan(plan)))
        if not args.api_only:
            rows += in_process(args, models, plan, work / "inproc")
        out["rows"] = rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.trace:
        _print_breakdown(rows)
    print(f"\ngoodput (highest load with >= 99% within SLO; mix {mix}, {total:g} req/s at x1):")
    base = goodput(rows, "in-process")
    out["goodput"] = {}
    for path in [*(f"api-{p}" for p in protos), *([] if args.api_only else ["in-process"])]:
        g = goodput(rows, path)
        out["goodput"][path] = g
        ratio = f"{g / base:.2f} of in-process" if base else "in-process: none"
        print(f"  {path:11} {g:7.0f} req/s  ({ratio})")
    write_summary(out, args.json, f"api_gpu-{mix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
