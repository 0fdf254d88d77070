"""Profiling models on real GPUs (issue: `stgs profile`). Imports torch lazily."""
