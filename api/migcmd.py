"""``stgs mig export|import|apply``: MIG layouts between a plan, NVIDIA mig-parted configs
(``version: v1``: profile counts only) and stgs's placement-exact form (``stgs.mig/v1``,
:mod:`stgs.migfile`), and onto the node's GPUs through the backend.

Exit codes: 0 done; 1 the node refused or failed a step (no NVML, no permission: MIG changes
need root; instances in use), nothing more is changed after the failing step and the backend
rolls a GPU's failed layout change back; 2 bad input (a file that is not valid, a profile the
GPU lacks, counts that do not fit, another SKU than the node's): nothing was changed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.completion import path_argument
from api.dispatch import EXIT_INFEASIBLE, EXIT_OK, EXIT_USAGE, fail
from stgs.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    InUseError,
    MigLayoutError,
    NoPermissionError,
)

# The parser is built for every ``stgs`` command: the layout code (pydantic, YAML, the plan)
# is imported by the handlers only.
if TYPE_CHECKING:
    from stgs.backend import Backend
    from stgs.catalog import MigLayout
    from stgs.migfile import GpuLayout, NodeLayouts

ROOT_HINT = (
    "MIG changes need root: run it as root (e.g. sudo stgs mig apply ...); --dry-run shows"
    " the steps without changing anything"
)


def add_arguments(sub: Any) -> None:
    m = sub.add_parser(
        "mig",
        help="MIG layouts: export a plan's (mig-parted or exact), import, apply on the node",
    )
    msub = m.add_subparsers(dest="mig_cmd", required=True, metavar="ACTION")

    e = msub.add_parser(
        "export",
        help="a plan's MIG layouts as a mig-parted config (counts) or stgs's form (placements)",
    )
    path_argument(
        e.add_argument(
            "plan",
            nargs="?",
            metavar="PLAN.json",
            help="a plan (`stgs plan --json`) or a saved GET /v1/plan answer; '-': standard input",
        )
    )
    e.add_argument(
        "--format",
        choices=("mig-parted", "stgs"),
        default="mig-parted",
        help="mig-parted: version v1, profile counts only (default); stgs: exact placements",
    )
    e.add_argument(
        "--name",
        help="config name, the nvidia.com/mig.config label value (default: stgs-plan)",
    )
    e.add_argument("--json", action="store_true", help="stgs's form as JSON (default: YAML)")
    path_argument(
        e.add_argument("--out", metavar="FILE", help="write to FILE (default: standard output)")
    )
    e.add_argument("--live", dest="mig_live", action="store_true", help="the running daemon's plan")
    e.add_argument("--url", help="daemon URL for --live (default: $STGS_URL, the config's)")
    path_argument(e.add_argument("--token-file", help="bearer token file for --live"))
    path_argument(
        e.add_argument("--config", help="daemon config TOML for --live (its address and token)")
    )

    i = msub.add_parser(
        "import",
        help="read a mig-parted config (placements chosen, and shown) or stgs's form (exact)",
    )
    path_argument(
        i.add_argument("file", help="mig-parted YAML or stgs's form (YAML or JSON); '-': stdin")
    )
    _read_arguments(i)
    i.add_argument(
        "--sku", help="the GPUs' SKU, e.g. H100-80GB (a mig-parted file needs it: counts only)"
    )
    i.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="the node's GPU count (a mig-parted entry with 'devices: all' needs it)",
    )
    i.add_argument("--json", action="store_true", help="write stgs's form as JSON (default YAML)")
    path_argument(
        i.add_argument("--out", metavar="FILE", help="write stgs's form to FILE (default: stdout)")
    )

    a = msub.add_parser(
        "apply",
        help="make the node's MIG layouts those of a file (real MIG changes need root)",
    )
    path_argument(
        a.add_argument("file", help="stgs's form (exact) or a mig-parted config; '-': stdin")
    )
    _read_arguments(a)
    a.add_argument("--gpu", type=int, metavar="N", help="only GPU N of the file")
    a.add_argument("--dry-run", action="store_true", help="print the steps, change nothing")
    a.add_argument(
        "--simulated",
        action="store_true",
        help="on a simulated node with the file's GPUs, MIG off at start (no GPU needed)",
    )
    a.add_argument("--sku", help="with --simulated and a mig-parted file: the GPUs' SKU")
    a.add_argument("--gpus", type=int, metavar="N", help="with --simulated: the node's GPU count")


def _read_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-name", help="which config of a mig-parted file (needed if several)")
    p.add_argument(
        "--device-id",
        help="PCI device id for mig-parted entries with a device-filter, e.g. 0x233010DE",
    )


def run(args: argparse.Namespace) -> int:
    try:
        if args.mig_cmd == "export":
            return _export(args)
        if args.mig_cmd == "import":
            return _import(args)
        return _apply(args)
    except MigLayoutError as exc:  # a profile the GPU lacks, counts that do not fit: input
        return fail(exc, EXIT_USAGE)


# ----------------------------------------------------------------------------- reading
def _read(path: str, what: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text") from exc


def _write(text: str, out: str | None) -> None:
    if out is None:
        sys.stdout.write(text)
        return
    try:
        Path(out).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from exc


def _kind(data: Any, path: str) -> str:
    from stgs.migfile import file_kind

    with _in_file(path):
        return file_kind(data)


@contextmanager
def _in_file(path: str) -> Iterator[None]:
    """Errors of the block name the file they are about."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except MigLayoutError as exc:
        raise MigLayoutError(f"{path}: {exc}") from exc


