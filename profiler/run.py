"""The orchestrator of ``stgs profile``: points -> workers -> rows, resumable, failure-tolerant.

For each model (in the order given) it measures every partition and batch that ``--out`` does
not have yet: ``full`` in a plain worker process, each green context in its own process (made
current once, for the process's whole life: measured on the H100, a process that switched
between green contexts reused cuDNN plans chosen in another context, which then ran slowly or
failed with CUDNN_STATUS_EXECUTION_FAILED), each MPS share in its own client process under an
MPS control daemon (started with private directories and quit at the end), each existing MIG
instance in a process pinned to it. Workers live for the whole run, one model loaded at a time.
Before a model's points are timed, its workers are started, load the model and run each batch
once eagerly, all at the same time (``prewarm``): the first forward pass of a new input shape
costs a process ~2 s of host time for models with many small convolutions (cuDNN's per-shape
plan set-up: efficientnet_b0, mobilenet_v3_large on the H100), which would otherwise be paid
partition after partition; the timed points then run one at a time on a quiet GPU.
A point that fails is retried once, after the other points of its model, in a fresh worker; a
worker that crashes or hangs costs the point it was measuring and is restarted. Rows are
appended and flushed as they are measured; failures go to the side file (see
:mod:`profiler.output`). With ``interference``, pairs of models then run side by side in two
MPS clients (solo, then together) and the companion CSV gets a row for each.

No torch here: everything that touches the GPU runs in the workers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from profiler.errors import ModelLoadError, MpsUnavailableError, NoGpuError, ProfilerError
from profiler.grid import DEFAULT_BATCHES, Point, default_partitions, order_points
from profiler.measure import TimingOptions
from profiler.models import ModelSpec
from profiler.output import (
    FAILURE_COLUMNS,
    INTERFERENCE_EXTRA,
    PROFILE_EXTRA,
    CsvAppender,
    failures_path,
    interference_path,
    interference_values,
    measured_interference,
    measured_points,
    profile_values,
)
from stgs.errors import ProfileError
from stgs.profiles import INTERFERENCE_COLUMNS, PROFILE_COLUMNS, InterferenceRow, ProfileRow

__all__ = ["ProfileConfig", "ProfileSummary", "WorkerFactory", "run_profile"]

WorkerKey = tuple[str, ...]
WorkerFactory = Callable[[str, Mapping[str, str]], Any]
"""(device, environment) -> a started worker (see :class:`profiler.workers.Worker`)."""

LOAD_TIMEOUT_S = 600.0
WARM_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class ProfileConfig:
    models: tuple[ModelSpec, ...]
    out: Path
    device: str = "0"  # a GPU index, or "cpu"
    partitions: tuple[str, ...] | None = None  # None: the default grid for the device
    batches: tuple[int, ...] = DEFAULT_BATCHES
    dtype: str = "fp16"
    timing: TimingOptions = field(default_factory=TimingOptions)
    point_timeout_s: float = 300.0
    gpu_label: str | None = None
    mps_pipe_dir: Path | None = None
    interference: bool = False
    interference_pairs: tuple[tuple[str, str], ...] | None = None  # None: consecutive models
    interference_splits: tuple[tuple[float, float], ...] = ((50, 50), (25, 75))
    interference_batches: tuple[int, ...] = (8, 32)
    interference_seconds: float = 1.0
    interference_out: Path | None = None
    quiet: bool = False
    prewarm: bool = True  # start, load and warm a model's workers in parallel (see above)

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"


@dataclass
class ProfileSummary:
    gpu: str = ""
    device_name: str = ""
    sm_count: int = 0
    driver: str | None = None
    torch: str = ""
    measured: int = 0
    skipped: int = 0
    failed: int = 0
    interference_rows: int = 0
    seconds: float = 0.0
    seconds_per_model: dict[str, float] = field(default_factory=dict)
    eager_points: int = 0
    notes: list[str] = field(default_factory=list)
    load_failures: dict[str, str] = field(default_factory=dict)
    out: Path | None = None
    interference_out: Path | None = None
    failures_out: Path | None = None


def _default_factory(device: str, env: Mapping[str, str]) -> Any:
    from profiler.workers import SubprocessWorker

    return SubprocessWorker(device, env)


class _Run:
    """One profiling run: its workers, its MPS daemon, its output files."""

    def __init__(
        self, cfg: ProfileConfig, factory: WorkerFactory, progress: Any, summary: ProfileSummary
    ) -> None:
        self.cfg = cfg
        self.factory = factory
        self.progress = progress
        self.s = summary
        self.workers: dict[WorkerKey, Any] = {}
        self.loaded: dict[WorkerKey, str] = {}
        self.daemon: Any = None
        self.mig: dict[str, str] = {}  # profile -> MIG uuid
        self.failures: CsvAppender | None = None
        self.rows: CsvAppender | None = None
        self.specs = {m.name: m for m in cfg.models}
        self.retry: list[Point] | None = None

    # --- workers ----------------------------------------------------------------------

    def _env(self, key: WorkerKey) -> dict[str, str]:
        from profiler.mps import MpsDaemon, visible_devices_env

        env: dict[str, str]
        if self.cfg.cpu:
            env = dict(os.environ)
            env["CUDA_VISIBLE_DEVICES"] = ""
            return env
        if key[0] == "mps":
            if self.daemon is None:
                self.daemon = MpsDaemon(self.cfg.device, self.cfg.mps_pipe_dir).start()
            env = self.daemon.client_env(float(key[1]))
            return env
        if key[0] == "mig":
            return visible_devices_env(key[1])
        env = visible_devices_env(self.cfg.device)
        if key[0] == "green":
            from profiler.worker import GREEN_ENV

            env[GREEN_ENV] = key[1]
        return env

    def worker(self, key: WorkerKey) -> Any:
        w = self.workers.get(key)
        if w is not None and w.alive:
            return w
        self.loaded.pop(key, None)
        w = self.factory("cpu" if self.cfg.cpu else "cuda:0", self._env(key))
        self.workers[key] = w
        return w

    def drop(self, key: WorkerKey) -> None:
        w = self.workers.pop(key, None)
        self.loaded.pop(key, None)
        if w is not None:
            with suppress(Exception):  # a dead worker: nothing to close
                w.close()

    def close(self) -> None:
        for key in list(self.workers):
            self.drop(key)
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None
        for f in (self.rows, self.failures):
            if f is not None:
                f.close()

    def ensure_loaded(self, key: WorkerKey, model: str) -> Any:
        """The worker of ``key`` with ``model`` loaded; :class:`ModelLoadError` if it fails."""
        w = self.worker(key)
        if self.loaded.get(key) == model:
            return w
        spec = asdict(self.specs[model])
        r = w.request({"op": "load", "spec": spec, "dtype": self.cfg.dtype}, LOAD_TIMEOUT_S)
        if not r.get("ok"):
            self.loaded.pop(key, None)
            raise ModelLoadError(str(r.get("error")))
        self.loaded[key] = model
        return w

    def prewarm(self, model: str, groups: Mapping[WorkerKey, Sequence[Point]]) -> None:
        """Start the workers of ``groups``, load ``model`` and run each of its batches once in
        every worker, all workers at once (nothing is timed).

        Best effort: a worker that does not start, load or warm is left to the serial path,
        which retries it and records the failure against the points.
        """
        envs: dict[WorkerKey, dict[str, str]] = {}
        for key in groups:
            w = self.workers.get(key)
            if w is None or not w.alive:
                try:
                    envs[key] = self._env(key)  # may start the MPS daemon: not in a thread
                except Exception:  # the serial path reports it
                    continue
        device = "cpu" if self.cfg.cpu else "cuda:0"
        spec = asdict(self.specs[model])

        def job(key: WorkerKey) -> tuple[WorkerKey, Any, bool]:
            w = self.workers.get(key) if key not in envs else None
            try:
                if w is None:
                    w = self.factory(device, envs[key])
                if self.loaded.get(key) != model:
                    msg = {"op": "load", "spec": spec, "dtype": self.cfg.dtype}
                    if not w.request(msg, LOAD_TIMEOUT_S).get("ok"):
                        return key, w, False
                batches = sorted({p.batch for p in groups[key]})
                warm: dict[str, Any] = {"op": "warm", "batches": batches}
                warm["partition"] = groups[key][0].partition
                w.request(warm, WARM_TIMEOUT_S)
                return key, w, True
            except Exception:  # the serial path retries this worker and records why
                return key, w, False

        keys = [k for k in groups if k in envs or k in self.workers]
        if not keys:
            return
        with ThreadPoolExecutor(max_workers=len(keys)) as pool:
            results = list(pool.map(job, keys))
        for key, w, loaded in results:
            if key in envs and w is not None:
                self.drop(key)  # a dead predecessor, if any
                self.workers[key] = w
            if loaded and w is not None and w.alive:
                self.loaded[key] = model
            else:
                self.loaded.pop(key, None)

    def unload(self, key: WorkerKey) -> None:
        w = self.workers.get(key)
        if w is not None and key in self.loaded and w.alive:
            try:
                w.request({"op": "unload"}, 60.0)
            except Exception:
                self.drop(key)
        self.loaded.pop(key, None)

    # --- setup ------------------------------------------------------------------------

    def device_info(self) -> dict[str, Any]:
        from profiler.workers import WorkerDied, WorkerTimeout

        try:
            w = self.worker(("plain",))
            info = w.request({"op": "info"}, 120.0)
        except (WorkerDied, WorkerTimeout) as exc:
            if self.cfg.cpu:
                raise ProfilerError(f"the CPU worker did not start: {exc}") from exc
            raise NoGpuError(
                f"no usable CUDA GPU {self.cfg.device}: {exc}; use --device cpu for a CPU run"
            ) from exc
        if not info.get("ok"):
            raise NoGpuError(f"device {self.cfg.device}: {info.get('error')}")
        return dict(info)

    def partitions(self, info: Mapping[str, Any]) -> tuple[str, ...]:
        from profiler.mps import mps_available

        cfg, notes = self.cfg, self.s.notes
        have_mps = cfg.mps_pipe_dir is not None or mps_available()
        if cfg.partitions is None:
            if cfg.cpu:
                return ("full",)
            parts = default_partitions(int(info["sm_count"]), mps=have_mps)
            if not have_mps:
                notes.append("no nvidia-cuda-mps-control on PATH: MPS shares not profiled")
        else:
            parts = cfg.partitions
        if cfg.cpu and parts != ("full",):
            raise ProfilerError("the CPU mode profiles the 'full' partition only")
        if not have_mps and any(p.startswith("mps:") for p in parts):
            raise MpsUnavailableError(
                "mps:* partitions need nvidia-cuda-mps-control on PATH (or --mps-pipe-dir of a "
                "running MPS daemon)"
            )
        if not info.get("green_contexts", True) and any(p.startswith("green:") for p in parts):
            notes.append("this torch has no torch.cuda.green_contexts: green:* not profiled")
            parts = tuple(p for p in parts if not p.startswith("green:"))
        migs = [p for p in parts if p.startswith("mig:")]
        if migs:
            from profiler.gpu import list_mig_devices

            found = {d.profile: d.uuid for d in list_mig_devices(int(cfg.device))}
            for p in migs:
                prof = p.partition(":")[2]
                if prof in found:
                    self.mig[prof] = found[prof]
                else:
                    notes.append(
                        f"no MIG instance {prof} exists (the profiler never changes the MIG "
                        f"layout): its latency is predicted from the measured SM curve"
                    )
            parts = tuple(p for p in parts if not p.startswith("mig:") or p[4:] in self.mig)
        return parts

    def key_of(self, partition: str) -> WorkerKey:
        kind, _, arg = partition.partition(":")
        if kind == "mps":
            return ("mps", arg, "0")
        if kind == "mig":
            return ("mig", self.mig[arg])
        if kind == "green":
            return ("green", arg)
        return ("plain",)

    # --- the profile grid -------------------------------------------------------------

    def fail(self, p: Point, error: str) -> None:
        if self.retry is not None:  # a first attempt: retried after the model's other points
            self.retry.append(p)
            return
        self.s.failed += 1
        if self.failures is None:
            assert self.s.failures_out is not None
            self.failures = CsvAppender(self.s.failures_out, FAILURE_COLUMNS)
        self.failures.append(
            {
                "gpu": self.s.gpu,
                "model": p.model,
                "partition": p.partition,
                "batch": p.batch,
                "error": " ".join(error.split())[:500],
            }
        )

    def measure(self, p: Point) -> None:
        from profiler.workers import WorkerDied, WorkerTimeout

        key = self.key_of(p.partition)
        try:
            w = self.ensure_loaded(key, p.model)
            timing = asdict(self.cfg.timing)
            r = w.request(
                {"op": "measure", "partition": p.partition, "batch": p.batch, "timing": timing},
                self.cfg.point_timeout_s,
            )
        except (WorkerDied, WorkerTimeout) as exc:
            self.drop(key)
            self.fail(p, f"{type(exc).__name__}: {exc}")
            return
        except ModelLoadError as exc:
            self.fail(p, f"ModelLoadError: {exc}")
            return
        if not r.get("ok"):
            if r.get("fatal"):
                self.drop(key)
            self.fail(p, str(r.get("error")))
            return
        try:
            row = ProfileRow(
                gpu=self.s.gpu,
                model=p.model,
                partition=p.partition,
                sm_count=int(r["sm_count"]),
                batch=p.batch,
                latency_ms=round(float(r["median_ms"]), 4),
                memory_mib=round(float(r["memory_mib"]), 3),
            )
        except ProfileError as exc:
            self.fail(p, f"invalid measurement: {exc}")
            return
        extra = {
            "p99_ms": round(float(r["p99_ms"]), 4),
            "graph": r["graph"],
            "iters": int(r["iters"]),
            "dtype": "fp32" if self.cfg.cpu else self.cfg.dtype,
            "seconds": round(float(r["seconds"]), 3),
        }
        assert self.rows is not None
        self.rows.append(profile_values(row, extra))
        self.s.measured += 1
        if r["graph"] != "cuda" and not self.cfg.cpu:
            self.s.eager_points += 1

    def run_points(self, points: Sequence[Point]) -> None:
        task = self.progress.add_task("profiling", total=len(points))
        by_model: dict[str, list[Point]] = {}
        for p in order_points(points):
            by_model.setdefault(p.model, []).append(p)
        for model, pts in by_model.items():
            t0 = time.monotonic()
            groups: dict[WorkerKey, list[Point]] = {}
            for p in pts:
                groups.setdefault(self.key_of(p.partition), []).append(p)
            if self.cfg.prewarm:
                self.progress.update(task, description=f"{model}: loading and warming up")
                self.prewarm(model, groups)
            for key, gpts in groups.items():
                try:
                    self.ensure_loaded(key, model)
                except ModelLoadError as exc:
                    self.s.load_failures.setdefault(model, str(exc))
                    for p in gpts:
                        self.fail(p, f"ModelLoadError: {exc}")
                    self.progress.advance(task, len(gpts))
                    continue
                except Exception as exc:  # the worker did not start (MPS client refused, ...)
                    self.drop(key)
                    for p in gpts:
                        self.fail(p, f"{type(exc).__name__}: {exc}")
                    self.progress.advance(task, len(gpts))
                    continue
                self.retry = []
                for p in gpts:
                    self.progress.update(task, description=f"{p.model} {p.partition} b={p.batch}")
                    self.measure(p)
                    self.progress.advance(task)
                again, self.retry = self.retry, None
                if again:  # once more, in a fresh worker
                    self.drop(key)
                    for p in again:
                        self.progress.update(task, description=f"{p.model} {p.partition} retry")
                        self.measure(p)
                self.unload(key)
            self.s.seconds_per_model[model] = time.monotonic() - t0
        self.progress.update(task, description="profiled")

    # --- co-location ------------------------------------------------------------------

    def pairs(self) -> list[tuple[str, str]]:
        if self.cfg.interference_pairs is not None:
            for a, b in self.cfg.interference_pairs:
                for m in (a, b):
                    if m not in self.specs:
                        raise ProfilerError(f"interference pair names {m!r}, not a MODEL given")
            return list(self.cfg.interference_pairs)
        names = [m.name for m in self.cfg.models]
        if len(names) < 2:
            return []
        pairs = [(names[i], names[i + 1]) for i in range(0, len(names) - 1, 2)]
        if len(names) % 2:
            pairs.append((names[-1], names[0]))
        return pairs

    def run_interference(self) -> None:
        from profiler.workers import WorkerDied, WorkerTimeout

        cfg = self.cfg
        path = cfg.interference_out or interference_path(cfg.out)
        self.s.interference_out = path
        done = measured_interference(path)
        todo: list[tuple[str, str, float, float, int]] = []
        for a, b in self.pairs():
            for pa, pb in cfg.interference_splits:
                for batch in cfg.interference_batches:
                    row_a = (self.s.gpu, a, float(pa), batch, float(pb), b)
                    row_b = (self.s.gpu, b, float(pb), batch, float(pa), a)
                    if row_a not in done or row_b not in done:
                        todo.append((a, b, pa, pb, batch))
        if not todo:
            return
        out = CsvAppender(
            path, (*INTERFERENCE_COLUMNS, *INTERFERENCE_EXTRA), required=INTERFERENCE_COLUMNS
        )
        task = self.progress.add_task("co-location", total=len(todo))
        secs = cfg.interference_seconds
        timing = asdict(cfg.timing)
        try:
            for a, b, pa, pb, batch in todo:
                self.progress.update(task, description=f"{a}@{pa:g}% + {b}@{pb:g}% b={batch}")
                ka, kb = ("mps", f"{pa:g}", "0"), ("mps", f"{pb:g}", "1")
                try:
                    wa, wb = self.ensure_loaded(ka, a), self.ensure_loaded(kb, b)
                    for w, pct in ((wa, pa), (wb, pb)):
                        r = w.request(
                            {
                                "op": "prepare",
                                "partition": f"mps:{pct:g}",
                                "batch": batch,
                                "timing": timing,
                            },
                            cfg.point_timeout_s,
                        )
                        if not r.get("ok"):
                            raise RuntimeError(r.get("error"))
                    solo = []
                    for w in (wa, wb):
                        r = w.request({"op": "run_for", "seconds": secs}, secs + 120)
                        if not r.get("ok"):
                            raise RuntimeError(r.get("error"))
                        solo.append(r)
                    wa.send({"op": "run_for", "seconds": secs})
                    wb.send({"op": "run_for", "seconds": secs})
                    both = [wa.receive(secs + 120), wb.receive(secs + 120)]
                    if not all(r.get("ok") for r in both):
                        raise RuntimeError("; ".join(str(r.get("error")) for r in both))
                except (WorkerDied, WorkerTimeout, RuntimeError, ModelLoadError) as exc:
                    self.drop(ka)
                    self.drop(kb)
                    for m, part in ((a, pa), (b, pb)):
                        self.fail(Point(m, f"mps:{part:g}+coloc", batch), f"co-location: {exc}")
                    self.progress.advance(task)
                    continue
                for (m, pct, npct, nm), r_solo, r_both in zip(
                    ((a, pa, pb, b), (b, pb, pa, a)), solo, both, strict=True
                ):
                    row = InterferenceRow(
                        gpu=self.s.gpu,
                        model=m,
                        mps_pct=pct,
                        batch=batch,
                        neighbour_pct=npct,
                        latency_ms=round(float(r_both["median_ms"]), 4),
                        solo_latency_ms=round(float(r_solo["median_ms"]), 4),
                    )
                    extra = {
                        "neighbour_model": nm,
                        "neighbour_batch": batch,
                        "p99_ms": round(float(r_both["p99_ms"]), 4),
                        "graph": "cuda",
                    }
                    out.append(interference_values(row, extra))
                    self.s.interference_rows += 1
                self.progress.advance(task)
        finally:
            out.close()
            for key in list(self.loaded):
                self.unload(key)


@contextmanager
def _progress(quiet: bool) -> Iterator[Any]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description:<44}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=False,
    ) as progress:
        yield progress


def model_partitions(spec: ModelSpec, partitions: Sequence[str]) -> tuple[str, ...]:
    """The partitions ``spec`` is measured in: every one, but no green context for an ONNX
    model. onnxruntime's CUDA provider selects its device with ``cudaSetDevice``, which makes
    the device's primary context current: a green context would neither confine nor time it
    (and the worker's green-context streams would not be valid in the primary context). Its MIG
    instances are then predicted from its other rows (``stgs.latency``)."""
    if spec.kind == "onnx":
        return tuple(p for p in partitions if not p.startswith("green:"))
    return tuple(partitions)


def grid_points(cfg: ProfileConfig, partitions: Sequence[str]) -> list[Point]:
    return [
        Point(m.name, part, b)
        for m in cfg.models
        for part in model_partitions(m, partitions)
        for b in cfg.batches
    ]


def run_profile(
    cfg: ProfileConfig,
    *,
    points: Sequence[Point] | None = None,
    factory: WorkerFactory | None = None,
) -> ProfileSummary:
    """Profile ``cfg.models`` over the grid (or the given ``points``); see the module docstring.

    Raises :class:`ProfilerError` (or a subclass) when the run cannot start (no GPU, no MPS
    binary for mps:* partitions, bad options). A model that does not load is recorded in
    ``summary.load_failures`` (its points in the failures file) and the other models are
    measured; the CLI then exits with status 2.
    """
    if not cfg.models:
        raise ProfilerError("no models to profile")
    if cfg.dtype not in ("fp16", "bf16", "fp32"):
        raise ProfilerError(f"dtype {cfg.dtype!r}: expected fp16, bf16 or fp32")
    if not cfg.cpu and not cfg.device.isdigit():
        raise ProfilerError(f"device {cfg.device!r}: expected a GPU index or 'cpu'")
    if cfg.cpu and cfg.partitions not in (None, ("full",)):
        raise ProfilerError("the CPU mode profiles the 'full' partition only")
    summary = ProfileSummary(out=cfg.out, failures_out=failures_path(cfg.out))
    t0 = time.monotonic()
    with _progress(cfg.quiet) as progress:
        run = _Run(cfg, factory or _default_factory, progress, summary)
        try:
            info = run.device_info()
            summary.device_name = str(info.get("name", ""))
            summary.torch = str(info.get("torch", ""))
            summary.sm_count = int(info.get("sm_count", 0))
            if not cfg.cpu:
                from profiler.gpu import driver_version, gpu_label

                summary.gpu = gpu_label(summary.device_name, float(info.get("memory_mib", 0)))
                summary.driver = driver_version()
            summary.gpu = cfg.gpu_label or ("cpu" if cfg.cpu else summary.gpu)
            if points is None:
                parts = run.partitions(info)
                points = grid_points(cfg, parts)
                onnx = [m.name for m in cfg.models if len(model_partitions(m, parts)) < len(parts)]
                if onnx:
                    summary.notes.append(
                        f"no green contexts for ONNX model(s) {', '.join(onnx)}: onnxruntime"
                        " runs in the device's primary context"
                    )
            done = measured_points(cfg.out)
            gpu = ProfileRow(summary.gpu, "x", "full", 1, 1, 1.0, 0.0).gpu  # normalised
            summary.gpu = gpu
            todo = [p for p in points if (gpu, p.model, p.partition, p.batch) not in done]
            summary.skipped = len(points) - len(todo)
            run.rows = CsvAppender(
                cfg.out, (*PROFILE_COLUMNS, *PROFILE_EXTRA), required=PROFILE_COLUMNS
            )
            run.run_points(todo)
            if cfg.interference and not cfg.cpu:
                run.run_interference()
        finally:
            run.close()
    summary.seconds = time.monotonic() - t0
    return summary
