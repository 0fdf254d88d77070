"""The data plane's frontend process (``python -m api.frontend``) against real workers.

Each worker here is a real worker process listening for data connections on a Unix path
(``WorkerSpec.listen``), its control connection held by the test. The frontend is a real
process with a control socketpair and a listening TCP socket made here,
driven by tritonclient, httpx and aiohttp.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from api.frontend import Router
from api.inference import EXTENSIONS
from stgs.backend import DeviceRef, SimulatedNode
from stgs.errors import DeadlineExceededError, WorkerDiedError
from stgs.runtime.aio import AsyncWorkerConnection
from stgs.runtime.process import WorkerProcess
from stgs.runtime.worker import ModelSlot, WorkerSpec

pytestmark = pytest.mark.slow

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 30.0
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "STGS_DEVICE": "cpu"}


class PathWorker:
    """A real worker process (on the simulated node) listening for data connections at
    ``path`` (``WorkerSpec.listen``); the test holds its control connection."""

    def __init__(self, tmp: Path, name: str, *slots: tuple[str, int]) -> None:
        self.path = str(tmp / f"{name}.sock")
        spec = WorkerSpec(
            name, tuple(ModelSlot(m, b) for m, b in slots), device="cpu", listen=self.path
        )
        self.node = SimulatedNode("H100-80GB", 1, mig_enabled=False)
        self.worker = WorkerProcess(self.node, DeviceRef(0), None, spec)
        self.proc = self.worker.proc
        assert self.worker.wait_ready(TIMEOUT), "worker did not start"

    def close(self) -> None:
        self.worker.kill()
        self.node.close()


class FrontendProc:
    """``python -m api.frontend`` with a control socketpair and a listening socket made here."""

    def __init__(self, **config: Any) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.ctl, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cfg = {"http_fd": self.listener.fileno(), **config}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "api.frontend",
                "--control-fd",
                str(child.fileno()),
                "--config",
                json.dumps(cfg),
            ],
            pass_fds=[child.fileno(), self.listener.fileno()],
            env=ENV,
            cwd=ROOT,
        )
        child.close()
        self.ctl.settimeout(TIMEOUT)
        self._lines = self.ctl.makefile("rb")
        self.url = f"http://127.0.0.1:{self.port}"

    def send(self, msg: dict[str, Any]) -> None:
        self.ctl.sendall(json.dumps(msg).encode() + b"\n")

    def recv(self, kind: str) -> dict[str, Any]:
        """The next control message of type ``kind`` (others are skipped)."""
        while True:
            line = self._lines.readline()
            assert line, "the control channel closed"
            msg: dict[str, Any] = json.loads(line)
            if msg["type"] == kind:
                return msg

    def route(self, version: int, models: dict[str, Any], parts: list[dict[str, Any]]) -> Any:
        self.send(
            {
                "type": "routing",
                "version": version,
                "ready": True,
                "models": models,
                "partitions": parts,
            }
        )
        ack = self.recv("ack")
        assert ack["version"] == version
        return ack

    def close(self) -> None:
        self._lines.close()
        self.ctl.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.listener.close()


def _model(slo_ms: float, shape: list[int] | None = None, dtype: str = "") -> dict[str, Any]:
    return {"slo_ms": slo_ms, "input": {"name": "input", "dtype": dtype, "shape": shape}}


def _part(pid: str, w: PathWorker, models: list[str], rate: float) -> dict[str, Any]:
    return {"id": pid, "socket": w.path, "models": models, "rates": dict.fromkeys(models, rate)}


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[PathWorker]]:
    made: list[PathWorker] = []
    yield made
    for w in made:
        w.close()


# ------------------------------------------------------------------------ aio.py on its own
def test_async_connection_serves_and_fails_in_flight_when_the_worker_dies(
    tmp_path: Path, workers: list[PathWorker]
) -> None:
    w = PathWorker(tmp_path, "w", ("echo", 4), ("sleep:5000", 1))
    workers.append(w)

    async def go() -> None:
        conn = await AsyncWorkerConnection.open(w.path, name="w")
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        outs = await asyncio.gather(*(conn.submit(0, row, 0) for row in x))
        np.testing.assert_array_equal(np.stack(outs), x)
        late = conn.submit(0, x[0], time.monotonic_ns() - 1)  # already past its deadline
        with pytest.raises(DeadlineExceededError):
            await late
        slow = conn.submit(1, x[0], 0)
        given_up = conn.submit(1, x[0], 0)
        given_up.cancel()  # its caller timed out: the worker still holds it
        await asyncio.sleep(0.3)
        assert conn.in_flight == 2 and conn.awaited == 1
        w.proc.kill()
        with pytest.raises(WorkerDiedError):
            await asyncio.wait_for(slow, TIMEOUT)
        assert conn.closed and conn.in_flight == 0
        with pytest.raises(WorkerDiedError):
            await conn.submit(0, x[0], 0)
        conn.close()

    asyncio.run(go())


def test_a_routing_older_than_the_one_in_use_is_ignored(
    tmp_path: Path, workers: list[PathWorker]
) -> None:
    """The daemon answers a frontend's hello with the current routing; a publish can overtake
    that answer. Applying the older snapshot after the newer one would route again to a
    partition the newer one left out, one the daemon drains once the newer one is acknowledged."""
    a = PathWorker(tmp_path, "a", ("echo", 4))
    b = PathWorker(tmp_path, "b", ("echo", 4))
    workers += [a, b]
    models = {"echo": _model(5000.0)}

    def snap(version: int, *parts: dict[str, Any]) -> dict[str, Any]:
        return {"version": version, "ready": True, "models": models, "partitions": list(parts)}

    async def go() -> None:
        r = Router()
        try:
            assert await r.apply(snap(2, _part("pb", b, ["echo"], 10.0))) == []
            assert await r.apply(snap(1, _part("pa", a, ["echo"], 10.0))) == []  # overtaken
            assert r.version == 2 and list(r.partitions) == ["pb"]
            x = np.ones((1, 4), np.float32)
            out = await r.infer_arrays("echo", (x,), None)
            np.testing.assert_array_equal(out[0], x)
            assert r.partitions["pb"].service_s  # served by b
        finally:
            r.close()

    asyncio.run(go())


# ------------------------------------------------------------------------ the process
def test_frontend_serves_kserve_like_the_daemon(tmp_path: Path, workers: list[PathWorker]) -> None:
    w = PathWorker(tmp_path, "w0", ("echo", 8))
    workers.append(w)
    fe = FrontendProc()
    try:
        hello = fe.recv("hello")
        assert hello["pid"] == fe.proc.pid
        with httpx.Client(base_url=fe.url) as h:  # no routing yet: not ready, models unknown
            assert h.get("/v2/health/ready").status_code == 503
            r = h.post("/v2/models/echo/infer", content=BODY)
            assert r.status_code == 503 and "no routing" in r.json()["error"]
        ack = fe.route(1, {"echo": _model(5000.0)}, [_part("p0", w, ["echo"], 100.0)])
        assert ack["failed"] == []
        c = httpclient.InferenceServerClient(url=f"127.0.0.1:{fe.port}")
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("echo")
        meta = c.get_model_metadata("echo")
        assert meta["inputs"][0]["name"] == "input" and meta["outputs"][0]["name"] == "output"
        x = np.random.default_rng(0).standard_normal((3, 5), dtype=np.float32)
        for binary in (False, True):
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            out = httpclient.InferRequestedOutput("output", binary_data=binary)
            res = c.infer("echo", [inp], outputs=[out], request_id="r1")
            np.testing.assert_array_equal(res.as_numpy("output"), x)
            assert res.get_response()["id"] == "r1"
        with pytest.raises(InferenceServerException, match="unknown model"):
            c.infer("nope", [inp])
        c.close()

        # the daemon's error answers, status and message (tests/test_api.py's table)
        from tests.test_api import BAD_INFER

        with httpx.Client(base_url=fe.url) as h:
            for headers, body, status, msg in BAD_INFER:
                r = h.post("/v2/models/echo/infer", content=body, headers=headers)
                assert r.status_code == status, (body, r.text)
                assert msg in r.json()["error"], (body, r.text)
            r = h.get("/v2/models/nope")
            assert r.status_code == 404 and "unknown model" in r.json()["error"]
            r = h.get("/v2/models/nope/ready")
            assert r.status_code == 404
            assert h.get("/v2").json()["extensions"] == list(EXTENSIONS)
            big = b"x" * (2 << 20)
            r = h.post("/v2/models/echo/infer", content=big)
            assert r.status_code == 400  # under the infer limit: parsed, not JSON
            r = h.post("/v1/models", content=big)
            assert r.status_code == 413  # the other paths' limit

        # what reached the router counts (the daemon's observer counts the same requests)
        stats = fe.recv("stats")["models"]["echo"]
        while stats["requests"] < 2:
            stats = fe.recv("stats")["models"]["echo"]
        assert (
            stats["requests"] == 2
            and stats["ok"] == 2
            and stats["slo_met"] == 2
            and stats["shed"] == 0
        )
        assert sum(stats["duration_buckets"]) == stats["requests"] and stats["samples"] == 6
        assert stats["duration_sum_s"] > 0
    finally:
        fe.close()
    assert fe.proc.returncode == 0  # the control channel closed: it exited


def test_grpc_and_token(tmp_path: Path, workers: list[PathWorker]) -> None:
    w = PathWorker(tmp_path, "w0", ("echo", 8))
    workers.append(w)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        grpc_port = s.getsockname()[1]
    fe = FrontendProc(grpc_port=grpc_port, token_file=str(token), auth_all=True)
    try:
        fe.route(1, {"echo": _model(5000.0)}, [_part("p0", w, ["echo"], 100.0)])
        with httpx.Client(base_url=fe.url) as h:
            assert h.get("/v2/health/live").status_code == 401
            ok = h.get("/v2/health/live", headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200
        c = grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
        with pytest.raises(InferenceServerException, match="token"):
            c.is_server_live()
        auth = {"authorization": "Bearer s3cret"}
        x = np.ones((2, 3), np.float32)
        inp = grpcclient.InferInput("input", [2, 3], "FP32")
        inp.set_data_from_numpy(x)
        res = c.infer("echo", [inp], headers=auth)
        np.testing.assert_array_equal(res.as_numpy("output"), x)
        with pytest.raises(InferenceServerException, match="unknown model"):
            c.infer("nope", [inp], headers=auth)
        c.close()
    finally:
        fe.close()


class _Control(http.server.BaseHTTPRequestHandler):
    """The control plane's HTTP server, as far as the proxy can tell."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n)
        out = json.dumps(
            {"method": self.command, "path": self.path, "body": body.decode(), "auth": None}
        ).encode()
        self.send_response(418)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Control", "yes")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_DELETE = _answer

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_other_paths_go_to_the_control_plane(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    server = socketserver.ThreadingUnixStreamServer(path, _Control)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    fe = FrontendProc(control_socket=path)
    try:
        fe.route(1, {}, [])
        with httpx.Client(base_url=fe.url) as h:
            r = h.post("/v1/models?x=1", json={"name": "echo"})
            assert r.status_code == 418 and r.headers["x-control"] == "yes"
            got = r.json()
            assert got["method"] == "POST" and got["path"] == "/v1/models?x=1"
            assert json.loads(got["body"]) == {"name": "echo"}
            r = h.get("/metrics")
            assert r.status_code == 418 and r.json()["path"] == "/metrics"
            r = h.get("/v2/models/echo")  # not routed here: unknown to the frontend
            assert r.status_code == 404
    finally:
        fe.close()
        server.shutdown()
        server.server_close()


def _burst(url: str, n: int, body: bytes) -> list[tuple[int, float, dict[str, Any]]]:
    """``n`` requests at once (one connection each); (status, seconds, JSON) per request."""
    import aiohttp

    async def go() -> list[tuple[int, float, dict[str, Any]]]:
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:

            async def one() -> tuple[int, float, dict[str, Any]]:
                t0 = time.monotonic()
                async with s.post(url, data=body) as r:
                    got = await r.json(content_type=None)
                    return r.status, time.monotonic() - t0, got

            async def warm() -> None:
                async with s.get(url.rsplit("/", 3)[0] + "/health/live") as r:
                    await r.read()

            # open the connections first: the burst measures the server, not TCP handshakes
            await asyncio.gather(*(warm() for _ in range(n)))
            return await asyncio.gather(*(one() for _ in range(n)))

    return asyncio.run(go())


BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
).encode()


