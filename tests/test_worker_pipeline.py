"""The pipelined worker (issue 17) on the CPU, through real worker processes: while batch N runs
on the device, batch N+1 is taken, staged and launched, and N's replies go out after that.

The simulated node's ``sleep:<ms>`` stand-in is asynchronous like a GPU runner (its launch
queues ``ms`` on a per-process stand-in device and returns; its collect waits for the end), so
the pipeline's order shows in the worker's trace without a GPU. Every behaviour is checked with
``STGS_WORKER_PIPELINE`` on and off.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from _helpers import make_partition, recorded_runs, run_python

from stgs.backend import DeviceRef, SimulatedNode
from stgs.errors import DeadlineExceededError, WorkerDiedError, WorkerError
from stgs.plan import GpuPlan, Plan
from stgs.registry import ModelEntry
from stgs.runtime import PartitionState, Runtime
from stgs.runtime.models import BatchRunner, Staged, model_entry
from stgs.runtime.process import WorkerProcess
from stgs.runtime.transport import FAILED, OK, REQUEST, RESPONSE, STOP, FrameSocket, Tensors
from stgs.runtime.worker import PIPELINE_ENV, ModelSlot, Worker, WorkerSpec, pipeline_setting
from stgs.workertrace import (
    LEGACY_BATCH_COLUMNS,
    TRACE_BATCH,
    TRACE_ENV,
    device_ns,
    gap_summary,
    host_gaps,
    per_worker,
)

TIMEOUT = 20.0
B = {c: k for k, c in enumerate(TRACE_BATCH)}
SETTINGS = pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "sequential"])


@pytest.fixture
def node() -> Iterator[SimulatedNode]:
    n = SimulatedNode("L4")
    yield n
    n.close()


def _worker(
    node: SimulatedNode,
    monkeypatch: pytest.MonkeyPatch,
    pipeline: bool,
    *slots: tuple[str, int],
    trace: Path | None = None,
) -> WorkerProcess:
    monkeypatch.setenv(PIPELINE_ENV, "1" if pipeline else "0")  # the worker inherits it
    if trace is not None:
        monkeypatch.setenv(TRACE_ENV, str(trace))
    spec = WorkerSpec("w", tuple(ModelSlot(n, b) for n, b in slots))
    w = WorkerProcess(node, DeviceRef(0), None, spec)
    assert w.wait_ready(TIMEOUT), w.exit_reason()
    return w


def _trace(trace: Path) -> tuple[np.ndarray, np.ndarray]:
    (f,) = trace.glob("*.npz")
    with np.load(f) as z:
        return z["batches"], z["requests"]


def test_pipeline_setting_reads_one_variable() -> None:
    assert pipeline_setting({}) is True
    assert pipeline_setting({PIPELINE_ENV: "1"}) is True
    assert pipeline_setting({PIPELINE_ENV: " 0 "}) is False
    assert pipeline_setting({PIPELINE_ENV: "off"}) is False
    with pytest.raises(Exception, match="STGS_WORKER_PIPELINE='maybe'"):
        pipeline_setting({PIPELINE_ENV: "maybe"})


def test_a_bad_pipeline_setting_stops_the_worker_before_it_loads(
    node: SimulatedNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PIPELINE_ENV, "maybe")
    w = WorkerProcess(node, DeviceRef(0), None, WorkerSpec("w", (ModelSlot("echo", 1),)))
    try:
        assert not w.wait_ready(TIMEOUT)
        assert w.proc.wait(TIMEOUT) == 3
    finally:
        w.kill()


@SETTINGS
def test_every_request_gets_its_own_result_in_order(
    node: SimulatedNode, monkeypatch: pytest.MonkeyPatch, pipeline: bool
) -> None:
    """Three models in one duty cycle (a device stand-in, a real CPU model, echo), requests
    interleaved: each answer is its own request's result, and each model's answers come back in
    the order its requests were sent (the queues are FIFO and batches are answered in order)."""
    torch = pytest.importorskip("torch")
    from stgs.runtime.models import build_module

    w = _worker(node, monkeypatch, pipeline, ("sleep:5", 4), ("tiny_mlp", 4), ("echo", 3))
    try:
        assert w.transport.ready_info is not None
        assert json.loads(w.transport.ready_info.text())["pipeline"] is pipeline
        mlp = model_entry("tiny_mlp")
        rng = np.random.default_rng(0)
        sent: list[tuple[str, np.ndarray]] = []
        for k in range(60):
            name = ("sleep:5", "tiny_mlp", "echo")[k % 3]
            x = (
                mlp.example(seed=k)
                if name == "tiny_mlp"
                else rng.standard_normal(5).astype(np.float32)
            )
            sent.append((name, x))
        done: list[int] = []
        futs = []
        for k, (name, x) in enumerate(sent):
            f = w.transport.submit(name, x)
            f.add_done_callback(lambda _f, k=k: done.append(k))
            futs.append(f)
        outs = [f.result(TIMEOUT) for f in futs]
        net = build_module("tiny_mlp")
        for (name, x), out in zip(sent, outs, strict=True):
            if name == "tiny_mlp":
                with torch.inference_mode():
                    want = net(torch.from_numpy(x[None]))[0].numpy()
                np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
            else:
                np.testing.assert_array_equal(out, x)
        for name in ("sleep:5", "tiny_mlp", "echo"):
            mine = [k for k in done if sent[k][0] == name]
            assert mine == sorted(mine), name
    finally:
        w.stop(TIMEOUT)
    assert w.proc.returncode == 0


@SETTINGS
def test_the_trace_shows_the_next_batch_launched_before_the_last_is_answered(
    node: SimulatedNode, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pipeline: bool
) -> None:
    """Two stand-in models time-share the worker with requests waiting. Pipelined: each batch
    is staged and launched while the one before still runs, before that one's replies, so no
    host time stands between them on the device. Sequential: each batch starts after the one
    before was answered, and the device waits for the host every time."""
    w = _worker(node, monkeypatch, pipeline, ("sleep:40", 2), ("sleep:30", 2), trace=tmp_path)
    x = np.ones(3, np.float32)
    futs = [w.transport.submit(("sleep:40", "sleep:30")[k % 2], x) for k in range(16)]
    for f in futs:
        f.result(TIMEOUT)
    w.stop(TIMEOUT)
    assert w.proc.returncode == 0
    b, _ = _trace(tmp_path)
    assert b.shape[1] == len(TRACE_BATCH)
    b = b[b[:, B["live"]] > 0]
    assert b[:, B["live"]].sum() == 16 and len(b) >= 8
    # the stand-in's device time is exactly its sleep
    assert set(b[:, B["device_ns"]].tolist()) <= {40_000_000, 30_000_000}
    assert np.all(b[:, B["t_take"]] <= b[:, B["t_run"]])
    assert np.all(b[:, B["t_run"]] <= b[:, B["t_launch"]])
    assert np.all(b[:, B["t_launch"]] <= b[:, B["t_ran"]])
    assert np.all(b[:, B["t_ran"]] <= b[:, B["t_replied"]])
    prev, nxt = b[:-1], b[1:]
    staged_early = nxt[:, B["t_run"]] < prev[:, B["t_replied"]]
    launched_early = nxt[:, B["t_launch"]] < prev[:, B["t_ran"]]
    gaps = host_gaps(*_trace(tmp_path))
    assert not gaps.legacy and len(gaps.gap_ns) >= len(b) - 2
    if pipeline:
        # (the first take may find one request queued and nothing else yet: one pair spared)
        assert staged_early.sum() >= len(prev) - 1 and launched_early.sum() >= len(prev) - 1
        assert (gaps.gap_ns == 0).sum() >= len(gaps.gap_ns) - 1
    else:
        assert not staged_early.any() and not launched_early.any()
        assert np.all(gaps.gap_ns > 0)


@SETTINGS
def test_requests_that_arrive_while_a_batch_runs_join_the_next_one(
    node: SimulatedNode, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pipeline: bool
) -> None:
    """The next batch is taken shortly before the one in flight ends, unless a full batch is
    waiting: a request that arrives while a 200 ms batch runs joins the partial batch queued
    before it (taken as soon as the batch before was launched, that one would run alone and the
    late request wait a whole batch more)."""
    w = _worker(node, monkeypatch, pipeline, ("sleep:200", 2), trace=tmp_path)
    x = np.ones(3, np.float32)
    w.transport.submit("sleep:200", x).result(TIMEOUT)  # the batch latency is known from here
    futs = [w.transport.submit("sleep:200", x)]  # 0 ms: a batch of one, 0-200 ms
    time.sleep(0.05)
    futs += [w.transport.submit("sleep:200", x) for _ in range(3)]  # 50 ms: 2 + 1 waiting
    time.sleep(0.2)
    futs.append(w.transport.submit("sleep:200", x))  # 250 ms: joins the one left waiting
    for f in futs:
        f.result(TIMEOUT)
    w.stop(TIMEOUT)
    _, r = _trace(tmp_path)
    batch = r[:, 3].tolist()  # each request's batch, in the order they were taken
    assert len(batch) == 6, batch
    assert batch[2] == batch[3] and batch[4] == batch[5] and len(set(batch)) == 4, batch


@SETTINGS
def test_batch_latency_is_the_device_time(
    node: SimulatedNode, monkeypatch: pytest.MonkeyPatch, pipeline: bool
) -> None:
    """STATS (and the admission estimate) count a batch's time on the device: with a batch
    waiting behind another, launch-to-collect spans both, but each counts its own 30 ms."""
    w = _worker(node, monkeypatch, pipeline, ("sleep:30", 2))
    try:
        x = np.ones(3, np.float32)
        for f in [w.transport.submit("sleep:30", x) for _ in range(8)]:
            f.result(TIMEOUT)
        end = time.monotonic() + TIMEOUT
        st = w.transport.batch_stats.get("sleep:30")
        while (st is None or st["batches"] < 4) and time.monotonic() < end:
            time.sleep(0.05)  # STATS come at most once a second: the next batch sends it
            w.transport.submit("sleep:30", x).result(TIMEOUT)
            st = w.transport.batch_stats.get("sleep:30")
        assert st is not None and st["batches"] >= 4
        assert st["run_ns"] == st["batches"] * 30_000_000
        end = time.monotonic() + TIMEOUT  # the longest batch comes with the next heartbeat
        while w.transport.max_batch_ns == 0 and time.monotonic() < end:
            time.sleep(0.05)
        assert w.transport.max_batch_ns == 30_000_000
    finally:
        w.stop(TIMEOUT)


@SETTINGS
def test_deadlines_and_admission_count_the_batch_in_flight(
    node: SimulatedNode, monkeypatch: pytest.MonkeyPatch, pipeline: bool
) -> None:
    w = _worker(node, monkeypatch, pipeline, ("sleep:100", 1), ("echo", 4))
    try:
        x = np.ones(3, np.float32)
        with pytest.raises(DeadlineExceededError, match="in the queue"):
            w.transport.submit("echo", x, deadline_ns=time.monotonic_ns() - 1).result(TIMEOUT)
        # Four 100 ms batches of one, each request due in 250 ms. The first two fit. The third,
        # taken when the first is answered (pipelined: while the second runs, queued behind
        # it), would end at ~300 ms: refused without running, as is the fourth.
        soon = time.monotonic_ns() + 250_000_000
        futs = [w.transport.submit("sleep:100", x, deadline_ns=soon) for _ in range(4)]
        results = []
        for f in futs:
            try:
                f.result(TIMEOUT)
                results.append("ok")
            except DeadlineExceededError as exc:
                results.append("predicted" if "predicted" in str(exc) else "late")
        assert results[0] == "ok"
        # (on a machine so loaded that a take slips by 50 ms they are late in the queue)
        assert "ok" not in results[2:], results
        np.testing.assert_array_equal(w.transport.submit("echo", x).result(TIMEOUT), x)
    finally:
        w.stop(TIMEOUT)


@SETTINGS
def test_stop_drains_the_queue_and_the_batch_in_flight(
    node: SimulatedNode, monkeypatch: pytest.MonkeyPatch, pipeline: bool
) -> None:
    w = _worker(node, monkeypatch, pipeline, ("sleep:20", 2), ("echo", 2))
    xs = [np.full(3, k, np.float32) for k in range(12)]
    futs = [w.transport.submit(("sleep:20", "echo")[k % 2], x) for k, x in enumerate(xs)]
    w.stop(timeout_s=TIMEOUT)
    for f, x in zip(futs, xs, strict=True):
        np.testing.assert_array_equal(f.result(TIMEOUT), x)
    assert w.proc.returncode == 0


@SETTINGS
def test_a_failing_batch_is_answered_and_the_others_are_served(
    node: SimulatedNode, monkeypatch: pytest.MonkeyPatch, pipeline: bool
) -> None:
    """``fail`` raises in its launch while a stand-in batch is in flight: its requests get
    FAILED, the batch in flight and the ones after it are answered."""
    w = _worker(node, monkeypatch, pipeline, ("sleep:20", 2), ("fail", 2), ("echo", 2))
    try:
        names = ("sleep:20", "fail", "echo")
        xs = [np.full(2, k, np.float32) for k in range(18)]
        futs = [w.transport.submit(names[k % 3], x) for k, x in enumerate(xs)]
        for k, (f, x) in enumerate(zip(futs, xs, strict=True)):
            if names[k % 3] == "fail":
                with pytest.raises(WorkerError, match="always fails"):
                    f.result(TIMEOUT)
            else:
                np.testing.assert_array_equal(f.result(TIMEOUT), x)
    finally:
        w.stop(TIMEOUT)
    assert w.proc.returncode == 0


class _FailsOnCollect(BatchRunner):
    """An asynchronous runner whose every second batch fails when collected (as a GPU error
    surfaces at the synchronisation)."""

    asynchronous = True

    def __init__(self, entry: ModelEntry) -> None:
        self.entry = entry
        self.batches = 0

    def stage(self, samples: list[Tensors]) -> Staged:
        return Staged(len(samples), samples)

    def launch(self, staged: Staged) -> None:
        staged.device_ns = 1_000_000

    def collect(self, staged: Staged) -> Sequence[Tensors]:
        self.batches += 1
        if self.batches % 2 == 0:
            raise RuntimeError("device error")
        time.sleep(0.005)
        assert staged.samples is not None
        return staged.samples


class _InProcess:
    """The worker's loop in this process over a real socket pair, its one slot (``batch``)
    served by ``runner``; the test is the client."""

    def __init__(
        self, runner: Callable[[ModelEntry], BatchRunner], batch: int, pipeline: bool
    ) -> None:
        a, self.b = socket.socketpair()
        spec = WorkerSpec("w", (ModelSlot("echo", batch),), device="cpu")
        self.worker = Worker(spec, FrameSocket(a), pipeline=pipeline)
        self.worker.load()
        self.worker.runners[0] = runner(self.worker.runners[0].entry)
        threading.Thread(target=self.worker.read, daemon=True).start()
        self.serving = threading.Thread(target=self.worker.serve, daemon=True)
        self.serving.start()
        self.client = FrameSocket(self.b)
        self.b.settimeout(TIMEOUT)

    def send(self, k: int) -> None:
        self.client.send(REQUEST, model=0, req_id=k, array=np.full(2, k, np.float32))

    def answers(self, n: int) -> dict[int, tuple[int, object, float]]:
        """The next ``n`` answers: req_id -> (status, array or message, monotonic s)."""
        got: dict[int, tuple[int, object, float]] = {}
        while len(got) < n:
            frame = self.client.recv()
            assert frame is not None
            if frame.kind == RESPONSE:
                out = frame.array() if frame.status == OK else frame.text()
                got[frame.req_id] = (frame.status, out, time.monotonic())
        return got

    def stop(self) -> None:
        try:
            self.client.send(STOP)
            self.serving.join(TIMEOUT)
            assert not self.serving.is_alive()
        finally:
            self.client.close()
            self.worker.fs.close()


@SETTINGS
def test_a_batch_failing_in_collect_is_answered_failed(pipeline: bool) -> None:
    """A runner that fails when a batch is collected: those requests get FAILED, every other
    one its answer, then STOP ends the loop."""
    w = _InProcess(_FailsOnCollect, 1, pipeline)
    try:
        for k in range(10):
            w.send(k)
        got = w.answers(10)
        failed = [k for k, (st, _, _) in got.items() if st == FAILED]
        assert len(failed) == 5 and all("device error" in str(got[k][1]) for k in failed)
        for k, (st, out, _) in got.items():
            if st == OK:
                np.testing.assert_array_equal(out, np.full(2, k, np.float32))
    finally:
        w.stop()


class _DoneEarly(BatchRunner):
    """An asynchronous runner whose batches are done at once but say they took 2 s on the
    device: the worker's estimate of the batch in flight runs far too long."""

    asynchronous = True

    def __init__(self, entry: ModelEntry) -> None:
        self.entry = entry

    def stage(self, samples: list[Tensors]) -> Staged:
        return Staged(len(samples), samples)

    def launch(self, staged: Staged) -> None:
        staged.device_ns = 2_000_000_000

    def collect(self, staged: Staged) -> Sequence[Tensors]:
        assert staged.samples is not None
        return staged.samples


