"""The run format: what a benchmark writes about a run (:func:`run_header`: the command, the
machine, the date), and a ``serve_gpu.py`` run read back (its JSON summary and the ``.npz`` of
every request beside it; :func:`read_run`, shared by fidelity.py, repeatability.py and
stall_windows.py)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lib.loadgen import NOT_SENT, OK
from partitioner.problem import Problem
from stgs.plan import Plan
from stgs.scenario import scenario_from_mapping

__all__ = [
    "NOT_SENT",
    "OK",
    "Run",
    "RunError",
    "load_run",
    "read_run",
    "run_header",
    "summary_path",
    "write_summary",
]


def summary_path(explicit: str | None, name: str) -> str | None:
    """Where a benchmark writes its JSON summary: ``--json``, else ``$OUT/<name>.json`` when
    ``$OUT`` is set (the lent GPU's output folder), else nowhere."""
    out = os.environ.get("OUT")
    return explicit or (str(Path(out) / f"{name}.json") if out else None)


def write_summary(obj: Any, explicit: str | None, name: str) -> str | None:
    """The summary as JSON at :func:`summary_path` (said on stdout); the path, or None."""
    path = summary_path(explicit, name)
    if path:
        Path(path).write_text(json.dumps(obj, indent=1, default=str))
        print(f"wrote {path}")
    return path


def run_header(script: str, argv: Sequence[str] | None = None) -> dict[str, str]:
    """The run's command (as ``python -m benchmarks.SCRIPT ARGS``), the machine (host name,
    OS, CPUs, Python) and the local date: the first keys of every summary a script writes."""
    args = list(sys.argv[1:] if argv is None else argv)
    return {
        "command": shlex.join(["python", "-m", f"benchmarks.{script}", *args]),
        "machine": (
            f"{platform.node()} ({platform.system()} {platform.release()}, "
            f"{platform.machine()}, Python {platform.python_version()})"
        ),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


@dataclass
class Run:
    path: Path
    res: dict[str, Any]
    npz: dict[str, np.ndarray]
    names: list[str]
    lo: float
    hi: float
    problem: Problem
    plan: Plan
    rates: dict[str, float]
    trace: Any = field(default=None, repr=False)  # load_trace's join, made on first use

    def arrivals(self) -> dict[str, np.ndarray]:
        t, m = self.npz["t_sched"], self.npz["model"]
        return {
            n: np.sort(t[(m == i) & (t < self.hi)]).astype(np.float64)
            for i, n in enumerate(self.names)
        }


def load_run(summary: str | Path, npz: str | Path | None = None, sku: str = "H100-80GB") -> Run:
    path = Path(summary)
    res: dict[str, Any] = json.loads(path.read_text())
    with np.load(npz or path.with_suffix(".npz")) as z:
        arrays = {k: z[k] for k in z.files}
    models = res["models"]
    win = res["windows"]["phase1"]
    scale = float(res.get("load_scale") or 1.0)
    rates = {m["name"]: float(m["rate_rps"]) * scale for m in models}
    sc = scenario_from_mapping(
        {
            "gpus": [{"sku": sku, "count": 1, "mig": False}],
            "headroom": float(res.get("args", {}).get("headroom", 0.1)),
            "models": [
                {"name": m["name"], "slo_ms": m["slo_ms"], "rate_rps": rates[m["name"]]}
                for m in models
            ],
        }
    )
    return Run(
        path,
        res,
        arrays,
        [m["name"] for m in models],
        float(win["from_s"]),
        float(win["to_s"]),
        Problem.from_scenario(sc),
        Plan.from_dict(res["plan1"]),
        rates,
    )


class RunError(Exception):
    """A run file that cannot be read (the message names the file and why)."""


def read_run(summary: str | Path, npz: str | Path | None = None, sku: str = "H100-80GB") -> Run:
    """:func:`load_run`, a file that cannot be read or is not a serve_gpu.py run raising
    :class:`RunError` with the file and why (the scripts exit 2 with it)."""
    try:
        return load_run(summary, npz, sku)
    except FileNotFoundError as exc:
        raise RunError(f"{exc.filename or summary}: no such file") from exc
    except json.JSONDecodeError as exc:
        raise RunError(f"{summary}: not JSON ({exc})") from exc
    except KeyError as exc:
        raise RunError(f"{summary}: not a serve_gpu.py run (no {exc} key or array)") from exc
    except (OSError, ValueError, TypeError, zipfile.BadZipFile, EOFError) as exc:
        raise RunError(f"{summary}: cannot read the run ({type(exc).__name__}: {exc})") from exc
