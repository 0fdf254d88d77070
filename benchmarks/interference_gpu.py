"""MPS interference by what the neighbours run: a victim's batch latency beside MPS neighbours
that replay batches of 1, 2, 8, 32 back to back (and stay idle), against the victim alone.

    python -m benchmarks.interference_gpu [--victim resnet50:50] [--victim-batches 8,32]
        [--neighbours vgg16:50] [--neighbour-batches 1,2,8,32] [--seconds 2]
        [--budget-s 220] [--device 0] [--json OUT.json]
    python -m benchmarks.interference_gpu --simulated [...]     # no GPU: a stated synthetic law
    python -m benchmarks.interference_gpu --fit RUN.json [RUN2.json ...] [--reference-batch 8]
        [--out stgs/data/interference-weights.json] [--dry-run]

On the GPU: one MPS control daemon under a private directory (``profiler.mps.MpsDaemon``,
quit at the end, as the profiler and ``stgs.backend.mps`` do), one profiler worker process per
MPS client at its share (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``: the victim and one or two
neighbours, shares summing to at most 100); CUDA graphs, fp16. GPU settings are never changed.
Phases: (1) the victim alone (no neighbour process yet) at each victim batch; (2) the
neighbours started and loaded, idle; (3) per neighbour batch, every neighbour replays a CUDA
graph of it back to back while the victim replays its own for ``--seconds``. Printed: the
victim's median and p99 per (victim batch, neighbour batch), its ratio to alone, and the raw
neighbour weight ``(ratio - 1) / (ratio at the reference batch - 1)``.

Never hangs: every call to a worker has a timeout within ``--budget-s`` (default 220 s, under
four minutes with the start); past it the run stops, writes what it measured (``partial``) and
exits 1; workers die with this process (``stgs.lifeline``) and the MPS daemon is quit on every
exit path (SIGTERM included).

``--simulated``: no GPU, no process: the victim's solo latency from the shipped profile and a
*synthetic* law, ``ratio = 1 + 0.4 x (neighbours' share / 100) x b / (b + 4)`` with 1% seeded
noise, so that the argument handling, the JSON and the fit run on a CPU (``simulated: true``;
``--fit`` refuses such runs unless ``--allow-simulated``).

``--fit``: the neighbour weights of the runs' GPU (``stgs.interference.fit_weights``) into the
data file the planner, the plan checker and the simulator read (``stgs/data/
interference-weights.json``); ``--reference-batch`` (default 8) is the smallest neighbour
batch of the co-location rows the gammas were fitted on (``stgs/data/interference.csv``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks.lib.runs import run_header, write_summary
from profiler.errors import ModelLoadError, ProfilerError
from profiler.models import resolve_spec
from stgs.errors import ConfigError
from stgs.interference import BENCH_FORMAT, fit_weights, shipped_weights_path, write_weights

DEFAULT_NEIGHBOUR_BATCHES = (1, 2, 8, 32)
REFERENCE_BATCH = 8
LEAD_S = 0.3  # the neighbours start this long before the victim's timed replays
START_TIMEOUT_S = 120.0
LOAD_TIMEOUT_S = 120.0
SIMULATED_GAMMA = 0.4  # --simulated: the synthetic law's slowdown per unit of busy share


@dataclass(frozen=True)
class Client:
    model: str
    share: int


class BudgetExceeded(RuntimeError):
    pass


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, want: float) -> float:
        """A timeout for a call that may take ``want`` s; BudgetExceeded when none is left."""
        rest = self.end - time.monotonic()
        if rest <= 1.0:
            raise BudgetExceeded("the run's time budget is spent")
        return min(want, rest)


# ---------------------------------------------------------------------------- arguments
def _client(text: str, what: str) -> Client:
    model, sep, share = text.strip().partition(":")
    try:
        pct = int(share) if sep else 50
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{what} {text!r}: MODEL[:SHARE], SHARE a percentage"
        ) from None
    if not model or not 1 <= pct <= 100:
        raise argparse.ArgumentTypeError(f"{what} {text!r}: MODEL[:SHARE] with SHARE in 1..100")
    return Client(model, pct)


def _batches(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated batch sizes") from None
    if not out or any(not 1 <= b <= 512 for b in out):
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes in 1..512")
    return tuple(sorted(set(out)))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--victim", default="resnet50:50", help="MODEL:SHARE (default resnet50:50)")
    ap.add_argument("--victim-batches", type=_batches, default=(8, 32), help="default 8,32")
    ap.add_argument(
        "--neighbours",
        default="vgg16:50",
        help="MODEL:SHARE[,MODEL:SHARE]: one or two neighbour clients (default vgg16:50)",
    )
    ap.add_argument(
        "--neighbour-batches",
        type=_batches,
        default=DEFAULT_NEIGHBOUR_BATCHES,
        help="batches the neighbours replay (default 1,2,8,32)",
    )
    ap.add_argument("--seconds", type=float, default=2.0, help="per point (default 2)")
    ap.add_argument("--budget-s", type=float, default=220.0, help="stop past this (default 220)")
    ap.add_argument("--device", default="0", help="GPU index or MIG-/GPU- UUID (default 0)")
    ap.add_argument("--json", help="write the run here (default: $OUT/interference_gpu.json)")
    ap.add_argument("--simulated", action="store_true", help="no GPU: the synthetic law")
    ap.add_argument("--seed", type=int, default=0, help="--simulated: the noise's seed")
    ap.add_argument("--fit", nargs="+", metavar="RUN.json", help="fit weights from runs")
    ap.add_argument("--reference-batch", type=int, default=REFERENCE_BATCH)
    ap.add_argument("--out", help="--fit: the weights file (default: the shipped one)")
    ap.add_argument("--dry-run", action="store_true", help="--fit: print, write nothing")
    ap.add_argument("--allow-simulated", action="store_true", help="--fit: accept --simulated")
    args = ap.parse_args(argv)
    try:
        args.victim = _client(args.victim, "--victim")
        args.neighbours = [_client(t, "--neighbours") for t in args.neighbours.split(",")]
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    for c in (args.victim, *args.neighbours):
        try:
            resolve_spec(c.model)
        except ModelLoadError as exc:
            ap.error(str(exc))
    if not 1 <= len(args.neighbours) <= 2:
        ap.error("--neighbours: one or two MODEL:SHARE (two or three MPS clients in all)")
    total = args.victim.share + sum(n.share for n in args.neighbours)
    if total > 100:
        ap.error(f"the shares sum to {total}%: MPS partitions of one GPU hold at most 100%")
    if not 0 < args.seconds <= 30:
        ap.error("--seconds must be in (0, 30]")
    if not 10 <= args.budget_s <= 600:
        ap.error("--budget-s must be in [10, 600]")
    if args.reference_batch not in args.neighbour_batches and not args.fit:
        ap.error(
            f"--neighbour-batches must include the reference batch {args.reference_batch}"
            " (the weights are relative to it)"
        )
    if args.fit and (args.simulated or args.json):
        ap.error("--fit reads runs; it takes neither --simulated nor --json")
    if not args.fit and (args.out or args.dry_run or args.allow_simulated):
        ap.error("--out, --dry-run and --allow-simulated go with --fit")
    return args


# ---------------------------------------------------------------------------- the runs
def _point(
    phase: str, vb: int, nb: int | None, victim: dict[str, Any], neigh: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "phase": phase,
        "victim_batch": vb,
        "neighbour_batch": nb,
        "median_ms": round(float(victim["median_ms"]), 5),
        "p99_ms": round(float(victim["p99_ms"]), 5),
        "iters": int(victim.get("iters", 0)),
        "neighbour_median_ms": [round(float(n["median_ms"]), 5) for n in neigh],
    }


def simulated_points(args: argparse.Namespace) -> tuple[str, list[dict[str, Any]]]:
    """The synthetic law of the module docstring on the shipped H100 profile."""
    from stgs.catalog import get_sku
    from stgs.latency import build_latency_models
    from stgs.profiles import default_profiles_path, read_profiles

    gpu = "H100-80GB"
    models = build_latency_models(read_profiles(default_profiles_path()))
    lm = models.get((gpu, args.victim.model))
    if lm is None:
        raise ConfigError(f"--simulated: no {gpu} profile of {args.victim.model!r}")
    sms = get_sku(gpu).mps_sm_count(args.victim.share)
    rng = random.Random(args.seed)
    busy = sum(n.share for n in args.neighbours) / 100.0
    points = []
    for vb in args.victim_batches:
        solo = lm.latency_ms(vb, sms, kind="mps")

        def noisy(ms: float) -> dict[str, Any]:
            m = ms * (1.0 + rng.gauss(0.0, 0.01))
            return {"median_ms": m, "p99_ms": m * 1.05, "iters": int(args.seconds * 1000 / m)}

        points.append(_point("alone", vb, None, noisy(solo), []))
        points.append(_point("idle", vb, None, noisy(solo), []))
        for nb in args.neighbour_batches:
            ratio = 1.0 + SIMULATED_GAMMA * busy * nb / (nb + 4.0)
            points.append(_point("busy", vb, nb, noisy(solo * ratio), []))
    return gpu, points


class GpuRun:
    """The workers and the MPS daemon of one run; :meth:`close` on every exit path."""

    def __init__(self, args: argparse.Namespace, budget: Budget) -> None:
        self.args = args
        self.budget = budget
        self.daemon: Any = None
        self.victim: Any = None
        self.neighbours: list[Any] = []
        self.started: list[Any] = []  # every neighbour worker started, in time or late
        self.points: list[dict[str, Any]] = []
        self.gpu = "unknown"
        self.device = "unknown"

    def _worker(self, share: int) -> Any:
        from profiler.workers import SubprocessWorker

        env = self.daemon.client_env(float(share))
        return SubprocessWorker("cuda:0", env, start_timeout_s=self.budget.left(START_TIMEOUT_S))

    def _load(self, w: Any, model: str) -> None:
        spec = asdict(resolve_spec(model))
        r = w.request(
            {"op": "load", "spec": spec, "dtype": "fp16"}, self.budget.left(LOAD_TIMEOUT_S)
        )
        if not r.get("ok"):
            raise RuntimeError(f"loading {model}: {r.get('error')}")

    def _prepare(self, w: Any, share: int, batch: int) -> None:
        r = w.request(
            {"op": "prepare", "partition": f"mps:{share}", "batch": batch},
            self.budget.left(LOAD_TIMEOUT_S),
        )
        if not r.get("ok"):
            raise RuntimeError(f"preparing batch {batch}: {r.get('error')}")

    def _victim_for(self) -> dict[str, Any]:
        s = self.args.seconds
        r: dict[str, Any] = self.victim.request(
            {"op": "run_for", "seconds": s}, self.budget.left(s + 60)
        )
        if not r.get("ok"):
            raise RuntimeError(f"victim: {r.get('error')}")
        return r

    def run(self) -> None:
        from profiler.gpu import driver_version, gpu_label
        from profiler.mps import MpsDaemon

        args = self.args
        self.daemon = MpsDaemon(args.device).start()
        self.victim = self._worker(args.victim.share)
        info = self.victim.request({"op": "info"}, self.budget.left(60))
        self.gpu = gpu_label(str(info.get("name", "")), float(info.get("memory_mib", 0)))
        self.device = f"{info.get('name')}, driver {driver_version() or '?'}"
        print(f"# {self.device}: victim {args.victim}, neighbours {args.neighbours}", flush=True)
        self._load(self.victim, args.victim.model)
        for vb in args.victim_batches:  # (1) alone: no neighbour process yet
            self._prepare(self.victim, args.victim.share, vb)
            self.points.append(_point("alone", vb, None, self._victim_for(), []))
        # (2) the neighbours, started together (each start takes seconds: CUDA, imports)
        started: list[Any] = [None] * len(args.neighbours)
        self.started = started
        errors: list[BaseException] = []

        def start(i: int, c: Any) -> None:
            try:
                started[i] = self._worker(c.share)
                self._load(started[i], c.model)
            except BaseException as exc:  # reported below, in this thread
                errors.append(exc)

        threads = [
            threading.Thread(target=start, args=(i, c), daemon=True)
            for i, c in enumerate(args.neighbours)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.budget.left(START_TIMEOUT_S + LOAD_TIMEOUT_S))
        self.neighbours = [w for w in started if w is not None]
        if errors or len(self.neighbours) != len(args.neighbours):
            raise RuntimeError(f"a neighbour did not start: {errors[0] if errors else 'timeout'}")
        for vb in args.victim_batches:
            self._prepare(self.victim, args.victim.share, vb)
            self.points.append(_point("idle", vb, None, self._victim_for(), []))
        # (3) the neighbours busy at each batch
        s = args.seconds
        for nb in args.neighbour_batches:
            for w, c in zip(self.neighbours, args.neighbours, strict=True):
                self._prepare(w, c.share, nb)
            for vb in args.victim_batches:
                self._prepare(self.victim, args.victim.share, vb)
                for w in self.neighbours:
                    w.send({"op": "run_for", "seconds": s + 2 * LEAD_S})
                time.sleep(LEAD_S)
                victim = self._victim_for()
                neigh = [w.receive(self.budget.left(s + 60)) for w in self.neighbours]
                if not all(n.get("ok") for n in neigh):
                    raise RuntimeError(f"a neighbour failed: {neigh}")
                p = _point("busy", vb, nb, victim, neigh)
                self.points.append(p)
                print(f"  neighbours b={nb}: victim b={vb} {p['median_ms']:.3f} ms", flush=True)

    def close(self) -> None:
        for w in [self.victim, *self.started]:
            if w is not None:
                with suppress(Exception):
                    w.close()
        if self.daemon is not None:
            with suppress(Exception):
                self.daemon.stop()
            self.daemon = None


# ---------------------------------------------------------------------------- output
def table(points: Sequence[dict[str, Any]], reference: int) -> list[str]:
    """The victim's ratio to alone and the raw weight per (victim batch, neighbour batch)."""
    alone = {p["victim_batch"]: p["median_ms"] for p in points if p["phase"] == "alone"}
    ref = {
        p["victim_batch"]: p["median_ms"]
        for p in points
        if p["phase"] == "busy" and p["neighbour_batch"] == reference
    }
    out = [
        "| victim batch | neighbours | median ms | p99 ms | x alone | weight (raw) |",
        "|---|---|---|---|---|---|",
    ]
    for p in points:
        vb = p["victim_batch"]
        ratio = p["median_ms"] / alone[vb] if vb in alone else math.nan
        eff = ref[vb] / alone[vb] - 1.0 if vb in ref and vb in alone else math.nan
        w = (ratio - 1.0) / eff if p["phase"] == "busy" and eff > 0 else math.nan
        who = {"alone": "none", "idle": "idle"}.get(p["phase"], f"batch {p['neighbour_batch']}")
        out.append(
            f"| {vb} | {who} | {p['median_ms']:.3f} | {p['p99_ms']:.3f} | {ratio:.3f} |"
            f" {'-' if math.isnan(w) else f'{w:.3f}'} |"
        )
    return out


