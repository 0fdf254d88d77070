"""Worker handles: the one place that starts measuring processes and talks to them.

:class:`Worker` is the interface the orchestrator uses (``request`` / ``close``);
:class:`SubprocessWorker` runs ``python -m profiler.worker`` in a given environment (plain, an
MPS client, a MIG device) with a reply timeout, so that a hung or crashed worker costs one point,
not the run. Tests substitute a fake with the same interface.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any, Protocol

from stgs import lifeline

__all__ = ["SubprocessWorker", "Worker", "WorkerDied", "WorkerTimeout"]


class WorkerDied(RuntimeError):
    """The worker process exited (crash, fatal CUDA error) before replying."""


class WorkerTimeout(RuntimeError):
    """The worker did not reply in time; it has been killed."""


class Worker(Protocol):
    def request(self, msg: Mapping[str, Any], timeout_s: float) -> dict[str, Any]: ...

    def send(self, msg: Mapping[str, Any]) -> None: ...

    def receive(self, timeout_s: float) -> dict[str, Any]: ...

    def close(self) -> None: ...

    @property
    def alive(self) -> bool: ...


def _pythonpath(env: dict[str, str]) -> None:
    root = str(Path(__file__).resolve().parents[1])
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root if not old else f"{root}{os.pathsep}{old}"


class SubprocessWorker:
    """``python -m profiler.worker DEVICE`` in ``env``; replies read by a thread."""

    def __init__(self, device: str, env: Mapping[str, str], start_timeout_s: float = 120.0) -> None:
        full_env = dict(env)
        _pythonpath(full_env)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (lives as long as the worker)
            prefix="stgs-worker-", suffix=".log", delete=False
        )
        self.log_path = Path(self._log.name)
        self._proc = lifeline.popen(
            [sys.executable, "-m", "profiler.worker", device],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=full_env,
            text=True,
            bufsize=1,
        )
        self._replies: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ready = self._wait(start_timeout_s)
        if not ready.get("ok"):
            self.close()
            raise WorkerDied(f"worker did not start: {ready.get('error', '?')}")

    def _read(self) -> None:
        assert self._proc.stdout is not None
        with suppress(ValueError, OSError):  # the pipe closed under us: the worker is gone
            for line in self._proc.stdout:
                self._replies.put(line)
        self._replies.put(None)

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def log_tail(self, n: int = 3) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in lines[-n:])

    def _wait(self, timeout_s: float) -> dict[str, Any]:
        try:
            line = self._replies.get(timeout=timeout_s)
        except queue.Empty:
            self.kill()
            raise WorkerTimeout(f"no reply within {timeout_s:.0f} s (worker killed)") from None
        if line is None:
            self._proc.wait()
            raise WorkerDied(
                f"worker exited with status {self._proc.returncode}: {self.log_tail() or 'no log'}"
            )
        reply: dict[str, Any] = json.loads(line)
        return reply

    def request(self, msg: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
        if not self.alive or self._proc.stdin is None:
            raise WorkerDied(f"worker is not running: {self.log_tail() or 'no log'}")
        try:
            self._proc.stdin.write(json.dumps(msg) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise WorkerDied(f"worker is gone: {self.log_tail() or exc}") from exc
        return self._wait(timeout_s)

    def send(self, msg: Mapping[str, Any]) -> None:
        """Send without waiting (co-location: start several workers at once)."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(msg) + "\n")
        self._proc.stdin.flush()

    def receive(self, timeout_s: float) -> dict[str, Any]:
        return self._wait(timeout_s)

    def kill(self) -> None:
        if self.alive:
            self._proc.kill()
        self._proc.wait()

    def close(self) -> None:
        if self.alive:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                with suppress(OSError):
                    pipe.close()
        self._log.close()
        self.log_path.unlink(missing_ok=True)
