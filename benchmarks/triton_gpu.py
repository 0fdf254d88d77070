"""Triton as the yardstick (issue 17): the highest load factor each system carries over HTTP.

Every system serves the same mix of zoo models (``--models name:slo_ms:rate_rps,...``; default
serve_gpu.py's) on one GPU behind an HTTP server, and one open-loop client drives them all:
``benchmarks.lib.kserve_load`` (KServe v2 binary tensors over HTTP, Poisson arrivals drawn per
model, ``--clients`` processes of its own, latency from each request's scheduled send, the
client's lag reported). For each system the search finds the highest load factor ``f`` (x every
model's base rate) at which every model keeps >= ``--target`` (99%) of its requests answered 200
within its SLO, and prints it beside the fluid bound.

``stgs``
    ``stgs serve`` (``api.launch.LocalDaemon``, the NVML backend, MIG never changed, a
    controller that does not re-plan) with its own policy (``stgs``, spare capacity ``fill``,
    the daemon's default: the plan for the registered rates, grown to fill the GPU it holds);
    the models registered over REST at their base rates, served through its HTTP frontends
    (``--frontends`` processes, the data plane).
``timeslice``, ``mps``, ``concurrent``
    the same daemon and frontends, serving a baseline's placement instead of its plan
    (``[planner] policy`` = ``partitioner.policies.sharing:TimeSlice``, ``:EqualMps``,
    ``:Concurrent``): a stgs worker per model on the whole GPU (the GPU time-slices their
    contexts), at an equal MPS share, or at an MPS share of 100 % (the models' kernels run
    concurrently: the closest a plan comes to ``baselines_gpu.py``'s one process with a stream
    per model). So the API, the frontends, the transport and the worker (fp16, CUDA graphs
    per batch bucket, work-conserving dynamic batching, the deadline drop) are stgs's for
    every one of these; only the placement differs. Each model's max batch: the largest power
    of two whose latency on its partition, alone, is <= SLO / 2
    (``partitioner.policies.sharing``; ``docs/baselines.md``).
``triton``
    NVIDIA Triton Inference Server 2.51 through ``nvidia-pytriton`` 0.7.0
    (``benchmarks/_triton_server.py``), as a Triton user would set it up: each model a Python
    callable running stgs's own model code (``stgs.runtime.models.load_runner``: the registry's
    module, the same weights seed, fp16, one CUDA graph per power-of-two batch bucket on a stream
    of its own), bound with Triton's dynamic batcher, one instance per model (Triton's default,
    so the models run concurrently). The rule for a model of SLO ``S``:

    * ``max_batch_size`` = the largest power of two ``b`` whose full-GPU latency ``L(b)`` is
      <= S / 2 (the rule of every baseline: a request may wait for the batch in progress, then
      run in the next one);
    * ``max_queue_delay_microseconds`` = ``--queue-delay-frac`` (0.5) x the slack
      ``S - 2 L(b)``: a request that waits that long for companions still meets ``S`` behind one
      batch in progress, with the other half of the slack left for HTTP and the host;
    * a default queue policy that rejects a request still queued after ``S`` (it can only miss;
      rejecting it keeps an overloaded queue from growing, as stgs's deadline drop does).

    Its interpreter (:func:`triton_python`): a virtual environment made over this one. Triton's
    Python backend stubs see ``--triton-site`` first (``nvidia-pytriton`` with numpy < 2, which
    the stubs need); the server process sees this interpreter's site-packages first (its numpy,
    torch). The stub links the interpreter's shared ``libpython``.

One call serves the systems one after another (``--systems``; each started, searched, stopped:
its MPS daemons quit). A trial at ``f``: ``--warmup-s`` of load (not counted), then ``--trial-s``
measured. A failed trial whose client lag p99 exceeds ``--max-lag-ms`` is "load generator
limited": not the system's failure (the search treats it as inconclusive). The search, the trial
outcome and the table are ``benchmarks/baselines_gpu.py``'s (:func:`search`): stgs starts at
the factor its daemon's plan was made for (its ``spare_factor``) unless ``--stgs-start``; the
others at ``--start``, default stgs's result; x ``--step`` after a pass, / after a failure,
bisect until fail / pass <= 1 + ``--tol``, at most ``--max-trials``, none started past
``--time-budget-s``, capped at 1.5 x the fluid bound. JSON (``--json``, default
``$OUT/triton_gpu.json``) is rewritten after every trial.

    # a GPU (MIG off), the wheels unpacked into /tmp/site and /tmp/site-triton (docs/baselines.md)
    python -m benchmarks.triton_gpu --triton-site /tmp/site-triton --time-budget-s 540
    python -m benchmarks.triton_gpu --combine a.json b.json     # the table of several calls
    # anywhere: the simulated node (CPU workers) and Triton on the CPU, tiny models whose
    # profiles are zoo models' (--simulated)
    python -m benchmarks.triton_gpu --simulated
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import sysconfig
import time
import venv
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from api.launch import ROOT, LocalDaemon, free_port, wait_until
from benchmarks.baselines_gpu import (
    GPU0,
    add_search_arguments,
    combine,
    print_summary,
    search,
    summary_table,
    trial_line,
    trial_outcome,
    trial_verdict,
)
from benchmarks.lib import kserve_load
from benchmarks.lib.kserve_load import Row, Target
from benchmarks.lib.loadgen import DEFAULT_MODELS, PLAN_SKU, ModelCfg, describe_plan, parse_models
from benchmarks.lib.node import daemon_sections, gpu_label, open_backend, quit_mps, stop_daemons
from benchmarks.lib.runs import run_header, summary_path
from partitioner.fluid import fluid_bound
from partitioner.planner import make_plan
from partitioner.policies.sharing import SHARING, sharing_batches
from partitioner.problem import Problem
from stgs.backend.base import Backend
from stgs.plan import Plan
from stgs.profiles import ProfileTable, default_profiles_path, read_profiles, write_profiles
from stgs.runtime.models import model_entry
from stgs.scenario import scenario_from_mapping

SYSTEMS = ("stgs", "timeslice", "mps", "concurrent", "triton")
POLICIES = {
    "stgs": "stgs",
    "timeslice": SHARING["timeslice"],
    "mps": SHARING["equal-mps"],
    "concurrent": SHARING["concurrent"],
}
LABELS = {
    "stgs": "stgs (`stgs serve`, its plan)",
    "timeslice": "time slicing, a stgs worker per model (`stgs serve`)",
    "mps": "equal MPS shares, a stgs worker per model (`stgs serve`)",
    "concurrent": "MPS at 100 % each, a stgs worker per model (`stgs serve`)",
    "triton": "NVIDIA Triton (pytriton): dynamic batching, CUDA graphs",
}
TARGETS = {"triton": 1.5, "timeslice": 3.0, "mps": 2.0, "concurrent": 1.5}  # stgs / system
FLUID_TARGET = 0.5  # stgs / fluid bound (issue 17)
TABLE: dict[str, Any] = {"labels": LABELS, "targets": TARGETS, "fluid_target": FLUID_TARGET}
SERVER = Path(__file__).resolve().with_name("_triton_server.py")
DEFAULT_SITE = Path(sys.prefix) / "triton-site"  # make setup: scripts/install_pytriton.sh
SITE_ENV = "STGS_TRITON_SITE"
# --simulated: tiny models that CPU workers and Triton on the CPU run in milliseconds, planned on
# the H100 profiles of the zoo model each stands for
SIM_MODELS = "tiny_mlp:100:24,tiny_cnn:150:16"
SIM_PROFILES = {"tiny_mlp": "mobilenet_v3_large", "tiny_cnn": "efficientnet_b0"}


# ---------------------------------------------------------------------- one trial
def _stats(name: str, rec: np.ndarray, slo_s: np.ndarray, rate: float) -> dict[str, Any]:
    """One model's (or all models') row: sent, answered 200, within SLO, latency percentiles
    (ms, from the scheduled send; ``p99_ok_ms`` of the 200s), status counts."""
    n = len(rec)
    code, lat = rec[:, 3].astype(int), rec[:, 2]
    ok = code == 200
    within = ok & (lat <= slo_s)
    codes: dict[str, int] = {}
    for c in code.tolist():
        codes[str(c)] = codes.get(str(c), 0) + 1

    def pct(x: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(x, q)) * 1e3, 3) if x.size else None

    return {
        "model": name,
        "rate_rps": round(rate, 3),
        "sent": n,
        "ok": int(ok.sum()),
        "within_slo": int(within.sum()),
        "errors": int(n - ok.sum()),
        "attainment": float(within.mean()) if n else None,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "p99_ok_ms": pct(lat[ok], 99),
        "codes": codes,
    }


def trial_from_records(
    records: Sequence[Row],
    models: Sequence[ModelCfg],
    rates: Sequence[float],
    f: float,
    target: float,
    max_lag_ms: float,
) -> dict[str, Any]:
    """A trial's result in ``baselines_gpu.py``'s form (rows per model and ``all``, pass when
    every model has >= ``target`` within SLO, "load generator limited" when it failed while the
    client's lag p99 exceeded ``max_lag_ms``) from kserve_load's records."""
    rec = np.asarray(records, dtype=np.float64).reshape(-1, 4)
    slo_s = np.array([m.slo_ms / 1e3 for m in models])
    idx = rec[:, 0].astype(int)
    rows = [_stats(m.name, rec[idx == i], slo_s[i], rates[i]) for i, m in enumerate(models)]
    rows.append(_stats("all", rec, slo_s[idx], sum(rates)))
    return {
        **trial_verdict(f, rates, rows[:-1], rec[:, 1] * 1e3, target, max_lag_ms),
        "rows": rows,
    }


# ---------------------------------------------------------------------- the servers
class DaemonServer:
    """``stgs serve`` with ``policy``: the mix registered over REST, its HTTP frontends."""

    def __init__(
        self,
        policy: str,
        work: Path,
        models: Sequence[ModelCfg],
        a: argparse.Namespace,
        profiles: Path | None,
    ) -> None:
        lines = [f'policy = "{policy}"', *a.planner]
        if profiles is not None:
            lines.append(f'profiles = "{profiles}"')
        self.d = LocalDaemon(
            work,
            daemon_sections(a.simulated) + "[planner]\n" + "".join(f"{x}\n" for x in lines),
            server_options=f"frontends = {a.frontends}\n",
        )
        self.models = list(models)
        self.a = a
        self.plan: Plan | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.d.port}"

    def start(self) -> dict[str, Any]:
        p = self.d.start()
        with self.d.client() as c:
            wait_until("the daemon", lambda: c.get("/v2/health/live").status_code == 200, 120, p)
            for m in self.models:
                body = {"name": m.name, "slo_ms": m.slo_ms, "rate_rps": m.rate_rps}
                r = c.post("/v1/models", json=body)
                if r.status_code not in (200, 201, 202):
                    raise RuntimeError(f"POST /v1/models {m.name}: {r.status_code} {r.text}")
            self.d.wait_all_ready(self.a.ready_timeout_s)
            view = c.get("/v1/plan").json()
            fronts = c.get("/v1/status").json().get("frontends", [])
        self.plan = Plan.from_dict(view["plan"])
        return {
            "plan": describe_plan(self.plan),
            "plan_json": view["plan"],
            "spare_factor": self.plan.info.get("spare_factor"),
            "frontends": len(fronts),
            "pid": p.pid,
        }

    def close(self) -> list[str]:
        self.d.stop()
        if not self.a.simulated:
            quit_mps(self.d.work / "run")
        return [f"daemon stopped (log {self.d.log_path})"]


def triton_python(site: Path, work: Path) -> tuple[str, dict[str, str], dict[str, str]]:
    """The interpreter the Triton server runs in, its environment, and the versions found.

    Two views of one virtual environment made over this interpreter (``work/triton-venv``),
    whose site-packages list ``site`` first, then this interpreter's site-packages and the
    repository:

    * Triton's Python backend stubs run the environment's ``python3`` (pytriton puts its
      ``bin`` first on ``PATH``) and Triton sets their ``PYTHONPATH``: they see ``site`` first,
      so nvidia-pytriton's numpy < 2 (the stub's compiled numpy interface needs it) and pyzmq;
    * the server process (stgs's model code, torch) runs with ``PYTHONPATH`` = this
      interpreter's site-packages first: numpy, torch and whatever was built against them are
      this interpreter's; only what it lacks (nvidia-pytriton) comes from ``site``.

    ``LD_LIBRARY_PATH``: the interpreter's shared ``libpython`` (the stub for this Python
    version links it) and the libraries pytriton ships (it looks for them beside
    site-packages, not in a ``--target`` directory). RuntimeError, saying what is missing,
    when it cannot run."""
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not (site / "pytriton").is_dir():
        raise RuntimeError(
            f"no nvidia-pytriton in {site}: pip install --target {site} nvidia-pytriton==0.7.0 "
            "(scripts/install_pytriton.sh), or --triton-site DIR"
        )
    stubs = site / "pytriton" / "tritonserver" / "python_backend_stubs"
    if not (stubs / ver / "triton_python_backend_stub").is_file():
        have = sorted(p.name for p in stubs.iterdir()) if stubs.is_dir() else []
        raise RuntimeError(f"pytriton in {site} has no Python backend stub for {ver} ({have})")
    soname = str(sysconfig.get_config_var("INSTSONAME") or f"libpython{ver}.so.1.0")
    libdir_var = str(sysconfig.get_config_var("LIBDIR") or "")
    arch = str(sysconfig.get_config_var("MULTIARCH") or "")
    dirs = [libdir_var, os.path.join(sys.base_prefix, "lib")]
    if arch:  # Debian's and Ubuntu's libpython3.X packages
        dirs += [os.path.join(libdir_var, arch), os.path.join("/usr/lib", arch)]
    libdir = next((d for d in dirs if d and (Path(d) / soname).is_file()), None)
    if libdir is None:
        raise RuntimeError(
            f"Triton's Python backend stub for {ver} links {soname}, which this interpreter "
            f"({sys.executable}) lacks in {dirs}: a Python built with --enable-shared is needed"
        )
    env_dir = work / "triton-venv"
    if not (env_dir / "bin" / "python").exists():
        venv.EnvBuilder(symlinks=True, with_pip=False).create(env_dir)
    purelib = env_dir / "lib" / f"python{ver}" / "site-packages"
    parent = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (purelib / "00-stgs-triton.pth").write_text(
        "\n".join([str(site.resolve()), *parent, str(ROOT)]) + "\n"
    )
    py = str(env_dir / "bin" / "python")
    libs = [libdir, str(site.resolve() / "nvidia_pytriton.libs")]
    if os.environ.get("LD_LIBRARY_PATH"):
        libs.append(os.environ["LD_LIBRARY_PATH"])
    path = [*parent, *os.environ.get("PYTHONPATH", "").split(os.pathsep), str(ROOT)]
    env = {"LD_LIBRARY_PATH": ":".join(libs), "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    stub_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    versions = {
        "stub": _probe(py, stub_env, "import zmq"),
        "server": _probe(py, {**os.environ, **env}, "import pytriton.triton"),
    }
    if int(versions["stub"]["numpy"].split(".")[0]) >= 2:
        raise RuntimeError(
            f"{py} without PYTHONPATH (as Triton's Python backend stub) imports numpy"
            f" {versions['stub']['numpy']}: the stub needs numpy < 2 in {site} (with numpy 2"
            " its outputs come back the wrong size)"
        )
    return py, env, {"numpy_stub": versions["stub"]["numpy"], **versions["server"]}


def _probe(py: str, env: dict[str, str], stmt: str) -> dict[str, str]:
    """numpy's and nvidia-pytriton's versions as ``py`` sees them in ``env`` after ``stmt``."""
    code = (
        f"{stmt}; import json, numpy, importlib.metadata as m; print(json.dumps({{"
        "'numpy': numpy.__version__, 'nvidia-pytriton': m.version('nvidia-pytriton')}))"
    )
    got = subprocess.run(
        [py, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if got.returncode != 0:
        raise RuntimeError(f"{py}: {stmt} failed: {got.stderr.strip()[-800:]}")
    out: dict[str, str] = json.loads(got.stdout.strip().splitlines()[-1])
    return out


def triton_models(problem: Problem, frac: float) -> list[dict[str, Any]]:
    """Each model's Triton settings by the rule in the module docstring."""
    out = []
    slos = {m.name: m.slo_ms for m in problem.models}
    for name, (b, lat) in sharing_batches(problem, None).items():
        slack = max(0.0, slos[name] - 2.0 * lat)
        out.append(
            {
                "name": name,
                "max_batch": b,
                "latency_ms": round(lat, 4),
                "queue_delay_us": int(frac * slack * 1000.0),
                "timeout_us": int(slos[name] * 1000.0),
            }
        )
    return out


