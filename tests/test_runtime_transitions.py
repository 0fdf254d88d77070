"""The runtime on the simulated node: plans, diffs, make before break, rollback, restarts."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from _helpers import make_partition

from stgs.backend import DeviceRef, FaultKind, SimulatedNode
from stgs.catalog import MigPlacement, canonical_layout
from stgs.errors import ConfigError, NoWorkerError, ServingError, TransitionError, WorkerDiedError
from stgs.plan import GpuPlan, Partition, Plan
from stgs.runtime import PartitionRuntime, PartitionState, Runtime, TransitionState

TIMEOUT = 20.0
X = np.ones(4, np.float32)


def part(
    models: list[tuple[str, int, float]],
    *,
    kind: str = "mps",
    mig: tuple[str, int] | None = None,
    mps: int | None = None,
) -> Partition:
    return make_partition(models, kind, mig, mps)


def plan(name: str, *gpus: tuple[str, bool, list[Partition]]) -> Plan:
    return Plan(
        policy=name,
        feasible=True,
        gpus=tuple(GpuPlan(i, sku, mig, tuple(ps)) for i, (sku, mig, ps) in enumerate(gpus)),
    )


@pytest.fixture
def node() -> Iterator[SimulatedNode]:
    n = SimulatedNode("H100-80GB", 1, mig_enabled=True)
    yield n
    n.close()


@pytest.fixture
def rt(node: SimulatedNode) -> Iterator[Runtime]:
    r = Runtime(node, ready_timeout_s=TIMEOUT, drain_timeout_s=5.0, monitor_interval_s=0.05)
    yield r
    r.close()


PLAN_A = plan(
    "A",
    (
        "H100-80GB",
        True,
        [
            part([("echo", 8, 100.0)], kind="mig", mig=("3g.40gb", 0)),
            part([("sleep:5", 2, 50.0)], mig=("2g.20gb", 4), mps=50),
            part([("echo", 4, 50.0), ("sleep:1", 4, 10.0)], mig=("2g.20gb", 4), mps=50),
        ],
    ),
)
# B keeps A's first two partitions (one at a new rate), drops the third, adds a 1g instance.
PLAN_B = plan(
    "B",
    (
        "H100-80GB",
        True,
        [
            part([("echo", 8, 100.0)], kind="mig", mig=("3g.40gb", 0)),
            part([("sleep:5", 2, 80.0)], mig=("2g.20gb", 4), mps=50),
            part([("sleep:1", 4, 10.0)], mig=("1g.10gb", 6), mps=100),
        ],
    ),
)
# C needs the whole GPU: the old instances are in the way and must go first.
PLAN_C = plan(
    "C",
    (
        "H100-80GB",
        True,
        [part([("echo", 8, 100.0), ("sleep:1", 2, 5.0)], kind="mig", mig=("7g.80gb", 0))],
    ),
)


def pids(rt: Runtime) -> dict[str, int | None]:
    return {str(k): p.pid for k, p in rt.partitions.items()}


def test_apply_starts_pinned_ready_workers_and_serves(rt: Runtime, node: SimulatedNode) -> None:
    rec = rt.apply(PLAN_A)
    assert rec.state is TransitionState.SUCCEEDED
    assert len(rec.started) == 3
    assert node.mig_layout(0) == canonical_layout(
        [MigPlacement(0, "3g.40gb"), MigPlacement(4, "2g.20gb")]
    )
    assert [d.ref for d in node.mps_daemons()] == [DeviceRef(0, 4)]
    assert rt.count(PartitionState.READY) == 3
    for p in rt.partitions.values():
        assert p.pid in node.clients(p.ref)
    np.testing.assert_array_equal(rt.infer("echo", X), X)
    np.testing.assert_array_equal(rt.infer("sleep:5", X), X)
    with pytest.raises(NoWorkerError):
        rt.infer("tiny_mlp", X)
    # Applying the same plan again changes nothing.
    before = pids(rt)
    calls = list(node.calls)
    rec2 = rt.apply(PLAN_A)
    assert rec2.started == [] and rec2.stopped == [] and len(rec2.kept) == 3
    assert pids(rt) == before and node.calls == calls


def _load(
    rt: Runtime, models: list[str], stop: threading.Event, errors: list[str], done: list[int]
) -> None:
    i = 0
    while not stop.is_set():
        model = models[i % len(models)]
        i += 1
        try:
            rt.infer(model, X, timeout_s=TIMEOUT)
            done.append(1)
        except ServingError as exc:
            errors.append(f"{model}: {exc!r}")


def test_make_before_break_loses_no_request(rt: Runtime, node: SimulatedNode) -> None:
    rt.apply(PLAN_A)
    keep = {k: p.pid for k, p in rt.partitions.items() if "3g.40gb@0" in str(k)}
    stop, errors, done = threading.Event(), [], []
    threads = [
        threading.Thread(
            target=_load, args=(rt, ["echo", "sleep:1", "sleep:5"], stop, errors, done)
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        rec = rt.apply(PLAN_B)
        n_at_switch = len(done)
        time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
    assert errors == []
    assert len(done) > n_at_switch > 0
    assert len(rec.started) == 1 and len(rec.stopped) == 1 and len(rec.kept) == 2
    assert {k: p.pid for k, p in rt.partitions.items() if "3g.40gb@0" in str(k)} == keep
    assert node.mig_layout(0) == canonical_layout(
        [MigPlacement(0, "3g.40gb"), MigPlacement(4, "2g.20gb"), MigPlacement(6, "1g.10gb")]
    )
    # The rate change of the kept MPS partition re-weights routing without a restart.
    sleep5 = next(p for p in rt.partitions.values() if "sleep:5" in str(p.key))
    assert sleep5.rates == {"sleep:5": 80.0}
    assert all(s is PartitionState.READY for s in rt.states().values())


def test_an_mps_daemon_with_other_clients_is_kept_not_a_failed_transition(
    rt: Runtime, node: SimulatedNode
) -> None:
    """The daemon's profiler measures MPS shares as clients of the node's MPS daemon. A plan
    that no longer needs that daemon must not fail (and roll back) because of them: the daemon
    stays until it is idle, and a later transition stops it."""
    rt.apply(PLAN_A)
    mps_ref = DeviceRef(0, 4)
    profiler_client = node.attach_client(mps_ref, mps_pct=20)
    no_mps = plan(
        "no-mps",
        (
            "H100-80GB",
            True,
            [
                part([("echo", 8, 100.0)], kind="mig", mig=("3g.40gb", 0)),
                part([("sleep:5", 2, 50.0)], kind="mig", mig=("2g.20gb", 4)),
            ],
        ),
    )
    rec = rt.apply(no_mps)
    assert rec.state is TransitionState.SUCCEEDED, rec.error
    assert [d.ref for d in node.mps_daemons()] == [mps_ref]  # kept for its other client
    np.testing.assert_array_equal(rt.infer("sleep:5", X), X)
    node.detach_client(profiler_client)
    only_3g = plan(
        "3g",
        ("H100-80GB", True, [part([("echo", 8, 100.0)], kind="mig", mig=("3g.40gb", 0))]),
    )
    assert rt.apply(only_3g).state is TransitionState.SUCCEEDED
    assert node.mps_daemons() == []  # idle now: stopped


def test_instances_in_the_way_are_drained_first(rt: Runtime, node: SimulatedNode) -> None:
    rt.apply(PLAN_A)
    old = set(pids(rt).values())
    rec = rt.apply(PLAN_C)
    assert rec.state is TransitionState.SUCCEEDED
    assert node.mig_layout(0) == (MigPlacement(0, "7g.80gb"),)
    assert node.mps_daemons() == []
    assert set(pids(rt).values()).isdisjoint(old)
    np.testing.assert_array_equal(rt.infer("echo", X), X)
    # The destroy of the old instances came before the create of the new one.
    destroys = [i for i, c in enumerate(node.calls) if c.startswith("destroy")]
    create = max(i for i, c in enumerate(node.calls) if c.startswith("create 0 7g"))
    assert destroys and max(destroys) < create


@pytest.mark.parametrize(
    ("kind", "op"),
    [
        (FaultKind.INSUFFICIENT_RESOURCES, "create_instance"),
        (FaultKind.WORKER_CRASH, "spawn"),
        (FaultKind.INSUFFICIENT_RESOURCES, "start_mps"),
    ],
)
def test_failed_transition_rolls_back_to_the_last_good_plan(
    rt: Runtime, node: SimulatedNode, kind: FaultKind, op: str
) -> None:
    rt.apply(PLAN_A)
    layout = node.mig_layout(0)
    good = pids(rt)
    node.inject(kind, op)
    with pytest.raises(TransitionError) as info:
        rt.apply(PLAN_B)
    assert info.value.rolled_back
    rec = rt.history[-1]
    assert rec.state is TransitionState.FAILED
    assert rec.reason and ("injected" in rec.reason or "signal 9" in rec.reason)
    assert rt.current_plan is PLAN_A and rt.last_good is PLAN_A
    assert node.mig_layout(0) == layout
    assert pids(rt) == good  # the old workers never stopped (or came back)
    assert all(s is PartitionState.READY for s in rt.states().values())
    np.testing.assert_array_equal(rt.infer("sleep:1", X), X)
    # The fault is spent: the same transition now goes through.
    rt.apply(PLAN_B)
    assert rt.current_plan is PLAN_B


def test_rollback_after_breaking_first_restarts_the_old_partitions(
    rt: Runtime, node: SimulatedNode
) -> None:
    rt.apply(PLAN_A)
    layout = node.mig_layout(0)
    old = pids(rt)
    node.inject(FaultKind.IN_USE, "destroy_instance", after=1)  # the 2nd destroy fails
    with pytest.raises(TransitionError, match="injected") as info:
        rt.apply(PLAN_C)
    assert info.value.rolled_back
    assert rt.history[-1].stopped  # A's partitions were drained before the failure
    assert node.mig_layout(0) == layout
    assert [d.ref for d in node.mps_daemons()] == [DeviceRef(0, 4)]
    assert set(pids(rt)) == set(old)  # the same partitions, in new processes
    assert set(pids(rt).values()).isdisjoint(old.values())
    assert all(s is PartitionState.READY for s in rt.states().values())
    np.testing.assert_array_equal(rt.infer("sleep:5", X), X)


def test_first_plan_failing_restores_the_node(rt: Runtime, node: SimulatedNode) -> None:
    node.inject(FaultKind.WORKER_CRASH, "spawn", after=1)
    with pytest.raises(TransitionError):
        rt.apply(PLAN_A)
    assert node.mig_layout(0) == ()
    assert node.mps_daemons() == []
    assert rt.partitions == {}
    assert rt.last_good is None


def test_invalid_plans_are_refused_before_any_change(rt: Runtime, node: SimulatedNode) -> None:
    rt.apply(PLAN_A)
    calls = list(node.calls)
    bad = [
        plan("x", ("A100-40GB", True, [])),  # wrong SKU
        plan(
            "x", ("H100-80GB", True, [part([("echo", 1, 1.0)], kind="mig", mig=("3g.40gb", 2))])
        ),  # bad placement
        plan("x", ("H100-80GB", True, [part([("echo", 1, 1.0)], kind="mps", mps=50)])),
        plan("x", ("H100-80GB", True, []), ("H100-80GB", True, [])),  # one GPU too many
    ]
    for p in bad:
        with pytest.raises(TransitionError) as info:
            rt.apply(p)
        assert isinstance(info.value.__cause__, ConfigError)
    assert node.calls == calls
    assert rt.current_plan is PLAN_A


def test_killed_worker_is_restarted_and_its_clients_get_errors(
    rt: Runtime, node: SimulatedNode
) -> None:
    rt.start_monitor()
    slow = plan(
        "slow",
        (
            "H100-80GB",
            False,
            [part([("sleep:3000", 1, 1.0)], kind="full"), part([("echo", 1, 1.0)], kind="full")],
        ),
    )
    node.set_mig_mode(0, False)
    rt.apply(slow)
    p = next(p for p in rt.partitions.values() if "sleep" in str(p.key))
    old_pid = p.pid
    assert old_pid is not None
    futs = [rt.submit("sleep:3000", X) for _ in range(3)]
    time.sleep(0.1)
    t0 = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    for f in futs:
        with pytest.raises(WorkerDiedError):
            f.result(TIMEOUT)
    assert time.monotonic() - t0 < 1.0
    # Restarted by the monitor: a new process, ready again, serving.
    end = time.monotonic() + TIMEOUT
    while time.monotonic() < end and not (p.pid != old_pid and p.state is PartitionState.READY):
        time.sleep(0.02)
    assert p.pid != old_pid and p.state is PartitionState.READY
    assert p.restarts == 1 and p.last_error is not None and "signal 9" in p.last_error
    np.testing.assert_array_equal(rt.infer("echo", X), X)


def test_cpu_torch_model_through_the_runtime(node: SimulatedNode) -> None:
    pytest.importorskip("torch")
    from stgs.runtime.models import model_entry

    rt = Runtime(node, ready_timeout_s=60.0, slos={"tiny_cnn": 5000.0})
    try:
        node.set_mig_mode(0, False)
        rt.apply(
            plan("cnn", ("H100-80GB", False, [part([("tiny_cnn", 4, 10.0)], kind="mps", mps=50)]))
        )
        x = model_entry("tiny_cnn").example()
        futs = [rt.submit("tiny_cnn", x) for _ in range(6)]
        outs = [f.result(TIMEOUT) for f in futs]
        assert all(o.shape == (10,) for o in outs)
        np.testing.assert_allclose(outs[0], outs[-1], rtol=1e-5)
        env = node.worker_env(DeviceRef(0), 50)
        assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    finally:
        rt.close()


def test_mig_mode_changes_drain_the_gpu_first(rt: Runtime, node: SimulatedNode) -> None:
    rt.apply(PLAN_A)
    whole = plan("W", ("H100-80GB", False, [part([("echo", 4, 1.0)], kind="mps", mps=50)]))
    rt.apply(whole)
    assert not node.gpus()[0].mig_enabled
    assert [d.ref for d in node.mps_daemons()] == [DeviceRef(0)]
    np.testing.assert_array_equal(rt.infer("echo", X), X)
    rt.apply(PLAN_A)
    assert node.gpus()[0].mig_enabled
    assert node.mig_layout(0) == canonical_layout(
        [MigPlacement(0, "3g.40gb"), MigPlacement(4, "2g.20gb")]
    )
    assert [d.ref for d in node.mps_daemons()] == [DeviceRef(0, 4)]
    assert rt.count(PartitionState.READY) == 3


def test_moving_off_a_gpu_the_new_plan_leaves_idle_makes_before_break() -> None:
    """A re-plan that moves the partitions of MIG GPU 0 to the idle GPU 1 and leaves GPU 0
    empty with ``mig`` off (as ``partitioner.replan.align_gpus`` does): nothing new needs GPU
    0, so its old partition serves until the new one is ready; GPU 0 keeps its MIG mode and
    loses its instances after the drain (docs/simulator.md, the compare-zoo defect)."""
    node = SimulatedNode("H100-80GB", 2, mig_enabled=True)
    rt = Runtime(node, ready_timeout_s=TIMEOUT, drain_timeout_s=5.0, monitor_interval_s=0.05)
    try:
        on0 = plan(
            "on0",
            ("H100-80GB", True, [part([("echo", 4, 100.0)], kind="mig", mig=("1g.10gb", 0))]),
            ("H100-80GB", True, []),
        )
        on1 = plan(
            "on1",
            ("H100-80GB", False, []),
            ("H100-80GB", True, [part([("echo", 8, 150.0)], kind="mig", mig=("1g.10gb", 0))]),
        )
        rt.apply(on0)
        (old_key,) = rt.partitions
        events: list[tuple[str, PartitionState]] = []
        set_state = rt._set

        def record(p: PartitionRuntime, state: PartitionState, error: str | None = None) -> None:
            events.append((str(p.key), state))
            set_state(p, state, error)

        rt._set = record  # type: ignore[method-assign]
        stop = threading.Event()
        errors: list[str] = []
        done: list[int] = []
        loader = threading.Thread(target=_load, args=(rt, ["echo"], stop, errors, done))
        loader.start()
        try:
            time.sleep(0.1)
            rec = rt.apply(on1)
        finally:
            stop.set()
            loader.join(TIMEOUT)
        assert rec.state is TransitionState.SUCCEEDED
        assert errors == [] and done
        (new_key,) = rt.partitions
        order = [(k, s) for k, s in events if s in (PartitionState.READY, PartitionState.DRAINING)]
        assert order == [
            (str(new_key), PartitionState.READY),
            (str(old_key), PartitionState.DRAINING),
        ]
        assert node.gpus()[0].mig_enabled and node.mig_layout(0) == ()
        assert node.mig_layout(1) == (MigPlacement(0, "1g.10gb"),)
        np.testing.assert_array_equal(rt.infer("echo", X), X)
    finally:
        rt.close()
        node.close()


def _until(cond: object, timeout_s: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.005)
    raise AssertionError("condition not met in time")


def test_ready_worker_restarts_at_once_failed_starts_back_off(
    rt: Runtime, node: SimulatedNode
) -> None:
    events: list[tuple[str, str]] = []
    rt.on_event = lambda kind, msg, _data: events.append((kind, msg))
    rt.start_monitor()
    node.set_mig_mode(0, False)
    rt.apply(plan("echo", ("H100-80GB", False, [part([("echo", 1, 1.0)], kind="full")])))
    p = next(iter(rt.partitions.values()))
    first = p.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)  # a ready worker dies: restarted at once
    _until(lambda: p.pid != first and p.state is PartitionState.STARTING)
    second = p.pid
    assert second is not None and p.restarts == 1 and p.failures == 1
    os.kill(second, signal.SIGKILL)  # and its successor dies loading: a failed start
    _until(lambda: p.state is PartitionState.FAILED and p.restart_at is not None)
    t_failed = time.monotonic()
    assert p.failures == 2
    assert 0.5 < rt.describe()[0]["restart_in_s"] <= 1.0  # RESTART_BACKOFF_S[1]
    _until(lambda: p.state is PartitionState.READY)
    assert time.monotonic() - t_failed >= 0.8  # it waited out the back-off
    assert p.failures == 0 and p.restarts == 2
    assert rt.infer("echo", X, timeout_s=TIMEOUT).tolist() == X.tolist()
    kinds = [k for k, _ in events]
    assert kinds.count("worker_failed") == 2 and kinds.count("worker_restarted") == 2
    assert "restart in 1 s (2 failed starts in a row)" in events[kinds.index("worker_failed", 1)][1]


def test_stopped_worker_is_detected_as_hung_and_restarted(rt: Runtime, node: SimulatedNode) -> None:
    rt.start_monitor()
    node.set_mig_mode(0, False)
    rt.apply(plan("echo", ("H100-80GB", False, [part([("echo", 1, 1.0)], kind="full")])))
    p = next(iter(rt.partitions.values()))
    pid = p.pid
    assert pid is not None
    time.sleep(0.3)  # a heartbeat or two
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    fut = rt.submit("echo", X, deadline_ms=10_000)
    try:
        with pytest.raises(WorkerDiedError):
            fut.result(TIMEOUT)  # in flight to the hung worker: failed when it is killed
        hang = rt.hang_after_s(p)
        assert hang is not None
        noticed = time.monotonic() - t0
        # silent for hang_after_s (2 x 1 ms planned + 0.8 s grace) after its last frame
        assert hang - 0.25 <= noticed <= hang + 0.5, (noticed, hang)
        assert p.last_error is not None and "hung" in p.last_error, rt.describe()
        _until(lambda: p.state is PartitionState.READY and p.pid != pid)
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
