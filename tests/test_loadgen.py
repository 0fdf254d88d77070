"""The load generator's pieces: serve_gpu.LoadGen's schedule, the transport's buffered receive
and batched replies, the worker's admission (no lockout), baselines_gpu's load-generator-limited
trials (search and table)."""

from __future__ import annotations

import importlib
import socket
import threading
import time
from concurrent.futures import Future
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from stgs.batching import ADMISSION_DECAY
from stgs.errors import DeadlineExceededError
from stgs.runtime.models import SyncRunner
from stgs.runtime.transport import (
    DEADLINE,
    OK,
    RECV_BUFFER_BYTES,
    REQUEST,
    RESPONSE,
    STATS,
    FrameSocket,
)
from stgs.runtime.worker import ModelSlot, Worker, WorkerSpec, _Request


@pytest.fixture(scope="module")
def sg() -> ModuleType:
    return importlib.import_module("benchmarks.lib.loadgen")


@pytest.fixture(scope="module")
def bl() -> ModuleType:
    return importlib.import_module("benchmarks.baselines_gpu")


# ---------------------------------------------------------------------- LoadGen
class _Router:
    """Runtime.submit's contract; answers at once (OK, or deadline exceeded for model 'late')."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, float, int]] = []  # model, time, deadline_ms, thread
        self.lock = threading.Lock()

    def submit(self, model: str, array: Any, *, deadline_ms: float | None = None) -> Future[Any]:
        with self.lock:
            self.calls.append(
                (model, time.monotonic(), float(deadline_ms or 0), threading.get_ident())
            )
        fut: Future[Any] = Future()
        if model == "late":
            fut.set_exception(
                DeadlineExceededError(
                    "late: deadline exceeded (predicted batch latency 9 ms would miss it)"
                )
            )
        else:
            fut.set_result(array)
        return fut


@pytest.mark.parametrize("senders", [0, 1, 2])
def test_loadgen_sends_each_request_once_at_its_time(sg: ModuleType, senders: int) -> None:
    t, m = sg.poisson_arrivals([300.0, 200.0, 100.0], 0.6, seed=3)
    r = _Router()
    x = np.zeros(4, np.float32)
    lg = sg.LoadGen(r, ["a", "b", "late"], [10.0, 20.0, 30.0], [x, x, x], t, m, senders)
    assert len(lg.threads) == (1 if senders == 0 else 3 * senders)
    t0 = time.monotonic() + 0.05
    lg.start(t0)
    lg.join()
    assert len(r.calls) == len(t) and lg.pending() == 0
    assert not np.any(lg.status == sg.NOT_SENT)
    lag = lg.sent - (t0 + t)
    assert np.all(lag >= 0)  # never before its scheduled time
    assert np.all(lg.done >= lg.sent)
    assert np.all(lg.status[m == 2] == sg.DEADLINE) and np.all(lg.status[m != 2] == sg.OK)
    assert lg.deadline_kinds == {(2, "predicted"): int((m == 2).sum())}
    # the deadline left = SLO - how late it was sent
    slo = np.array([10.0, 20.0, 30.0])
    by_model: dict[str, list[float]] = {"a": [], "b": [], "late": []}
    for name, _, left, _ in r.calls:
        by_model[name].append(left)
    for k, name in enumerate(("a", "b", "late")):
        lefts = np.array(by_model[name])
        # at most as late as the worst lag (a loaded 2-core machine saw sends > 50 ms late)
        worst_ms = float(lag.max()) * 1e3
        assert np.all(lefts <= slo[k] + 1e-9) and np.all(lefts >= slo[k] - worst_ms - 5.0)
    if senders == 0:
        assert len({c[3] for c in r.calls}) == 1  # one thread sent everything
        sent_order = [c[1] for c in r.calls]
        assert sent_order == sorted(sent_order)


def test_loadgen_stop_at(sg: ModuleType) -> None:
    t = np.linspace(0.0, 0.4, 41)
    m = np.zeros(len(t), dtype=np.int16)
    r = _Router()
    lg = sg.LoadGen(r, ["a"], [10.0], [np.zeros(1)], t, m, 0)
    lg.stop_at = 0.2
    lg.start(time.monotonic())
    lg.join()
    assert int((lg.status != sg.NOT_SENT).sum()) == int((t <= 0.2).sum())
    assert np.all(lg.status[t > 0.2] == sg.NOT_SENT)


# ---------------------------------------------------------------------- transport
def test_buffered_recv_many_small_frames_and_large_ones() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    tx, rx = FrameSocket(a), FrameSocket(b)
    big = np.arange(3 * RECV_BUFFER_BYTES // 8 + 5, dtype=np.float64)  # > the buffer
    sent: list[tuple[int, np.ndarray]] = []
    for k in range(200):
        arr = big + k if k % 50 == 7 else np.full((k % 5 + 1, 3), k, dtype=np.int64)
        sent.append((k, arr))

    def writer() -> None:
        for k, arr in sent[:100]:
            tx.send(REQUEST, req_id=k, deadline_ns=-k, model=k % 3, array=arr)
        tx.send_responses(sent[100:])  # one call, many frames
        tx.send(RESPONSE, status=DEADLINE, req_id=999, data=b"late")

    th = threading.Thread(target=writer)
    th.start()
    for k, arr in sent:
        f = rx.recv()
        assert f is not None and f.req_id == k
        assert f.kind == (REQUEST if k < 100 else RESPONSE)
        if k < 100:
            assert (f.deadline_ns, f.model) == (-k, k % 3)
        assert f.status == OK
        np.testing.assert_array_equal(f.array(), arr)
    f = rx.recv()
    assert f is not None and (f.req_id, f.status, f.text()) == (999, DEADLINE, "late")
    th.join()
    # arrays received stay valid after later frames reuse the receive buffer
    tx.send(RESPONSE, req_id=1, array=np.ones(4, np.float32))
    tx.send(RESPONSE, req_id=2, array=np.zeros(4, np.float32))
    one = rx.recv()
    two = rx.recv()
    assert one is not None and two is not None
    np.testing.assert_array_equal(one.array(), np.ones(4, np.float32))
    tx.close()
    assert rx.recv() is None  # end of file
    rx.close()


def test_buffered_recv_byte_by_byte() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    rx = FrameSocket(b)
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    FrameSocket(c).send(REQUEST, req_id=7, array=np.arange(6, dtype=np.int32).reshape(2, 3))
    raw = d.recv(1 << 16)
    c.close()
    d.close()

    def trickle() -> None:
        for i in range(len(raw)):
            a.send(raw[i : i + 1])
            time.sleep(0.0005)
        a.close()

    th = threading.Thread(target=trickle)
    th.start()
    f = rx.recv()
    th.join()
    assert f is not None and f.req_id == 7
    np.testing.assert_array_equal(f.array(), np.arange(6, dtype=np.int32).reshape(2, 3))
    assert rx.recv() is None
    rx.close()


# ---------------------------------------------------------------------- worker admission
class _Fs:
    def __init__(self) -> None:
        self.errors: list[tuple[int, int, str]] = []
        self.ok: list[int] = []
        self.stats: list[str] = []

    def send(
        self, kind: int, *, status: int = OK, req_id: int = 0, data: bytes = b"", **_: Any
    ) -> None:
        if kind == STATS:  # the worker's batch statistics, not a reply
            self.stats.append(data.decode())
            return
        assert kind == RESPONSE
        self.errors.append((req_id, status, data.decode()))

    def send_responses(self, replies: list[tuple[int, Any]]) -> None:
        self.ok += [r for r, _ in replies]


class _Runner(SyncRunner):
    def __init__(self, ms: float) -> None:
        self.ms = ms
        self.batches: list[int] = []

    def compute(self, samples: list[Any]) -> list[Any]:
        self.batches.append(len(samples))
        time.sleep(self.ms / 1e3)
        return samples


def _run(w: Worker, i: int, take: list[_Request]) -> None:
    """One take through the worker's loop steps, start to end (the sequential path)."""
    b = w._take(i, take, None)
    if b is not None and w._stage(b) and w._launch(b) is not None:
        w._finish(b)