class TritonServer:
    """``_triton_server.py`` spawned through the backend (pinned as a stgs worker)."""

    def __init__(
        self,
        backend: Backend,
        work: Path,
        models: list[dict[str, Any]],
        a: argparse.Namespace,
    ) -> None:
        self.backend = backend
        self.work = work
        self.models = models
        self.a = a
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = work / "triton.log"
        self.token = secrets.token_urlsafe(16)  # Triton's restricted APIs (statistics)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def start(self) -> dict[str, Any]:
        self.work.mkdir(parents=True, exist_ok=True)
        py, env, versions = triton_python(Path(self.a.triton_site), self.work)
        spec = {
            "models": self.models,
            "http_port": self.http_port,
            "grpc_port": free_port(),
            "metrics_port": free_port(),
            "access_token": self.token,
            "log": str(self.log),
        }
        argv = [py, str(SERVER), "--spec", json.dumps(spec)]
        self.proc = self.backend.spawn_worker(GPU0, None, argv, extra_env=env)
        proc = self.proc
        url = f"http://{self.addr}"
        end = time.monotonic() + self.a.ready_timeout_s
        with httpx.Client(timeout=5.0) as c:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"the Triton server exited ({proc.returncode}): {self._tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if c.get(f"{url}/v2/health/ready").status_code == 200 and all(
                        c.get(f"{url}/v2/models/{m['name']}/ready").status_code == 200
                        for m in self.models
                    ):
                        meta = c.get(f"{url}/v2").json()
                        break
                if time.monotonic() > end:
                    raise RuntimeError(f"the Triton server was not ready: {self._tail()}")
                time.sleep(0.5)
        return {
            "pid": proc.pid,
            "server": {k: meta.get(k) for k in ("name", "version")},
            "packages": versions,
            "models": self.models,
            "log": str(self.log),
        }

    def stats(self) -> dict[str, dict[str, int | float]]:
        """Per model, Triton's counts since it started (``/v2/models/stats``): requests,
        batches run, and the mean batch."""
        with httpx.Client(timeout=10.0) as c:
            got = c.get(
                f"http://{self.addr}/v2/models/stats", headers={"triton-access-token": self.token}
            ).json()
        out: dict[str, dict[str, int | float]] = {}
        for m in got.get("model_stats", []):
            n, runs = int(m.get("inference_count", 0)), int(m.get("execution_count", 0))
            out[m["name"]] = {"requests": n, "batches": runs, "mean_batch": n / runs if runs else 0}
        return out

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-1500:]
        return "(no log)"

    def close(self) -> list[str]:
        p = self.proc
        if p is None:
            return []
        notes = []
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)  # Triton stops, the server exits
            try:
                p.wait(45)
                notes.append(f"Triton server exited ({p.returncode})")
            except subprocess.TimeoutExpired:
                notes.append("Triton server killed (no exit 45 s after SIGTERM)")
        if p.poll() is None:
            p.kill()
            p.wait(10)
        # tritonserver and its Python backend stubs, if any is left: they are in its group
        end = time.monotonic() + 15.0
        while True:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            if time.monotonic() > end:
                notes.append(f"processes of group {p.pid} (tritonserver) still there")
                break
            time.sleep(0.1)
        return notes


