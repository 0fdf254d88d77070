"""The ``stgs`` command: the composition root. Imports heavy parts lazily per sub-command, so
``stgs plan`` never pays for torch or FastAPI.

Exit codes: 0 success; 1 the plan is infeasible (``stgs plan``: some rate unserved; ``stgs
compare``: a run started from such a plan, unless ``--allow-infeasible``); 2 bad input (usage,
scenario, profiles, policy, experiment, MIG layout file): one line on stderr, never a traceback;
3 ``stgs compare``: a cell failed (the other cells' results are written).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

# api.client is light (no httpx, FastAPI): the daemon verbs' arguments and their names
from api.client import DAEMON_COMMANDS, add_live_arguments
from api.client import add_arguments as add_daemon_arguments
from api.completion import SHELLS, path_argument
from api.dispatch import EXIT_INCOMPLETE, EXIT_INFEASIBLE, EXIT_OK, EXIT_USAGE, dispatch, fail
from api.migcmd import add_arguments as add_mig_arguments
from stgs import __version__
from stgs.errors import ConfigError, StgsError


def _example_scenario() -> Path:
    return Path(str(files("stgs") / "data" / "example-scenario.yaml"))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="stgs",
        description="Spatial-temporal GPU partitioning for DNN inference.",
    )
    ap.add_argument("--version", action="version", version=f"stgs {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", help="plan a scenario: partitions, time sharing, batches")
    path_argument(
        p.add_argument(
            "scenario",
            nargs="?",
            help="scenario YAML (default: the embedded example scenario)",
        )
    )
    p.add_argument("--policy", default="stgs", help="policy name or dotted path (default: stgs)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (stgs.plan/v1)")
    p.add_argument(
        "--peak",
        action="store_true",
        help="find the largest factor k on all rates that still fits, and the plan at k",
    )
    path_argument(
        p.add_argument("--current", metavar="PLAN.json", help="replan incrementally from this plan")
    )
    add_live_arguments(p)

    sub.add_parser("policies", help="list the planning policies")

    f = sub.add_parser("fit", help="fit latency functions to a profile table and report errors")
    path_argument(
        f.add_argument("profiles", nargs="?", help="profile CSV (default: the shipped profiles)")
    )
    f.add_argument("--gpu", help="only this GPU SKU")

    c = sub.add_parser("compare", help="simulate a grid of policies x workloads x GPUs x seeds")
    path_argument(c.add_argument("experiment", help="experiment YAML (see docs/simulator.md)"))
    path_argument(
        c.add_argument(
            "--out", default="compare-out", help="output directory (default: compare-out)"
        ),
        directory=True,
    )
    c.add_argument("--jobs", type=int, default=0, help="processes (default: the available cores)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument(
        "--allow-infeasible",
        action="store_true",
        help="exit 0 even when a policy's plan cannot serve every rate (default: exit 1)",
    )

    from profiler.command import add_arguments as add_profile_arguments  # light: no torch

    add_profile_arguments(
        sub.add_parser("profile", help="measure latency profiles of models on a GPU (or CPU)")
    )
    add_daemon_arguments(sub)
    add_mig_arguments(sub)

    sh = sub.add_parser("completion", help="print the shell completion script (bash, zsh)")
    sh.add_argument("shell", choices=SHELLS)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd in DAEMON_COMMANDS or getattr(args, "live", False):
            from api.client import run as run_daemon_command

            return run_daemon_command(args)
        return dispatch(args, _COMMANDS)
    except ConfigError as exc:
        return fail(exc, EXIT_USAGE)
    except StgsError as exc:
        return fail(exc, EXIT_INFEASIBLE)
    except KeyboardInterrupt:
        return 130


def _cmd_plan(args: argparse.Namespace) -> int:
    from partitioner.planner import make_plan
    from stgs.plan import Plan
    from stgs.scenario import load_scenario

    path = Path(args.scenario) if args.scenario else _example_scenario()
    scenario = load_scenario(path)
    current = None
    if args.current:
        try:
            current = Plan.from_json(Path(args.current).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read plan {args.current}: {exc.strerror or exc}") from exc
    plan = make_plan(scenario, args.policy, current=current, peak=args.peak)
    if args.json:
        print(plan.to_json())
    else:
        from api.render import render_plan

        if not args.scenario:
            print(f"(embedded example scenario: {path})")
        render_plan(plan, scenario)
    return EXIT_OK if plan.feasible else EXIT_INFEASIBLE


def _cmd_policies(_args: argparse.Namespace) -> int:
    from partitioner.policies import REGISTRY, policy_names

    for name in policy_names():
        print(f"{name:10s} {REGISTRY[name].description}")
    return EXIT_OK


def _cmd_compare(args: argparse.Namespace) -> int:
    """Exit 0: every cell ran (and every plan was feasible, or --allow-infeasible); 1: a plan
    could not serve every rate; 3: a cell failed (the others' results are written); 2: the
    experiment cannot run (nothing is run)."""
    from rich.console import Console
    from rich.table import Table

    from partitioner.sim.compare import (
        CellFailure,
        default_jobs,
        infeasible_runs,
        load_experiment,
        run_experiment,
        summary_table,
        write_outputs,
    )

    if args.jobs < 0:
        raise ConfigError(f"--jobs {args.jobs}: give a number of processes >= 1 (0: all cores)")
    exp = load_experiment(args.experiment)
    jobs = args.jobs if args.jobs > 0 else default_jobs()
    failures: list[CellFailure] = []
    rows = run_experiment(exp, jobs=jobs, progress=not args.no_progress, failures=failures)
    out = Path(args.out)
    plots = write_outputs(exp, rows, out, failures)
    n_seeds = len(exp.spec.seeds)
    header, *body = list(summary_table(rows))
    what = "means ± 95% CI (Student's t)" if n_seeds >= 2 else "means"
    table = Table(title=f"{exp.spec.name}: {what} over {n_seeds} seed(s)")
    for col in header:
        table.add_column(col, justify="left" if col in ("gpus", "workload", "policy") else "right")
    for r in body:
        table.add_row(*r)
    Console(width=max(160 if n_seeds >= 2 else 120, Console().width)).print(table)
    print(f"wrote {out}/results.csv, results.json, summary.csv, experiment.resolved.json")
    print(f"plots: {', '.join(str(p) for p in plots) or 'none'}")
    if failures:
        for f in failures:
            print(f"stgs: error: cell failed: {f}", file=sys.stderr)
        print(
            f"stgs: error: {len(failures)} cell(s) failed; the results of the other"
            f" {len(rows)} run(s) are in {out}",
            file=sys.stderr,
        )
        return EXIT_INCOMPLETE
    bad = infeasible_runs(rows)
    if bad and not args.allow_infeasible:
        cells = sorted({(r["gpu_set"], r["workload"], r["load"], r["policy"]) for r in bad})
        listed = "; ".join(f"{g} x {w} x {ld:g} x {p}" for g, w, ld, p in cells[:5])
        more = f" and {len(cells) - 5} more" if len(cells) > 5 else ""
        print(
            f"stgs: error: {len(bad)} of {len(rows)} run(s) started from a plan that cannot"
            f" serve every rate ({listed}{more}); pass --allow-infeasible to accept them",
            file=sys.stderr,
        )
        return EXIT_INFEASIBLE
    return EXIT_OK


def _cmd_fit(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from stgs.latency import build_latency_models, fit_report
    from stgs.profiles import default_profiles_path, read_profiles

    table = read_profiles(args.profiles or default_profiles_path())
    out = Table(title="Latency-function fit error (leave-one-out on interior measured points)")
    for col in ("gpu", "model", "points", "median", "p95", "max"):
        out.add_column(col, justify="right" if col not in ("gpu", "model") else "left")
    for (gpu, model), lm in sorted(build_latency_models(table).items()):
        if args.gpu and gpu != args.gpu:
            continue
        r = fit_report(lm)
        out.add_row(
            gpu,
            model,
            str(r.n_points),
            f"{r.median_error:.1%}",
            f"{r.p95_error:.1%}",
            f"{r.max_error:.1%}",
        )
    Console().print(out)
    return EXIT_OK


def _cmd_mig(args: argparse.Namespace) -> int:
    from api.migcmd import run

    return run(args)


def _cmd_profile(args: argparse.Namespace) -> int:
    from profiler.command import profile_command

    return profile_command(args)


def _cmd_completion(args: argparse.Namespace) -> int:
    from api.completion import script

    sys.stdout.write(script(_parser(), args.shell))
    return EXIT_OK


_COMMANDS = {
    "completion": _cmd_completion,
    "plan": _cmd_plan,
    "policies": _cmd_policies,
    "fit": _cmd_fit,
    "compare": _cmd_compare,
    "profile": _cmd_profile,
    "mig": _cmd_mig,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
