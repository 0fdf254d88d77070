"""The real backend's pure parts: NVML error mapping, names, MPS control commands (no NVML)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from stgs.backend import DeviceRef
from stgs.backend.mps import MpsControl, RunResult, parse_pids
from stgs.backend.nvml import NvmlBackend, map_nvml_error, profile_name, sku_for_name
from stgs.errors import (
    BackendError,
    BackendUnavailableError,
    GpuLostError,
    InsufficientResourcesError,
    InUseError,
    MpsError,
    NoPermissionError,
    NotSupportedError,
)

pynvml = pytest.importorskip("pynvml")


@pytest.mark.parametrize(
    ("cls_name", "want"),
    [
        ("NVMLError_InUse", InUseError),
        ("NVMLError_InsufficientResources", InsufficientResourcesError),
        ("NVMLError_GpuIsLost", GpuLostError),
        ("NVMLError_NotSupported", NotSupportedError),
        ("NVMLError_NoPermission", NoPermissionError),
        ("NVMLError_LibraryNotFound", BackendUnavailableError),
        ("NVMLError_DriverNotLoaded", BackendUnavailableError),
        ("NVMLError_NotFound", BackendUnavailableError),
        ("NVMLError_Unknown", BackendError),
    ],
)
def test_nvml_errors_map_onto_the_stgs_tree(cls_name: str, want: type[BackendError]) -> None:
    exc = getattr(pynvml, cls_name)()
    got = map_nvml_error(exc, "GPU 0: create 3g.40gb@0")
    assert type(got) is want
    assert "GPU 0: create 3g.40gb@0" in str(got) and f"NVML error {exc.value}" in str(got)


def test_nvml_init_failure_is_backend_unavailable(tmp_path: Path) -> None:
    # conftest makes nvmlInit fail as on a machine without a driver.
    with pytest.raises(BackendUnavailableError, match="NVML init") as info:
        NvmlBackend(tmp_path)
    assert isinstance(info.value.__cause__, pynvml.NVMLError)


@pytest.mark.parametrize(
    ("raw", "slices", "mem", "want"),
    [
        (b"MIG 1g.10gb", 1, 9984, "1g.10gb"),
        ("MIG 3g.71gb", 3, 71424, "3g.71gb"),
        (b"MIG 1g.10gb+me", 1, 9984, "1g.10gb+me"),
        (b"", 3, 40448, "3g.40gb"),
        (b"", 1, 20096, "1g.20gb"),
    ],
)
def test_profile_names(raw: bytes | str, slices: int, mem: int, want: str) -> None:
    assert profile_name(raw, slices, mem) == want


@pytest.mark.parametrize(
    ("name", "mem", "want"),
    [
        ("NVIDIA H100 80GB HBM3", 81559, "H100-80GB"),
        (b"NVIDIA A100-SXM4-40GB", 40960, "A100-40GB"),
        ("NVIDIA A100 80GB PCIe", 81920, "A100-80GB"),
        ("NVIDIA H200", 143771, "H200-141GB"),
        ("NVIDIA A10", 23028, "A10"),
        ("Tesla T4", 15360, "T4"),
        ("NVIDIA L4", 23034, "L4"),
        ("NVIDIA GeForce RTX 2080 Ti", 11264, "RTX-2080Ti"),
        ("NVIDIA B200", 183359, None),
    ],
)
def test_sku_from_nvml_names(name: str, mem: int, want: str | None) -> None:
    assert sku_for_name(name, mem) == want


class FakeMps:
    """A fake ``nvidia-cuda-mps-control``: one daemon per CUDA_VISIBLE_DEVICES value."""

    def __init__(self) -> None:
        self.daemons: dict[str, list[int]] = {}  # device -> client pids of server 4242
        self.calls: list[tuple[tuple[str, ...], str, dict[str, str]]] = []

    def __call__(
        self, argv: Sequence[str], stdin: str, env: dict[str, str], timeout: float
    ) -> RunResult:
        dev = env["CUDA_VISIBLE_DEVICES"]
        self.calls.append((tuple(argv), stdin, env))
        if list(argv[1:]) == ["-d"]:
            self.daemons[dev] = []
            return RunResult(0, "", "")
        if dev not in self.daemons:
            return RunResult(1, "", "Cannot find MPS control daemon process")
        cmd = stdin.strip()
        if cmd == "get_server_list":
            return RunResult(0, "4242\n" if self.daemons[dev] else "", "")
        if cmd == "get_client_list 4242":
            return RunResult(0, "".join(f"{p}\n" for p in self.daemons[dev]), "")
        if cmd == "quit":
            del self.daemons[dev]
            return RunResult(0, "", "")
        return RunResult(1, "", f"unknown command {cmd}")


def test_mps_daemon_lifecycle(tmp_path: Path) -> None:
    fake = FakeMps()
    mps = MpsControl(tmp_path, runner=fake, timeout_s=1.0)
    ref = DeviceRef(0, 4)
    uuid = "MIG-1234"
    info = mps.start(ref, uuid)
    assert info.pipe_dir == tmp_path / "mps" / uuid / "pipe" and info.pipe_dir.is_dir()
    assert info.log_dir.is_dir()
    argv, _, env = fake.calls[1]  # the first call asked whether one already runs
    assert argv == ("nvidia-cuda-mps-control", "-d")
    assert env == {
        "CUDA_VISIBLE_DEVICES": uuid,
        "CUDA_MPS_PIPE_DIRECTORY": str(info.pipe_dir),
        "CUDA_MPS_LOG_DIRECTORY": str(info.log_dir),
    }
    n = len(fake.calls)
    assert mps.start(ref, uuid) == info  # idempotent: no second daemon
    assert not any(c[0][1:] == ("-d",) for c in fake.calls[n:])
    fake.daemons[uuid] = [111, 222]
    assert mps.clients(uuid) == [111, 222]
    with pytest.raises(InUseError, match="111"):
        mps.stop(ref)
    fake.daemons[uuid] = []
    mps.stop(ref)
    assert uuid not in fake.daemons and ref not in mps.daemons
    mps.stop(ref)  # stopping a stopped daemon is a no-op


def test_mps_start_failures(tmp_path: Path) -> None:
    def broken(argv: Sequence[str], stdin: str, env: dict[str, str], timeout: float) -> RunResult:
        return RunResult(1, "", "permission denied")

    with pytest.raises(MpsError, match="permission denied"):
        MpsControl(tmp_path, runner=broken).start(DeviceRef(0), "GPU-1")
    missing = MpsControl(tmp_path, binary=str(tmp_path / "no-such-binary"))
    with pytest.raises(MpsError, match="not found"):
        missing.start(DeviceRef(0), "GPU-1")


def test_mps_start_exit_status_1_but_the_daemon_listens(tmp_path: Path) -> None:
    """``-d`` exits 1 while the daemon it forked goes on to listen: it is used, not refused."""
    fake = FakeMps()

    def late(argv: Sequence[str], stdin: str, env: dict[str, str], timeout: float) -> RunResult:
        res = fake(argv, stdin, env, timeout)
        return RunResult(1, "", "") if list(argv[1:]) == ["-d"] else res

    info = MpsControl(tmp_path, runner=late, timeout_s=1.0).start(DeviceRef(0), "GPU-1")
    assert "GPU-1" in fake.daemons and info.device_uuid == "GPU-1"


def test_parse_pids() -> None:
    assert parse_pids("12\n 34 \n\nfoo\n") == [12, 34]
    assert parse_pids("") == []


def test_usage_reads_gpus_and_mig_instances(tmp_path: Path) -> None:
    """``usage()`` over a fake NVML: a GPU's utilisation and memory, a MIG instance's memory
    (its utilisation NOT_SUPPORTED: None), an empty MIG slot and a lost GPU skipped."""
    import threading
    from types import SimpleNamespace

    from stgs.backend import DeviceUsage
    from stgs.catalog import MigPlacement

    gib = 1 << 30

    def memory(h: str) -> SimpleNamespace:
        if h == "gpu1":
            raise pynvml.NVMLError_GpuIsLost()
        return SimpleNamespace(used=3 * gib, total=40 * gib if h == "mig0" else 80 * gib)

    def utilization(h: str) -> SimpleNamespace:
        if h.startswith("mig"):
            raise pynvml.NVMLError_NotSupported()
        return SimpleNamespace(gpu=37, memory=5)

    def mig_handle(h: str, idx: int) -> str:
        if idx:
            raise pynvml.NVMLError_NotFound()
        return f"mig{idx}"

    nv = SimpleNamespace(
        NVMLError=pynvml.NVMLError,
        NVML_DEVICE_MIG_ENABLE=1,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetMemoryInfo=memory,
        nvmlDeviceGetUtilizationRates=utilization,
        nvmlDeviceGetMigMode=lambda h: (1, 1),
        nvmlDeviceGetMaxMigDeviceCount=lambda h: 7,
        nvmlDeviceGetMigDeviceHandleByIndex=mig_handle,
        nvmlDeviceGetGpuInstanceId=lambda mh: 2,
    )
    b = object.__new__(NvmlBackend)
    b._nv = nv
    b._lock = threading.RLock()
    b._gpu_instances = lambda gpu: [(MigPlacement(4, "3g.40gb"), None, 2, None)]  # type: ignore[method-assign]
    assert b.usage() == [
        DeviceUsage(DeviceRef(0), None, 3 * gib, 80 * gib, 0.37),
        DeviceUsage(DeviceRef(0, 4), "3g.40gb", 3 * gib, 40 * gib, None),
    ]