def test_a_batch_done_before_its_estimate_does_not_hold_the_next_take() -> None:
    """Waiting for the next turn, the loop checks whether the batch in flight is done: with an
    estimate of 2 s and batches done at once, a request queued behind one is answered at once,
    not when the estimate runs out."""
    w = _InProcess(_DoneEarly, 4, True)
    try:
        w.send(0)
        w.answers(1)  # the estimate is 2 s from here
        w.send(1)  # a batch of one, in flight; what comes next waits for its turn
        time.sleep(0.05)
        t0 = time.monotonic()
        w.send(2)
        got = w.answers(2)
        assert {k: st for k, (st, _, _) in got.items()} == {1: OK, 2: OK}
        assert got[2][2] - t0 < 1.0  # not ~2 s
    finally:
        w.stop()


# ---------------------------------------------------------------------- liveness (runtime)
@pytest.fixture
def rt() -> Iterator[Runtime]:
    n = SimulatedNode("H100-80GB", 1, mig_enabled=False)
    r = Runtime(n, ready_timeout_s=TIMEOUT, drain_timeout_s=5.0, monitor_interval_s=0.05)
    yield r
    r.close()
    n.close()


def _plan(*models: tuple[str, int, float]) -> Plan:
    # planned batch latency 1 ms: the hang threshold is 2 x the measured slowest batch + 0.8 s
    part = make_partition(list(models), kind="full")
    return Plan(policy="t", feasible=True, gpus=(GpuPlan(0, "H100-80GB", False, (part,)),))


