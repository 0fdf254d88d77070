"""MPS control daemons: one per GPU (MIG off) or per MIG instance, run by stgs.

Each daemon gets its own directories under the runtime directory (never /tmp, so that it works
under systemd's private tmp)::

    <runtime_dir>/mps/<device uuid>/pipe    CUDA_MPS_PIPE_DIRECTORY (the daemon's and clients')
    <runtime_dir>/mps/<device uuid>/log     CUDA_MPS_LOG_DIRECTORY

and runs with ``CUDA_VISIBLE_DEVICES=<device uuid>``. Commands go to the control daemon on stdin
of ``nvidia-cuda-mps-control`` with the same environment: ``get_server_list``,
``get_client_list <server pid>``, ``quit``. A client's share is its own
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (set by the backend in the worker's environment), so a
share change is a new client process.

Only the backends use this module; the command runner is injectable for tests.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from stgs.backend.base import DeviceRef, MpsDaemonInfo
from stgs.errors import InUseError, MpsError

__all__ = ["MpsControl", "RunResult"]


@dataclass(frozen=True)
class RunResult:
    returncode: int
    stdout: str
    stderr: str


Runner = Callable[[Sequence[str], str, dict[str, str], float], RunResult]


def _subprocess_runner(
    argv: Sequence[str], stdin: str, env: dict[str, str], timeout: float
) -> RunResult:
    import os

    full = {**os.environ, **env}
    try:
        cp = subprocess.run(
            list(argv),
            input=stdin,
            env=full,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise MpsError(f"{argv[0]} not found: is the CUDA MPS control binary installed?") from exc
    except subprocess.TimeoutExpired as exc:
        raise MpsError(f"{' '.join(argv)} did not answer within {timeout:g} s") from exc
    return RunResult(cp.returncode, cp.stdout, cp.stderr)


class MpsControl:
    """Start, query and stop MPS control daemons pinned to GPUs or MIG instances."""

    def __init__(
        self,
        runtime_dir: Path,
        *,
        binary: str = "nvidia-cuda-mps-control",
        runner: Runner = _subprocess_runner,
        timeout_s: float = 10.0,
    ) -> None:
        self.runtime_dir = Path(runtime_dir)
        self.binary = binary
        self._run = runner
        self.timeout_s = timeout_s
        self.daemons: dict[DeviceRef, MpsDaemonInfo] = {}

    def dirs(self, device_uuid: str) -> tuple[Path, Path]:
        base = self.runtime_dir / "mps" / device_uuid
        return base / "pipe", base / "log"

    def env(self, device_uuid: str) -> dict[str, str]:
        pipe, logd = self.dirs(device_uuid)
        return {
            "CUDA_VISIBLE_DEVICES": device_uuid,
            "CUDA_MPS_PIPE_DIRECTORY": str(pipe),
            "CUDA_MPS_LOG_DIRECTORY": str(logd),
        }

    def command(self, device_uuid: str, cmd: str) -> str:
        res = self._run([self.binary], cmd + "\n", self.env(device_uuid), self.timeout_s)
        if res.returncode != 0:
            raise MpsError(
                f"MPS control of {device_uuid}: '{cmd}' failed ({res.returncode}): "
                f"{(res.stderr or res.stdout).strip()}"
            )
        return res.stdout

    def alive(self, device_uuid: str) -> bool:
        try:
            self.command(device_uuid, "get_server_list")
        except MpsError:
            return False
        return True

    def start(self, ref: DeviceRef, device_uuid: str) -> MpsDaemonInfo:
        """Start the daemon of ``device_uuid`` unless it runs already; idempotent."""
        pipe, logd = self.dirs(device_uuid)
        known = self.daemons.get(ref)
        if known is not None and known.device_uuid == device_uuid and self.alive(device_uuid):
            return known
        if not self.alive(device_uuid):
            pipe.mkdir(parents=True, exist_ok=True, mode=0o700)
            logd.mkdir(parents=True, exist_ok=True, mode=0o700)
            res = self._run([self.binary, "-d"], "", self.env(device_uuid), self.timeout_s)
            if res.returncode != 0 and not self._answers_within(device_uuid, 2.0):
                said = (res.stderr or res.stdout).strip()
                raise MpsError(
                    f"could not start the MPS daemon for {device_uuid} (exit {res.returncode})"
                    f"{': ' + said if said else ''}; {logd / 'control.log'} ends:"
                    f" {_log_tail(logd / 'control.log') or '(empty)'}"
                )
            end = time.monotonic() + self.timeout_s
            while not self.alive(device_uuid):
                if time.monotonic() > end:
                    raise MpsError(f"MPS daemon for {device_uuid} started but does not answer")
                time.sleep(0.05)
        info = MpsDaemonInfo(ref, device_uuid, pipe, logd, _read_pid(pipe))
        self.daemons[ref] = info
        return info

    def _answers_within(self, device_uuid: str, seconds: float) -> bool:
        """Whether the daemon answers within ``seconds``: ``-d`` may exit non-zero although
        the daemon it forked goes on to listen (then it is used, not started twice)."""
        end = time.monotonic() + seconds
        while True:
            if self.alive(device_uuid):
                return True
            if time.monotonic() > end:
                return False
            time.sleep(0.1)

    def clients(self, device_uuid: str) -> list[int]:
        """PIDs of the clients of every MPS server under this daemon."""
        out: list[int] = []
        for server in parse_pids(self.command(device_uuid, "get_server_list")):
            out.extend(parse_pids(self.command(device_uuid, f"get_client_list {server}")))
        return out

    def stop(self, ref: DeviceRef) -> None:
        """``quit`` the daemon of ``ref``; refuses while it has clients."""
        info = self.daemons.get(ref)
        if info is None:
            return
        if self.alive(info.device_uuid):
            users = self.clients(info.device_uuid)
            if users:
                raise InUseError(f"MPS daemon on {ref} still has clients (pids {users})")
            self.command(info.device_uuid, "quit")
            end = time.monotonic() + self.timeout_s
            while self.alive(info.device_uuid):
                if time.monotonic() > end:
                    raise MpsError(f"MPS daemon on {ref} did not quit")
                time.sleep(0.05)
        del self.daemons[ref]


def parse_pids(text: str) -> list[int]:
    """PIDs from a ``get_server_list`` / ``get_client_list`` answer (one per line)."""
    out = []
    for line in text.split():
        line = line.strip()
        if line.isdigit():
            out.append(int(line))
    return out


def _log_tail(path: Path, lines: int = 5) -> str:
    """The last lines of an MPS log, joined with " | " ("" where it cannot be read)."""
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _read_pid(pipe: Path) -> int | None:
    for name in ("nvidia-cuda-mps-control.pid", "control.pid"):
        try:
            return int((pipe / name).read_text().strip())
        except (OSError, ValueError):
            continue
    return None
