"""``stgs serve``: config -> store -> backend -> runtime -> service -> controller -> uvicorn.

Start-up order: open the SQLite store in ``paths.state_dir``; pick the backend (``auto``: NVML
when a GPU answers, else the simulated node of ``backend.simulated_gpus``, whose workers run on
the CPU); start the runtime's monitor (it notices dead and hung workers within a second, fails
their partitions and restarts them with back-off, each step in the event log); serve HTTP at
once (``/v2/health/live`` answers while the state is restored); restore in the background (the
last good plan, else a fresh plan, so every registered model serves again); then tell systemd
``READY=1`` and start the controller.

systemd (``Type=notify``): ``READY=1`` once restored, ``STATUS=`` lines as things happen,
``WATCHDOG=1`` every half ``WATCHDOG_USEC`` while the controller loop is alive, ``STOPPING=1`` at
shutdown. SIGTERM (uvicorn's handler) stops the controller, the workers and the backend.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api import logs
from api.app import AppContext, create_app
from api.config import DaemonConfig, read_token
from api.controller import Controller, LoadMeter
from api.limits import uvicorn_config
from api.metrics import Metrics
from api.service import Observer, Service
from api.store import Store
from profiler.adapters import clean_stale_profiling, cpu_profiler, gpu_profiler
from stgs.backend.base import Backend, DeviceRef
from stgs.backend.simulated import SimulatedNode
from stgs.errors import BackendError, ConfigError
from stgs.hostmem import keep_large_buffers
from stgs.runtime import Runtime
from stgs.runtime.stalls import StallProbe

log = logging.getLogger("stgs.daemon")

LOOPBACK = ("127.0.0.1", "::1", "localhost")


STATUS_INTERVAL_S = 2.0  # how often the daemon's systemd STATUS line is brought up to date


def sd_notify(message: str) -> bool:
    """Send ``message`` to systemd's $NOTIFY_SOCKET; False when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", message.split("\n")[0], exc)
        return False
    return True


def make_backend(cfg: DaemonConfig) -> tuple[Backend, str, list[bool] | None]:
    """(backend, kind, per-GPU MIG permission or None for 'as the SKU allows')."""
    kind = cfg.backend.kind
    cfg.paths.runtime_dir.mkdir(parents=True, exist_ok=True)
    if kind in ("auto", "nvml"):
        try:
            from stgs.backend.nvml import NvmlBackend

            nv = NvmlBackend(cfg.paths.runtime_dir)
            if nv.gpus():
                return nv, "nvml", None
            nv.close()
            if kind == "nvml":
                raise ConfigError("backend.kind = nvml, but NVML reports no GPU")
        except (BackendError, ImportError) as exc:
            if kind == "nvml":
                raise ConfigError(f"backend.kind = nvml: {exc}") from exc
            log.info("no GPU through NVML (%s): using the simulated node", exc)
    names: list[str] = []
    mig: list[bool] = []
    for g in cfg.backend.simulated_gpus:
        names += [g.sku] * g.count
        mig += [g.mig] * g.count
    node = SimulatedNode(names, runtime_dir=cfg.paths.runtime_dir / "sim")
    return node, "simulated", mig


def _node_mps_pipe(backend: Backend, gpu: int) -> Callable[[], Path] | None:
    """The profiler's MPS door on ``gpu``: the node's own control daemon there (started, or
    found running, by the backend, which the runtime's plans share), not a second one that would
    fail to start beside it. None on a MIG-enabled GPU (no MPS on the whole GPU there)."""
    info = next((g for g in backend.gpus() if g.index == gpu), None)
    if info is None or info.mig_enabled:
        return None
    return lambda: backend.start_mps(DeviceRef(gpu)).pipe_dir


@dataclass
class Daemon:
    cfg: DaemonConfig
    store: Store
    backend: Backend
    runtime: Runtime
    service: Service
    controller: Controller
    metrics: Metrics
    ctx: AppContext
    stall_probe: StallProbe

    def on_frontend_stats(self, model: str, delta: dict[str, float]) -> None:
        """A frontend's answers since its last report: the controller's load meter sees the
        offered load, shed requests included, and the share within SLO."""
        meter = self.controller.meter
        n, met = int(delta.get("requests", 0)), int(delta.get("slo_met", 0))
        meter.arrived(model, n)
        meter.finished(model, met, True)
        meter.finished(model, n - met, False)

    def close(self) -> None:
        self.stall_probe.stop()
        self.controller.stop()
        self.service.close()
        self.runtime.close()
        self.backend.close()
        self.store.close()


