"""Fit the host-cost model on serve_gpu.py runs' worker traces and write it into the host-cost
file that the planner, the daemon and the simulator read (``stgs/data/host-costs.json``).

    python -m benchmarks.fit_host_costs RUN.npz [RUN2.npz ...] [--host SKU] [--out FILE]
        [--default] [--check]
    python -m benchmarks.fit_host_costs --api API_GPU.json [...] [--host SKU] [--out FILE]

Each RUN is a ``benchmarks/serve_gpu.py`` run: its ``.npz`` (with the workers' trace ``wb`` /
``wr``, on by default) and its JSON summary beside it (either may be named). The fit
(:func:`stgs.hostcosts.fit_trace`, phase 1 of every run pooled, one set for every model) is
written as the entry ``--host`` (default: the runs' GPU, a catalog SKU) with its provenance:
this command, the runs (session/name under ``benchmarks/results``, their date, device and
command) and the fit's diagnostics. ``--default`` makes it the entry the product starts from
(the first entry of a new file is). ``--check``: write nothing; exit 1 when the file's entry
differs from the fit (the shipped file is still what its runs give).

``--api``: the runs are ``benchmarks/api_gpu.py --trace`` summaries instead; the way through the
daemon's frontends (:class:`stgs.hostcosts.ApiWay`, :func:`stgs.hostcosts.fit_api_way`) is
fitted on each model's medians in every API row that kept >= 99% within SLO (a frontend's first
byte -> the worker's queue; the client's latency less the stay in the worker) and set as the
``api`` part of the entry ``--host`` (default: the file's default entry, which must exist). A
daemon with frontends then plans ``host_request_ms`` from it (api.config).

Exit status: 0 done (or, --check, the same), 1 the entry differs (--check), 2 bad input (a
missing run, a run without a worker trace).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.lib.fitting import trace_observations
from benchmarks.lib.runs import RunError, load_run, run_header
from stgs.errors import ConfigError
from stgs.hostcosts import (
    PLANNER_INPUT_MB,
    ApiPoint,
    ApiWay,
    Provenance,
    RunRef,
    entry_from_fit,
    fit_api_way,
    fit_trace,
    load_host_costs,
    shipped_host_costs_path,
    write_host_costs,
)
from stgs.registry import sample_bytes

METHOD = (
    "stgs.hostcosts.fit_trace on the workers' trace joined to the client's record, phase 1 of"
    " every run pooled, one set for every model"
)


def _summary(arg: str) -> Path:
    p = Path(arg)
    summary = p.with_suffix(".json")
    for need in (summary, summary.with_suffix(".npz")):
        if not need.is_file():
            raise ConfigError(
                f"{arg}: {need} is missing (a serve_gpu.py run is its .json summary and its .npz"
                " beside it; .npz files of old runs are in git history: benchmarks/results/"
                "MANIFEST.md)"
            )
    return summary


def _command(res: dict[str, Any]) -> str:
    """The run's command: as its summary recorded it, else rebuilt from its ``args`` (as
    benchmarks/results/MANIFEST.md does)."""
    if res.get("command"):
        return str(res["command"])
    parts = ["python", "benchmarks/serve_gpu.py"]
    for k, v in (res.get("args") or {}).items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            parts.append(flag)
        elif v not in (None, False, ""):
            parts += [flag, str(v)]
    return shlex.join(parts)


def _run_name(path: Path) -> str:
    """SESSION/NAME: where the run lives under benchmarks/results."""
    return f"{path.parent.name}/{path.stem}"


API_METHOD = (
    "stgs.hostcosts.fit_api_way on each model's medians (worker trace and client) in every API"
    " row of the runs that kept >= 99% within SLO"
)


def api_points(res: dict[str, Any]) -> list[ApiPoint]:
    """Each model's medians in every HTTP row of an ``api_gpu.py --trace`` summary that kept
    >= 99% within SLO."""
    points = []
    for row in res.get("rows", []):
        if row.get("path") != "api-http" or row.get("within_slo", 0.0) < 0.99:
            continue
        worker = (row.get("trace") or {}).get("by_model") or {}
        client = row.get("by_model") or {}
        for name, w in sorted(worker.items()):
            if name in client:
                points.append(
                    ApiPoint(
                        mb=sample_bytes(name) / 1e6,
                        in_ms=round(w["in_p50_ms"], 4),
                        way_ms=round(client[name]["p50_ms"] - w["stay_p50_ms"], 4),
                        label=f"{name} x{row['scale']:g}",
                    )
                )
    return points


def fit_api(args: argparse.Namespace, argv: list[str] | None, out: Path) -> int:
    try:
        paths = [Path(a) for a in args.runs]
        runs = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
        points = [pt for res in runs for pt in api_points(res)]
        terms, info = fit_api_way(points)
        key = args.host or load_host_costs(out).default
        entry = load_host_costs(out).entry(key)
    except (ConfigError, ValueError, OSError, KeyError) as exc:
        print(f"fit_host_costs: {exc}", file=sys.stderr)
        return 2
    way = ApiWay(
        **terms,
        provenance=Provenance(
            command=run_header("fit_host_costs", argv)["command"],
            fitted=time.strftime("%Y-%m-%d"),
            machine="; ".join(sorted({str(r.get("device", "")) for r in runs} - {""})) or "?",
            runs=[
                RunRef(
                    run=_run_name(p),
                    date=str(r.get("date", "")),
                    device=str(r.get("device", "")),
                    command=str(r.get("command", "")),
                )
                for p, r in zip(paths, runs, strict=True)
            ],
            method=API_METHOD,
        ),
        fit=info,
    )
    print(f"# the API way fitted on {len(points)} points ({key}):")
    for k, v in terms.items():
        print(f"  {k} = {v}")
    print(f"  the planner's way through the frontends: {way.way_ms(PLANNER_INPUT_MB):.4f} ms")
    write_host_costs(out, key, entry.model_copy(update={"api": way}), default=False)
    print(f"# written to {out} [{key}]")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="serve_gpu.py runs (RUN.npz or RUN.json)")
    ap.add_argument("--host", help="the entry's name (default: the runs' GPU, a catalog SKU)")
    ap.add_argument("--out", type=Path, help="the host-cost file (default: the shipped one)")
    ap.add_argument("--default", action="store_true", help="make this entry the default")
    ap.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 when the entry differs"
    )
    ap.add_argument(
        "--api", action="store_true", help="the runs are api_gpu.py --trace summaries (JSON)"
    )
    args = ap.parse_args(argv)
    out: Path = args.out or shipped_host_costs_path()
    if args.api:
        return fit_api(args, argv, out)
    try:
        runs = [load_run(_summary(a)) for a in args.runs]
        obs = trace_observations(runs)
        terms, info = fit_trace(obs)
    except (ConfigError, RunError, ValueError, OSError) as exc:
        print(f"fit_host_costs: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # a run without a worker trace
        print(f"fit_host_costs: {exc}", file=sys.stderr)
        return 2
    skus = sorted({str(r.res.get("live_sku") or r.plan.gpus[0].sku) for r in runs})
    key = args.host or "+".join(skus)
    devices = sorted({str(r.res.get("device", "")) for r in runs} - {""})
    entry = entry_from_fit(
        terms,
        info,
        command=run_header("fit_host_costs", argv)["command"],
        fitted=time.strftime("%Y-%m-%d"),
        machine="; ".join(devices) or "unknown",
        runs=[
            RunRef(
                run=_run_name(r.path),
                date=str(r.res.get("date", "")),
                device=str(r.res.get("device", "")),
                command=_command(r.res),
            )
            for r in runs
        ],
        method=METHOD,
    )
    print(f"# host costs fitted on {', '.join(_run_name(r.path) for r in runs)} ({key}):")
    for k, v in terms.model_dump().items():
        print(f"  {k} = {v}")
    if args.check:
        try:
            have = load_host_costs(out).entry(key).terms
        except ConfigError as exc:
            print(f"fit_host_costs: {exc}", file=sys.stderr)
            return 2
        if have != terms:
            print(f"# {out} [{key}] differs: {have.model_dump()}")
            return 1
        print(f"# {out} [{key}] holds these terms")
        return 0
    write_host_costs(out, key, entry, default=args.default)
    print(f"# written to {out} [{key}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
