"""The daemon's configuration: a TOML file (``stgs serve --config FILE``), every option below.

Unknown keys are errors (a typo must not silently fall back to a default). Paths may be
relative: they resolve against the config file's directory. ``deploy/stgs.toml`` is the
documented example; ``DaemonConfig()`` is the embedded default (loopback, simulated node when
no GPU is found, state under ``./stgs-state``).
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from partitioner.control import ControlRules
from stgs.errors import ConfigError, StgsError
from stgs.hostcosts import api_request_ms
from stgs.scenario import PlannerOptions, SpareFactor


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = Field("127.0.0.1", description="address to bind; not loopback needs a token")
    port: int = Field(8470, ge=0, le=65535, description="TCP port (0: any free port)")
    token_file: Path | None = Field(
        None,
        description="file holding the bearer token; required when host is not loopback."
        " With a token, every mutating call needs it (and every call off loopback)",
    )
    grpc_port: int = Field(
        8471,
        ge=-1,
        le=65535,
        description="KServe v2 gRPC port on the same host (0: any free port; -1: no gRPC)",
    )
    frontends: int | Literal["auto"] = Field(
        "auto",
        description="data-plane frontend processes that serve inference (HTTP and gRPC) apart"
        " from the control plane; auto: one per core, at most 8; 0: the control plane serves"
        " inference itself",
    )

    @field_validator("frontends")
    @classmethod
    def _frontends(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 0 <= v <= 64:
            raise ValueError("frontends must be auto or a number from 0 to 64")
        return v

    def frontend_count(self) -> int:
        """How many frontends to run (``auto`` resolved on this machine)."""
        if self.frontends == "auto":
            return max(1, min(8, os.cpu_count() or 1))
        return int(self.frontends)

    # Limits on what one request can make the daemon spend (api.limits; docs/operations.md).
    max_body_bytes: int = Field(
        1 << 20, ge=1, le=1 << 30, description="largest request body but inference (413 above)"
    )
    max_infer_body_bytes: int = Field(
        64 << 20,
        ge=1,
        le=1 << 32,
        description="largest POST /v2/models/{m}/infer body, binary tensors included (413 above)",
    )
    max_header_bytes: int = Field(
        64 << 10, ge=1024, le=16 << 20, description="largest request line and headers (431 above)"
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="a connection's request line and headers must arrive within this (408)",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="a request's whole body must arrive within this once its headers did (408)",
    )
    idle_body_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="the longest pause between two pieces of a request body (408)",
    )
    max_concurrency: int = Field(
        4096,
        ge=16,
        le=1 << 20,
        description="connections and requests one serving process holds at once; above it, HTTP"
        " answers 503 and gRPC RESOURCE_EXHAUSTED at once (with the data plane: per frontend)",
    )

    log_format: Literal["text", "json"] = Field(
        "text",
        description="the log lines of the daemon and its frontends: text, or one JSON object"
        " per line (time, level, logger, process, message)",
    )
    access_log: bool = Field(False, description="log every HTTP request (uvicorn's access log)")

    def limits(self) -> dict[str, Any]:
        """What bounds one request (api.limits), as the frontends get it (one list)."""
        return self.model_dump(include=set(LIMIT_FIELDS))


LIMIT_FIELDS = (
    "max_body_bytes",
    "max_infer_body_bytes",
    "max_header_bytes",
    "header_timeout_s",
    "body_timeout_s",
    "idle_body_timeout_s",
    "max_concurrency",
)


class PathsConfig(_Strict):
    state_dir: Path = Field(Path("stgs-state"), description="SQLite state (systemd StateDirectory)")
    runtime_dir: Path = Field(
        Path("stgs-run"), description="MPS pipe/log directories, worker sockets (RuntimeDirectory)"
    )
    model_dir: Path = Field(
        Path("models"),
        description="model files (source file:<path>) load only from here: the resolved path,"
        " symlinks included, must stay inside it",
    )


class ModelsConfig(_Strict):
    """``[models]``: model files registered with ``source: file:<path in paths.model_dir>``
    (TorchScript .pt/.ts, torch.export .pt2, ONNX .onnx; never pickled modules)."""

    max_file_mb: float = Field(
        2048.0, gt=0, le=1 << 20, description="a larger model file is refused (MiB)"
    )
    repository: Path | None = Field(
        None,
        description="a Triton-style model repository (<repo>/<model>/config.pbtxt,"
        " <repo>/<model>/<version>/model.pt|model.pt2|model.onnx): registered at start, and"
        " the Triton model-repository API (/v2/repository/...) loads and unloads from it",
    )


class SimulatedGpu(_Strict):
    sku: str
    count: int = Field(1, ge=1)
    mig: bool = True


class BackendConfig(_Strict):
    kind: Literal["auto", "nvml", "simulated"] = Field(
        "auto", description="auto: NVML when a GPU is found, else the simulated node"
    )
    simulated_gpus: list[SimulatedGpu] = Field(
        default_factory=lambda: [SimulatedGpu(sku="H100-80GB", count=1)],
        description="the simulated node's GPUs (workers then run on the CPU)",
    )
    allow_mig_changes: bool = Field(
        True, description="false: never change MIG layouts; plan on the layout found"
    )


class PlannerConfig(PlannerOptions):
    """``[planner]``: the planner's own options (:class:`stgs.scenario.PlannerOptions`, declared
    once there) and the daemon's settings around them."""

    policy: str = Field("stgs", description="policy name or dotted path")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        """Checked at start, not when the first model arrives."""
        from partitioner.policies import get_policy

        try:
            get_policy(v)
        except StgsError as exc:
            raise ValueError(str(exc)) from None
        return v

    headroom: float = Field(0.1, ge=0.0, lt=1.0, description="latency margin (fraction)")
    profiles: Path | None = Field(None, description="extra profile CSV loaded at start")
    # the daemon fills the GPUs its plan holds (the core's default is the fewest GPUs, 1)
    spare_factor: SpareFactor = Field(
        "fill", description=PlannerOptions.model_fields["spare_factor"].description
    )
    time_budget_s: float = Field(
        10.0,
        gt=0.0,
        le=3600.0,
        description="the longest one API call (or controller re-plan) may plan: a plan that"
        " takes longer is abandoned (its planner process killed) and the call answers 503",
    )


