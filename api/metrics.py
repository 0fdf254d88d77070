"""Prometheus metrics: stgs's own at ``/metrics``, Triton's ``nv_*`` names at ``/metrics/triton``.

``/metrics`` passes ``promtool check metrics``: counters end in ``_total``, units are base
units (``_seconds``, ``_bytes``, ``_ratio``, ``_requests_per_second``), no ``_created`` series,
and the labels are stable: ``gpu`` (index), ``partition`` (:attr:`PartitionKey.short_id
<stgs.transition.PartitionKey.short_id>`: its MIG place or kind and a hash of the key, the
same while a re-plan changes only rates), ``model``, ``reason``, ``result``. What a partition
is (kind, MIG profile, MPS share, models and batches) is in ``stgs_partition_info``, one
series per partition id, to join on. The full table, with the names they replace:
docs/operations.md.

``/metrics/triton`` carries the series Triton's dashboards read, named and typed as Triton
names them (``nv_inference_request_success``, ``nv_inference_request_duration_us``, ...,
labels ``model`` and ``version``; ``nv_gpu_*`` with ``gpu_uuid``). Those names are Triton's:
counters without ``_total`` and ``_us`` units, which ``promtool check metrics`` lints, hence
their own path (a second scrape job). Triton series stgs cannot fill (queue time, input and
output copies, cache, power) are left out, not exported as zeros.

Inference counts come from :class:`~api.inference.InferenceStats`: this process's and every
frontend's (reported about once a second, :mod:`api.dataplane`). Measured GPU and MIG-instance
utilisation and memory come from :meth:`stgs.backend.base.Backend.usage` (NVML); the simulated
node measures nothing and exports none of them.

Each daemon has its own registries (several apps live in one test process). The live gauges
are read at scrape time and tolerate a backend that does not answer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from api.inference import LATENCY_BUCKETS, InferenceStats

if TYPE_CHECKING:
    from api.controller import Controller
    from api.service import Service

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MIB = 1 << 20


def _go_float(v: float) -> str:
    """A sample value as Prometheus's text format writes it."""
    out: str = floatToGoString(v)  # type: ignore[no-untyped-call]
    return out


