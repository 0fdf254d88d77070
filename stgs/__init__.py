"""stgs core: domain types, GPU catalog, profiles and latency functions, plans, errors, config.

This package imports none of ``partitioner``, ``profiler`` or ``api`` (checked by import-linter).
"""

__version__ = "0.1.0"
