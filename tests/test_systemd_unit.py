"""deploy/stgs.service and deploy/stgs-mig.service pass ``systemd-analyze verify``, and the
daemon's unit rates <= 4.0 in ``systemd-analyze security`` (the issue's bar; 8.1 as root).

systemd-analyze comes from Debian's systemd package (``make setup`` runs
scripts/install_systemd_analyze.sh: downloaded and unpacked, no root, no systemd running); the
tests skip without it, except where ``STGS_REQUIRE_SYSTEMD_ANALYZE=1`` (CI) makes that a failure.
``verify`` runs in a root directory of its own (``--root``): the units where systemd looks for
them, stubs at their ``ExecStart`` paths, and systemd's own units (``sysinit.target``, ...).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = ("stgs.service", "stgs-mig.service")
MAX_EXPOSURE = 4.0


def systemd_analyze() -> str:
    for cand in (
        os.environ.get("STGS_SYSTEMD_ANALYZE"),
        shutil.which("systemd-analyze"),
        str(Path(sys.executable).parent / "systemd-analyze"),
    ):
        if cand and os.access(cand, os.X_OK) and run(cand, "--version").returncode == 0:
            return cand
    why = (
        "systemd-analyze is not installed: `make setup` unpacks it from Debian's systemd"
        " package (scripts/install_systemd_analyze.sh: needs apt-get)"
    )
    if os.environ.get("STGS_REQUIRE_SYSTEMD_ANALYZE") == "1":
        pytest.fail(why + "; STGS_REQUIRE_SYSTEMD_ANALYZE=1 requires it")
    pytest.skip(why)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def systemd_units(exe: str) -> Path:
    """systemd's own units: those unpacked beside our systemd-analyze, else the system's."""
    for d in (
        Path(exe).parent.parent / "lib" / "systemd-analyze" / "lib" / "systemd" / "system",
        Path("/usr/lib/systemd/system"),
        Path("/lib/systemd/system"),
    ):
        if (d / "sysinit.target").exists():
            return d
    pytest.skip("systemd's own units (sysinit.target, ...) are not here: verify needs them")


def exec_paths(unit: str) -> list[str]:
    return re.findall(r"^ExecStart=[-@:+!]*(\S+)", unit, flags=re.M)


def test_units_verify(tmp_path: Path) -> None:
    exe = systemd_analyze()
    root = tmp_path / "root"
    shutil.copytree(systemd_units(exe), root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name in UNITS:
        text = (DEPLOY / name).read_text()
        (root / "etc/systemd/system" / name).write_text(text)
        for path in exec_paths(text):  # verify checks that ExecStart's program is there
            stub = root / path.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)
    r = run(exe, "verify", f"--root={root}", "--man=no", "--generators=no", *UNITS)
    # verify exits 0 on keys it ignores (a typo, an unknown value): any word from it fails
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def exposure(exe: str, unit: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    r = run(exe, "security", "--offline=true", f"--threshold={round(MAX_EXPOSURE * 10)}", str(unit))
    m = re.search(rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d)", r.stdout)
    assert m, r.stdout + r.stderr
    return float(m.group(1)), r


def test_daemon_unit_exposure_at_most_4(tmp_path: Path) -> None:
    exe = systemd_analyze()
    level, r = exposure(exe, DEPLOY / "stgs.service")
    print(f"systemd-analyze security: stgs.service {level}")
    assert level <= MAX_EXPOSURE and r.returncode == 0, r.stdout
    # the threshold bites: an unhardened unit is refused
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/opt/stgs/.venv/bin/stgs serve\n")
    level, r = exposure(exe, bare)
    assert level > MAX_EXPOSURE and r.returncode != 0