def _config_name(data: Any, wanted: str | None, path: str) -> str:
    from stgs.migparted import config_names

    with _in_file(path):
        names = config_names(data)
    if wanted is not None:
        if wanted not in names:
            raise ConfigError(
                f"{path}: no mig-parted config {wanted!r}; it holds {', '.join(names)}"
            )
        return wanted
    if len(names) == 1:
        return names[0]
    raise ConfigError(
        f"{path} holds {len(names)} mig-parted configs ({', '.join(names)}): choose one with"
        " --config-name"
    )


# ----------------------------------------------------------------------------- export
def _export(args: argparse.Namespace) -> int:
    from stgs.migfile import DEFAULT_NAME, check_config_name, from_plan
    from stgs.migparted import load_yaml
    from stgs.plan import Plan

    name = check_config_name(args.name or DEFAULT_NAME)
    if args.mig_live:
        if args.plan:
            raise ConfigError("give a plan file or --live, not both")
        from api.client import ClientError, daemon_get

        try:
            data = daemon_get(args, "/v1/plan")
        except ClientError as exc:
            return fail(exc, exc.code)
        source = "the daemon's plan"
    elif args.plan:
        source = args.plan
        data = load_yaml(_read(args.plan, "plan"), f"plan {args.plan}")
    else:
        raise ConfigError("give a plan file (stgs plan --json > plan.json) or --live")
    if isinstance(data, dict) and "format" not in data and "plan" in data:  # GET /v1/plan
        data = data["plan"]
        if data is None:
            raise ConfigError(f"{source}: the daemon has applied no plan yet")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: not a plan (a JSON object of format stgs.plan/v1)")
    layouts = from_plan(Plan.from_dict(data), name)
    if args.format == "stgs":
        text = layouts.to_text("json" if args.json else "yaml")
    else:
        if args.json:
            raise ConfigError("--json is for --format stgs (mig-parted configs are YAML)")
        text = layouts.to_mig_parted()
    _write(text, args.out)
    return EXIT_OK


