"""Transport frames, worker processes on the CPU, deadlines, and worker death."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from stgs.backend import DeviceRef, SimulatedNode
from stgs.batching import batch_buckets
from stgs.errors import (
    ConfigError,
    DeadlineExceededError,
    InvalidRequestError,
    WorkerDiedError,
    WorkerError,
)
from stgs.runtime.models import model_entry
from stgs.runtime.process import WorkerProcess
from stgs.runtime.transport import (
    MULTI,
    OK,
    REQUEST,
    RESPONSE,
    STATS,
    FrameSocket,
    MockTransport,
    SocketTransport,
    frame_parts,
)
from stgs.runtime.worker import ModelSlot, WorkerSpec

TIMEOUT = 20.0


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(6, dtype=np.int64),
        np.ones((2, 3, 4), dtype=np.float16),
        np.array(3.5, dtype=np.float64),  # 0-d
        np.zeros((0, 5), dtype=np.uint8),  # empty
        np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),  # not C order
        np.random.default_rng(0).standard_normal((3, 224, 224), dtype=np.float32),  # 600 KB
    ],
)
def test_frames_round_trip_raw_arrays(array: np.ndarray) -> None:
    a, b = socket.socketpair()
    fa, fb = FrameSocket(a), FrameSocket(b)
    try:
        # Large arrays do not fit the socket buffer: send from another thread.
        sender = threading.Thread(
            target=lambda: fa.send(REQUEST, model=7, req_id=2**40 + 3, deadline_ns=123, array=array)
        )
        sender.start()
        frame = fb.recv()
        sender.join(TIMEOUT)
        assert frame is not None
        assert (frame.kind, frame.model, frame.req_id, frame.deadline_ns) == (
            REQUEST,
            7,
            2**40 + 3,
            123,
        )
        got = frame.array()
        assert got.dtype == array.dtype and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
        fb.send(RESPONSE, status=OK, data=b"done")
        reply = fa.recv()
        assert reply is not None and reply.text() == "done"
        fa.close()
        assert fb.recv() is None  # end of file: the peer is gone
    finally:
        fa.close()
        fb.close()


MULTI_TENSORS = (
    np.arange(4, dtype=np.float32),
    np.array([7, -2], dtype=np.int64),
    np.ones((2, 3), dtype=np.float16),  # 12 bytes: padded to 16
    np.array(True),  # 0-d bool: 1 byte, padded
    np.zeros((0, 3), dtype=np.int32),  # empty
    np.asfortranarray(np.arange(6, dtype=np.uint16).reshape(2, 3)),  # not C order
    np.arange(3, dtype=np.uint64),
)


@pytest.mark.parametrize("n", [1, 2, len(MULTI_TENSORS)])
def test_frames_carry_several_tensors_in_order(n: int) -> None:
    """A tuple travels as one MULTI frame: each tensor its own dtype and shape, in order; a
    tuple of one comes back as a tuple of one, a bare array as a bare array."""
    tensors = MULTI_TENSORS[:n]
    a, b = socket.socketpair()
    fa, fb = FrameSocket(a), FrameSocket(b)
    try:
        fa.send(REQUEST, model=3, req_id=9, array=tensors)
        fa.send_responses([(10, tensors), (11, tensors[0])])
        for want_id in (9, 10):
            frame = fb.recv()
            assert frame is not None and frame.req_id == want_id and frame.dtype == MULTI
            got = frame.tensors()
            assert isinstance(got, tuple) and len(got) == n
            for g, t in zip(got, tensors, strict=True):
                assert g.dtype == t.dtype and g.shape == t.shape
                np.testing.assert_array_equal(g, t)
            with pytest.raises(ValueError):
                frame.array()  # several tensors: no single array
        single = fb.recv()
        assert single is not None and single.dtype != MULTI
        got1 = single.tensors()
        assert isinstance(got1, np.ndarray)
        np.testing.assert_array_equal(got1, tensors[0])
    finally:
        fa.close()
        fb.close()


def test_single_array_frames_are_unchanged() -> None:
    """One array: the frame of before (header, shape, raw bytes), no tensor table."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    head, body = frame_parts(REQUEST, OK, 1, 2, 3, x, b"")
    assert len(head) == 32 + 2 * 4 and bytes(body) == x.tobytes()
    assert head[2] == 0 and head[3] == 2  # float32's code, ndim
    parts = frame_parts(REQUEST, OK, 1, 2, 3, (x, x[0]), b"")
    assert parts[0][2] == MULTI and parts[0][3] == (1 + 2) + (1 + 1)  # table words
    assert sum(len(memoryview(p).cast("B")) for p in parts[1:]) == 24 + 16  # 12 B padded


