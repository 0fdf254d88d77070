"""Do the workers slow down while the load generator's process stalls? (serve_gpu.py runs)

    python -m benchmarks.stall_windows RUN.json[:NPZ] ... --clean CLEAN.json [CLEAN2.json ...]

Stall windows of a run: the union of [scheduled, sent] over the phase-1 requests the load
generator sent more than ``--lag-ms`` (3) late. Every phase-1 batch of the workers' trace is
predicted as ``fidelity.py`` does (the profile's latency x the busy neighbours' interference,
calibrated per (model, partition) on the ``--clean`` runs, plus the runner's copies fitted on
them); a batch is *slow* when its runner took more than ``--slow`` (1.3) x that. Prints, per
run: the windows (count, total ms), the share of slow batches among those that overlap a window
and among the rest, and the median time from the runner's end to the replies sent (host work of
the loop) inside and outside the windows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.lib import fitting
from benchmarks.lib.runs import Run, RunError, read_run


def windows(run: Run, lag_ms: float) -> np.ndarray:
    """[start, end) seconds from the load generator's t0, merged, of its late sends in phase 1."""
    z = run.npz
    t, sent = z["t_sched"], z["sent"]
    late = np.isfinite(sent) & (sent - t > lag_ms / 1e3) & (t >= run.lo) & (t < run.hi)
    iv = np.c_[t[late], sent[late]]
    iv = iv[np.argsort(iv[:, 0])]
    out: list[list[float]] = []
    for a, b in iv:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return np.asarray(out).reshape(-1, 2)


def overlaps(win: np.ndarray, s: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Per interval [s, e): does it overlap any window."""
    if not len(win):
        return np.zeros(len(s), bool)
    k = np.searchsorted(win[:, 1], s, "right")  # first window ending after s
    k = np.minimum(k, len(win) - 1)
    return np.asarray((win[k, 0] < e) & (win[k, 1] > s), dtype=bool)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "runs", nargs="+", help="serve_gpu.py JSON summaries (JSON:NPZ for another npz)"
    )
    ap.add_argument("--clean", nargs="+", required=True, help="runs to calibrate the prediction on")
    ap.add_argument("--lag-ms", type=float, default=3.0)
    ap.add_argument("--slow", type=float, default=1.3)
    args = ap.parse_args(argv)

    def load(path: str, npz: str | None = None) -> Run:
        try:
            return read_run(path, npz)
        except RunError as exc:  # a usage error: exit 2 with the file and why
            print(f"stall_windows.py: {exc}", file=sys.stderr)
            raise SystemExit(2) from exc

    clean = [load(p) for p in args.clean]
    if any(fitting.load_trace(r) is None for r in clean):
        ap.error("--clean runs need a worker trace")
    cal = fitting.calibration(clean)
    _, info = fitting.fit_host_trace(clean)
    a0 = float(info["runner_copy_ms"]["per_batch"])
    a1 = float(info["runner_copy_ms"]["per_mb"])
    print(
        "| run | windows | in windows (ms) | windows > 15 ms | longest (ms) "
        "| slow batches: overlapping a window | elsewhere "
        "| loop after the runner, median ms: in windows | elsewhere |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in args.runs:
        path, _, npz = spec.partition(":")
        run = load(path, npz or None)
        tr = fitting.load_trace(run)
        if tr is None:
            print(f"{path}: no worker trace", file=sys.stderr)
            return 2
        win = windows(run, args.lag_ms)
        kinds = {m.name: p for p in fitting.plan_parts(run).values() for m in p.models}
        slow_in, slow_out, post_in, post_out = [], [], [], []
        for d in fitting.trace_batches(run, tr):
            part = kinds[d["model"]]
            f = cal.get((d["model"], part.kind, int(part.sm_count)), (1.0, 0))[0]
            pred = d["solo_ms"] * f * (1.0 + d["gamma"] * d["busy_pct"] / 100.0)
            pred = pred + a0 + a1 * d["n"] * d["mb"]
            rows = d["rows"]
            s = (rows[:, 5] - tr.t0_ns) / 1e9
            e = (rows[:, 7] - tr.t0_ns) / 1e9
            inside = overlaps(win, s, e)
            slow = d["run_ms"] > args.slow * pred
            slow_in.append(slow[inside])
            slow_out.append(slow[~inside])
            post_in.append(d["reply_ms"][inside])
            post_out.append(d["reply_ms"][~inside])

        def share(xs: list[np.ndarray]) -> str:
            x = np.concatenate(xs)
            return f"{x.mean():.1%} of {len(x)}" if len(x) else "-"

        def med(xs: list[np.ndarray]) -> str:
            x = np.concatenate(xs)
            return f"{np.median(x):.3f}" if len(x) else "-"

        length_ms = (win[:, 1] - win[:, 0]) * 1e3
        print(
            f"| {Path(path).stem} | {len(win)} | {length_ms.sum():.0f} | "
            f"{int((length_ms > 15).sum())} | {length_ms.max(initial=0.0):.0f} | "
            f"{share(slow_in)} | "
            f"{share(slow_out)} | {med(post_in)} | {med(post_out)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