# No ``<counter>_created`` series (a gauge per counter and histogram that dashboards never read
# and that doubles the series count). Process-wide, like the environment variable
# PROMETHEUS_DISABLE_CREATED_SERIES.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # every answered request, in this process or a frontend: one collector (_Inference)
        self.inference = InferenceStats()
        self.inference_sources: list[Callable[[], InferenceStats]] = []
        r.register(_Inference(self))
        # counters read from the runtime at scrape time (worker lifetimes): _Live
        self._lock = threading.Lock()
        self._live: list[Metric] = []
        self._triton_live: list[Metric] = []
        self._exec_seen: dict[tuple[object, int | None, str], tuple[int, int]] = {}
        self._exec_total: dict[str, list[int]] = {}
        r.register(_Live(self))
        self.attainment = Gauge(
            "stgs_slo_attainment_ratio",
            "SLO attainment per model (EWMA of the share of requests within SLO)",
            ["model"],
            registry=r,
        )
        self.pending = Gauge(
            "stgs_inference_pending_requests", "Samples queued or running", ["model"], registry=r
        )
        self.rate = Gauge(
            "stgs_model_measured_requests_per_second",
            "Measured arrival rate (EWMA) the controller plans on",
            ["model"],
            registry=r,
        )
        self.planned_rate = Gauge(
            "stgs_model_planned_requests_per_second",
            "Rate the current plan serves",
            ["model"],
            registry=r,
        )
        self.model_ready = Gauge(
            "stgs_model_ready",
            "1 when a ready worker serves the registered model",
            ["model"],
            registry=r,
        )
        labels = ["gpu", "partition"]
        self.part_info = Gauge(
            "stgs_partition_info",
            "Always 1: what a partition id is (kind, MIG profile and start, MPS share, models"
            " with their batches)",
            [*labels, "kind", "mig_profile", "mps_percent", "models"],
            registry=r,
        )
        self.part_up = Gauge(
            "stgs_partition_up", "1 when the partition is ready", labels, registry=r
        )
        self.part_util = Gauge(
            "stgs_partition_planned_utilization_ratio",
            "Busy share of the partition's duty cycle in the plan",
            labels,
            registry=r,
        )
        self.part_mem = Gauge(
            "stgs_partition_planned_memory_bytes",
            "Partition memory in the plan",
            labels,
            registry=r,
        )
        self.part_inflight = Gauge(
            "stgs_partition_requests_in_flight",
            "Requests sent to the worker, not answered",
            labels,
            registry=r,
        )
        self.part_planned_batch = Gauge(
            "stgs_partition_planned_batch_seconds",
            "The plan's predicted latency of one full batch of the model on the partition",
            [*labels, "model"],
            registry=r,
        )
        self.gpu_mem = Gauge("stgs_gpu_memory_total_bytes", "GPU memory", ["gpu"], registry=r)
        self.gpu_healthy = Gauge(
            "stgs_gpu_healthy", "1 when the GPU is healthy", ["gpu"], registry=r
        )
        self.gpu_mig = Gauge("stgs_gpu_mig_enabled", "1 when MIG mode is on", ["gpu"], registry=r)
        self.gpu_used = Gauge(
            "stgs_gpu_memory_used_bytes",
            "GPU memory in use, measured (NVML; absent on the simulated node)",
            ["gpu"],
            registry=r,
        )
        self.gpu_util = Gauge(
            "stgs_gpu_utilization_ratio",
            "Share of the driver's last sample period in which a kernel ran on the GPU, measured"
            " (NVML; absent on the simulated node)",
            ["gpu"],
            registry=r,
        )
        ml = ["gpu", "mig_start", "mig_profile"]
        self.mig_used = Gauge(
            "stgs_mig_instance_memory_used_bytes",
            "MIG instance memory in use, measured (NVML)",
            ml,
            registry=r,
        )
        self.mig_total = Gauge(
            "stgs_mig_instance_memory_total_bytes", "MIG instance memory (NVML)", ml, registry=r
        )
        self.mig_util = Gauge(
            "stgs_mig_instance_utilization_ratio",
            "Share of time a kernel ran on the MIG instance, where the driver measures it",
            ml,
            registry=r,
        )
        self.plan_gpus = Gauge(
            "stgs_plan_gpus_used", "GPUs the current plan puts partitions on", registry=r
        )
        self.plan_spare = Gauge(
            "stgs_plan_spare_factor",
            "Room in the current plan: it holds its rates x this factor (1: none)",
            registry=r,
        )
        self.reconfigs = Counter(
            "stgs_reconfigurations", "Plan transitions by result", ["result"], registry=r
        )
        self.reconfig_duration = Histogram(
            "stgs_reconfiguration_duration_seconds",
            "Duration of plan transitions",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.plans = Counter(
            "stgs_planner_plans",
            "Plans asked of the planner by result (ok, timeout: over planner.time_budget_s,"
            " refused: rates above the node's bound, error)",
            ["result"],
            registry=r,
        )
        for result in ("ok", "timeout", "refused", "error"):
            self.plans.labels(result)  # every result from 0: rate() and alerts see them
        self.worker_failures = Counter(
            "stgs_worker_failures",
            "Workers that died or hung (each killed and restarted with back-off)",
            registry=r,
        )
        self.replans = Counter(
            "stgs_controller_replans", "Re-plans decided by the controller", registry=r
        )
        self.controller_errors = Counter(
            "stgs_controller_errors", "Controller steps that raised", registry=r
        )
        self.stall = Histogram(
            "stgs_process_stall_seconds",
            "How late the daemon's sleeping probe thread woke up (stgs/runtime/stalls.py): "
            "a stalling process or machine",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )

    # ------------------------------------------------------------------ hooks
    def on_request(self, model: str, n: int, seconds: float, slo_met: bool, error: str) -> None:
        """Every answered inference request, as its client saw it: the duration counts from the
        request's arrival at the server, and a request shed, timed out or failed is in the
        duration histogram (its ``_count`` is every answer) and never within SLO."""
        self.inference.record(model, n, seconds, slo_met, error)

    def inference_totals(self) -> InferenceStats:
        """This process's counts plus every source's (the frontends of the data plane)."""
        out = InferenceStats()
        out.add_stats(self.inference)
        for source in self.inference_sources:
            out.add_stats(source())
        return out

    def on_reconfig(self, ok: bool, seconds: float) -> None:
        self.reconfigs.labels("success" if ok else "failure").inc()
        self.reconfig_duration.observe(seconds)

    def on_plan(self, result: str) -> None:
        self.plans.labels(result).inc()

    # ------------------------------------------------------------------ scrape
    def refresh(self, service: Service, controller: Controller | None) -> None:
        """Read the live gauges; a failing read leaves those gauges empty, never raises."""
        for g in (
            self.part_info,
            self.part_up,
            self.part_util,
            self.part_mem,
            self.part_inflight,
            self.part_planned_batch,
            self.rate,
            self.attainment,
            self.planned_rate,
            self.pending,
            self.model_ready,
            self.gpu_mem,
            self.gpu_healthy,
            self.gpu_mig,
            self.gpu_used,
            self.gpu_util,
            self.mig_used,
            self.mig_total,
            self.mig_util,
        ):
            g.clear()
        restarts = CounterMetricFamily(
            "stgs_partition_restarts",
            "Worker restarts of the partition (since the partition started)",
            labels=["gpu", "partition"],
        )
        pml = ["gpu", "partition", "model"]
        batches = CounterMetricFamily(
            "stgs_partition_batches",
            "Batches the partition's worker ran for the model (since the worker started)",
            labels=pml,
        )
        run = CounterMetricFamily(
            "stgs_partition_batch_run_seconds",
            "Run time of those batches (the runner's call: input copy, GPU, output copy)",
            labels=pml,
        )
        full = CounterMetricFamily(
            "stgs_partition_full_batches",
            "Batches of the planned batch size the worker ran for the model",
            labels=pml,
        )
        full_run = CounterMetricFamily(
            "stgs_partition_full_batch_run_seconds", "Run time of the full batches", labels=pml
        )
        live: list[Metric] = [restarts, batches, run, full, full_run]
        pending: dict[str, int] = {}
        try:
            plan = service.runtime.current_plan
            if plan is not None:
                self.plan_gpus.set(plan.gpus_used)
                spare = plan.info.get("spare_factor", 1.0)
                self.plan_spare.set(float(spare) if isinstance(spare, int | float) else 1.0)
            for name, rate in service.planned_rates().items():
                self.planned_rate.labels(name).set(rate)
            with service.inflight.lock:
                pending = dict(service.inflight.counts)
            for name, n in pending.items():
                self.pending.labels(name).set(n)
            if controller is not None:
                for name, (rate, att) in controller.meter.snapshot().items():
                    self.rate.labels(name).set(rate)
                    self.attainment.labels(name).set(att)
            for rec in service.models():
                self.model_ready.labels(rec.name).set(1 if service.model_ready(rec.name) else 0)
            for p in list(service.runtime.partitions.values()):
                k = p.key
                labels = (str(k.gpu), k.short_id)
                self.part_info.labels(
                    *labels,
                    k.kind,
                    k.mig_profile or "",
                    "" if k.mps_pct is None else str(k.mps_pct),
                    ",".join(f"{m}x{b}" for m, b in k.models),
                ).set(1)
                self.part_up.labels(*labels).set(1 if p.state.value == "ready" else 0)
                part = p.partition
                busy = sum(m.latency_ms for m in part.models)
                util = busy / part.duty_cycle_ms if part.duty_cycle_ms > 0 else 0.0
                self.part_util.labels(*labels).set(min(1.0, util))
                self.part_mem.labels(*labels).set(part.memory_mib * MIB)
                restarts.add_metric(labels, p.restarts)
                w = p.worker
                self.part_inflight.labels(*labels).set(0 if w is None else w.transport.in_flight)
                for m in part.models:
                    self.part_planned_batch.labels(*labels, m.name).set(m.latency_ms / 1000.0)
                for name, st in ({} if w is None else dict(w.transport.batch_stats)).items():
                    batches.add_metric([*labels, name], st["batches"])
                    run.add_metric([*labels, name], st["run_ns"] / 1e9)
                    full.add_metric([*labels, name], st["full_batches"])
                    full_run.add_metric([*labels, name], st["full_run_ns"] / 1e9)
            self._count_executions(service)
        except Exception:  # read path: tolerate, log
            log.exception("metrics: reading the runtime failed")
        uuids: dict[int, str] = {}
        try:
            for info in service.backend.gpus():
                gpu = str(info.index)
                uuids[info.index] = info.uuid
                self.gpu_mem.labels(gpu).set(info.memory_mib * MIB)
                self.gpu_healthy.labels(gpu).set(1 if info.healthy else 0)
                self.gpu_mig.labels(gpu).set(1 if info.mig_enabled else 0)
        except Exception:
            log.exception("metrics: reading the backend failed")
        gpu_util = GaugeMetricFamily(
            "nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", labels=["gpu_uuid"]
        )
        gpu_total = GaugeMetricFamily(
            "nv_gpu_memory_total_bytes", "GPU total memory, in bytes", labels=["gpu_uuid"]
        )
        gpu_used = GaugeMetricFamily(
            "nv_gpu_memory_used_bytes", "GPU used memory, in bytes", labels=["gpu_uuid"]
        )
        try:
            for u in service.backend.usage():
                gpu = str(u.ref.gpu)
                if u.ref.mig_start is None:
                    self.gpu_used.labels(gpu).set(u.memory_used_bytes)
                    if u.utilization is not None:
                        self.gpu_util.labels(gpu).set(u.utilization)
                    uuid = uuids.get(u.ref.gpu, "")
                    if uuid:
                        gpu_total.add_metric([uuid], u.memory_total_bytes)
                        gpu_used.add_metric([uuid], u.memory_used_bytes)
                        if u.utilization is not None:
                            gpu_util.add_metric([uuid], u.utilization)
                    continue
                ml = (gpu, str(u.ref.mig_start), u.mig_profile or "")
                self.mig_used.labels(*ml).set(u.memory_used_bytes)
                self.mig_total.labels(*ml).set(u.memory_total_bytes)
                if u.utilization is not None:
                    self.mig_util.labels(*ml).set(u.utilization)
        except Exception:
            log.exception("metrics: reading the GPUs' usage failed")
        triton = self._triton_families(service, pending)
        with self._lock:
            self._live = live
            self._triton_live = [*triton, gpu_util, gpu_total, gpu_used]

    def _count_executions(self, service: Service) -> None:
        """Per model, batches run and their run time, monotone across worker restarts and plan
        changes (each worker's counts start at 0; a worker's last batches before it stopped,
        since the previous scrape, are not counted)."""
        seen: dict[tuple[object, int | None, str], tuple[int, int]] = {}
        with self._lock:
            for p in list(service.runtime.partitions.values()):
                w = p.worker
                if w is None:
                    continue
                for name, st in dict(w.transport.batch_stats).items():
                    key = (p.key, w.pid, name)
                    now = (int(st.get("batches", 0)), int(st.get("run_ns", 0)))
                    last = self._exec_seen.get(key, (0, 0))
                    if now[0] < last[0] or now[1] < last[1]:
                        last = (0, 0)
                    total = self._exec_total.setdefault(name, [0, 0])
                    total[0] += now[0] - last[0]
                    total[1] += now[1] - last[1]
                    seen[key] = now
            self._exec_seen = seen

    def _triton_families(self, service: Service, pending: dict[str, int]) -> list[Metric]:
        """Triton's per-model inference series, named and typed as Triton does."""

        def family(name: str, doc: str, typ: str = "counter") -> Metric:
            return Metric(name, doc, typ)

        fams = {
            "success": family(
                "nv_inference_request_success", "Number of successful inference requests"
            ),
            "failure": family(
                "nv_inference_request_failure", "Number of failed inference requests"
            ),
            "count": family("nv_inference_count", "Number of inferences performed"),
            "exec": family("nv_inference_exec_count", "Number of model executions performed"),
            "duration": family(
                "nv_inference_request_duration_us",
                "Cumulative inference request duration in microseconds (successful requests)",
            ),
            "infer": family(
                "nv_inference_compute_infer_duration_us",
                "Cumulative compute inference duration in microseconds (stgs: per execution,"
                " the batches' run time)",
            ),
            "pending": family(
                "nv_inference_pending_request_count",
                "Instantaneous number of pending requests awaiting execution",
                "gauge",
            ),
        }
        totals = self.inference_totals().to_dict()
        with self._lock:
            execs = {k: list(v) for k, v in self._exec_total.items()}
        versions: dict[str, str] = {}
        try:
            for rec in service.models():
                # the served version: a repository model's is its source's last part
                # (api.inference.model_io), every other model's is 1
                source = str(rec.spec.get("source") or "")
                repo = source.startswith("repository:")
                versions[rec.name] = source.rsplit("/", 1)[-1] if repo else "1"
        except Exception:
            log.exception("metrics: listing the models failed")
        names = set(totals) | set(execs) | set(pending) | set(versions)
        for name in sorted(names):
            version = versions.get(name, "1")  # unregistered since
            lab = {"model": name, "version": version}
            st = totals.get(name, {})
            ok = int(st.get("ok", 0))
            n_exec, run_ns = execs.get(name, [0, 0])
            values: Iterable[tuple[str, float]] = (
                ("success", ok),
                ("failure", int(st.get("requests", 0)) - ok),
                ("count", int(st.get("samples", 0))),
                ("exec", n_exec),
                ("duration", float(st.get("ok_duration_sum_s", 0.0)) * 1e6),
                ("infer", run_ns / 1e3),
                ("pending", pending.get(name, 0)),
            )
            for key, value in values:
                fams[key].add_sample(fams[key].name, lab, value)
        return list(fams.values())

    def live(self) -> list[Metric]:
        with self._lock:
            return list(self._live)

    def triton_live(self) -> list[Metric]:
        with self._lock:
            return list(self._triton_live)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def render_triton(self) -> bytes:
        """Triton's text: a counter's ``# TYPE`` line names it as its samples do (no
        ``_total``, which prometheus_client's writer would add)."""
        return _exposition(self.triton_live())


def _escape(value: str, quote: bool) -> str:
    out = value.replace("\\", "\\\\").replace("\n", "\\n")
    return out.replace('"', '\\"') if quote else out


def _exposition(families: Iterable[Metric]) -> bytes:
    """Text format 0.0.4 of ``families``, each sample under its own name, as is."""
    lines = []
    for f in families:
        lines.append(f"# HELP {f.name} {_escape(f.documentation, False)}")
        lines.append(f"# TYPE {f.name} {f.type}")
        for smp in f.samples:
            labels = ",".join(f'{k}="{_escape(v, True)}"' for k, v in smp.labels.items())
            lines.append(
                f"{smp.name}{{{labels}}} {_go_float(smp.value)}"
                if labels
                else f"{smp.name} {_go_float(smp.value)}"
            )
    return ("\n".join(lines) + "\n").encode()


class _Live:
    """The counters read from the runtime at the last :meth:`Metrics.refresh`."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics.live()


class _Inference:
    """The inference families, from :meth:`Metrics.inference_totals` at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        totals: dict[str, dict[str, Any]] = self.metrics.inference_totals().to_dict()
        success = CounterMetricFamily(
            "stgs_inference_request_success", "Successful inference requests", labels=["model"]
        )
        failure = CounterMetricFamily(
            "stgs_inference_request_failure",
            "Failed inference requests (shed, timed out, no worker, invalid, ...)",
            labels=["model", "reason"],
        )
        samples = CounterMetricFamily(
            "stgs_inference_count",
            "Samples inferred (a request may carry several)",
            labels=["model"],
        )
        met = CounterMetricFamily(
            "stgs_inference_slo_met",
            "Requests answered successfully within their SLO (from arrival at the server)",
            labels=["model"],
        )
        duration = HistogramMetricFamily(
            "stgs_inference_request_duration_seconds",
            "Inference request latency from arrival at the server to the answer, every answer"
            " (successes, shed, timed out, failed)",
            labels=["model"],
        )
        for model, st in sorted(totals.items()):
            success.add_metric([model], st["ok"])
            samples.add_metric([model], st["samples"])
            met.add_metric([model], st["slo_met"])
            for kind, n in sorted(st["errors"].items()):
                failure.add_metric([model, kind], n)
            cum = 0
            buckets = []
            for le, n in zip((*LATENCY_BUCKETS, float("inf")), st["duration_buckets"], strict=True):
                cum += n
                buckets.append(("+Inf" if le == float("inf") else repr(le), cum))
            duration.add_metric([model], buckets, sum_value=st["duration_sum_s"])
        yield from (success, failure, samples, met, duration)