def test_malformed_tensor_tables_are_refused() -> None:
    from stgs.runtime.transport import decode_tensors

    payload = bytearray(16)
    with pytest.raises(ValueError):
        decode_tensors(MULTI, (0 | 1 << 8,), payload)  # the dims word is missing
    with pytest.raises(ValueError):
        decode_tensors(MULTI, (0 | 1 << 8, 8), payload)  # 32 bytes needed
    with pytest.raises(ValueError):
        decode_tensors(MULTI, (0 | 1 << 8, 2), payload)  # 8 bytes too many
    with pytest.raises(ValueError):
        decode_tensors(MULTI, (), payload)  # no tensor
    with pytest.raises(ValueError):
        decode_tensors(MULTI, (200 | 1 << 8, 2), payload)  # unknown dtype code
    with pytest.raises(InvalidRequestError, match="cannot travel"):
        frame_parts(REQUEST, OK, 0, 0, 0, tuple(np.zeros((1,) * 9) for _ in range(30)), b"")
    with pytest.raises(InvalidRequestError):
        frame_parts(REQUEST, OK, 0, 0, 0, (), b"")


def test_unsupported_dtype_is_an_invalid_request() -> None:
    a, b = socket.socketpair()
    try:
        with pytest.raises(InvalidRequestError, match="cannot travel"):
            FrameSocket(a).send(REQUEST, array=np.zeros(2, dtype=np.complex64))
    finally:
        a.close()
        b.close()


def test_mock_transport() -> None:
    t = MockTransport(lambda _m, x: x * 2, ["m"])
    np.testing.assert_array_equal(t.submit("m", np.ones(2)).result(), [2.0, 2.0])
    with pytest.raises(InvalidRequestError):
        t.submit("other", np.ones(2)).result()
    with pytest.raises(DeadlineExceededError):
        t.submit("m", np.ones(2), deadline_ns=time.monotonic_ns() - 1).result()
    t.close()
    with pytest.raises(WorkerDiedError):
        t.submit("m", np.ones(2)).result()


def test_model_registry() -> None:
    assert model_entry("tiny_cnn").input_shape == (3, 32, 32)
    assert model_entry("bert_base").input_dtype == "int64"
    assert model_entry("sleep:5").needs_torch is False
    with pytest.raises(ConfigError, match="unknown model"):
        model_entry("no_such_net")
    with pytest.raises(ConfigError):
        model_entry("sleep:x")
    if importlib.util.find_spec("torchaudio") is None:
        with pytest.raises(ConfigError, match="unknown model"):
            model_entry("wav2vec2_base")
    else:
        assert model_entry("wav2vec2_base").input_shape == (16000,)
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(24) == (1, 2, 4, 8, 16, 24)


def test_bert_encoder_shape() -> None:
    torch = pytest.importorskip("torch")
    from stgs.registry import bert_encoder

    net = bert_encoder(vocab=100, hidden=32, layers=2, heads=4, ff=64).eval()
    with torch.inference_mode():
        out = net(torch.randint(0, 100, (3, 16)))
    assert tuple(out.shape) == (3, 16, 32)  # the last hidden state, as profiled


@pytest.fixture
def node() -> Iterator[SimulatedNode]:
    n = SimulatedNode("L4")
    yield n
    n.close()  # kills whatever worker a failed test left behind