# ----------------------------------------------------------------------------- import
def _import(args: argparse.Namespace) -> int:
    from stgs.migfile import from_mapping, from_mig_parted
    from stgs.migparted import load_yaml

    data = load_yaml(_read(args.file, "MIG layout file"), args.file)
    kind = _kind(data, args.file)
    if kind == "stgs":
        layouts = from_mapping(data, args.file)
        if args.sku is not None:
            for g in layouts.gpus:
                if g.sku != _sku_name(args.sku):
                    raise ConfigError(f"{args.file}: GPU {g.index} is a {g.sku}, not {args.sku}")
        notes = [f"{g.describe()} (read exactly)" for g in layouts.gpus]
    else:
        if args.sku is None:
            raise ConfigError(
                f"{args.file} is a mig-parted config (profile counts, no GPU model): give --sku"
            )
        name = _config_name(data, args.config_name, args.file)
        with _in_file(args.file):
            layouts = from_mig_parted(
                data, args.sku, name, gpu_count=args.gpus, device_id=args.device_id
            )
        notes = [_chosen(g) for g in layouts.gpus]
    _write(layouts.to_text("json" if args.json else "yaml"), args.out)
    for line in notes:  # what was chosen: on stderr when stdout carries the file
        print(line, file=sys.stdout if args.out else sys.stderr)
    return EXIT_OK


def _sku_name(sku: str) -> str:
    from stgs.catalog import get_sku

    return get_sku(sku).name


def _chosen(g: GpuLayout) -> str:
    if not g.layout:
        return g.describe()
    counts = Counter(p.profile for p in g.layout)
    asked = ", ".join(f"{n} x {prof}" for prof, n in counts.items())
    return (
        f"{g.describe()} (chosen for {asked}: mig-parted gives counts only, stgs placed them"
        " by best fit)"
    )


# ----------------------------------------------------------------------------- apply
def _apply(args: argparse.Namespace) -> int:
    from stgs.migfile import from_mapping, from_mig_parted
    from stgs.migparted import load_yaml

    data = load_yaml(_read(args.file, "MIG layout file"), args.file)
    kind = _kind(data, args.file)
    if args.gpus is not None and args.gpus < 1:
        raise ConfigError(f"--gpus {args.gpus}: a node has at least one GPU")
    if not args.simulated and (args.sku is not None or args.gpus is not None):
        raise ConfigError("--sku and --gpus are for --simulated (a real node's GPUs say theirs)")
    # stgs's form is checked whole before the node is touched, NVML opened included
    exact = from_mapping(data, args.file) if kind == "stgs" else None
    name = _config_name(data, args.config_name, args.file) if exact is None else ""

    if args.simulated:
        if exact is not None:
            layouts = exact
        else:
            if args.sku is None:
                raise ConfigError("a mig-parted file on --simulated needs --sku (the GPUs' SKU)")
            with _in_file(args.file):
                layouts = from_mig_parted(
                    data, args.sku, name, gpu_count=args.gpus, device_id=args.device_id
                )
        layouts = _only(layouts, args.gpu)
        count = max(args.gpus or 0, max(g.index for g in layouts.gpus) + 1)
        first = layouts.gpus[0].sku
        skus = [next((g.sku for g in layouts.gpus if g.index == i), first) for i in range(count)]
        from stgs.backend import SimulatedNode

        node = SimulatedNode(skus, name="mig-apply")
        try:
            return _apply_on(node, layouts, args, "simulated node")
        finally:
            node.close()

    with _nvml() as backend:
        if exact is not None:
            layouts = exact
        else:
            skus = [backend.sku(i).name for i in range(len(backend.gpus()))]
            with _in_file(args.file):
                layouts = from_mig_parted(data, skus, name, device_id=args.device_id)
        return _apply_on(backend, _only(layouts, args.gpu), args, "this node")


def _only(layouts: NodeLayouts, gpu: int | None) -> NodeLayouts:
    from stgs.migfile import NodeLayouts

    if gpu is None:
        return layouts
    picked = tuple(g for g in layouts.gpus if g.index == gpu)
    if not picked:
        have = ", ".join(str(g.index) for g in layouts.gpus)
        raise ConfigError(f"--gpu {gpu}: the file has no layout for GPU {gpu} (it has {have})")
    return NodeLayouts(layouts.name, picked)


