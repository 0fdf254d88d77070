"""One worker process and its connection, as the supervisor sees it.

The supervisor makes a ``socketpair``, hands one end to the worker (``pass_fds``) and keeps the
other. The worker's end lives only in the worker, so the moment the worker dies, for whatever
reason (SIGKILL included), the kernel closes it and the daemon's reader sees end-of-file: the
requests in flight fail at once with :class:`~stgs.errors.WorkerDiedError`. The supervisor also
polls the process, for the rare death that leaves the socket open (a stuck child of the worker).
A worker that listens for data connections unlinks its socket file when it exits; for one that
was killed, the supervisor does.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from stgs.backend.base import Backend, DeviceRef
from stgs.runtime.transport import SocketTransport
from stgs.runtime.worker import WorkerSpec

__all__ = ["WorkerProcess"]

# How long after its drain deadline a stopped worker may take to exit before it is killed: the
# batch in flight and the exit itself.
STOP_GRACE_S = 1.0


class WorkerProcess:
    """A started worker: its process, its transport, and how to stop it."""

    def __init__(
        self,
        backend: Backend,
        ref: DeviceRef,
        mps_pct: int | None,
        spec: WorkerSpec,
        *,
        on_close: Callable[[SocketTransport], None] | None = None,
    ) -> None:
        self.ref = ref
        self.mps_pct = mps_pct
        self.spec = spec
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            argv = [
                sys.executable,
                "-m",
                "stgs.runtime",
                "--fd",
                str(child.fileno()),
                "--spec",
                spec.to_json(),
            ]
            self.proc: subprocess.Popen[bytes] = backend.spawn_worker(
                ref, mps_pct, argv, pass_fds=[child.fileno()]
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()  # the worker holds the only copy now
        self.transport = SocketTransport(
            parent, [m.name for m in spec.models], name=spec.name, on_close=on_close
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None and not self.transport.closed

    def reap(self, grace_s: float = 0.5) -> str:
        """After a lost connection: give the process ``grace_s`` to exit, kill it, say why."""
        try:
            self.proc.wait(grace_s)
            reason = self.exit_reason()
        except subprocess.TimeoutExpired:
            reason = f"worker pid {self.pid} lost its connection; killed"
        self.kill()
        return reason

    def exit_reason(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "connection lost"
        if code < 0:
            return f"worker pid {self.pid} killed by signal {-code}"
        return f"worker pid {self.pid} exited with status {code}"

    def wait_ready(self, timeout_s: float) -> bool:
        """True once the worker loaded its models; False if it died or the time ran out."""
        step = 0.05
        waited = 0.0
        while waited < timeout_s:
            if self.transport.ready.wait(step):
                return True
            waited += step
            if self.proc.poll() is not None:
                return self.transport.ready.is_set()
        return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Drain: the worker serves what it has queued, and its data clients until they hang
        up, for at most ``timeout_s`` (the STOP's deadline), then exits; killed if it has not
        exited ``STOP_GRACE_S`` after that."""
        if self.proc.poll() is None:
            self.transport.stop(deadline_ns=time.monotonic_ns() + int(timeout_s * 1e9))
            try:
                self.proc.wait(timeout_s + STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._gone()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._gone()

    def _gone(self) -> None:
        """The process has exited: fail what is in flight, remove a socket file it left."""
        self.transport.fail(self.exit_reason())
        if self.spec.listen is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spec.listen)