def build(cfg: DaemonConfig, *, background: bool = True) -> Daemon:
    token = read_token(cfg)
    cfg.paths.state_dir.mkdir(parents=True, exist_ok=True)
    store = Store(cfg.paths.state_dir / "stgs.db")
    backend, kind, mig = make_backend(cfg)
    metrics = Metrics()

    def on_worker_event(kind: str, message: str, data: dict[str, Any]) -> None:
        store.log_event(kind, message, **data)
        if kind == "worker_failed":
            metrics.worker_failures.inc()

    w = cfg.workers
    runtime = Runtime(
        backend,
        ready_timeout_s=w.ready_timeout_s,
        drain_timeout_s=w.drain_timeout_s,
        hang_grace_s=w.hang_grace_s,
        restart_limit=w.restart_limit,
        on_event=on_worker_event,
        # with frontends, every worker listens for their data connections
        data_dir=cfg.paths.runtime_dir / "w" if cfg.server.frontend_count() else None,
    )
    meter = LoadMeter(cfg.controller.rate_halflife_s)

    def on_request(model: str, n: int, secs: float, met: bool, error: str) -> None:
        metrics.on_request(model, n, secs, met, error)
        meter.arrived(model, n)
        meter.finished(model, n, met)

    profiling_dir = cfg.paths.state_dir / "profiling"
    stale = clean_stale_profiling(profiling_dir)
    if stale:
        log.info("removed %d stale profiling dir(s) of a killed run: %s", len(stale), stale)
    profiler = (
        cpu_profiler(profiling_dir)
        if kind == "simulated"
        else gpu_profiler(profiling_dir, mps_pipe_dir=_node_mps_pipe(backend, 0))
    )
    service = Service(
        cfg,
        store,
        backend,
        runtime,
        profiler=profiler,
        observer=Observer(
            on_request=on_request, on_reconfig=metrics.on_reconfig, on_plan=metrics.on_plan
        ),
        background=background,
        mig_allowed=mig,
    )
    controller = Controller(service, cfg.controller, meter=meter)
    controller.on_replan = lambda _r: metrics.replans.inc()
    controller.on_error = metrics.controller_errors.inc
    stall_probe = StallProbe(metrics.stall.observe)
    if background:  # the real daemon (tests that build apps in-process do not run it)
        stall_probe.start()
        runtime.start_monitor()  # worker supervision: dead and hung workers restarted
    ctx = AppContext(
        service,
        controller,
        metrics,
        token=token,
        auth_all=cfg.server.host not in LOOPBACK,
        backend_kind=kind,
    )
    return Daemon(cfg, store, backend, runtime, service, controller, metrics, ctx, stall_probe)


@dataclass
class _DataPlaneSockets:
    plane: Any  # api.dataplane.DataPlane
    listen: socket.socket  # the public port, accepted on by every frontend
    control: socket.socket  # this process's own HTTP server (the frontends proxy to it)


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_dataplane(d: Daemon) -> _DataPlaneSockets:
    """Bind the public port and the control plane's Unix socket; make the frontends' manager
    (started with the server) and hook it to the runtime, the metrics and the load meter."""
    from api.dataplane import DataPlane

    cfg = d.cfg
    family = socket.AF_INET6 if ":" in cfg.server.host else socket.AF_INET
    listen = socket.create_server((cfg.server.host, cfg.server.port), family=family, backlog=4096)
    listen.set_inheritable(True)
    path = cfg.paths.runtime_dir / "control.sock"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(str(path))
    os.chmod(path, 0o600)  # the daemon's user only (uvicorn's own uds would be 0666)
    control.listen(1024)
    s = cfg.server
    plane = DataPlane(
        d.service,
        count=s.frontend_count(),
        listen=listen,
        config={
            "host": s.host,
            # every frontend binds the same gRPC port (SO_REUSEPORT): "any free port" is chosen
            # here, once
            "grpc_port": free_port(s.host) if s.grpc_port == 0 else s.grpc_port,
            "token_file": None if s.token_file is None else str(s.token_file),
            "auth_all": d.ctx.auth_all,
            "control_socket": str(path),
            **s.limits(),
            "log_format": s.log_format,
            "access_log": s.access_log,
        },
        on_event=lambda kind, msg, data: d.store.log_event(kind, msg, **data),
        on_stats=d.on_frontend_stats,
    )
    d.runtime.on_routing = lambda leaving, wait: plane.publish(leaving, wait=wait)
    d.metrics.inference_sources.append(plane.stats)
    d.ctx.dataplane = plane
    return _DataPlaneSockets(plane, listen, control)


