"""The MPS door of the profiler: its own MPS control daemon, and the client environments.

:class:`MpsDaemon` starts ``nvidia-cuda-mps-control -d`` with private pipe and log directories
(a temporary directory) and quits it (``echo quit | nvidia-cuda-mps-control``) at the end; with
``pipe_dir`` it uses a running daemon instead (the stgs daemon's own) and neither starts nor
quits it. Shares are set per client process (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``): a share
is fixed when the client connects, so each share is its own worker process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from profiler.errors import MpsUnavailableError

__all__ = ["MPS_CONTROL", "MpsDaemon", "mps_available", "visible_devices_env"]

MPS_CONTROL = "nvidia-cuda-mps-control"


def mps_available() -> bool:
    return shutil.which(MPS_CONTROL) is not None


def visible_devices_env(device: int | str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment that shows one GPU (index into the caller's own ``CUDA_VISIBLE_DEVICES`` if
    set, or a ``MIG-<uuid>``) as device 0."""
    env = dict(os.environ if base is None else base)
    dev = str(device)
    if not dev.startswith(("MIG-", "GPU-")):
        outer = env.get("CUDA_VISIBLE_DEVICES")
        if outer:
            parts = [p.strip() for p in outer.split(",") if p.strip()]
            if int(dev) < len(parts):
                dev = parts[int(dev)]
    env["CUDA_VISIBLE_DEVICES"] = dev
    return env


class MpsDaemon:
    """An MPS control daemon for one GPU; a context manager (``start`` / ``stop``)."""

    def __init__(self, device: int | str, pipe_dir: str | os.PathLike[str] | None = None) -> None:
        self.device = device
        self.owned = pipe_dir is None
        self._tmp: Path | None = None
        self.pipe_dir: Path | None = Path(pipe_dir) if pipe_dir is not None else None
        self.log_dir: Path | None = None

    def _env(self) -> dict[str, str]:
        assert self.pipe_dir is not None
        env = visible_devices_env(self.device)
        env["CUDA_MPS_PIPE_DIRECTORY"] = str(self.pipe_dir)
        if self.log_dir is not None:
            env["CUDA_MPS_LOG_DIRECTORY"] = str(self.log_dir)
        return env

    def start(self) -> MpsDaemon:
        if not self.owned:
            if self.pipe_dir is None or not self.pipe_dir.is_dir():
                raise MpsUnavailableError(f"MPS pipe directory {self.pipe_dir} does not exist")
            return self
        exe = shutil.which(MPS_CONTROL)
        if exe is None:
            raise MpsUnavailableError(
                f"MPS partitions need {MPS_CONTROL} on PATH (NVIDIA driver utilities); "
                "profile without mps:* partitions or install it"
            )
        self._tmp = Path(tempfile.mkdtemp(prefix="stgs-mps-"))
        self.pipe_dir, self.log_dir = self._tmp / "pipe", self._tmp / "log"
        self.pipe_dir.mkdir()
        self.log_dir.mkdir()
        r = subprocess.run(
            [exe, "-d"], env=self._env(), capture_output=True, text=True, check=False
        )
        if r.returncode != 0:
            self._cleanup()
            raise MpsUnavailableError(
                f"{MPS_CONTROL} -d failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()}"
            )
        deadline = time.monotonic() + 10.0
        while not (self.pipe_dir / "control").exists():
            if time.monotonic() > deadline:
                log = self.log_tail()
                self.stop()
                raise MpsUnavailableError(f"the MPS control daemon did not start: {log}")
            time.sleep(0.05)
        return self

    def client_env(self, pct: float) -> dict[str, str]:
        """Environment of a client process at ``pct`` percent of the SMs."""
        env = self._env()
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = f"{pct:g}"
        return env

    def log_tail(self, n: int = 5) -> str:
        if self.log_dir is None:
            return ""
        f = self.log_dir / "control.log"
        try:
            return " | ".join(f.read_text(errors="replace").strip().splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.owned and self.pipe_dir is not None and (self.pipe_dir / "control").exists():
            exe = shutil.which(MPS_CONTROL) or MPS_CONTROL
            subprocess.run(
                [exe],
                input="quit\n",
                env=self._env(),
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            deadline = time.monotonic() + 10.0
            while (self.pipe_dir / "control").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        self._cleanup()

    def _cleanup(self) -> None:
        if self.owned and self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> MpsDaemon:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
