"""Run ``stgs serve`` as a subprocess with a throw-away config and state directory.

Shared by the demo (``scripts/demo.py``), the GPU flow (``benchmarks/daemon_gpu.py``) and the
end-to-end test: a free loopback port, a bearer token, a TOML config, the daemon's log in the
work directory, and a wait that fails fast when the daemon exits.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

ROOT = Path(__file__).resolve().parent.parent

ONE_SIMULATED_GPU = """
[backend]
kind = "simulated"
simulated_gpus = [{ sku = "H100-80GB", count = 1, mig = false }]
[controller]
interval_s = 3600.0
"""
"""``LocalDaemon`` sections: one simulated H100 without MIG (CPU workers), and a controller that
never re-plans on its own (load tests and fault tests measure the runtime, not re-plans)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    what: str, fn: Callable[[], Any], timeout_s: float, proc: subprocess.Popen[bytes]
) -> Any:
    """Poll ``fn`` until it returns something true; RuntimeError on timeout or daemon exit."""
    end = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited ({proc.returncode}) waiting for {what}")
        try:
            last = fn()
            if last:
                return last
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}: last {last!r}")


@dataclass
class LocalDaemon:
    """A daemon config in ``work`` (token, state, runtime and model dirs) and its processes."""

    work: Path
    sections: str  # TOML after [server] and [paths]: [backend], [controller], ...
    server_options: str = ""  # more [server] lines: "header_timeout_s = 2\n", ...
    port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: "local-" + os.urandom(12).hex())
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _log: IO[bytes] | None = None

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "token").write_text(self.token + "\n")
        self.config.write_text(
            f'[server]\nport = {self.port}\ngrpc_port = {self.grpc_port}\ntoken_file = "token"\n'
            + self.server_options
            + '[paths]\nstate_dir = "state"\nruntime_dir = "run"\nmodel_dir = "models"\n'
            + self.sections
        )

    @property
    def config(self) -> Path:
        return self.work / "stgs.toml"

    @property
    def log_path(self) -> Path:
        return self.work / "daemon.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(
        self, env: dict[str, str] | None = None, args: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        """``stgs serve --config <work>/stgs.toml [args]`` (``--model-repository DIR``)."""
        if self._log is None:
            self._log = self.log_path.open("ab")
        e = {**os.environ, "PYTHONUNBUFFERED": "1"}
        e.pop("NOTIFY_SOCKET", None)  # not this process's systemd, unless ``env`` says so
        e.update(env or {})
        p = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--config", str(self.config), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=e,
        )
        self.procs.append(p)
        return p

    def start_ready(
        self, timeout_s: float = 60.0, env: dict[str, str] | None = None, args: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        """:meth:`start`, then wait until ``/v2/health/ready`` answers 200 (RuntimeError when the
        process exits first or ``timeout_s`` passes)."""
        p = self.start(env, args)
        with self.client() as c:
            wait_until("ready", lambda: c.get("/v2/health/ready").status_code == 200, timeout_s, p)
        return p

    def start_serving(
        self,
        model: str,
        slo_ms: float,
        rate_rps: float,
        timeout_s: float = 120.0,
        extra: dict[str, Any] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start the daemon, register ``model`` over REST (profiled in the background on the
        simulated node) and return once it serves (``/v2/models/{model}/ready``). ``extra``:
        more registration fields (``source``, ``inputs``)."""
        p = self.start_ready()
        self.register(model, slo_ms, rate_rps, timeout_s, extra)
        return p

    def register(
        self,
        model: str,
        slo_ms: float,
        rate_rps: float,
        timeout_s: float = 120.0,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Register ``model`` over REST on the running daemon and wait until it serves."""
        p = self.procs[-1]
        with self.client() as c:
            body = {"name": model, "slo_ms": slo_ms, "rate_rps": rate_rps, **(extra or {})}
            r = c.post("/v1/models", json=body)
            if r.status_code not in (201, 202):
                raise RuntimeError(f"registering {model}: {r.status_code} {r.text}")

            def served() -> bool:
                if c.get(f"/v2/models/{model}/ready").status_code == 200:
                    return True
                got = c.get(f"/v1/models/{model}").json()
                if got.get("status") in ("failed", "refused"):
                    raise RuntimeError(f"{model}: {got['status']}: {got.get('detail')}")
                return False

            wait_until(f"{model} served", served, timeout_s, p)

    def wait_all_ready(self, timeout_s: float = 120.0) -> None:
        """Wait until every registered model is ready; RuntimeError naming any registration
        that failed or was refused, or on timeout."""
        p = self.procs[-1]
        with self.client() as c:

            def ready() -> bool:
                ms = c.get("/v1/models").json()
                bad = [m for m in ms if m["status"] in ("failed", "refused")]
                if bad:
                    raise RuntimeError(f"registration failed: {bad}")
                return all(m["ready"] for m in ms)

            wait_until("every model ready", ready, timeout_s, p)

    def client(self, timeout_s: float = 60.0) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=timeout_s,
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM every process still running (then SIGKILL), close the log."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
