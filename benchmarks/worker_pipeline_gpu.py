"""The pipelined worker against the sequential one, side by side in one run (issue 17).

    # on a GPU (MIG disabled; the runtime starts and quits its own MPS daemon):
    python -m benchmarks.worker_pipeline_gpu [--partitions SPEC] [--seconds 8] [--load 0.9]
        [--slo-ms 50] [--json OUT]
    # anywhere: the simulated node with CPU workers (sleep:<ms> device stand-ins, a tiny model)
    python -m benchmarks.worker_pipeline_gpu --simulated [--seconds 3]

``--partitions``: ``PCT=MODEL/BATCH+MODEL/BATCH,...``, one MPS partition of PCT percent per item,
its models time-shared by one worker's duty cycle (default on a GPU: resnet50 batch 8 with
mobilenet_v3_large batch 4 at 50 %, and efficientnet_b0 batch 8 alone at 50 %; simulated:
``sleep:6``/8 with tiny_cnn/4, and ``sleep:4``/8 alone). A model serves in one partition.

For ``STGS_WORKER_PIPELINE=0`` (sequential), then ``1`` (pipelined), in this one process, with
one ``Runtime`` (the NVML backend, or the simulated node):

1. apply the plan: one worker per partition, with the worker trace on (``STGS_WORKER_TRACE``);
   the workers' READY frames must say the setting;
2. probe: per model, ``2 x batch + 1`` distinct inputs sent at once; the answers of the two
   settings are compared (largest difference relative to the largest value: a result written to
   another request's reply, or overwritten by the next batch, shows as ~1);
3. ``saturated``: a closed loop per model, ``4 x batch`` requests outstanding, no deadlines, for
   ``--seconds`` after a second of warm-up: every batch full, requests always waiting;
4. ``near``: open-loop Poisson arrivals at ``--load`` x the *sequential* setting's saturated
   throughput of each model (the same rates for both settings), deadlines ``--slo-ms``, for
   ``--seconds``;
5. drain (an empty plan): the workers write their trace.

Per setting, phase and worker (partition) the table prints: batches run; the host time on the
GPU's critical path per batch (:func:`stgs.workertrace.host_gaps`: for consecutive batches with a
request waiting, the time from the previous batch's end on the device to the next launch; p50,
p99 and mean over the batches that had one); the device busy fraction (the batches' device time,
CUDA events on a GPU, over the phase); throughput (answers OK per second); p99 latency (from
send, or from the scheduled arrival in ``near``; ``miss``: more than 1 % not answered OK).

Every wait has a timeout and the whole run stops after ``--max-s`` (default 220 s: a GPU run
with the defaults takes about two minutes, most of it loading models and capturing graphs).
Writes a JSON summary (``--json``, default ``$OUT/worker_pipeline_gpu.json`` when ``$OUT`` is
set). Exit status: 0 done, 2 bad arguments or MIG on, 3 a plan did not come up, 4 out of time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lib.node import open_backend, stop_daemons
from benchmarks.lib.probes import collect_traces
from benchmarks.lib.runs import run_header, write_summary
from benchmarks.lib.socket_load import DEADLINE, ERROR, OK, PENDING
from stgs.catalog import get_sku
from stgs.plan import GpuPlan, ModelAssignment, Partition, Plan
from stgs.runtime import Runtime
from stgs.runtime.models import model_entry
from stgs.runtime.worker import PIPELINE_ENV
from stgs.workertrace import TRACE_BATCH, TRACE_ENV, device_ns, gap_summary, host_gaps, per_worker

GPU_PARTITIONS = "50=resnet50/8+mobilenet_v3_large/4,50=efficientnet_b0/8"
SIM_PARTITIONS = "50=sleep:6/8+tiny_cnn/4,50=sleep:4/8"
SETTINGS = (("sequential", "0"), ("pipelined", "1"))
WARMUP_S = 1.0
CLIENT_READY_S = 60.0  # for the load clients to import and connect
ROOT = Path(__file__).resolve().parents[1]
PROBE_TOLERANCE = 0.02  # fp16 on the GPU: batch composition may differ between the settings
_B = {c: k for k, c in enumerate(TRACE_BATCH)}


class OutOfTime(Exception):
    pass


def _alarm(_sig: int, _frame: Any) -> None:
    raise OutOfTime


def _sigterm(_sig: int, _frame: Any) -> None:
    raise SystemExit(143)  # so that the finally blocks quit the workers and the MPS daemon


# ---------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Part:
    pct: int
    models: tuple[tuple[str, int], ...]  # (name, batch)

    @property
    def label(self) -> str:
        return "+".join(f"{n}/{b}" for n, b in self.models) + f"@{self.pct}%"


def parse_partitions(text: str) -> list[Part]:
    """``PCT=MODEL/BATCH+MODEL/BATCH,...``; ValueError with what is wrong."""
    parts: list[Part] = []
    seen: set[str] = set()
    for item in (x.strip() for x in text.split(",")):
        pct_s, sep, rest = item.partition("=")
        if not sep or not rest:
            raise ValueError(f"{item!r}: PCT=MODEL/BATCH+MODEL/BATCH")
        pct = int(pct_s)
        if not 1 <= pct <= 100:
            raise ValueError(f"{item!r}: a share of 1 to 100 percent")
        models = []
        for m in rest.split("+"):
            name, sep, batch = m.strip().rpartition("/")
            if not sep or not name or int(batch) < 1:
                raise ValueError(f"{m!r}: MODEL/BATCH with a batch >= 1")
            if name in seen:
                raise ValueError(f"{name} is in two partitions: one each")
            model_entry(name)  # a model the registry knows (ConfigError otherwise)
            seen.add(name)
            models.append((name, int(batch)))
        parts.append(Part(pct, tuple(models)))
    return parts


def make_plan(parts: Sequence[Part], sku: str, planned_ms: float) -> Plan:
    """One MPS partition per part on GPU 0; ``planned_ms`` per batch (the hang threshold's
    floor before any batch was measured; routing needs no rates: a model serves in one)."""
    sms = get_sku(sku).sm_count
    partitions = tuple(
        Partition(
            kind="mps",
            sm_count=max(1, sms * p.pct // 100),
            memory_mib=1000.0,
            duty_cycle_ms=planned_ms * len(p.models),
            models=tuple(ModelAssignment(n, b, 1.0, planned_ms) for n, b in p.models),
            mps_pct=p.pct,
        )
        for p in parts
    )
    return Plan(policy="worker-pipeline", feasible=True, gpus=(GpuPlan(0, sku, False, partitions),))


def empty_plan(sku: str) -> Plan:
    return Plan(policy="drain", feasible=True, gpus=(GpuPlan(0, sku, False, ()),))


# ---------------------------------------------------------------------- load
def run_clients(
    specs: Sequence[dict[str, Any]], work: Path, seconds: float
) -> tuple[float, list[Any]]:
    """One ``benchmarks.lib.socket_load`` process per spec; once every one is connected, they
    all start at once, for ``seconds``. The start time and their records (None for a client
    that failed, or that ran past ``seconds`` + a minute and was killed)."""
    work.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[subprocess.Popen[str], Path]] = []
    try:
        for k, spec in enumerate(specs):
            sp, out = work / f"client-{k}.json", work / f"client-{k}.npz"
            sp.write_text(json.dumps(spec))
            out.unlink(missing_ok=True)
            argv = [sys.executable, "-m", "benchmarks.lib.socket_load", str(sp), str(out)]
            proc = subprocess.Popen(
                argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            procs.append((proc, out))
        end = time.monotonic() + CLIENT_READY_S
        pending = {p.stdout.fileno(): p for p, _ in procs if p.stdout is not None}
        while pending and time.monotonic() < end:
            ready, _, _ = select.select(list(pending), [], [], max(0.0, end - time.monotonic()))
            for fd in ready:
                if pending[fd].stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                    raise RuntimeError("a load client failed to start (its stderr above)")
                del pending[fd]
        if pending:
            raise RuntimeError(f"load clients not connected after {CLIENT_READY_S:g} s")
        start = time.monotonic() + 0.2
        for p, _ in procs:
            assert p.stdin is not None
            p.stdin.write(f"{start!r}\n")
            p.stdin.close()
        end = start + seconds + 60.0
        records: list[Any] = []
        for proc, out in procs:
            try:
                proc.wait(max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                print("a load client ran a minute past its end: killed")
            if proc.returncode == 0 and out.is_file():
                with np.load(out) as z:
                    records.append({k: z[k] for k in z.files})
            else:
                records.append(None)
        return start, records
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def closed_stats(rec: Any, lo: float, hi: float) -> dict[str, Any]:
    """A closed loop's answers OK in [lo, hi): throughput, latency from the send."""
    if rec is None:
        return {"ok": 0, "throughput_rps": 0.0, "p50_ms": None, "p99_ms": None, "lost": True}
    done = rec["done"]
    sel = (rec["status"] == OK) & (done >= lo) & (done < hi)
    lat = (done[sel] - rec["sent"][sel]) * 1e3
    return {
        "ok": int(sel.sum()),
        "errors": int(((rec["status"] > OK) & (done >= lo) & (done < hi)).sum()),
        "throughput_rps": round(float(sel.sum()) / (hi - lo), 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 3) if len(lat) else None,
    }


