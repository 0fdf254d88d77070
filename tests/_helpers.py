"""Helpers shared by test modules (``from _helpers import ...``; pytest puts tests/ on the path)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python ARGS...`` in the repository root, its output captured as text; asserts exit 0
    (the message: the tails of its stdout and stderr)."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