def _until(cond: object, timeout_s: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


@SETTINGS
def test_a_stuck_batch_silences_the_worker_and_it_is_restarted(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch, pipeline: bool
) -> None:
    """A 3 s batch against a threshold of 0.8 s: the loop blocks collecting it (pipelined: with
    the next batch launched behind it), sends no heartbeat, and the supervisor kills it."""
    monkeypatch.setenv(PIPELINE_ENV, "1" if pipeline else "0")
    rt.start_monitor()
    rt.apply(_plan(("sleep:3000", 1, 1.0)))
    p = next(iter(rt.partitions.values()))
    pid = p.pid
    time.sleep(0.3)  # a heartbeat or two
    x = np.ones(3, np.float32)
    futs = [rt.submit("sleep:3000", x, deadline_ms=30_000) for _ in range(2)]
    for f in futs:
        with pytest.raises(WorkerDiedError):
            f.result(TIMEOUT)
    assert p.last_error is not None and "hung" in p.last_error, rt.describe()
    _until(lambda: p.state is PartitionState.READY and p.pid != pid)


@SETTINGS
def test_a_stopped_worker_under_load_is_detected_and_restarted(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch, pipeline: bool
) -> None:
    monkeypatch.setenv(PIPELINE_ENV, "1" if pipeline else "0")
    rt.start_monitor()
    rt.apply(_plan(("sleep:10", 2, 1.0), ("echo", 2, 1.0)))
    p = next(iter(rt.partitions.values()))
    pid = p.pid
    assert pid is not None
    x = np.ones(3, np.float32)
    stop = threading.Event()
    answered: list[str] = []

    def load() -> None:
        while not stop.is_set():
            futs = [rt.submit(m, x, deadline_ms=5_000) for m in ("sleep:10", "echo") * 3]
            for f in futs:
                try:
                    f.result(TIMEOUT)
                    answered.append("ok")
                except Exception as exc:
                    answered.append(type(exc).__name__)
            time.sleep(0.005)

    th = threading.Thread(target=load, daemon=True)
    th.start()
    try:
        _until(lambda: answered.count("ok") > 20)
        os.kill(pid, signal.SIGSTOP)
        _until(lambda: p.last_error is not None and "hung" in p.last_error)
        _until(lambda: p.state is PartitionState.READY and p.pid != pid)
        n = answered.count("ok")
        _until(lambda: answered.count("ok") > n + 20)  # serving again
    finally:
        stop.set()
        th.join(TIMEOUT)
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------- the trace's arithmetic
def _rows(*batches: tuple[int, ...]) -> np.ndarray:
    return np.asarray(batches, dtype=np.int64)


def test_host_gaps_chain_the_device_ends() -> None:
    """Three batches, times in ns. Batch 0 launched at 100, 50 on the device: ends at 150.
    Batch 1 launched at 120 (behind 0): starts at 150, ends at 190; no gap. Batch 2 launched at
    230 while its request waited since 140: a gap of 230 - 190 = 40. A batch that ran nothing
    (row 3) is skipped; batch 4's request came after batch 2 ended: the device idled for lack
    of work, no gap counted."""
    b = _rows(
        # slot taken live t_take t_run t_ran t_replied t_launch device_ns
        (0, 2, 2, 90, 95, 200, 210, 100, 50),
        (1, 1, 1, 110, 115, 205, 215, 120, 40),
        (0, 1, 1, 220, 225, 300, 310, 230, 30),
        (1, 1, 0, 320, 320, 320, 320, 320, 0),
        (0, 1, 1, 500, 505, 560, 570, 510, 20),
    )
    r = _rows(
        # slot deadline t_queued batch ran
        (0, 0, 10, 0, 1),
        (0, 0, 12, 0, 1),
        (1, 0, 50, 1, 1),
        (0, 0, 140, 2, 1),
        (1, 0, 300, 3, 0),
        (0, 0, 400, 4, 1),
    )
    g = host_gaps(b, r)
    assert g.device_end_ns.tolist() == [150, 190, 260, 0, 530]
    assert g.batch.tolist() == [1, 2] and g.gap_ns.tolist() == [0, 40]
    assert not g.legacy
    assert device_ns(b).tolist() == [50, 40, 30, 0, 20]
    assert gap_summary(g.gap_ns) == {"n": 2, "p50_ms": 0.0, "p99_ms": 0.0, "mean_ms": 0.0}
    # a collect that returned before the chained end bounds it
    b2 = b.copy()
    b2[1, B["t_ran"]] = 170
    assert host_gaps(b2, r).device_end_ns.tolist()[:3] == [150, 170, 260]


def test_host_gaps_read_old_traces() -> None:
    """A file from before the pipeline (7 columns): the device end is when the results were on
    the host, the launch when the runner was called."""
    b = _rows(
        (0, 1, 1, 90, 100, 150, 160),
        (0, 1, 1, 170, 175, 220, 230),
    )
    r = _rows((0, 0, 10, 0, 1), (0, 0, 120, 1, 1))
    g = host_gaps(b, r)
    assert g.legacy and g.gap_ns.tolist() == [25] and device_ns(b).tolist() == [50, 45]
    with pytest.raises(ValueError, match="columns"):
        host_gaps(b[:, :5], r)


def test_host_gaps_of_a_recorded_gpu_run() -> None:
    """A serve_gpu.py run recorded on the H100 before the pipeline: its merged trace splits per
    worker and yields gaps (lower bounds) for batches that had requests waiting."""
    rec = recorded_runs()
    if rec is None:
        pytest.skip("the recorded runs are not in this clone's history")
    with np.load(rec / "2026-11-22-h100-s4" / "s1200c.npz") as z:
        wb, wr = z["wb"], z["wr"]
    assert wb.shape[1] == 1 + LEGACY_BATCH_COLUMNS
    total = 0
    for _, b, r in per_worker(wb, wr):
        g = host_gaps(b, r)
        assert g.legacy and np.all(g.gap_ns >= 0)
        total += len(g.gap_ns)
    assert total > 1000


# ---------------------------------------------------------------------- the benchmark
@pytest.mark.slow
def test_worker_pipeline_benchmark_simulated(tmp_path: Path) -> None:
    """benchmarks/worker_pipeline_gpu.py --simulated: both settings side by side through the
    runtime; the stand-in worker alone shows host time on the critical path only sequentially."""
    out = tmp_path / "wp.json"
    proc = run_python(
        "-m",
        "benchmarks.worker_pipeline_gpu",
        "--simulated",
        "--seconds",
        "1.5",
        "--runtime-dir",
        str(tmp_path / "rt"),
        "--json",
        str(out),
        timeout=180,
    )
    assert "host ms p50" in proc.stdout
    res = json.loads(out.read_text())
    assert [s["setting"] for s in res["settings"]] == ["sequential", "pipelined"]
    assert res["probe_agrees"] is True
    assert set(res["probe_max_rel_diff"].values()) == {0.0}  # stand-ins and the CPU model: exact
    rows = {(r["setting"], r["phase"], r["worker"]): r for r in res["rows"]}
    assert len(rows) == 8
    for r in rows.values():
        assert r["batches"] > 0 and r["throughput_rps"] > 0 and 0 < r["device_busy"] <= 1.05
    seq = rows[("sequential", "saturated", "sleep:4/8@50%")]
    pipe = rows[("pipelined", "saturated", "sleep:4/8@50%")]
    assert seq["gap_n"] > 10 and seq["gap_p50_ms"] > 0
    assert pipe["gap_n"] > 10 and pipe["gap_p50_ms"] == 0
    # the same open-loop rates for both settings: the sequential setting's saturated throughput
    near = [s["near_rates"] for s in res["settings"]]
    assert near[0] == near[1]