def open_stats(rec: Any, lo: float, hi: float) -> dict[str, Any]:
    """An open loop's requests scheduled in [lo, hi): answered OK, latency from the scheduled
    arrival (p99 None: more than 1 % not answered OK)."""
    if rec is None:
        return {"sent": 0, "ok": 0, "throughput_rps": 0.0, "p99_ms": None, "lost": True}
    t = rec["t_sched"]
    sel = (t >= lo) & (t < hi)
    st = rec["status"][sel]
    lat = (rec["done"][sel] - t[sel]) * 1e3
    ok = st == OK
    eff = np.where(ok, lat, np.inf)
    p99 = float(np.percentile(eff, 99, method="inverted_cdf")) if len(eff) else np.inf
    return {
        "sent": int(sel.sum()),
        "ok": int(ok.sum()),
        "deadline": int((st == DEADLINE).sum()),
        "errors": int((st == ERROR).sum()),
        "never_answered": int((st == PENDING).sum()),
        "throughput_rps": round(float(ok.sum()) / (hi - lo), 1),
        "p50_ms": round(float(np.percentile(lat[ok], 50)), 3) if ok.any() else None,
        "p99_ms": round(p99, 3) if np.isfinite(p99) else None,
        "p99_ok_ms": round(float(np.percentile(lat[ok], 99)), 3) if ok.any() else None,
    }