class ControllerConfig(ControlRules):
    """``[controller]``: the re-planning rules' parameters (:class:`partitioner.control.
    ControlRules`, shared with the simulator's ``simulator.controller``) and admission."""

    deadline_drop: bool = Field(
        True, description="answer 'deadline exceeded' for requests that can no longer meet SLO"
    )


class WorkersConfig(_Strict):
    """``[workers]``: how the daemon supervises partition workers (:class:`stgs.runtime.
    Runtime`)."""

    ready_timeout_s: float = Field(
        120.0, gt=0.0, le=3600.0, description="a worker must load its models within this"
    )
    drain_timeout_s: float = Field(
        30.0, ge=0.0, le=3600.0, description="an old worker finishes its queue within this"
    )
    hang_grace_s: float = Field(
        0.8,
        gt=0.0,
        le=600.0,
        description="a ready worker silent for twice its slowest batch plus this is hung:"
        " killed and restarted",
    )
    restart_limit: int = Field(
        10, ge=0, le=1000, description="failures in a row after which a partition stays failed"
    )


class DaemonConfig(_Strict):
    server: ServerConfig = Field(default_factory=lambda: ServerConfig())
    paths: PathsConfig = Field(default_factory=lambda: PathsConfig())
    backend: BackendConfig = Field(default_factory=lambda: BackendConfig())
    planner: PlannerConfig = Field(default_factory=lambda: PlannerConfig())
    controller: ControllerConfig = Field(default_factory=lambda: ControllerConfig())
    workers: WorkersConfig = Field(default_factory=lambda: WorkersConfig())
    models: ModelsConfig = Field(default_factory=lambda: ModelsConfig())

    @model_validator(mode="after")
    def _plan_for_the_api_way(self) -> DaemonConfig:
        """A daemon that serves through its frontends plans each request's host way as the
        measured API way (``stgs.hostcosts.api_request_ms``), unless ``[planner]`` sets
        ``host_request_ms`` itself; with no frontends (the control plane serves) or no API
        measurement for this host, the in-process way stays."""
        if "host_request_ms" in self.planner.model_fields_set or self.server.frontend_count() == 0:
            return self
        way = api_request_ms()
        if way is not None:
            # (frozen: set once, here, while validating)
            object.__setattr__(
                self, "planner", self.planner.model_copy(update={"host_request_ms": way})
            )
        return self

    @field_validator("server")
    @classmethod
    def _token_off_loopback(cls, v: ServerConfig) -> ServerConfig:
        if v.host not in ("127.0.0.1", "::1", "localhost") and v.token_file is None:
            raise ValueError(f"host {v.host!r} is not loopback: set server.token_file")
        return v

    def resolved(self, base: Path) -> DaemonConfig:
        """Relative paths made absolute against ``base`` (the config file's directory)."""

        def fix(p: Path | None) -> Path | None:
            return None if p is None else (p if p.is_absolute() else (base / p).resolve())

        return self.model_copy(
            update={
                "server": self.server.model_copy(
                    update={"token_file": fix(self.server.token_file)}
                ),
                "paths": PathsConfig(
                    state_dir=fix(self.paths.state_dir) or self.paths.state_dir,
                    runtime_dir=fix(self.paths.runtime_dir) or self.paths.runtime_dir,
                    model_dir=fix(self.paths.model_dir) or self.paths.model_dir,
                ),
                "planner": self.planner.model_copy(update={"profiles": fix(self.planner.profiles)}),
                "models": self.models.model_copy(
                    update={"repository": fix(self.models.repository)}
                ),
            }
        )


def load_config(path: Path | None) -> DaemonConfig:
    """Read and validate a TOML config; ``None``: the embedded default (relative to cwd)."""
    if path is None:
        return DaemonConfig().resolved(Path.cwd())
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such config file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        cfg = DaemonConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(top)"
        raise ConfigError(f"{path}: {where}: {err['msg']}") from exc
    return cfg.resolved(path.parent.resolve())


def read_token(cfg: DaemonConfig) -> str | None:
    """The bearer token from ``server.token_file`` (stripped), or None when none is set.

    A token file that others may write is refused (anyone who can write it can replace the
    token); one that others may read is accepted (the default umask makes such files).
    """
    tf = cfg.server.token_file
    if tf is None:
        return None
    try:
        with tf.open(encoding="utf-8") as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            token = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"{tf}: cannot read the token file: {exc.strerror}") from exc
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{tf}: the token file is writable by group or others (mode {mode:04o});"
            f" chmod go-w {tf}"
        )
    if len(token) < 16:
        raise ConfigError(f"{tf}: the token must be at least 16 characters")
    return token