@contextmanager
def _nvml() -> Iterator[Backend]:
    """The node's GPUs through NVML, for the length of one command."""
    try:
        from stgs.backend.nvml import NvmlBackend
    except ImportError as exc:
        raise BackendUnavailableError(
            f"NVML is not available ({exc}); try the file on a simulated node with --simulated"
        ) from exc
    with tempfile.TemporaryDirectory(prefix="stgs-mig-") as tmp:
        try:
            backend = NvmlBackend(Path(tmp))
        except BackendError as exc:
            raise BackendUnavailableError(
                f"no GPU through NVML ({exc}); try the file on a simulated node with --simulated"
            ) from exc
        try:
            if not backend.gpus():
                raise BackendUnavailableError("NVML reports no GPU on this node")
            yield backend
        finally:
            backend.close()


def _apply_on(backend: Backend, layouts: NodeLayouts, args: argparse.Namespace, where: str) -> int:
    """Check every GPU of the file against the node first, then change one GPU at a time."""
    from stgs.catalog import layout_violation

    infos = backend.gpus()
    for g in layouts.gpus:
        if g.index >= len(infos):
            raise ConfigError(
                f"the file has a layout for GPU {g.index}; {where} has {len(infos)} GPU(s)"
            )
        sku = backend.sku(g.index)
        if sku.name != g.sku:
            raise ConfigError(f"GPU {g.index} of {where} is a {sku.name}; the file says {g.sku}")
        if g.layout is not None:
            why = layout_violation(sku, g.layout)
            if why is not None:
                raise ConfigError(f"GPU {g.index} ({sku.name}): {why}")
    for g in layouts.gpus:
        info = backend.gpus()[g.index]
        current = backend.mig_layout(g.index) if info.mig_enabled else None
        steps = _steps(current, g.layout)
        head = f"gpu {g.index} ({g.sku})"
        if not steps:
            print(f"{head}: already as asked ({g.describe().split(': ', 1)[1]})")
            continue
        if args.dry_run:
            print(f"{head}: would {'; '.join(steps)}")
            continue
        try:
            _change(backend, g.index, current, g.layout)
        except NoPermissionError as exc:
            return fail(NoPermissionError(f"{head}: {exc}. {ROOT_HINT}"), EXIT_INFEASIBLE)
        except InUseError as exc:
            hint = "stop what uses it first (the stgs daemon: systemctl stop stgs)"
            return fail(InUseError(f"{head}: {exc}; {hint}"), EXIT_INFEASIBLE)
        except BackendError as exc:
            return fail(BackendError(f"{head}: {exc}"), EXIT_INFEASIBLE)
        print(f"{head}: {'; '.join(steps)}: done")
        for d in backend.mig_devices(g.index) if g.layout is not None else ():
            print(f"  {d.placement}  {d.uuid}")
    if args.dry_run:
        print(f"dry run on {where}: nothing changed")
    return EXIT_OK


def _steps(current: MigLayout | None, target: MigLayout | None) -> list[str]:
    """What it takes to go from ``current`` to ``target`` (None: MIG disabled), in order."""
    if current == target:
        return []
    out = []
    if target is None:
        if current:
            out.append("destroy " + ", ".join(str(p) for p in current))
        out.append("disable MIG")
        return out
    if current is None:
        out.append("enable MIG")
        current = ()
    gone = [p for p in current if p not in target]
    new = [p for p in target if p not in current]
    if gone:
        out.append("destroy " + ", ".join(str(p) for p in gone))
    if new:
        out.append("create " + ", ".join(str(p) for p in new))
    return out


def _change(
    backend: Backend, gpu: int, current: MigLayout | None, target: MigLayout | None
) -> None:
    if target is None:
        if current:
            backend.apply_mig_layout(gpu, ())
        backend.set_mig_mode(gpu, False)
        return
    if current is None:
        backend.set_mig_mode(gpu, True)
    backend.apply_mig_layout(gpu, target)