def inputs(names: Sequence[str]) -> list[np.ndarray]:
    """The request each model's load client sends: the registry's example (zeros for a test
    model)."""
    out = []
    for k, n in enumerate(names):
        entry = model_entry(n)
        out.append(np.zeros(16, np.float32) if entry.kind == "test" else entry.example(seed=k))
    return out


def probe(runtime: Runtime, names: Sequence[str], batches: Sequence[int]) -> dict[str, Any]:
    """Per model, ``2 x batch + 1`` distinct inputs at once: their answers (float64 arrays)."""
    out: dict[str, Any] = {}
    for name, b in zip(names, batches, strict=True):
        entry = model_entry(name)
        xs = [
            entry.example(seed=k) if entry.kind != "test" else np.full(16, k, np.float32)
            for k in range(2 * b + 1)
        ]
        futs = [runtime.submit(name, x) for x in xs]
        out[name] = [np.asarray(f.result(60.0), dtype=np.float64) for f in futs]
    return out


def compare_probes(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Per model: the largest |a - b| over the answers, relative to the largest |a|."""
    out = {}
    for name in a:
        diff = max(float(np.max(np.abs(x - y))) for x, y in zip(a[name], b[name], strict=True))
        scale = max(float(np.max(np.abs(x))) for x in a[name]) or 1.0
        out[name] = round(diff / scale, 6)
    return out


# ---------------------------------------------------------------------- the trace
def trace_rows(
    traces: dict[str, np.ndarray], windows: dict[str, tuple[int, int]]
) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (phase, worker label): batches, host gaps and device busy fraction in the window."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    if not traces:
        return out
    parts = json.loads(str(traces["w_parts"]))
    for w, b, r in per_worker(traces["wb"], traces["wr"]):
        label = "+".join(parts[w]["models"])
        gaps = host_gaps(b, r)
        dev = device_ns(b)
        launch = b[:, _B["t_launch"]]
        ran = b[:, _B["live"]] > 0
        for phase, (lo, hi) in windows.items():
            inside = ran & (launch >= lo) & (launch < hi)
            g = gaps.gap_ns[(launch[gaps.batch] >= lo) & (launch[gaps.batch] < hi)]
            out[(phase, label)] = {
                "batches": int(inside.sum()),
                "host_gap": gap_summary(g),
                "host_gap_per_batch_ms": round(float(g.sum()) / 1e6 / max(1, int(inside.sum())), 4),
                "device_busy": round(float(dev[inside].sum()) / (hi - lo), 4),
            }
    return out


# ---------------------------------------------------------------------- one setting
def run_setting(
    runtime: Runtime,
    setting: str,
    value: str,
    args: argparse.Namespace,
    parts: list[Part],
    sku: str,
    trace_root: Path,
    near_rates: list[float] | None,
) -> dict[str, Any]:
    names = [n for p in parts for n, _ in p.models]
    batches = [b for p in parts for _, b in p.models]
    res: dict[str, Any] = {"setting": setting, PIPELINE_ENV: value, "near_s": args.seconds}
    trace_dir = trace_root / setting
    shutil.rmtree(trace_dir, ignore_errors=True)
    os.environ[PIPELINE_ENV] = value  # the workers inherit both
    os.environ[TRACE_ENV] = str(trace_dir)
    t = time.monotonic()
    runtime.apply(make_plan(parts, sku, args.planned_ms))
    res["startup_s"] = round(time.monotonic() - t, 2)
    states = runtime.describe()
    print(f"[{setting}] plan applied in {res['startup_s']} s: {[s['state'] for s in states]}")
    if any(s["state"] != "ready" for s in states):
        raise RuntimeError(f"not every partition is ready: {states}")
    says = set()
    for p in runtime.partitions.values():
        info = p.worker.transport.ready_info if p.worker is not None else None
        says.add(json.loads(info.text()).get("pipeline") if info is not None else None)
    if says != {value == "1"}:
        raise RuntimeError(f"the workers say pipeline={says}, {PIPELINE_ENV}={value}")
    res["probe"] = probe(runtime, names, batches)

    where = {}  # model -> (its worker's data socket, the worker's slots in order)
    for p in runtime.partitions.values():
        slots = [m.name for m in p.partition.models]
        for n in slots:
            where[n] = (p.socket_path, slots)
    work = trace_root.parent / "clients" / setting
    span = WARMUP_S + args.seconds

    work.mkdir(parents=True, exist_ok=True)
    for k, x in enumerate(inputs(names)):
        np.save(work / f"input-{k}.npy", x)

    def specs(mode: str, extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {
                "socket": where[n][0],
                "models": where[n][1],
                "model": n,
                "input": str(work / f"input-{k}.npy"),
                "mode": mode,
                "seconds": span,
                **x,
            }
            for k, (n, x) in enumerate(zip(names, extra, strict=True))
        ]

    start, recs = run_clients(specs("closed", [{"window": 4 * b} for b in batches]), work, span)
    lo, hi = start + WARMUP_S, start + WARMUP_S + args.seconds
    windows = {"saturated": (int(lo * 1e9), int(hi * 1e9))}
    res["saturated"] = {n: closed_stats(r, lo, hi) for n, r in zip(names, recs, strict=True)}
    sat_rps = [res["saturated"][n]["throughput_rps"] for n in names]
    print(
        f"[{setting}] saturated: "
        + ", ".join(f"{n} {r:.0f}/s" for n, r in zip(names, sat_rps, strict=True))
    )

    rates = [args.load * r for r in (near_rates or sat_rps)]
    res["near_rates"] = [round(r, 1) for r in rates]
    extra = [{"rate": r, "seed": args.seed + k, "slo_ms": args.slo_ms} for k, r in enumerate(rates)]
    start, recs = run_clients(specs("open", extra), work, span)
    lo, hi = start + WARMUP_S, start + WARMUP_S + args.seconds
    windows["near"] = (int(lo * 1e9), int(hi * 1e9))
    res["near"] = {n: open_stats(r, lo, hi) for n, r in zip(names, recs, strict=True)}
    near = res["near"]
    print(
        f"[{setting}] near: {sum(v['ok'] for v in near.values())} OK of"
        f" {sum(v['sent'] for v in near.values())} sent; p99 ms "
        + ", ".join(f"{n} {near[n]['p99_ms']}" for n in names)
    )

    t = time.monotonic()
    runtime.apply(empty_plan(sku))  # drained: the workers write their trace
    res["drain_s"] = round(time.monotonic() - t, 2)
    traces = collect_traces(trace_dir)
    res["trace_batches"] = len(traces.get("wb", []))
    res["trace"] = {f"{ph}|{w}": v for (ph, w), v in trace_rows(traces, windows).items()}
    return res


# ---------------------------------------------------------------------- report
def table(parts: Sequence[Part], results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for res in results:
        for phase in ("saturated", "near"):
            for p in parts:
                names = [n for n, _ in p.models]
                tr = res["trace"].get(f"{phase}|{'+'.join(names)}", {})
                if phase == "saturated":
                    thr = sum(res["saturated"][n]["throughput_rps"] for n in names)
                    p99s = [res["saturated"][n]["p99_ms"] for n in names]
                    p99 = None if None in p99s else max(p99s)
                else:
                    thr = sum(res["near"][n]["throughput_rps"] for n in names)
                    p99s = [res["near"][n]["p99_ms"] for n in names]
                    p99 = None if None in p99s else max(p99s)
                gap = tr.get("host_gap", {})
                rows.append(
                    {
                        "setting": res["setting"],
                        "phase": phase,
                        "worker": p.label,
                        "batches": tr.get("batches", 0),
                        "gap_n": gap.get("n", 0),
                        "gap_p50_ms": gap.get("p50_ms"),
                        "gap_p99_ms": gap.get("p99_ms"),
                        "gap_mean_ms": gap.get("mean_ms"),
                        "gap_per_batch_ms": tr.get("host_gap_per_batch_ms"),
                        "device_busy": tr.get("device_busy"),
                        "throughput_rps": round(thr, 1),
                        "p99_ms": p99,
                    }
                )
    return rows


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    head = (
        f"{'setting':<11}{'phase':<10}{'worker':<44}{'batches':>8}"
        f"{'host ms p50':>12}{'p99':>8}{'mean':>8}{'/batch':>8}{'busy':>7}{'req/s':>9}{'p99 ms':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['setting']:<11}{r['phase']:<10}{r['worker'][:43]:<44}{r['batches']:>8}"
            f"{_f(r['gap_p50_ms'], '.3f'):>12}{_f(r['gap_p99_ms'], '.3f'):>8}"
            f"{_f(r['gap_mean_ms'], '.3f'):>8}{_f(r['gap_per_batch_ms'], '.3f'):>8}"
            f"{_f(None if r['device_busy'] is None else 100 * r['device_busy'], '.1f'):>6}%"
            f"{r['throughput_rps']:>9.0f}{_f(r['p99_ms'], '.2f') if r['p99_ms'] else 'miss':>9}"
        )
    print(
        "host ms: the host time on the GPU's critical path before a batch that had a request"
        " waiting (stgs.workertrace.host_gaps); /batch: their sum over the batches run;"
        " busy: device time / phase"
    )


# ---------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partitions", default=None, help="PCT=MODEL/BATCH+MODEL/BATCH,...")
    ap.add_argument("--seconds", type=float, default=None, help="per phase (GPU 8, simulated 3)")
    ap.add_argument("--load", type=float, default=0.9, help="near: x saturated throughput")
    ap.add_argument("--slo-ms", type=float, default=None, help="near's deadlines (GPU 50, sim 300)")
    ap.add_argument("--planned-ms", type=float, default=None, help="planned batch latency")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--simulated", action="store_true", help="simulated node, CPU workers")
    ap.add_argument("--runtime-dir", default=None, help="MPS pipe/log dirs (default: a tmp dir)")
    ap.add_argument("--max-s", type=float, default=220.0, help="stop after this long (exit 4)")
    ap.add_argument("--json", default=None, help="summary (default $OUT/worker_pipeline_gpu.json)")
    args = ap.parse_args(argv)
    sim = args.simulated
    args.seconds = args.seconds or (3.0 if sim else 8.0)
    args.slo_ms = args.slo_ms or (300.0 if sim else 50.0)
    args.planned_ms = args.planned_ms or (5.0 if sim else 10.0)
    try:
        parts = parse_partitions(args.partitions or (SIM_PARTITIONS if sim else GPU_PARTITIONS))
    except Exception as exc:
        print(f"worker_pipeline_gpu: --partitions: {exc}", file=sys.stderr)
        return 2
    if not 0 < args.load <= 2 or args.seconds <= 0:
        print("worker_pipeline_gpu: --load in (0, 2], --seconds > 0", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(1, int(args.max_s)))
    t_start = time.monotonic()
    runtime_dir = Path(args.runtime_dir or f"/tmp/stgs-pipeline-{os.getpid()}")
    runtime_dir.mkdir(parents=True, exist_ok=True)
    opened = open_backend(sim, runtime_dir)
    if opened is None:
        return 2
    backend, label = opened
    sku = backend.sku(0).name
    print(f"device: {label}; partitions: {', '.join(p.label for p in parts)}")
    result: dict[str, Any] = {
        **run_header("worker_pipeline_gpu", argv),
        "device": label,
        "args": vars(args),
        "partitions": [p.label for p in parts],
        "settings": [],
    }
    runtime = Runtime(
        backend, ready_timeout_s=150.0, drain_timeout_s=20.0, data_dir=runtime_dir / "sock"
    )
    code = 0
    try:
        runtime.start_monitor()
        near_rates: list[float] | None = None
        for setting, value in SETTINGS:
            elapsed = time.monotonic() - t_start
            if result["settings"] and elapsed * 2 > args.max_s:
                result["skipped"] = f"{setting}: not enough time left ({elapsed:.0f} s used)"
                print(result["skipped"])
                break
            res = run_setting(
                runtime, setting, value, args, parts, sku, runtime_dir / "trace", near_rates
            )
            if near_rates is None:  # the sequential setting's saturated rates drive both
                names = [n for p in parts for n, _ in p.models]
                near_rates = [res["saturated"][n]["throughput_rps"] for n in names]
            result["settings"].append(res)
    except OutOfTime:
        print(f"worker_pipeline_gpu: out of time after {args.max_s:g} s", file=sys.stderr)
        result["error"] = f"out of time after {args.max_s:g} s"
        code = 4
    except Exception as exc:  # a plan that did not come up, a probe not answered, ...
        print(f"worker_pipeline_gpu: {type(exc).__name__}: {exc}", file=sys.stderr)
        result["error"] = f"{type(exc).__name__}: {exc}"
        code = 3
    finally:
        signal.alarm(0)
        runtime.close()
        result["cleanup"] = stop_daemons(backend)
        backend.close()
        with contextlib.suppress(KeyError):
            os.environ.pop(PIPELINE_ENV)
    probes = [s.pop("probe") for s in result["settings"]]
    if len(probes) == 2:
        result["probe_max_rel_diff"] = compare_probes(probes[0], probes[1])
        bad = {k: v for k, v in result["probe_max_rel_diff"].items() if v > PROBE_TOLERANCE}
        print(
            "probe (the answers of the two settings, max rel diff): "
            + ", ".join(f"{k} {v:g}" for k, v in result["probe_max_rel_diff"].items())
            + (f"  DIFFER: {sorted(bad)}" if bad else "  (agree)")
        )
        result["probe_agrees"] = not bad
    rows = table(parts, result["settings"])
    result["rows"] = rows
    print()
    print_table(rows)
    write_summary(result, args.json, "worker_pipeline_gpu")
    return code


if __name__ == "__main__":
    sys.exit(main())