def test_admission_recovers_after_slow_batches() -> None:
    """One estimate above the SLO (slow batches under time slicing) must not lock a model out."""
    fs = _Fs()
    w = Worker(WorkerSpec("w", (ModelSlot("echo", 64),), device="cpu"), fs)  # type: ignore[arg-type]
    runner = _Runner(1.0)
    w.runners = [runner]  # type: ignore[list-item]
    w.est_ns[0] = 40e6  # 40 ms measured, SLO 20 ms: every request is predicted to miss
    x = np.zeros(1)
    ran_at = None
    for k in range(40):
        dl = time.monotonic_ns() + 20_000_000  # 20 ms left, as a fresh request
        _run(w, 0, [_Request(k, dl, x, w.control)])
        if fs.ok:
            ran_at = k
            break
    assert ran_at is not None, "the model kept refusing every request"
    assert ran_at <= 5  # 40 * 0.8**4 < 20
    assert w.est_ns[0] < 20e6
    assert all(s == DEADLINE and "predicted" in m for _, s, m in fs.errors)
    assert len(fs.errors) == ran_at
    assert len(fs.stats) == 1 and '"batches": [1]' in fs.stats[0]  # the batch that ran
    # requests already late decay nothing: only predictions that refused a whole take do
    est = w.est_ns[0] = 5e6
    _run(w, 0, [_Request(100, time.monotonic_ns() - 1, x, w.control)])
    assert w.est_ns[0] == est
    assert 0 < ADMISSION_DECAY < 1