# ---------------------------------------------------------------------- per system
class Run:
    """What every system's run shares: the mix, the load's settings, the result file."""

    def __init__(self, a: argparse.Namespace, models: list[ModelCfg], res: dict[str, Any]):
        self.a = a
        self.models = models
        self.res = res
        self.json_path = summary_path(a.json, "triton_gpu")
        self.t0 = time.monotonic()
        self.targets = []
        for i, m in enumerate(models):  # the input "input", as stgs's API and Triton's name it
            self.targets.append(
                Target(m.name, m.rate_rps, model_entry(m.name).example(seed=i)[None])
            )

    @property
    def trial_cost_s(self) -> float:
        return float(self.a.warmup_s + self.a.trial_s + 3.0)  # + the client processes' start

    def fits(self, extra_s: float) -> bool:
        budget = float(self.a.time_budget_s)
        return budget <= 0 or time.monotonic() - self.t0 + extra_s <= budget

    def save(self) -> None:
        self.res["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.res["table"] = summary_table(self.res, **TABLE)
        if self.json_path:
            Path(self.json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.json_path).write_text(json.dumps(self.res, indent=1, default=str))

    def trial(self, name: str, addr: str, f: float, work: Path) -> dict[str, Any]:
        a = self.a
        rates = [m.rate_rps * f for m in self.models]
        targets = [replace(t, rate=r) for t, r in zip(self.targets, rates, strict=True)]
        recs = kserve_load.load(
            "http", addr, targets, a.trial_s, a.clients, work, seed=a.seed, warmup_s=a.warmup_s
        )
        tr = trial_from_records(recs, self.models, rates, f, a.target, a.max_lag_ms)
        print(trial_line(name, tr), flush=True)
        return tr

    def system(self, name: str, server: DaemonServer | TritonServer, sres: dict[str, Any]) -> None:
        """Start ``server``, search its factor, stop it; the result into ``sres``."""
        a = self.a
        if not self.fits((15.0 if a.simulated else 45.0) + self.trial_cost_s):
            sres["result"] = {"factor": None, "reason": "skipped: time budget"}
            print("  skipped: not enough time budget left")
            return
        try:
            t = time.monotonic()
            info = server.start()
            sres["startup_s"] = round(time.monotonic() - t, 2)
            sres["server"] = info
            print(f"  ready in {sres['startup_s']} s")
            for line in info.get("plan", []):
                print(f"    {line}")
            for m in info.get("models", []):
                print(f"    {m}")
            stgs_f = (self.res["systems"].get("stgs", {}).get("result") or {}).get("factor")
            if name == "stgs":
                spare = info.get("spare_factor")
                planned = float(spare) if isinstance(spare, int | float) and spare > 1 else 1.0
                start = a.stgs_start or planned
            else:
                start = a.start or stgs_f or 1.0
            sres["start_factor"] = start
            work = Path(a.work) / f"{name}-clients"

            def passes(f: float) -> bool | None:
                tr = self.trial(name, server.addr, f, work)
                sres["trials"].append(tr)
                self.save()
                return trial_outcome(tr)

            sr = search(
                passes,
                start,
                step=a.step,
                tol=a.tol,
                max_trials=a.max_trials,
                cap=1.5 * float(self.res["fluid_k"]),
                floor=start / 50,
                budget_ok=lambda: self.fits(self.trial_cost_s),
            )
        finally:
            if isinstance(server, TritonServer) and server.proc is not None:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    sres["stats"] = server.stats()
                    print(f"  Triton's counts: {sres['stats']}")
            sres["cleanup"] = server.close()
        sres["result"] = sr.summary(float(self.res["base_rps"]))
        print(f"  -> {name}: {sr.best:.3f} ({sr.reason})", flush=True)


# ---------------------------------------------------------------------- main
def sim_profiles(table: ProfileTable, path: Path) -> ProfileTable:
    """--simulated: the tiny models' profiles, copied from the zoo models they stand for."""
    rows = [
        replace(r, model=tiny)
        for tiny, zoo in SIM_PROFILES.items()
        for r in table.rows_for(PLAN_SKU, zoo)
    ]
    write_profiles(rows, path)
    return ProfileTable(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--models", default=None, help="name:slo_ms:base_rate_rps,...")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="in this order")
    add_search_arguments(ap, trial_s=10.0, warmup_s=2.0, max_trials=4)
    ap.add_argument("--start", type=float, default=None, help="first factor but stgs's")
    ap.add_argument("--stgs-start", type=float, default=None, help="stgs's first factor")
    ap.add_argument("--time-budget-s", type=float, default=0.0, help="0: none")
    ap.add_argument("--headroom", type=float, default=0.1, help="the planner's (fluid, peak)")
    ap.add_argument("--clients", type=int, default=4, help="client processes")
    ap.add_argument("--frontends", type=int, default=None, help="the daemon's (default 4; sim 1)")
    ap.add_argument(
        "--planner",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [planner] line of every daemon's config (TOML); repeatable",
    )
    ap.add_argument("--queue-delay-frac", type=float, default=0.5, help="x the SLO slack")
    ap.add_argument("--triton-site", default=None, help=f"nvidia-pytriton's site (${SITE_ENV})")
    ap.add_argument("--max-lag-ms", type=float, default=2.0, help="a failed trial's client lag")
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--ready-timeout-s", type=float, default=300.0)
    ap.add_argument("--simulated", action="store_true", help="simulated node, CPU everywhere")
    ap.add_argument("--work", default=None, help="scratch directory (default: a new temp dir)")
    ap.add_argument("--json", default=None, help="default $OUT/triton_gpu.json")
    ap.add_argument("--combine", nargs="+", default=None, help="result files to merge, print")
    a = ap.parse_args(argv)
    if a.combine:
        return combine(a.combine, a.json, **TABLE)
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        print(f"unknown systems {unknown}; known: {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    a.frontends = a.frontends or (1 if a.simulated else 4)
    a.triton_site = a.triton_site or os.environ.get(SITE_ENV) or str(DEFAULT_SITE)
    a.work = a.work or f"/tmp/stgs-triton-{os.getpid()}"
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    models = parse_models(a.models or (SIM_MODELS if a.simulated else DEFAULT_MODELS))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that finally blocks stop all

    table = read_profiles(default_profiles_path())
    extra: Path | None = None
    if a.simulated:
        extra = work / "sim-profiles.csv"
        table = table.merge(sim_profiles(table, extra))
    sc = scenario_from_mapping(
        {
            "headroom": a.headroom,
            "gpus": [{"sku": PLAN_SKU, "count": 1, "mig": False}],
            "models": [
                {"name": m.name, "slo_ms": m.slo_ms, "rate_rps": m.rate_rps} for m in models
            ],
        }
    )
    problem = Problem.from_scenario(sc, table)
    peak = make_plan(sc, "stgs", peak=True, problem=problem)
    fluid_k = fluid_bound(problem)
    base_rps = sum(m.rate_rps for m in models)
    tmodels = triton_models(problem, a.queue_delay_frac)
    text = ",".join(f"{m.name}:{m.slo_ms:g}:{m.rate_rps:g}" for m in models)
    print(
        f"models (name:SLO ms:rate at factor 1): {text}\n"
        f"stgs planner's peak on 1 {PLAN_SKU}: {peak.k or 0:.3f}; fluid bound: {fluid_k:.3f}"
        f" ({fluid_k * base_rps:.0f} req/s)\n"
        f"Triton: {[(m['name'], m['max_batch'], m['queue_delay_us']) for m in tmodels]}"
        " (model, max batch, queue delay us)",
        flush=True,
    )
    res: dict[str, Any] = {
        **run_header("triton_gpu", argv),
        "args": vars(a),
        "models": [asdict(m) for m in models],
        "models_text": text,
        "base_rps": base_rps,
        "load_scale": 1.0,
        "target": a.target,
        "planner_peak_k": round(float(peak.k or 0.0), 5),
        "fluid_k": round(fluid_k, 5),
        "triton_models": tmodels,
        "device": f"simulated {PLAN_SKU} (CPU)" if a.simulated else gpu_label(),
        "systems": {},
    }
    run = Run(a, models, res)
    backend: Backend | None = None
    try:
        for name in systems:
            sres: dict[str, Any] = {"system": name, "label": LABELS[name], "trials": []}
            res["systems"][name] = sres
            print(f"\n# {name}: {LABELS[name]}", flush=True)
            t = time.monotonic()
            server: DaemonServer | TritonServer
            try:
                if name == "triton":
                    if backend is None:
                        opened = open_backend(a.simulated, work / "triton-run")
                        if opened is None:
                            raise RuntimeError("no backend (GPU 0 in MIG mode)")
                        backend = opened[0]
                    server = TritonServer(backend, work / "triton", tmodels, a)
                else:
                    server = DaemonServer(POLICIES[name], work / name, models, a, extra)
                run.system(name, server, sres)
            except Exception as exc:  # one system's failure must not cost the others' results
                sres["error"] = f"{type(exc).__name__}: {exc}"
                sres["result"] = {"factor": None, "reason": f"error: {sres['error'][:300]}"}
                print(f"  {name} FAILED: {sres['error']}", file=sys.stderr, flush=True)
            sres["wall_s"] = round(time.monotonic() - t, 1)
            run.save()
            print_summary(res, **TABLE)
    finally:
        if backend is not None:
            res["cleanup"] = stop_daemons(backend)
            backend.close()
        run.save()
        if run.json_path:
            print(f"wrote {run.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
