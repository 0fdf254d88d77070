"""Shared pieces of the benchmark scripts (``python -m benchmarks.NAME`` from the repository
root): the load generators, probes, the run format and the fits."""