def fit_main(args: argparse.Namespace) -> int:
    runs = []
    for path in args.fit:
        try:
            runs.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            print(f"interference_gpu: error: {path}: {exc}", file=sys.stderr)
            return 2
    if not args.allow_simulated and any(r.get("simulated") for r in runs):
        print(
            "interference_gpu: error: a --simulated run is not a measurement; fit it only with"
            " --allow-simulated (and never into the shipped file)",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out) if args.out else shipped_weights_path()
    if args.allow_simulated and out.resolve() == shipped_weights_path().resolve():
        print("interference_gpu: error: simulated weights go to --out FILE", file=sys.stderr)
        return 2
    try:
        gpu, entry = fit_weights(
            runs,
            reference_batch=args.reference_batch,
            command=run_header("interference_gpu")["command"],
            fitted=time.strftime("%Y-%m-%d"),
        )
    except ConfigError as exc:
        print(f"interference_gpu: error: {exc}", file=sys.stderr)
        return 2
    print(f"# {gpu}: neighbour weights, reference batch {entry.reference_batch}")
    print("| neighbour batch | weight |")
    print("|---|---|")
    for b, w in zip(entry.batches, entry.weights, strict=True):
        print(f"| {b} | {w:.4f} |")
    print(f"| >= {entry.reference_batch} | 1 |")
    if entry.fit.get("left_out"):
        print(f"left out: {'; '.join(entry.fit['left_out'])}")
    if not args.dry_run:
        write_weights(out, gpu, entry)
        print(f"wrote {out}")
    return 0


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through GpuRun.close (the MPS daemon quits)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fit:
        return fit_main(args)
    t0 = time.monotonic()
    header = run_header("interference_gpu", argv)
    partial = False
    error = ""
    if args.simulated:
        try:
            gpu, points = simulated_points(args)
        except ConfigError as exc:
            print(f"interference_gpu: error: {exc}", file=sys.stderr)
            return 2
        device = "simulated (synthetic law, no GPU)"
    else:
        signal.signal(signal.SIGTERM, _terminate)
        budget = Budget(args.budget_s)
        run = GpuRun(args, budget)
        try:
            run.run()
        except ProfilerError as exc:  # no GPU, no MPS: nothing measured
            run.close()
            print(f"interference_gpu: error: {exc}", file=sys.stderr)
            return 2
        except (BudgetExceeded, RuntimeError, OSError) as exc:
            partial, error = True, f"{type(exc).__name__}: {exc}"
            print(f"interference_gpu: stopped: {error}", file=sys.stderr)
        finally:
            run.close()
        gpu, points, device = run.gpu, run.points, run.device
    for line in table(points, args.reference_batch):
        print(line)
    alone = {p["victim_batch"]: p["median_ms"] for p in points if p["phase"] == "alone"}
    ratios = [
        p["median_ms"] / alone[p["victim_batch"]]
        for p in points
        if p["phase"] == "idle" and p["victim_batch"] in alone
    ]
    if ratios:
        print(f"\nidle neighbours: x{statistics.fmean(ratios):.3f} the victim alone (expect ~1)")
    summary = {
        **header,
        "format": BENCH_FORMAT,
        "gpu": gpu,
        "device": device,
        "simulated": bool(args.simulated),
        "seconds": args.seconds,
        "victim": asdict(args.victim),
        "neighbours": [asdict(n) for n in args.neighbours],
        "reference_batch": args.reference_batch,
        "points": points,
        "partial": partial,
        "error": error,
        "wall_s": round(time.monotonic() - t0, 1),
    }
    write_summary(summary, args.json, "interference_gpu")
    return 1 if partial else 0


if __name__ == "__main__":
    sys.exit(main())