def _worker(node: SimulatedNode, *slots: tuple[str, int], admission: bool = True) -> WorkerProcess:
    spec = WorkerSpec("w", tuple(ModelSlot(n, b) for n, b in slots), admission=admission)
    w = WorkerProcess(node, DeviceRef(0), None, spec)
    assert w.wait_ready(TIMEOUT), w.exit_reason()
    return w


def test_cpu_worker_serves_real_models_end_to_end(node: SimulatedNode) -> None:
    torch = pytest.importorskip("torch")
    from stgs.runtime.models import build_module

    w = _worker(node, ("tiny_mlp", 4), ("tiny_cnn", 2))
    try:
        assert w.pid in node.clients(DeviceRef(0))
        for name in ("tiny_mlp", "tiny_cnn"):
            entry = model_entry(name)
            xs = [entry.example(seed) for seed in range(5)]
            futs = [w.transport.submit(name, x) for x in xs]  # batched up to the slot's batch
            outs = [f.result(TIMEOUT) for f in futs]
            ref_net = build_module(name)
            with torch.inference_mode():
                want = ref_net(torch.from_numpy(np.stack(xs))).numpy()
            np.testing.assert_allclose(np.stack(outs), want, rtol=1e-4, atol=1e-5)
        with pytest.raises(InvalidRequestError, match="shape"):
            w.transport.submit("tiny_mlp", np.zeros(63, np.float32)).result(TIMEOUT)
        with pytest.raises(InvalidRequestError, match="dtype"):
            w.transport.submit("tiny_mlp", np.zeros(64, np.float64)).result(TIMEOUT)
        with pytest.raises(InvalidRequestError, match="does not serve"):
            w.transport.submit("resnet50", np.zeros(3, np.float32)).result(TIMEOUT)
    finally:
        w.stop()
    assert w.proc.returncode == 0


def test_deadlines_and_model_errors(node: SimulatedNode) -> None:
    w = _worker(node, ("sleep:100", 1), ("echo", 4), ("fail", 1))
    try:
        x = np.ones(3, np.float32)
        past = time.monotonic_ns() - 1
        with pytest.raises(DeadlineExceededError, match="deadline exceeded"):
            w.transport.submit("echo", x, deadline_ns=past).result(TIMEOUT)
        with pytest.raises(WorkerError, match="always fails"):
            w.transport.submit("fail", x).result(TIMEOUT)
        # Four 100 ms requests, one per batch, each with a 250 ms deadline: the first two fit;
        # the third would end at ~300 ms and is refused without running, and so is the fourth.
        soon = time.monotonic_ns() + 250_000_000
        futs = [w.transport.submit("sleep:100", x, deadline_ns=soon) for _ in range(4)]
        results = []
        for f in futs:
            try:
                f.result(TIMEOUT)
                results.append("ok")
            except DeadlineExceededError:
                results.append("late")
        assert results[0] == "ok"
        assert results[2:] == ["late", "late"]
        # Still serving after all that.
        np.testing.assert_array_equal(w.transport.submit("echo", x).result(TIMEOUT), x)
    finally:
        w.stop()


def test_sigkill_fails_in_flight_requests_fast(node: SimulatedNode) -> None:
    w = _worker(node, ("sleep:2000", 1))
    x = np.ones(3, np.float32)
    futs = [w.transport.submit("sleep:2000", x) for _ in range(4)]
    time.sleep(0.1)  # the first one is running, the others queued in the worker
    t0 = time.monotonic()
    os.kill(w.pid, signal.SIGKILL)
    for f in futs:
        with pytest.raises(WorkerDiedError, match="in flight"):
            f.result(TIMEOUT)
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(WorkerDiedError):
        w.transport.submit("sleep:2000", x).result(1.0)  # later requests fail at once
    w.kill()
    assert "signal 9" in w.exit_reason()


def test_stop_serves_what_is_queued(node: SimulatedNode) -> None:
    w = _worker(node, ("sleep:20", 1))
    x = np.ones(3, np.float32)
    futs = [w.transport.submit("sleep:20", x) for _ in range(5)]
    w.stop(timeout_s=TIMEOUT)
    for f in futs:
        np.testing.assert_array_equal(f.result(TIMEOUT), x)
    assert w.proc.returncode == 0