# ---------------------------------------------------------------------- baselines: limited
def test_search_treats_load_generator_limited_as_inconclusive(bl: ModuleType) -> None:
    tried: list[float] = []

    def passes(f: float) -> bool | None:
        tried.append(f)
        if f > 1.6:
            return None  # the load generator cannot drive it
        return f <= 1.2

    res = bl.search(passes, 2.0, step=1.5, tol=0.05, max_trials=20)
    assert res.limited == pytest.approx(2.0)
    assert res.hi is not None and res.hi <= 1.6  # a real failure, not the limited trial
    assert res.lo is not None and res.lo <= 1.2 < res.hi
    assert res.reason == "converged; load generator limited at 2.000"
    assert all(f < 2.0 for f in tried[1:])  # nothing at or above the limited factor again
    # only limited and passing trials: the result is a lower bound, said so
    only = bl.search(lambda f: True if f <= 1.0 else None, 1.0, max_trials=20)
    assert only.hi is None and only.best == 1.0
    assert only.limited is not None and 1.0 < only.limited <= 1.05
    assert only.reason == "load generator limited above"
    capped = bl.search(lambda f: None, 1.0, max_trials=3, floor=0.0)
    assert capped.best == 0.0 and capped.hi is None and capped.lo is None
    assert "load generator limited at 0.444" in capped.reason


def test_trial_outcome_and_table_report_limited(bl: ModuleType) -> None:
    assert bl.trial_outcome({"passed": True, "load_generator_limited": False}) is True
    assert bl.trial_outcome({"passed": False, "load_generator_limited": False}) is False
    assert bl.trial_outcome({"passed": False, "load_generator_limited": True}) is None
    res = {
        "base_rps": 100.0,
        "fluid_k": 3.0,
        "planner_peak_k": 2.5,
        "systems": {
            "stgs": {
                "trials": [
                    {"passed": False, "load_generator_limited": True},
                    {"passed": True, "load_generator_limited": False},
                ],
                "result": {"factor": 1.5, "lo": 1.5, "hi": None, "load_generator_limited_at": 2.0},
            }
        },
    }
    text = bl.summary_table(res)
    row = next(line for line in text.splitlines() if line.startswith(f"| {bl.LABELS['stgs']}"))
    assert "load generator limited at 2.000" in row
    assert "| 2 (1 load generator limited) |" in row
    assert "&ge; 1.500" in row  # no failure of the system above it: a lower bound
