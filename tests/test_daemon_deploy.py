"""deploy/: the example config loads; the systemd unit has what the daemon relies on;
sd_notify speaks systemd's datagram protocol."""

from __future__ import annotations

import configparser
import socket
from pathlib import Path

import pytest

from api.config import DaemonConfig, load_config
from api.daemon import sd_notify

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_example_config_loads_with_the_defaults() -> None:
    cfg = load_config(DEPLOY / "stgs.toml")
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8470
    assert cfg.server == DaemonConfig().server  # the limits shown are the defaults
    assert cfg.workers == DaemonConfig().workers
    assert cfg.paths.state_dir == Path("/var/lib/stgs")
    assert cfg.controller.hold_s == 30.0
    assert cfg.planner.spare_factor == DaemonConfig().planner.spare_factor == "fill"
    assert cfg.planner.max_spare_factor == DaemonConfig().planner.max_spare_factor


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    text = (DEPLOY / "stgs.service").read_text()
    unit.read_string(text)
    s = unit["Service"]
    assert s["Type"] == "notify" and s["Restart"] == "on-failure"
    assert s["StateDirectory"] == "stgs" and s["RuntimeDirectory"] == "stgs"
    assert s["User"] == "root" and "MIG" in text and "need root" in text
    assert "WatchdogSec" in s and "DeviceAllow=/dev/nvidiactl" in text


def test_sd_notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False  # not under systemd
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1\nSTATUS=serving")
        assert srv.recv(100) == b"READY=1\nSTATUS=serving"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sd_notify("WATCHDOG=1") is False  # logged, never raised
