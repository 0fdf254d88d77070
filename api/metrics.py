"""Prometheus metrics at ``/metrics``, named in the style of Triton (``nv_inference_*``) and
dcgm-exporter, with the ``stgs_`` prefix and units in the names.

Per model: ``stgs_inference_request_success_total``, ``stgs_inference_request_failure_total``
(by ``reason``), ``stgs_inference_count_total`` (samples),
``stgs_inference_request_duration_seconds`` (histogram), ``stgs_inference_slo_met_total``,
``stgs_slo_attainment_ratio`` (EWMA),
``stgs_inference_pending_requests`` (queued or running samples), ``stgs_model_request_rate_rps``
(measured, EWMA) and ``stgs_model_planned_rate_rps``.

Per partition (labels ``gpu``, ``partition``): ``stgs_partition_up`` (1 when ready),
``stgs_partition_planned_utilization_ratio`` (busy time / duty cycle of the plan),
``stgs_partition_memory_mib`` (planned), ``stgs_partition_restarts_total``,
``stgs_partition_requests_in_flight``. Per GPU: ``stgs_gpu_memory_total_mib``, ``stgs_gpu_healthy``,
``stgs_gpu_mig_enabled``. Reconfigurations: ``stgs_reconfigurations_total`` (by ``result``),
``stgs_reconfiguration_duration_seconds``. Controller: ``stgs_controller_replans_total``,
``stgs_controller_errors_total``. Process: ``stgs_process_stall_seconds`` (histogram of how
late a sleeping probe thread wakes, ``stgs/runtime/stalls.py``).

Measured SM utilisation per MIG instance (GPM on Hopper) is not exported yet: the backend
interface has no read for it (see docs/operations.md).

Each daemon has its own registry (several apps live in one test process). The per-partition
and per-GPU gauges are read at scrape time and tolerate a backend that does not answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from api.inference import LATENCY_BUCKETS, InferenceStats

if TYPE_CHECKING:
    from api.controller import Controller
    from api.service import Service

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # every answered request, in this process or a frontend: one collector (_Inference)
        self.inference = InferenceStats()
        self.inference_sources: list[Callable[[], InferenceStats]] = []
        r.register(_Inference(self))
        self.attainment = Gauge(
            "stgs_slo_attainment_ratio", "SLO attainment (EWMA) per model", ["model"], registry=r
        )
        self.pending = Gauge(
            "stgs_inference_pending_requests", "Samples queued or running", ["model"], registry=r
        )
        self.rate = Gauge(
            "stgs_model_request_rate_rps", "Measured arrival rate (EWMA)", ["model"], registry=r
        )
        self.planned_rate = Gauge(
            "stgs_model_planned_rate_rps", "Rate the current plan serves", ["model"], registry=r
        )
        labels = ["gpu", "partition"]
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
            "stgs_partition_memory_mib", "Partition memory in the plan (MiB)", labels, registry=r
        )
        self.part_restarts = Gauge(
            "stgs_partition_restarts_total", "Worker restarts of the partition", labels, registry=r
        )
        self.part_inflight = Gauge(
            "stgs_partition_requests_in_flight",
            "Requests sent to the worker, not answered",
            labels,
            registry=r,
        )
        ml = ["gpu", "partition", "model"]
        self.part_batches = Gauge(
            "stgs_partition_batches_total",
            "Batches the partition's worker ran for the model (since the worker started)",
            ml,
            registry=r,
        )
        self.part_run = Gauge(
            "stgs_partition_batch_run_seconds_total",
            "Run time of those batches (the runner's call: input copy, GPU, output copy)",
            ml,
            registry=r,
        )
        self.part_full = Gauge(
            "stgs_partition_full_batches_total",
            "Batches of the planned batch size the worker ran for the model",
            ml,
            registry=r,
        )
        self.part_full_run = Gauge(
            "stgs_partition_full_batch_run_seconds_total",
            "Run time of the full batches",
            ml,
            registry=r,
        )
        self.part_planned_batch = Gauge(
            "stgs_partition_planned_batch_seconds",
            "The plan's predicted latency of one full batch of the model on the partition",
            ml,
            registry=r,
        )
        self.gpu_mem = Gauge("stgs_gpu_memory_total_mib", "GPU memory (MiB)", ["gpu"], registry=r)
        self.gpu_healthy = Gauge(
            "stgs_gpu_healthy", "1 when the GPU is healthy", ["gpu"], registry=r
        )
        self.gpu_mig = Gauge("stgs_gpu_mig_enabled", "1 when MIG mode is on", ["gpu"], registry=r)
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

    # ------------------------------------------------------------------ scrape
    def refresh(self, service: Service, controller: Controller | None) -> None:
        """Read the live gauges; a failing read leaves those gauges empty, never raises."""
        for g in (
            self.part_up,
            self.part_util,
            self.part_mem,
            self.part_restarts,
            self.part_inflight,
            self.part_batches,
            self.part_run,
            self.part_full,
            self.part_full_run,
            self.part_planned_batch,
            self.rate,
            self.attainment,
            self.planned_rate,
            self.pending,
        ):
            g.clear()
        try:
            plan = service.runtime.current_plan
            if plan is not None:
                self.plan_gpus.set(plan.gpus_used)
                spare = plan.info.get("spare_factor", 1.0)
                self.plan_spare.set(float(spare) if isinstance(spare, int | float) else 1.0)
            for name, rate in service.planned_rates().items():
                self.planned_rate.labels(name).set(rate)
            with service.inflight.lock:
                for name, n in service.inflight.counts.items():
                    self.pending.labels(name).set(n)
            if controller is not None:
                for name, (rate, att) in controller.meter.snapshot().items():
                    self.rate.labels(name).set(rate)
                    self.attainment.labels(name).set(att)
            for p in list(service.runtime.partitions.values()):
                labels = (str(p.key.gpu), str(p.key))
                self.part_up.labels(*labels).set(1 if p.state.value == "ready" else 0)
                part = p.partition
                busy = sum(m.latency_ms for m in part.models)
                util = busy / part.duty_cycle_ms if part.duty_cycle_ms > 0 else 0.0
                self.part_util.labels(*labels).set(min(1.0, util))
                self.part_mem.labels(*labels).set(part.memory_mib)
                self.part_restarts.labels(*labels).set(p.restarts)
                w = p.worker
                self.part_inflight.labels(*labels).set(0 if w is None else w.transport.in_flight)
                for m in part.models:
                    self.part_planned_batch.labels(*labels, m.name).set(m.latency_ms / 1000.0)
                for name, st in ({} if w is None else w.transport.batch_stats).items():
                    self.part_batches.labels(*labels, name).set(st["batches"])
                    self.part_run.labels(*labels, name).set(st["run_ns"] / 1e9)
                    self.part_full.labels(*labels, name).set(st["full_batches"])
                    self.part_full_run.labels(*labels, name).set(st["full_run_ns"] / 1e9)
        except Exception:  # read path: tolerate, log
            log.exception("metrics: reading the runtime failed")
        try:
            for info in service.backend.gpus():
                g = str(info.index)
                self.gpu_mem.labels(g).set(info.memory_mib)
                self.gpu_healthy.labels(g).set(1 if info.healthy else 0)
                self.gpu_mig.labels(g).set(1 if info.mig_enabled else 0)
        except Exception:
            log.exception("metrics: reading the backend failed")

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Inference:
    """The inference families, from :meth:`Metrics.inference_totals` at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        totals = self.metrics.inference_totals().to_dict()
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