def test_admission_sheds_at_once_what_cannot_meet_its_deadline(
    tmp_path: Path, workers: list[PathWorker]
) -> None:
    w = PathWorker(tmp_path, "w0", ("sleep:200", 1))
    workers.append(w)
    fe = FrontendProc()
    try:
        # planned at 5 requests/s: 200 ms each, as the worker runs them; a 400 ms SLO. The scale
        # (not 50/100 ms) keeps the client's own jitter on a loaded 2-core host small beside it.
        fe.route(1, {"sleep:200": _model(400.0)}, [_part("p0", w, ["sleep:200"], 5.0)])
        url = f"{fe.url}/v2/models/sleep:200/infer"
        for _ in range(3):  # the worker's first batches (and the frontend's estimate) settle
            _burst(url, 1, BODY)
        got = _burst(url, 100, BODY)
        ok = [s for st, s, _ in got if st == 200]
        shed = [(s, b) for st, s, b in got if st == 429]
        assert len(ok) + len(shed) == 100, sorted({st for st, _, _ in got})
        assert 1 <= len(ok) <= 4, len(ok)
        assert max(ok) <= 0.4 + 0.2, ok  # within the SLO, with room for a loaded host
        assert all("deadline" in b["error"] for _, b in shed)
        assert max(s for s, _ in shed) <= 0.4 + 0.2  # no answer later than SLO + a bound
        fast = sorted(s for s, _ in shed)
        assert fast[len(fast) // 2] < 0.2, fast  # most are refused at once
        stats = fe.recv("stats")["models"]["sleep:200"]
        while stats["requests"] < 103:
            stats = fe.recv("stats")["models"]["sleep:200"]
        assert stats["shed"] == len(shed) and stats["ok"] == len(ok) + 3
    finally:
        fe.close()


def test_a_partition_left_out_of_the_snapshot_finishes_its_requests(
    tmp_path: Path, workers: list[PathWorker]
) -> None:
    a = PathWorker(tmp_path, "a", ("sleep:200", 8))
    b = PathWorker(tmp_path, "b", ("sleep:200", 8))
    workers += [a, b]
    fe = FrontendProc()
    models = {"sleep:200": _model(10000.0)}
    try:
        fe.route(1, models, [_part("pa", a, ["sleep:200"], 40.0)])
        url = f"{fe.url}/v2/models/sleep:200/infer"
        results: list[Any] = []
        t = threading.Thread(target=lambda: results.extend(_burst(url, 8, BODY)))
        t.start()
        time.sleep(0.1)  # in flight on a
        fe.route(2, models, [_part("pb", b, ["sleep:200"], 40.0)])
        after = _burst(url, 4, BODY)  # go to b
        t.join(TIMEOUT)
        assert [st for st, _, _ in results] == [200] * 8
        assert [st for st, _, _ in after] == [200] * 4
        assert b.proc.poll() is None
        a.close()  # a partition that cannot be reached is reported
        ack = fe.route(3, models, [_part("pa", a, ["sleep:200"], 40.0)])
        assert ack["failed"] == ["pa"]
    finally:
        fe.close()


def test_admission_counts_rounds_of_batches(tmp_path: Path, workers: list[PathWorker]) -> None:
    """A worker that takes up to 8 requests per round: a burst of 8 fits one round and must not
    be shed as 8 requests' worth of service time (what a per-request estimate predicted)."""
    w = PathWorker(tmp_path, "w0", ("sleep:100", 8))
    workers.append(w)
    fe = FrontendProc()
    try:
        part = {**_part("p0", w, ["sleep:100"], 40.0), "batches": {"sleep:100": 8}}
        fe.route(1, {"sleep:100": _model(300.0)}, [part])
        url = f"{fe.url}/v2/models/sleep:100/infer"
        for _ in range(3):  # the estimate settles: one round takes ~100 ms
            _burst(url, 1, BODY)
        got = _burst(url, 8, BODY)
        assert [st for st, _, _ in got] == [200] * 8, got
        assert max(s for _, s, _ in got) <= 0.3
        # and past a round's worth it still sheds: 3 rounds (300 ms) cannot meet 300 ms
        got = _burst(url, 40, BODY)
        codes = [st for st, _, _ in got]
        assert codes.count(429) >= 8 and codes.count(200) >= 8, codes
    finally:
        fe.close()


def test_a_model_split_over_a_shared_partition_gets_its_share_there(
    tmp_path: Path, workers: list[PathWorker]
) -> None:
    """A model planned on a partition of its own and on one it shares, at equal rates: while
    the shared worker is busy with another model's requests, a burst of the first model still
    goes to both partitions (the router weighs that model's own requests in flight,
    stgs.batching.route_load). Weighing the worker's total sent the whole burst to the
    partition of its own and left the shared one's planned share unused."""
    own = PathWorker(tmp_path, "own", ("sleep:30", 4))
    shared = PathWorker(tmp_path, "shared", ("sleep:30", 4), ("sleep:400", 8))
    workers += [own, shared]
    fe = FrontendProc()
    try:
        p_shared = {
            "id": "shared",
            "socket": shared.path,
            "models": ["sleep:30", "sleep:400"],
            "rates": {"sleep:30": 50.0, "sleep:400": 20.0},
            "batches": {"sleep:30": 4, "sleep:400": 8},
        }
        p_own = {**_part("own", own, ["sleep:30"], 50.0), "batches": {"sleep:30": 4}}
        fe.route(
            1,
            {"sleep:30": _model(5000.0), "sleep:400": _model(5000.0)},
            [p_own, p_shared],
        )

        async def both() -> tuple[list[int], list[int]]:
            import aiohttp

            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

                async def one(model: str, delay: float) -> int:
                    await asyncio.sleep(delay)
                    async with s.post(f"{fe.url}/v2/models/{model}/infer", data=BODY) as r:
                        await r.read()
                        return r.status

                busy = [asyncio.create_task(one("sleep:400", 0.0)) for _ in range(8)]
                burst = [asyncio.create_task(one("sleep:30", 0.1)) for _ in range(8)]
                return list(await asyncio.gather(*busy)), list(await asyncio.gather(*burst))

        busy, burst = asyncio.run(both())
        assert busy == [200] * 8 and burst == [200] * 8, (busy, burst)
        # a worker sends its cumulative STATS after a batch, at most once a second: one more
        # batch on the shared worker, a second later, brings them
        time.sleep(1.2)
        assert _burst(f"{fe.url}/v2/models/sleep:400/infer", 1, BODY)[0][0] == 200

        def shared_ran_the_model() -> bool:
            st = shared.worker.transport.batch_stats
            return bool(st) and st.get("sleep:30", {}).get("batches", 0) > 0

        deadline = time.monotonic() + 15
        while not shared_ran_the_model() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert shared_ran_the_model(), dict(shared.worker.transport.batch_stats)
    finally:
        fe.close()
