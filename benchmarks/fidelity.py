"""Simulator fidelity: the same plan and the same requests, on the GPU and in the simulator.

    python -m benchmarks.fidelity RUN.json [RUN2.json ...] [--seeds 3] [--host default|off|fit|F]
        [--arrivals auto|queued|sent|scheduled] [--interference busy|static]
    python -m benchmarks.fidelity --fit RUN.json [RUN2.json ...] [--fit-from auto|trace|client]
    python -m benchmarks.fidelity RUN.json --calibrate-from OTHER.json [...]
        [--calibrate-by partition|bucket] [--noise profile|runtime --runtime-noise FILE]
    python -m benchmarks.fidelity --fit-noise OUT.json RUN.json [RUN2.json ...]

Input: what `benchmarks/serve_gpu.py` wrote after a run on a lent GPU (its JSON summary and the
.npz of every request: scheduled arrival, send and answer times, model, status; newer runs also
the workers' per-batch trace). The simulator replays phase 1 of each run with plan 1, the
latency functions and noise of the shipped profiles, the runtime's router, executor and
deadline rule, and the host-cost model (``SimOptions.host``). Prints, per model and overall,
p99 latency of the answered requests and SLO attainment from both, their relative differences
and the largest one against issue #6's target (10%); with a trace also where latency went
(the trace joined to the client's record, segment by segment).

Where requests enter and latency counts from (``--arrivals``, :func:`replay_input`):
``queued`` (the default when the run has a worker trace) the worker's queueing time less the
modelled transport, to the batch's replies + the modelled reply, with the deadlines the worker
had: the workers compared, the load generator's lag and its process's stalls out of both
sides; ``sent`` from ``Runtime.submit`` to the client's answer, with the runtime's deadlines;
``scheduled`` (the default without a trace) end to end, as the runs' own tables.

Host costs (``--host``): ``default`` the simulator's defaults (measured, docs/simulator.md),
``off`` none, ``fit`` fitted on the runs given, or a JSON file of ``HostCosts`` fields.

``--fit`` measures the host costs and prints them as JSON. From the workers' trace (every
run has one; :func:`fit_host_trace`): the runner's time per batch less the profile's GPU
latency x the interference of the neighbours that ran meanwhile, fitted as ``a + b x n x MB``
(copies; least absolute deviations over every batch); the loop's time outside the runner
(deadline check, replies) as ``c + d x n``; the turn between two batches when work was
waiting; the median from the send to the worker's queue per input size (``request_ms`` +
``request_ms_per_mb`` x MB) and from the batch's replies to the client's answer
(``reply_ms``). It also prints the interference check (:func:`interference_check`).
From the client's record alone (``--fit-from client``, runs without a trace):

* in the worker's loop: batches are told apart by their answers (answers of one batch arrive
  within microseconds of each other, one model at a time); a batch whose requests were all sent
  before the partition's previous batch ended ran back to back, and its duration is the time
  between the two batches' answers. Its excess over the profile's GPU latency (bucket, partition
  and MPS interference as the simulator computes it), over every back-to-back batch of the
  fitted models, is fitted (least squares over the (model, n) medians, weighted by count) as
  ``batch_ms + n x sample_ms_per_mb x MB``;
* before and after the loop: for each model, the latency of single-request batches that found
  the worker idle minus the duration of back-to-back single-request batches (both measured, no
  profile involved) is the transport around one request; fitted over the input sizes as
  ``request_ms + request_ms_per_mb x MB``.

``--calibrate-from OTHER.json ...``: the profiles' latency per (model, partition) scaled by
what the runtime measured in *other* runs' traces (:func:`calibration`), then the replay; the
runs compared must not be among them (no fitting on the answer).

``--calibrate-by``: ``partition`` (the default) one factor per (model, partition); ``bucket``
one per (model, partition, captured batch bucket) where 50 batches measured it, the
partition's for the rest. On the session-4 repeats bucket factors are lower for the large
buckets (mobilenet_v3_large on 32 SMs: x1.15 at 1, x0.95 at 4) but the replays' p99 agree
worse (docs/benchmarks.md, session 6), hence the default.

``--fit-noise OUT`` writes the runtime's per-batch latency factors of the runs given (every
batch's ratio of :func:`batch_ratios`, divided by its (run, model, partition, bucket) median)
as the simulator's ``runtime_noise`` file (partitioner/sim/noise.py) and prints their spread;
``--noise runtime --runtime-noise FILE`` replays with them instead of the profile's lognormal
(fit them on other runs than the ones compared).

A run file that cannot be read (missing, not JSON, no .npz, not a serve_gpu.py run): exit 2
and one line with the file and why (:func:`read_run`, shared with repeatability.py and
stall_windows.py).

``--exclude MODEL`` leaves a model out of the client fit (the session-2 runs served
``bert_base`` as a torch.nn encoder, not the transformers BertModel its profile measured).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.lib.fitting import (
    CALIBRATE_BY,
    MODES,
    TARGET,
    apply_calibration,
    calibration,
    compare,
    decomposition,
    fit_host,
    fit_host_trace,
    fit_runtime_noise,
    interference_check,
    load_trace,
    print_table,
    resolve_mode,
)
from benchmarks.lib.runs import RunError, read_run
from partitioner.sim.config import HostCosts
from partitioner.sim.noise import write_runtime_noise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("summary", nargs="+", help="serve_gpu.py's JSON summaries")
    ap.add_argument("--npz", help="per-request arrays of a single run (default: beside the JSON)")
    ap.add_argument("--seeds", type=int, default=3, help="simulator noise seeds to average")
    ap.add_argument("--sku", default="H100-80GB", help="the GPU the plan was made for")
    ap.add_argument("--host", default="default", help="default | off | fit | HostCosts JSON file")
    ap.add_argument(
        "--arrivals",
        choices=MODES,
        default="auto",
        help="where requests enter and latency counts from (auto: queued with a worker trace)",
    )
    ap.add_argument("--interference", choices=("busy", "static"), default="busy")
    ap.add_argument("--fit", action="store_true", help="only fit and print the host costs")
    ap.add_argument(
        "--fit-from",
        choices=("auto", "trace", "client"),
        default="auto",
        help="what --fit measures on (auto: the worker trace when every run has one)",
    )
    ap.add_argument("--exclude", action="append", default=[], help="model left out (client fit)")
    ap.add_argument("--json", help="write the comparison rows here")
    ap.add_argument(
        "--calibrate-from",
        nargs="+",
        default=None,
        metavar="RUN",
        help="other runs (with a worker trace) whose measured batch latency per model and "
        "partition scales the profiles' before the replay (see calibration())",
    )
    ap.add_argument(
        "--calibrate-by",
        choices=CALIBRATE_BY,
        default="partition",
        help="--calibrate-from's factors: one per (model, partition), or per (model, partition,"
        " captured batch bucket) where 50 batches measured it",
    )
    ap.add_argument(
        "--fit-noise",
        metavar="OUT",
        help="only fit the runtime's per-batch latency factors on the runs given and write them"
        " to OUT (the simulator's runtime_noise file)",
    )
    ap.add_argument(
        "--noise",
        choices=("profile", "runtime"),
        default="profile",
        help="the simulator's noise: the profile's lognormal, or the runtime's factors"
        " (--runtime-noise FILE, fitted by --fit-noise on other runs)",
    )
    ap.add_argument("--runtime-noise", metavar="FILE", help="factors for --noise runtime")
    args = ap.parse_args(argv)
    if args.npz and len(args.summary) > 1:
        ap.error("--npz goes with a single run")
    if (args.noise == "runtime") != bool(args.runtime_noise):
        ap.error("--noise runtime and --runtime-noise FILE go together")
    try:
        runs = [read_run(s, args.npz, args.sku) for s in args.summary]
        cal_runs = [read_run(x, None, args.sku) for x in args.calibrate_from or []]
    except RunError as exc:
        print(f"fidelity.py: {exc}", file=sys.stderr)
        return 2
    if args.fit_noise:
        if any(load_trace(r) is None for r in runs):
            ap.error("--fit-noise needs runs with a worker trace")
        factors, ninfo = fit_runtime_noise(runs)
        src = "benchmarks/fidelity.py --fit-noise on " + ", ".join(str(r.path.name) for r in runs)
        write_runtime_noise(args.fit_noise, factors, src)
        print(f"# runtime noise written to {args.fit_noise} ({src})")
        print("| profile | batches | p90 / median | p99 / median |")
        print("|---|---|---|---|")
        for p, d in ninfo.items():
            print(
                f"| {p} | {d['batches']} | {d['p90_over_median']:.3f} |"
                f" {d['p99_over_median']:.3f} |"
            )
        return 0
    if args.runtime_noise:
        from partitioner.sim.noise import load_runtime_noise
        from stgs.errors import ConfigError

        try:
            load_runtime_noise(args.runtime_noise)
        except ConfigError as exc:
            ap.error(str(exc))
        source = str(json.loads(Path(args.runtime_noise).read_text()).get("source", ""))
        fitted_on = {x.strip() for x in source.partition(" on ")[2].split(",")}
        for r in runs:
            if r.path.name in fitted_on:
                print(
                    f"# note: {args.runtime_noise} was fitted on a run named {r.path.name}"
                    " (the factors should come from other runs than the one compared)"
                )
    if args.fit or args.host == "fit":
        src = args.fit_from
        if src == "auto":
            src = "trace" if all(load_trace(r) is not None for r in runs) else "client"
        if src == "trace":
            host, info = fit_host_trace(runs)
        else:
            host, info = fit_host(runs, set(args.exclude))
        if args.fit:
            fit_out = {"from": src, "host": host.model_dump(exclude={"input_mb"}), **info}
            print(json.dumps(fit_out, indent=1))
            if src == "trace":
                lines, _ = interference_check(runs)
                print("\n".join(lines))
            return 0
        how = f"fitted on these runs ({src}): {host.model_dump(exclude={'input_mb'})}"
    elif args.host == "default":
        host = HostCosts()
        how = f"simulator defaults {host.model_dump(exclude={'input_mb'})}"
    elif args.host == "off":
        host = HostCosts(enabled=False)
        how = "off"
    else:
        host = HostCosts(**json.loads(Path(args.host).read_text()))
        how = f"{args.host}: {host.model_dump(exclude={'input_mb'})}"
    how += f"; interference {args.interference}"
    cal = None
    if args.calibrate_from:
        given = {Path(x).resolve() for x in args.summary}
        if any(Path(x).resolve() in given for x in args.calibrate_from):
            ap.error("--calibrate-from must name other runs than the ones compared")
        if any(load_trace(r) is None for r in cal_runs):
            ap.error("--calibrate-from needs runs with a worker trace")
        cal = calibration(cal_runs, args.calibrate_by)
        print(
            f"# calibration from {', '.join(args.calibrate_from)} (by {args.calibrate_by}):"
            " runtime / profile latency"
        )
        for key, (f, n) in sorted(cal.items(), key=lambda kv: tuple(map(str, kv[0]))):
            model, kind, sms, *bk = key
            at = f", bucket {bk[0]}" if bk else ""
            print(f"#   {model} on {kind} {sms} SMs{at}: x{f:.3f} ({n} batches)")
        how += f"; latency calibrated from {len(cal_runs)} other run(s) by {args.calibrate_by}"
    out: dict[str, Any] = {}
    worst_all = 0.0
    for run in runs:
        if cal is not None:
            n_applied = apply_calibration(run, cal)
            print(f"# {run.path.name}: {n_applied} calibration factors applied")
        mode = resolve_mode(run, args.arrivals)
        rows, worst, info = compare(
            run, host, args.seeds, mode, args.interference, args.runtime_noise
        )
        print_table(run, rows, worst, args.seeds, how, info)
        tr = load_trace(run)
        if tr is not None:
            print("\n".join(decomposition(run, tr)))
        out[str(run.path)] = {"rows": rows, "largest_diff": worst, **info}
        worst_all = max(worst_all, worst)
    if len(runs) > 1:
        verdict = "met" if worst_all <= TARGET else "NOT met"
        print(f"all runs: largest relative difference {worst_all:.1%} ({verdict})")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host.model_dump(), "runs": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
