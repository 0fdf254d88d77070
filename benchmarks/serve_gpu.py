"""Serve a stgs plan under open-loop Poisson load, then switch plans under load.

    # on a GPU (MIG disabled; starts and quits its own MPS daemon under --runtime-dir):
    python -m benchmarks.serve_gpu [--phase-s 60] [--after-s 30] [--json out.json]
    # anywhere, on the simulated node with CPU workers (``sleep:<ms>`` stand-ins, low rates):
    python -m benchmarks.serve_gpu --simulated [--phase-s 3]

1. Plan the models (``--models name:slo_ms:rate_rps,...``) on one GPU with the ``stgs`` policy
   and the shipped measured H100 profiles, apply the plan with ``Runtime(NvmlBackend(...))``
   (one MPS client per partition, CUDA graphs per batch bucket) and wait until every partition
   is READY.
2. Drive open-loop Poisson load at the planned rates: arrival times are drawn per model in
   advance (numpy Generator, ``--seed``), and a few sender threads submit each request at its
   arrival time, never waiting for a response. Latency = completion (the future's callback) -
   scheduled arrival; a request's deadline is its scheduled arrival + SLO. A request is within
   SLO when it completed OK within ``slo_ms``; "deadline exceeded" and every error are misses.
3. At the end of phase 1 apply a second plan with different partition sizes (planned with
   ``--switch-shares`` as the MPS share list, rates x ``--switch-rate-scale``) in another thread
   while the load keeps running; report the requests lost (never answered, or errors other than
   "deadline exceeded") and the attainment during the switch and ``--after-s`` seconds after it.

Worker trace: unless ``--no-worker-trace``, the workers record per batch and per request when
they took, ran and answered it (``stgs.runtime.worker``, ``STGS_WORKER_TRACE``); the drained
workers of plan 1 write it when they stop, and it is merged into the ``.npz`` (``wb``, ``wr``,
``w_parts``, ``t0_ns``; ``benchmarks/fidelity.py`` reads it).

Windows (by scheduled arrival): warmup (not counted), phase1, switch (from the start of
``apply`` to its return), after. Writes a JSON summary (``--json``, default ``$OUT/serve_gpu.json``
when ``$OUT`` is set) and the per-request record as ``.npz`` beside it.

``--simulated``: the same path (planner, runtime, transitions, worker processes, transport,
duty cycles, deadlines) on the simulated node. Each model is served by a ``sleep:<ms>`` stand-in
that sleeps its planned batch latency; the load is ``--load-scale`` (default 0.05) of the
planned rates.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lib.loadgen import (
    DEFAULT_MODELS,
    ERROR,
    NOT_SENT,
    PENDING,
    PLAN_SKU,
    LoadGen,
    describe_plan,
    parse_models,
    plan_checks,
    plan_for,
    poisson_arrivals,
    print_table,
    relabel,
    stand_ins,
    timeline,
    window_stats,
)
from benchmarks.lib.node import open_backend, stop_daemons
from benchmarks.lib.probes import Probe, collect_traces, mps_pids
from benchmarks.lib.runs import run_header, summary_path
from stgs.errors import StgsError
from stgs.runtime import Runtime
from stgs.runtime.models import model_entry
from stgs.runtime.worker import TRACE_ENV


def _sigterm(_sig: int, _frame: Any) -> None:
    raise SystemExit(143)  # so that the finally blocks quit the workers and the MPS daemon


# ---------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help="name:slo_ms:rate_rps,...")
    ap.add_argument("--shares", default="", help="MPS share list for plan 1 (default: planner's)")
    ap.add_argument("--switch-shares", default="10,20,30,40,60,80,100")
    ap.add_argument("--switch-rate-scale", type=float, default=1.0)
    ap.add_argument("--headroom", type=float, default=0.1, help="planner latency margin")
    ap.add_argument("--warmup-s", type=float, default=5.0)
    ap.add_argument("--phase-s", type=float, default=60.0)
    ap.add_argument("--after-s", type=float, default=30.0)
    ap.add_argument("--max-switch-s", type=float, default=240.0)
    # One sender thread and a 1 ms GIL switch interval: fewer GIL hand-offs between this
    # process's threads. On a lent H100 whose load-generator process stalled (session 4, call 9,
    # the same machine, back to back): 1 sender per model and 200 us had 92 client stalls > 3 ms
    # and 99.62% within SLO; one sender and 1000 us had 5 and 99.98% (docs/serving-gpu.md).
    ap.add_argument(
        "--senders",
        type=int,
        default=0,
        help="sender threads per model (0, the default: one thread sends for every model)",
    )
    ap.add_argument(
        "--switch-interval-us",
        type=float,
        default=1000.0,
        help="this process's GIL switch interval (Python's default: 5000)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--simulated", action="store_true", help="simulated node, CPU workers")
    ap.add_argument("--load-scale", type=float, default=None, help="x planned rates (sim 0.05)")
    ap.add_argument("--runtime-dir", default=None, help="MPS pipe/log dirs (default: a tmp dir)")
    ap.add_argument("--no-admission", action="store_true")
    ap.add_argument("--json", default=None, help="summary path (default $OUT/serve_gpu.json)")
    ap.add_argument(
        "--no-worker-trace", action="store_true", help="workers record no per-batch trace"
    )
    args = ap.parse_args(argv)

    signal.signal(signal.SIGTERM, _sigterm)
    sys.setswitchinterval(args.switch_interval_us / 1e6)
    models = parse_models(args.models)
    load_scale = (
        args.load_scale if args.load_scale is not None else (0.05 if args.simulated else 1.0)
    )
    shares1 = [int(s) for s in args.shares.split(",") if s]
    shares2 = [int(s) for s in args.switch_shares.split(",") if s]
    runtime_dir = Path(args.runtime_dir or f"/tmp/stgs-serve-{os.getpid()}")
    runtime_dir.mkdir(parents=True, exist_ok=True)
    json_path = summary_path(args.json, "serve_gpu")

    # ---- plans
    t = time.monotonic()
    plan1 = plan_for(models, shares1, 1.0, args.headroom)
    plan2 = plan_for(models, shares2, args.switch_rate_scale, args.headroom)
    print(f"planned in {time.monotonic() - t:.1f} s (stgs policy, shipped {PLAN_SKU} profiles)")
    print("plan 1:")
    print("\n".join(describe_plan(plan1)))
    print("plan 2 (the switch):")
    print("\n".join(describe_plan(plan2)))
    checks1, checks2 = plan_checks(plan1), plan_checks(plan2)
    print(f"plan 1 checks: {checks1}\nplan 2 checks: {checks2}")
    if not (plan1.feasible and plan2.feasible):
        print("a plan is infeasible at these rates: lower them", file=sys.stderr)
        return 2

    # ---- backend
    opened = open_backend(args.simulated, runtime_dir)
    if opened is None:
        return 2
    backend, label = opened
    live_sku = backend.sku(0).name
    print(f"device: {label}; live SKU {live_sku}")
    if live_sku != PLAN_SKU:
        print(f"note: planned on the {PLAN_SKU} profiles, served on a {live_sku}")
    names = stand_ins([plan1, plan2]) if args.simulated else {m.name: m.name for m in models}
    run1 = relabel(plan1, live_sku, names if args.simulated else None)
    run2 = relabel(plan2, live_sku, names if args.simulated else None)
    serve_names = [names[m.name] for m in models]
    slos_by_serve = {names[m.name]: m.slo_ms for m in models}
    if args.simulated:
        inputs = [np.zeros(16, np.float32) for _ in models]
    else:
        inputs = [model_entry(m.name).example(seed=i) for i, m in enumerate(models)]
    rates = [m.rate_rps * load_scale for m in models]

    trace_dir: Path | None = None
    if json_path and not args.no_worker_trace:
        trace_dir = runtime_dir / f"worker-trace-{os.getpid()}"
        shutil.rmtree(trace_dir, ignore_errors=True)
        os.environ[TRACE_ENV] = str(trace_dir)  # the workers inherit it
    runtime = Runtime(backend, slos=slos_by_serve, admission=not args.no_admission)
    result: dict[str, Any] = {
        "device": label,
        "live_sku": live_sku,
        **run_header("serve_gpu", argv),  # command, machine, date
        "args": vars(args),
        "load_scale": load_scale,
        "models": [m.__dict__ for m in models],
        "plan1": plan1.to_dict() if hasattr(plan1, "to_dict") else None,
        "plan2": plan2.to_dict() if hasattr(plan2, "to_dict") else None,
        "checks": {"plan1": checks1, "plan2": checks2},
        # what bert_base is (stgs.runtime.models): the profiled model only with transformers
        "bert_base_impl": "transformers BertModel"
        if importlib.util.find_spec("transformers") is not None
        else "torch.nn encoder",
    }
    print(f"bert_base served as: {result['bert_base_impl']}")
    lg: LoadGen | None = None
    try:
        runtime.start_monitor()
        t = time.monotonic()
        runtime.apply(run1)
        startup_s = time.monotonic() - t
        states = runtime.describe()
        print(f"plan 1 applied in {startup_s:.1f} s: " + ", ".join(s["state"] for s in states))
        if any(s["state"] != "ready" for s in states):
            print("not every partition is READY", file=sys.stderr)
            return 3
        result["startup_s"] = round(startup_s, 2)
        result["partitions1"] = states

        # Everything built so far lives to the end: keep it out of the cyclic collector, whose
        # full passes over torch's objects (imported by the model registry) stall the senders.
        gc.collect()
        gc.freeze()
        horizon = args.warmup_s + args.phase_s + args.max_switch_s + args.after_s
        t_sched, m_idx = poisson_arrivals(rates, horizon, args.seed)
        lg = LoadGen(
            runtime, serve_names, [m.slo_ms for m in models], inputs, t_sched, m_idx, args.senders
        )
        t0 = time.monotonic() + 0.2
        probe = Probe(
            t0,
            lambda: {
                "workers": [int(p["pid"]) for p in runtime.describe() if p["pid"]],
                "mps": mps_pids(),
            },
        )
        probe.start()
        lg.start(t0)
        p1_end = args.warmup_s + args.phase_s
        print(
            f"load: {sum(rates):.0f} req/s open loop; warmup {args.warmup_s:g} s, "
            f"phase 1 {args.phase_s:g} s, then the switch"
        )
        time.sleep(max(0.0, t0 + p1_end - time.monotonic()))

        # ---- the switch, under load
        switch: dict[str, Any] = {}

        def do_switch() -> None:
            switch["start"] = time.monotonic() - t0
            try:
                rec = runtime.apply(run2)
                switch["record"] = {
                    "state": rec.state.value,
                    "started": rec.started,
                    "stopped": rec.stopped,
                    "kept": rec.kept,
                }
            except StgsError as exc:
                switch["error"] = f"{type(exc).__name__}: {exc}"
            switch["end"] = time.monotonic() - t0

        th = threading.Thread(target=do_switch, name="switch")
        th.start()
        th.join(args.max_switch_s)
        if th.is_alive():
            switch["error"] = f"apply did not return within {args.max_switch_s:g} s"
            switch["end"] = time.monotonic() - t0
        sw0, sw1 = switch["start"], switch["end"]
        print(
            f"switch: apply took {sw1 - sw0:.1f} s; "
            + (switch.get("error") or f"{switch['record']['state']}")
        )
        lg.stop_at = sw1 + args.after_s
        lg.join()
        end = time.monotonic() + 15.0  # let the last requests finish
        while lg.pending() and time.monotonic() < end:
            time.sleep(0.05)
        result["partitions2"] = runtime.describe()
        probe.stop()

        # ---- report
        wins = {
            "phase1": window_stats(lg, models, rates, args.warmup_s, p1_end),
            "switch": window_stats(lg, models, rates, sw0, sw1),
            "after": window_stats(lg, models, rates, sw1, sw1 + args.after_s),
            "warmup": window_stats(lg, models, rates, 0.0, args.warmup_s),
        }
        slo_map = {m.name: m.slo_ms for m in models}
        print_table(f"PHASE 1: plan 1, {args.phase_s:g} s", wins["phase1"], slo_map)
        print_table(
            f"SWITCH: plan 1 -> plan 2 under load ({sw1 - sw0:.1f} s)", wins["switch"], slo_map
        )
        print_table(f"AFTER: plan 2, {args.after_s:g} s", wins["after"], slo_map)
        sent = lg.status != NOT_SENT
        lost = int(np.count_nonzero(sent & ((lg.status == PENDING) | (lg.status == ERROR))))
        lag = (lg.sent - (lg.t0 + lg.t))[sent] * 1e3
        print(
            f"\nrequests sent {int(sent.sum())}, lost (never answered or errors) {lost}; "
            f"errors {dict(lg.errors)}"
        )
        print(
            f"sender lag behind schedule: p50 {np.percentile(lag, 50):.3f} ms, "
            f"p99 {np.percentile(lag, 99):.3f} ms, max {lag.max():.3f} ms"
        )
        for k, v in lg.examples.items():
            print(f"  {k}: {v}")
        diag = {
            "phase1": probe.summary(args.warmup_s, p1_end),
            "switch": probe.summary(sw0, sw1),
            "after": probe.summary(sw1, sw1 + args.after_s),
        }
        for name, w in wins.items():
            if name in diag:
                att = w["rows"][-1]["attainment_from_send"]
                d = diag[name]
                print(
                    f"{name}: attainment counted from the send {100 * (att or 0):.2f}%; "
                    f"client stalls >3 ms {d['stalls_over_3ms']} (max {d['stall_max_ms']} ms); "
                    f"GC passes >1 ms {d['gc_passes_over_1ms']} (max {d['gc_max_ms']} ms); "
                    f"CPU % (100 = one core) {d['cpu_pct_mean']}"
                )
        result.update(
            client=diag,
            stalls=probe.stalls,
            stall_frames=probe.stall_frames,
            gc_passes=probe.gcs,
            cpu=probe.cpu,
            switch=switch,
            windows=wins,
            lost=lost,
            errors=dict(lg.errors),
            error_examples=lg.examples,
            sender_lag_ms={
                "p50": float(np.percentile(lag, 50)),
                "p99": float(np.percentile(lag, 99)),
                "max": float(lag.max()),
            },
            timeline=timeline(lg, models, sw1 + args.after_s),
        )
    finally:
        runtime.close()
        notes = stop_daemons(backend)
        for n in notes:
            print(n)
        result["cleanup"] = notes
        backend.close()
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(result, indent=1, default=str))
            if lg is not None:
                traces = collect_traces(trace_dir) if trace_dir is not None else {}
                with contextlib.suppress(OSError):
                    np.savez_compressed(
                        Path(json_path).with_suffix(".npz"),
                        t_sched=lg.t,
                        model=lg.m,
                        sent=lg.sent - lg.t0,
                        done=lg.done - lg.t0,
                        status=lg.status,
                        t0_ns=np.int64(round(lg.t0 * 1e9)),
                        **traces,
                    )
                print(f"worker trace: {len(traces.get('wb', []))} batches")
            print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