def test_worker_that_cannot_load_reports_it(node: SimulatedNode) -> None:
    spec = WorkerSpec("w", (ModelSlot("tiny_mlp", 1),), device="tpu")
    w = WorkerProcess(node, DeviceRef(0), None, spec)
    try:
        assert not w.wait_ready(TIMEOUT)
        assert w.proc.wait(TIMEOUT) == 3
    finally:
        w.kill()


def _wait_stats(t: SocketTransport, model: str, batches: int) -> dict[str, int]:
    end = time.monotonic() + TIMEOUT
    while time.monotonic() < end:
        st = t.batch_stats.get(model)
        if st is not None and st["batches"] >= batches:
            return st
        time.sleep(0.01)
    raise AssertionError(f"no STATS with {batches} batches of {model}: {t.batch_stats}")


def test_worker_reports_batch_statistics(node: SimulatedNode) -> None:
    """The worker's STATS frames: cumulative batches and run time per model, full batches (the
    planned size) apart; at most one frame a second, so the totals lag by up to a second."""
    x = np.ones(3, np.float32)
    for _attempt in range(5):
        w = _worker(node, ("sleep:30", 2), ("echo", 4))
        for f in [w.transport.submit("sleep:30", x) for _ in range(2)]:  # one full batch ...
            f.result(TIMEOUT)
        st = _wait_stats(w.transport, "sleep:30", 1)  # the first batch reports at once
        if st["full_batches"] == 1:
            break
        w.stop()  # ... unless the worker took the first request before the second arrived
    try:
        assert st["full_batches"] == 1 and 0.03e9 <= st["run_ns"] == st["full_run_ns"] < 1e9
        time.sleep(1.05)  # past the interval: the next batch reports again
        w.transport.submit("sleep:30", x).result(TIMEOUT)  # a partial batch
        st = _wait_stats(w.transport, "sleep:30", 2)
        assert st["full_batches"] == 1 and st["run_ns"] > st["full_run_ns"] + 0.025e9
        assert w.transport.batch_stats["echo"]["batches"] == 0
    finally:
        w.stop()
    assert w.proc.returncode == 0


def test_malformed_stats_are_ignored() -> None:
    a, b = socket.socketpair()
    t = SocketTransport(a, ["m"], name="t")
    try:
        fs = FrameSocket(b)
        fs.send(STATS, data=b"not json")
        good = b'{"batches": [3], "run_ns": [9], "full_batches": [1], "full_run_ns": [4]}'
        fs.send(STATS, data=good)
        end = time.monotonic() + TIMEOUT
        while not t.batch_stats and time.monotonic() < end:
            time.sleep(0.01)
        assert t.batch_stats == {
            "m": {"batches": 3, "run_ns": 9, "full_batches": 1, "full_run_ns": 4}
        }
        fs.send(STATS, data=b'{"batches": []}')  # malformed: the last good totals stay
        fs.send(STATS, data=good.replace(b"[3]", b"[5]"))
        end = time.monotonic() + TIMEOUT
        while t.batch_stats["m"]["batches"] == 3 and time.monotonic() < end:
            time.sleep(0.01)
        assert t.batch_stats["m"]["batches"] == 5 and not t.closed
    finally:
        t.close()
        b.close()


def test_worker_echoes_several_tensors(node: SimulatedNode) -> None:
    """Tuples through a worker process: batched together with single arrays, each request
    answered with its own tensors."""
    w = _worker(node, ("echo", 8))
    try:
        futs = [w.transport.submit("echo", MULTI_TENSORS[: 1 + k % 3]) for k in range(6)]
        one = w.transport.submit("echo", MULTI_TENSORS[1])
        for k, f in enumerate(futs):
            got = f.result(TIMEOUT)
            assert isinstance(got, tuple) and len(got) == 1 + k % 3
            for g, t in zip(got, MULTI_TENSORS, strict=False):
                np.testing.assert_array_equal(g, t)
        np.testing.assert_array_equal(one.result(TIMEOUT), MULTI_TENSORS[1])
    finally:
        w.kill()
