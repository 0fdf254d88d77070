"""The simulated node: MIG layouts round-trip, rules hold, faults leave the last good layout."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from stgs.backend import DeviceRef, FaultKind, SimulatedNode
from stgs.catalog import SKUS, MigPlacement, canonical_layout, enumerate_layouts
from stgs.errors import (
    BackendError,
    BackendUnavailableError,
    GpuLostError,
    InsufficientResourcesError,
    InUseError,
    MigLayoutError,
    MpsError,
    NotSupportedError,
)

MIG_SKUS = [name for name, sku in SKUS.items() if sku.supports_mig]


@pytest.fixture
def node() -> Iterator[SimulatedNode]:
    n = SimulatedNode("H100-80GB", 2, mig_enabled=True)
    yield n
    n.close()


def L(*items: str) -> tuple[MigPlacement, ...]:
    """``L("3g.40gb@0", "1g.10gb@4")`` -> a canonical layout."""
    out = []
    for it in items:
        prof, start = it.split("@")
        out.append(MigPlacement(int(start), prof))
    return canonical_layout(out)


@pytest.mark.parametrize("sku", MIG_SKUS)
def test_every_valid_layout_round_trips(sku: str) -> None:
    layouts = enumerate_layouts(sku)
    assert len(layouts) > 100
    node = SimulatedNode(sku, 1, mig_enabled=True)
    try:
        seen_uuids: set[str] = set()
        # Walk every layout from the previous one (destroys and creates), then back and forth
        # with the empty layout, so both the diff and the from-scratch paths run.
        for i, layout in enumerate(layouts):
            devices = node.apply_mig_layout(0, layout)
            assert node.mig_layout(0) == layout
            assert tuple(d.placement for d in devices) == layout
            assert len({d.uuid for d in devices}) == len(devices)
            seen_uuids.update(d.uuid for d in devices)
            for d in devices:
                assert d.uuid.startswith("MIG-")
                prof = SKUS[sku].mig_profile(d.placement.profile)
                assert (d.sm_count, d.memory_mib) == (prof.sm_count, prof.memory_mib)
            if i % 50 == 0:
                node.apply_mig_layout(0, ())
                assert node.mig_layout(0) == ()
        assert len(seen_uuids) > len(layouts)  # re-created instances get new UUIDs
    finally:
        node.close()


def test_reapplying_the_same_layout_changes_nothing(node: SimulatedNode) -> None:
    layout = L("3g.40gb@0", "2g.20gb@4", "1g.10gb@6")
    first = node.apply_mig_layout(0, layout)
    calls = list(node.calls)
    again = node.apply_mig_layout(0, layout)
    assert node.calls == calls
    assert [d.uuid for d in again] == [d.uuid for d in first]


def test_kept_instances_keep_their_uuid(node: SimulatedNode) -> None:
    before = {d.placement: d.uuid for d in node.apply_mig_layout(0, L("3g.40gb@0", "3g.40gb@4"))}
    after = {d.placement: d.uuid for d in node.apply_mig_layout(0, L("3g.40gb@0", "2g.20gb@4"))}
    keep = MigPlacement(0, "3g.40gb")
    assert after[keep] == before[keep]
    assert node.calls[-2:] == ["destroy 0 3g.40gb@4", "create 0 2g.20gb@4"]


@pytest.mark.parametrize(
    "layout",
    [
        L("3g.40gb@2"),  # 3g starts at 0 or 4 only
        L("4g.40gb@0", "3g.40gb@0"),  # overlap
        L("4g.40gb@0", "4g.40gb@4"),  # 4g only at 0; and 8 compute slices
        L(*(f"1g.10gb@{i}" for i in range(7)), "1g.10gb@7"),  # 1g.10gb starts 0..6
        L("7g.80gb@0", "1g.10gb@0"),
        L("2g.20gb@0", "2g.20gb@2", "2g.20gb@4", "1g.10gb@6"),  # 7 compute slices: valid
    ],
)
def test_invalid_layouts_are_refused_before_any_change(
    node: SimulatedNode, layout: tuple[MigPlacement, ...]
) -> None:
    good = L("1g.10gb@0", "1g.10gb@1")
    node.apply_mig_layout(0, good)
    calls = list(node.calls)
    if layout == L("2g.20gb@0", "2g.20gb@2", "2g.20gb@4", "1g.10gb@6"):
        node.apply_mig_layout(0, layout)  # the control: a valid one goes through
        assert node.mig_layout(0) == layout
        return
    with pytest.raises(MigLayoutError):
        node.apply_mig_layout(0, layout)
    assert node.calls == calls
    assert node.mig_layout(0) == good


def test_unknown_profile_and_mig_off_are_refused() -> None:
    node = SimulatedNode(["A100-40GB", "L4"])
    try:
        node.set_mig_mode(0, True)
        with pytest.raises(MigLayoutError, match="no MIG profile"):
            node.apply_mig_layout(0, L("1g.20gb@0"))
        node.set_mig_mode(0, False)
        with pytest.raises(BackendError, match="MIG mode is off"):
            node.apply_mig_layout(0, L("1g.5gb@0"))
        with pytest.raises(NotSupportedError):
            node.set_mig_mode(1, True)
        with pytest.raises(BackendUnavailableError):
            node.mig_devices(5)
    finally:
        node.close()


@pytest.mark.parametrize(
    ("kind", "op", "after", "error"),
    [
        (FaultKind.IN_USE, "destroy_instance", 0, InUseError),
        (FaultKind.IN_USE, "destroy_instance", 1, InUseError),
        (FaultKind.INSUFFICIENT_RESOURCES, "create_instance", 0, InsufficientResourcesError),
        (FaultKind.INSUFFICIENT_RESOURCES, "create_instance", 2, InsufficientResourcesError),
    ],
)
def test_injected_faults_leave_the_last_good_layout(
    node: SimulatedNode, kind: FaultKind, op: str, after: int, error: type[Exception]
) -> None:
    good = L("3g.40gb@0", "2g.20gb@4", "1g.10gb@6")
    target = L("1g.10gb@0", "1g.10gb@1", "1g.10gb@2", "1g.10gb@3", "3g.40gb@4")
    before = {d.placement: d.uuid for d in node.apply_mig_layout(0, good)}
    node.inject(kind, op, gpu=0, after=after)
    with pytest.raises(error, match="injected"):
        node.apply_mig_layout(0, target)
    assert node.mig_layout(0) == good
    # Rolled back for real: some instances were destroyed and re-created (new UUIDs) or not.
    after_uuids = {d.placement: d.uuid for d in node.mig_devices(0)}
    assert set(after_uuids) == set(before)
    # The fault is spent: the same change now goes through.
    node.apply_mig_layout(0, target)
    assert node.mig_layout(0) == target


def test_a_fault_on_another_gpu_does_not_fire(node: SimulatedNode) -> None:
    node.inject(FaultKind.IN_USE, "create_instance", gpu=1)
    node.apply_mig_layout(0, L("7g.80gb@0"))
    with pytest.raises(InUseError):
        node.apply_mig_layout(1, L("7g.80gb@0"))
    assert node.mig_layout(1) == ()


def test_gpu_lost_then_reset(node: SimulatedNode) -> None:
    node.apply_mig_layout(0, L("7g.80gb@0"))
    node.apply_mig_layout(1, L("4g.40gb@0"))
    node.inject(FaultKind.GPU_LOST, "destroy_instance", gpu=0)
    with pytest.raises(GpuLostError):
        node.apply_mig_layout(0, L("3g.40gb@0"))
    assert [g.healthy for g in node.gpus()] == [False, True]
    with pytest.raises(GpuLostError):
        node.mig_layout(0)
    assert node.mig_layout(1) == L("4g.40gb@0")  # the other GPU is untouched
    node.reset_gpu(0)
    assert node.gpus()[0].healthy
    assert node.mig_layout(0) == ()  # a reset loses every instance, as on real GPUs
    node.apply_mig_layout(0, L("3g.40gb@0"))
    assert node.mig_layout(0) == L("3g.40gb@0")


def test_instances_with_clients_are_not_destroyed(node: SimulatedNode) -> None:
    node.apply_mig_layout(0, L("3g.40gb@0", "3g.40gb@4"))
    pid = node.attach_client(DeviceRef(0, 4))
    calls = list(node.calls)
    with pytest.raises(InUseError, match="clients"):
        node.apply_mig_layout(0, L("3g.40gb@0", "1g.10gb@4"))
    assert node.calls == calls
    # An instance that stays may keep its clients while others change.
    node.apply_mig_layout(0, L("1g.10gb@0", "3g.40gb@4"))
    node.detach_client(pid)
    node.apply_mig_layout(0, L("7g.80gb@0"))
    assert node.mig_layout(0) == L("7g.80gb@0")


def test_mps_daemons_limits_and_pinning() -> None:
    node = SimulatedNode(["H100-80GB", "H200-141GB"], mps_max_clients=3)
    try:
        node.set_mig_mode(0, True)
        node.apply_mig_layout(0, L("3g.40gb@0", "3g.40gb@4"))
        with pytest.raises(NotSupportedError):
            node.start_mps(DeviceRef(0))  # MIG on: MPS runs inside an instance
        with pytest.raises(BackendUnavailableError):
            node.start_mps(DeviceRef(1, 0))  # MIG off on GPU 1
        ref = DeviceRef(0, 4)
        with pytest.raises(MpsError):
            node.attach_client(ref, mps_pct=50)  # no daemon yet
        info = node.start_mps(ref)
        assert node.start_mps(ref) == info  # idempotent
        assert info.pipe_dir.is_dir() and info.log_dir.is_dir()
        assert info.pipe_dir.is_relative_to(node.runtime_dir)
        pids = [node.attach_client(ref, mps_pct=p) for p in (20, 30, 50)]
        with pytest.raises(InsufficientResourcesError, match="limit is 3"):
            node.attach_client(ref, mps_pct=10)
        env = node.worker_env(ref, 30)
        assert env["CUDA_VISIBLE_DEVICES"] == node.device_uuid(ref)
        assert env["CUDA_VISIBLE_DEVICES"].startswith("MIG-")
        assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(info.pipe_dir)
        with pytest.raises(InUseError):
            node.stop_mps(ref)
        for p in pids:
            node.detach_client(p)
        with pytest.raises(InUseError, match="MPS daemon"):
            node.apply_mig_layout(0, L("3g.40gb@0"))  # its daemon still runs
        node.stop_mps(ref)
        node.apply_mig_layout(0, L("3g.40gb@0"))
        whole = node.worker_env(DeviceRef(1), None)
        assert whole["CUDA_VISIBLE_DEVICES"] == node.gpus()[1].uuid
        assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in whole
    finally:
        node.close()


def _sleeper(node: SimulatedNode, ref: DeviceRef) -> subprocess.Popen[bytes]:
    return node.spawn_worker(ref, None, [sys.executable, "-c", "import time; time.sleep(60)"])


def test_worker_processes_are_clients_and_can_crash(node: SimulatedNode) -> None:
    node.apply_mig_layout(0, L("7g.80gb@0"))
    ref = DeviceRef(0, 0)
    proc = _sleeper(node, ref)
    try:
        assert node.clients(ref) == [proc.pid]
        with pytest.raises(InUseError):
            node.apply_mig_layout(0, ())
        assert node.crash_worker(ref=ref) == [proc.pid]
        assert proc.wait(timeout=5) == -9
        assert node.clients(ref) == []
        node.apply_mig_layout(0, ())
        # An armed worker_crash kills the next worker right after it starts.
        node.set_mig_mode(0, False)
        node.inject(FaultKind.WORKER_CRASH, "spawn")
        proc2 = _sleeper(node, DeviceRef(0))
        assert proc2.wait(timeout=5) == -9
    finally:
        for p in (proc,):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_gpu_lost_kills_its_workers(node: SimulatedNode) -> None:
    node.set_mig_mode(1, False)
    proc = _sleeper(node, DeviceRef(1))
    try:
        node.lose_gpu(1)
        assert proc.wait(timeout=5) == -9
        with pytest.raises(GpuLostError):
            node.worker_env(DeviceRef(1), None)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_close_kills_leftover_workers() -> None:
    node = SimulatedNode("L4")
    proc = _sleeper(node, DeviceRef(0))
    t0 = time.monotonic()
    node.close()
    assert proc.poll() is not None
    assert time.monotonic() - t0 < 5