def serve(cfg: DaemonConfig) -> int:
    """Run the daemon until SIGTERM/SIGINT; 0 on a clean stop."""
    import uvicorn

    keep_large_buffers()  # request bodies without page faults (stgs.hostmem)
    logs.setup(cfg.server.log_format, logging.INFO)
    d = build(cfg)
    server: Any = None
    stop = threading.Event()

    def restore() -> None:
        sd_notify("STATUS=restoring registered models")
        try:
            d.service.restore()
        except Exception as exc:  # the daemon still serves; the error is visible in status
            log.exception("restore failed")
            d.service.last_error = f"restore failed: {exc}"
            d.service.restored = True
        while server is not None and not server.started and not stop.is_set():
            time.sleep(0.05)
        d.controller.start()
        if dataplane is not None:
            dataplane.plane.publish()  # restored: the frontends answer ready, route everything
        status = serving_status()
        sd_notify(f"READY=1\nSTATUS={status}")
        log.info("ready: %s, %s backend", status, d.ctx.backend_kind)
        # STATUS follows what is served (systemctl status shows it), checked every 2 s
        while os.environ.get("NOTIFY_SOCKET") and not stop.wait(STATUS_INTERVAL_S):
            now = serving_status()
            if now != status:
                status = now
                sd_notify(f"STATUS={status}")

    def serving_status() -> str:
        models = d.store.models()
        ready = sum(1 for m in models if m.status == "ready")
        where = f"{cfg.server.host}:{cfg.server.port}"
        return f"serving {ready} of {len(models)} registered model(s) on {where}"

    def watchdog() -> None:
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if usec <= 0:
            return
        period = usec / 2e6
        while not stop.wait(period):
            last = d.controller.last_step
            stale = 3 * cfg.controller.interval_s + period
            if last is None or time.monotonic() - last < stale:
                sd_notify("WATCHDOG=1")
            else:
                log.error("controller loop stalled: no WATCHDOG=1 (systemd will restart us)")

    dataplane = start_dataplane(d) if cfg.server.frontend_count() else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        grpc_server = None
        if cfg.server.grpc_port >= 0 and dataplane is None:
            from api import grpc_server as grpc_mod

            grpc_server, bound = await grpc_mod.start(
                d.service,
                cfg.server.host,
                cfg.server.grpc_port,
                token=d.ctx.token,
                auth_all=d.ctx.auth_all,
                max_concurrent_rpcs=cfg.server.max_concurrency,
                control=grpc_mod.ControlClient.in_process(app),  # Triton's model API
            )
            log.info("KServe v2 gRPC on %s:%d", cfg.server.host, bound)
        threading.Thread(target=restore, name="stgs-restore", daemon=True).start()
        threading.Thread(target=watchdog, name="stgs-watchdog", daemon=True).start()
        if dataplane is not None:
            dataplane.plane.start()
        yield
        if grpc_server is not None:
            await grpc_server.stop(2.0)
        stop.set()
        sd_notify("STOPPING=1")
        log.info("stopping")
        if dataplane is not None:
            dataplane.plane.close()
        d.close()

    app = create_app(d.ctx, lifespan=lifespan)
    # With a data plane the frontends own the public port and proxy the rest to this server's
    # Unix socket; without, this server listens on the public port itself.
    where: dict[str, Any] = (
        {"host": cfg.server.host, "port": cfg.server.port}
        if dataplane is None
        else {"fd": dataplane.control.fileno()}
    )
    config = uvicorn_config(
        app,
        header_timeout_s=cfg.server.header_timeout_s,
        max_header_bytes=cfg.server.max_header_bytes,
        max_concurrency=cfg.server.max_concurrency,
        log_level="info",
        graceful_s=10,
        access_log=cfg.server.access_log,
        **where,
    )
    server = uvicorn.Server(config)
    server.run()
    return 0
