"""The simulator and ``stgs compare``: the same policies and latency functions as the daemon,
a virtual clock instead of workers (see docs/simulator.md)."""

from partitioner.sim.config import ControllerOptions, ReconfigCosts, SimOptions
from partitioner.sim.engine import NoiseModel, SimResult, Simulator, runtime_buckets
from partitioner.sim.metrics import RunMetrics, compute_metrics
from partitioner.sim.run import fit_noise, simulate
from partitioner.sim.workload import WorkloadSpec, generate

__all__ = [
    "ControllerOptions",
    "NoiseModel",
    "ReconfigCosts",
    "RunMetrics",
    "SimOptions",
    "SimResult",
    "Simulator",
    "WorkloadSpec",
    "compute_metrics",
    "fit_noise",
    "generate",
    "runtime_buckets",
    "simulate",
]
