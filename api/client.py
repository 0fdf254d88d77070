"""The operator verbs of ``stgs`` that talk to a running daemon over HTTP (httpx, lazily):
``stgs serve``, ``stgs status``, ``stgs models add|list|rm``, ``stgs plan --live``.

Where the daemon is: ``--url``, else ``$STGS_URL``, else the ``[server]`` of ``--config``, else
``http://127.0.0.1:8470``. The token: ``--token-file``, else ``$STGS_TOKEN_FILE``, else the
config's ``server.token_file``. Exit codes: 0 ok, 1 the daemon refused (its message on stderr),
2 bad usage or the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from api.completion import path_argument
from api.dispatch import dispatch, fail

DAEMON_COMMANDS = ("serve", "status", "models")
DEFAULT_URL = "http://127.0.0.1:8470"


FINAL = ("ready", "failed", "refused")  # a registration's outcomes (--wait stops there)


class ClientError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help=f"daemon URL (default: $STGS_URL, the config's, {DEFAULT_URL})")
    path_argument(
        p.add_argument("--token-file", help="bearer token file (default: $STGS_TOKEN_FILE)")
    )
    path_argument(p.add_argument("--config", help="daemon config TOML (for its address and token)"))
    p.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")


def add_arguments(sub: Any) -> None:
    s = sub.add_parser("serve", help="run the daemon (REST API, KServe v2 inference, controller)")
    path_argument(
        s.add_argument("--config", help="TOML config (default: built-in defaults, state in ./)")
    )
    path_argument(
        s.add_argument(
            "--model-repository",
            metavar="DIR",
            help="a Triton-style model repository to serve (overrides models.repository)",
        ),
        directory=True,
    )

    st = sub.add_parser("status", help="the running daemon: models, partitions, controller")
    _common(st)

    m = sub.add_parser("models", help="register, list and remove models of the running daemon")
    msub = m.add_subparsers(dest="models_cmd", required=True, metavar="ACTION")
    a = msub.add_parser("add", help="register a model (profiles it when needed)")
    a.add_argument("name", help="built-in model name, e.g. tiny_mlp, resnet50")
    a.add_argument("--slo-ms", type=float, required=True, help="latency SLO (ms)")
    a.add_argument("--rate-rps", type=float, required=True, help="expected request rate")
    a.add_argument(
        "--source",
        help="builtin:<name> or file:<path in model_dir> (.pt TorchScript, .pt2, .onnx)",
    )
    a.add_argument(
        "--input-shape",
        help="one sample's input shape, e.g. 3x224x224 (a TorchScript file needs it)",
    )
    a.add_argument(
        "--input-datatype",
        default="FP32",
        choices=("FP32", "FP16", "INT64", "INT32", "UINT8"),
        help="the input's KServe datatype with --input-shape (default FP32)",
    )
    a.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    a.add_argument(
        "--wait",
        type=float,
        default=0.0,
        help="wait up to this many seconds until the model serves; exit 1 when it failed or was"
        " refused, 3 when it does not serve in time (0: return at once, exit 0 unless refused)",
    )
    _common(a)
    ls = msub.add_parser("list", help="registered models and their status")
    _common(ls)
    rm = msub.add_parser("rm", help="remove a model")
    rm.add_argument("name")
    _common(rm)


def add_live_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--live", action="store_true", help="show the running daemon's plan")
    p.add_argument("--url", help="daemon URL for --live")
    path_argument(p.add_argument("--token-file", help="bearer token file for --live"))
    path_argument(
        p.add_argument(
            "--config", "--config-file", dest="config", help="daemon config TOML for --live"
        )
    )


def _target(args: argparse.Namespace) -> tuple[str, str | None]:
    from api.config import load_config, read_token

    url = getattr(args, "url", None) or os.environ.get("STGS_URL")
    token_file = getattr(args, "token_file", None) or os.environ.get("STGS_TOKEN_FILE")
    token = None
    cfg_path = getattr(args, "config", None)
    if cfg_path:
        cfg = load_config(Path(cfg_path))
        if url is None:
            host = cfg.server.host
            host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
            url = f"http://{host}:{cfg.server.port}"
        if token_file is None:
            token = read_token(cfg)
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ClientError(f"cannot read the token file {token_file}: {exc}", 2) from exc
    return (url or DEFAULT_URL).rstrip("/"), token


def _call(args: argparse.Namespace, method: str, path: str, **kw: Any) -> Any:
    import httpx

    url, token = _target(args)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.request(method, url + path, headers=headers, timeout=300.0, **kw)
    except httpx.HTTPError as exc:
        raise ClientError(f"cannot reach the daemon at {url}: {exc}", 2) from exc
    try:
        body = r.json()
    except ValueError:
        body = {"error": r.text}
    if r.status_code >= 400:
        msg = body.get("error") if isinstance(body, dict) else None
        raise ClientError(f"{r.status_code}: {msg or r.text}")
    return body


def daemon_get(args: argparse.Namespace, path: str) -> Any:
    """GET ``path`` of the daemon that ``args`` (``--url``, ``--token-file``, ``--config``)
    name; ClientError when it cannot be reached (code 2) or answers an error (code 1)."""
    return _call(args, "GET", path)


def run(args: argparse.Namespace) -> int:
    try:
        return dispatch(args, _VERBS)
    except ClientError as exc:
        return fail(exc, exc.code)


def _serve(args: argparse.Namespace) -> int:
    from api.config import load_config
    from api.daemon import serve

    cfg = load_config(Path(args.config) if args.config else None)
    if args.model_repository:
        repo = Path(args.model_repository).resolve()
        if not repo.is_dir():
            raise ClientError(f"--model-repository {args.model_repository}: no such directory", 2)
        cfg = cfg.model_copy(update={"models": cfg.models.model_copy(update={"repository": repo})})
    return serve(cfg)


def _console() -> Any:
    from rich.console import Console

    return Console()


def _status(args: argparse.Namespace) -> int:
    from rich.table import Table

    s = _call(args, "GET", "/v1/status")
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    con = _console()
    con.print(
        f"stgs {s['version']} on the {s['backend']} backend; policy {s['policy']}; "
        f"{'restored' if s['restored'] else 'restoring'}; GPUs used: {s['gpus_used']}"
    )
    t = Table(title="models")
    t.add_column("status")
    t.add_column("count", justify="right")
    for k, v in sorted(s["models"].items()):
        t.add_row(k, str(v))
    con.print(t)
    parts = ", ".join(f"{k} {v}" for k, v in s["partitions"].items() if v)
    con.print(f"partitions: {parts or 'none'}")
    c = s.get("controller") or {}
    if c:
        con.print(
            f"controller: {c['state']}, {c['replans']} re-plan(s), {c['errors']} error(s)"
            + (f"; last error: {c['last_error']}" if c.get("last_error") else "")
        )
    if s.get("last_error"):
        con.print(f"last error: {s['last_error']}")
    return 0


def _models(args: argparse.Namespace) -> int:
    import time

    from rich.table import Table

    if args.models_cmd == "add":
        spec: dict[str, Any] = {
            "name": args.name,
            "slo_ms": args.slo_ms,
            "rate_rps": args.rate_rps,
            "dtype": args.dtype,
        }
        if args.source:
            spec["source"] = args.source
        if args.input_shape:
            dims = [d for d in args.input_shape.lower().replace(",", "x").split("x") if d]
            try:
                shape = [int(d) for d in dims]
            except ValueError:
                raise SystemExit(
                    f"--input-shape {args.input_shape!r}: expected e.g. 3x224x224"
                ) from None
            spec["inputs"] = [{"datatype": args.input_datatype, "shape": shape}]
        m = _call(args, "POST", "/v1/models", json=spec)
        end = time.monotonic() + args.wait
        # --wait: until it serves (ready) or cannot (failed, refused), not merely until its
        # profiling ended: "pending" may stay pending for good
        while args.wait > 0 and m["status"] not in FINAL and time.monotonic() < end:
            time.sleep(0.5)
            m = _call(args, "GET", f"/v1/models/{args.name}")
        if args.json:
            print(json.dumps(m, indent=2))
        else:
            print(f"{m['name']}: {m['status']}" + (f" ({m['detail']})" if m["detail"] else ""))
        if m["status"] in ("failed", "refused"):
            return 1
        if args.wait > 0 and m["status"] != "ready":
            return 3  # not serving within --wait
        return 0
    if args.models_cmd == "rm":
        _call(args, "DELETE", f"/v1/models/{args.name}")
        done = {"name": args.name, "deleted": True}
        print(json.dumps(done) if args.json else f"{args.name}: deleted")
        return 0
    rows = _call(args, "GET", "/v1/models")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    t = Table(title="models")
    for col in ("name", "status", "slo_ms", "rate_rps", "planned_rps", "ready", "detail"):
        t.add_column(col, justify="right" if col.endswith(("ms", "rps")) else "left")
    for m in rows:
        t.add_row(
            m["name"],
            m["status"],
            f"{m['spec']['slo_ms']:g}",
            f"{m['spec']['rate_rps']:g}",
            f"{m['planned_rate_rps']:g}",
            "yes" if m["ready"] else "no",
            m["detail"],
        )
    _console().print(t)
    return 0


def plan_live(args: argparse.Namespace) -> int:
    from rich.table import Table

    v = _call(args, "GET", "/v1/plan")
    if getattr(args, "json", False):
        print(json.dumps(v, indent=2))
        return 0
    con = _console()
    plan = v.get("plan")
    if plan is None:
        con.print("no plan applied yet")
        return 0
    states = {p["partition"]: p for p in v["partitions"]}
    t = Table(title=f"live plan ({plan['policy']}, {plan['gpus_used']} GPU(s) used)")
    for col in ("partition", "state", "pid", "restarts", "duty_ms", "models (batch @ rps)"):
        t.add_column(col)
    for name, p in sorted(states.items()):
        t.add_row(name, p["state"], str(p["pid"] or "-"), str(p["restarts"]), "", "")
    for g in plan["gpus"]:
        for part in g["partitions"]:
            models = ", ".join(
                f"{m['name']} b{m['batch']} @ {m['rate_rps']:g}" for m in part["models"]
            )
            where = part["mig_profile"] or part["kind"]
            share = f" mps{part['mps_pct']}%" if part["mps_pct"] else ""
            t.add_row(
                f"gpu{g['index']} {where}{share}",
                "(planned)",
                "",
                "",
                f"{part['duty_cycle_ms']:.2f}",
                models,
            )
    con.print(t)
    c = v.get("controller") or {}
    for name, m in (c.get("models") or {}).items():
        con.print(
            f"{name}: measured {m['measured_rate_rps']:g} rps, SLO attainment "
            f"{m['slo_attainment']:.3f}"
        )
    return 0


_VERBS = {"serve": _serve, "status": _status, "models": _models, "plan": plan_live}
