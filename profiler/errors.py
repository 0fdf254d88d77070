"""Errors of the profiler, in the one stgs exception tree.

    StgsError
    └── ConfigError                 (CLI exit 2)
        └── ProfilerError           the profiler cannot run as asked
            ├── NoGpuError          no CUDA device (or not the one asked for)
            ├── MpsUnavailableError no ``nvidia-cuda-mps-control``, or its daemon did not start
            └── ModelLoadError      a model spec that does not resolve, build or load

A failure at one measured point is *not* raised: it is recorded (``<out>.failures.csv``) and the
run goes on.
"""

from __future__ import annotations

from stgs.errors import ConfigError


class ProfilerError(ConfigError):
    """The profiler cannot run as asked (bad options, missing hardware or tools)."""


class NoGpuError(ProfilerError):
    """No CUDA device is available (or the index asked for does not exist)."""


class MpsUnavailableError(ProfilerError):
    """MPS partitions were asked for but the MPS control binary is missing or did not start."""


class ModelLoadError(ProfilerError):
    """A model spec that is unknown, or a model that does not build or load."""
