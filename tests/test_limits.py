"""Limits on what a client can make the daemon spend (api.limits), against the real daemon.

One ``stgs serve`` process for the module (simulated node, CPU workers) with small limits:
headers within 2 s and 64 KiB, a body within 4 s with no pause over 2 s, an inference body of
at most 8 MiB, any other body 1 MiB. Clients are raw sockets (to send exactly the bytes an attacker
would: partial headers, slow or endless chunked bodies) and httpx.
"""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from api.launch import ROOT, LocalDaemon, wait_until

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 4.0
IDLE_BODY_TIMEOUT_S = 2.0
MAX_INFER_BODY_BYTES = 8 << 20
MAX_BODY_BYTES = 1 << 20  # the default
INFER = "/v2/models/tiny_mlp/infer"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDaemon]:
    d = LocalDaemon(
        tmp_path_factory.mktemp("limits"),
        '[backend]\nkind = "simulated"\nsimulated_gpus = [{ sku = "H100-80GB", count = 1 }]\n',
        server_options=f"header_timeout_s = {HEADER_TIMEOUT_S}\n"
        f"body_timeout_s = {BODY_TIMEOUT_S}\n"
        f"idle_body_timeout_s = {IDLE_BODY_TIMEOUT_S}\n"
        f"max_infer_body_bytes = {MAX_INFER_BODY_BYTES}\n",
    )
    p = d.start()
    try:
        with d.client() as c:
            wait_until("ready", lambda: c.get("/v2/health/ready").status_code == 200, 30, p)
            # profiled on the CPU in the background while the tests below run
            r = c.post("/v1/models", json={"name": "tiny_mlp", "slo_ms": 5000, "rate_rps": 2})
            assert r.status_code in (201, 202), r.text
        yield d
    finally:
        d.stop()


def _connect(d: LocalDaemon) -> socket.socket:
    return socket.create_connection(("127.0.0.1", d.port), timeout=10)


def _head(method: str, path: str, token: str, *extra: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", f"Authorization: Bearer {token}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _until_closed(s: socket.socket, timeout_s: float) -> bytes:
    """Everything the daemon sends until it closes the connection (AssertionError if it does
    not within ``timeout_s``)."""
    end = time.monotonic() + timeout_s
    got = b""
    while True:
        left_s = end - time.monotonic()
        assert left_s > 0, f"the daemon kept the connection open; got {got[:200]!r}"
        s.settimeout(left_s)
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            return got
        except TimeoutError:
            continue
        if not data:
            return got
        got += data


def _status(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    return int(raw.split(b" ", 2)[1])


def _error(raw: bytes) -> str:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), head
    return str(json.loads(body)["error"])


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ------------------------------------------------------------------------------ body size
@pytest.mark.parametrize("path", [INFER, "/v1/models"])
def test_content_length_over_the_limit_is_refused_before_any_body_byte(
    daemon: LocalDaemon, path: str
) -> None:
    with _connect(daemon) as s:
        t0 = time.monotonic()
        s.sendall(_head("POST", path, daemon.token, "Content-Length: 300000000"))
        raw = _until_closed(s, 2.0)  # not one body byte sent
    assert _status(raw) == 413
    assert "300000000 bytes" in _error(raw)
    assert time.monotonic() - t0 < 2.0


def _stream_chunked(d: LocalDaemon, path: str, total_bytes: int) -> tuple[bytes, int]:
    """POST an endless-looking chunked body (256 KiB chunks, up to ``total_bytes``) until the
    daemon answers; (its answer, the body bytes sent)."""
    chunk_bytes = 256 << 10
    chunk = b"%x\r\n" % chunk_bytes + b"0" * chunk_bytes + b"\r\n"
    sent = 0
    with _connect(d) as s:
        s.sendall(_head("POST", path, d.token, "Transfer-Encoding: chunked"))
        try:
            while sent < total_bytes and not select.select([s], [], [], 0)[0]:
                s.sendall(chunk)
                sent += chunk_bytes
            s.sendall(b"0\r\n\r\n")
        except OSError:  # the daemon closed the connection: its answer is still readable
            pass
        return _until_closed(s, 10.0), sent


def test_chunked_bodies_are_refused_as_they_pass_the_limit_not_buffered(
    daemon: LocalDaemon,
) -> None:
    pid = daemon.procs[0].pid
    base = _rss_bytes(pid)
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.01):
            peak = max(peak, _rss_bytes(pid))

    total = 200 << 20
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: _stream_chunked(daemon, INFER, total), range(4)))
    finally:
        done.set()
        sampler.join()
    for raw, sent in results:
        assert _status(raw) == 413
        assert f"over {MAX_INFER_BODY_BYTES} bytes" in _error(raw)
        assert sent < total // 4, sent  # refused long before the client was done
    assert peak - base < 150 << 20, f"RSS grew {(peak - base) >> 20} MiB"


def test_rest_bodies_have_their_own_1_mib_limit(daemon: LocalDaemon) -> None:
    body = b'{"name": "' + b"x" * (5 << 20) + b'"}'
    with daemon.client() as c:
        r = c.post("/v1/models", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        want = f"the request body ({len(body)} bytes) is over {MAX_BODY_BYTES} bytes"
        assert r.json() == {"error": want}
        r = c.post("/v1/plan/preview", content=iter([b" " * (1 << 20), b"{}"]))  # chunked
        assert r.status_code == 413, r.text
        assert r.json()["error"] == f"the request body is over {MAX_BODY_BYTES} bytes"
        # at the limit, not over: the route itself answers
        r = c.post(
            "/v1/plan/preview",
            content=b" " * (MAX_BODY_BYTES - 2) + b"{}",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------ time
def test_slow_headers_are_cut_at_the_header_timeout(daemon: LocalDaemon) -> None:
    with _connect(daemon) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /v1/models HTTP/1.1\r\nHost: x\r\n")
        raw = b""
        try:
            while time.monotonic() - t0 < HEADER_TIMEOUT_S + 2:
                s.sendall(b"X")  # one header byte a second, forever
                if select.select([s], [], [], 1.0)[0]:
                    break
        except OSError:
            pass
        raw = _until_closed(s, HEADER_TIMEOUT_S + 2 - (time.monotonic() - t0))
    assert _status(raw) == 408
    assert "headers did not arrive within 2 s" in _error(raw)
    assert HEADER_TIMEOUT_S - 0.5 < time.monotonic() - t0 < HEADER_TIMEOUT_S + 2


def _one_response(s: socket.socket) -> bytes:
    """One response with a Content-Length, read off a connection that stays open."""
    s.settimeout(10)
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += s.recv(65536)
    head, _, body = raw.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def test_the_header_timeout_spares_idle_keep_alive_and_covers_each_request(
    daemon: LocalDaemon,
) -> None:
    get = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    with _connect(daemon) as s:
        s.sendall(get)
        assert _status(_one_response(s)) == 200
        time.sleep(HEADER_TIMEOUT_S + 1)  # idle between requests: uvicorn's keep-alive (5 s)
        s.sendall(get)
        assert _status(_one_response(s)) == 200
        t0 = time.monotonic()
        s.sendall(b"GET /v2 HTTP/1.1\r\n")  # the third request's headers never end
        raw = _until_closed(s, HEADER_TIMEOUT_S + 2)
    assert _status(raw) == 408
    assert HEADER_TIMEOUT_S - 0.5 < time.monotonic() - t0 < HEADER_TIMEOUT_S + 2


def test_endless_headers_are_refused_at_the_size_limit(daemon: LocalDaemon) -> None:
    with _connect(daemon) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(64):  # a 64 MiB header value, unless the daemon answers first
                if select.select([s], [], [], 0)[0]:
                    break
                s.sendall(b"a" * (1 << 20))
        except OSError:
            pass
        raw = _until_closed(s, HEADER_TIMEOUT_S)
    assert _status(raw) == 431
    assert _error(raw) == "the request headers are over 65536 bytes"
    assert time.monotonic() - t0 < HEADER_TIMEOUT_S  # the size limit, not the timeout


def test_a_connection_that_sends_nothing_is_closed(daemon: LocalDaemon) -> None:
    with _connect(daemon) as s:
        t0 = time.monotonic()
        assert _until_closed(s, HEADER_TIMEOUT_S + 2) == b""
    assert time.monotonic() - t0 > HEADER_TIMEOUT_S - 0.5


def test_a_slow_body_is_cut_at_the_body_timeout(daemon: LocalDaemon) -> None:
    with _connect(daemon) as s:
        t0 = time.monotonic()
        s.sendall(_head("POST", "/v1/plan/preview", daemon.token, "Content-Length: 1000"))
        try:
            while time.monotonic() - t0 < BODY_TIMEOUT_S + 2:
                s.sendall(b" ")  # a byte a second: never idle long, never done
                if select.select([s], [], [], 1.0)[0]:
                    break
        except OSError:
            pass
        raw = _until_closed(s, 2.0)
    assert _status(raw) == 408
    assert "did not arrive within 4 s" in _error(raw)
    assert BODY_TIMEOUT_S - 0.5 < time.monotonic() - t0 < BODY_TIMEOUT_S + 2


def test_a_stalled_body_is_cut_at_the_idle_timeout(daemon: LocalDaemon) -> None:
    with _connect(daemon) as s:
        t0 = time.monotonic()
        s.sendall(_head("POST", INFER, daemon.token, "Content-Length: 1000") + b"{" * 10)
        raw = _until_closed(s, IDLE_BODY_TIMEOUT_S + 2)
    assert _status(raw) == 408
    assert "no request body bytes for 2 s" in _error(raw)
    assert IDLE_BODY_TIMEOUT_S - 0.5 < time.monotonic() - t0 < IDLE_BODY_TIMEOUT_S + 2


# ------------------------------------------------------------------------------ disconnects
def test_a_client_leaving_mid_body_leaves_no_traceback(daemon: LocalDaemon) -> None:
    before = daemon.log_path.stat().st_size
    for head in ("Content-Length: 100000", "Transfer-Encoding: chunked"):
        with _connect(daemon) as s:
            s.sendall(_head("POST", INFER, daemon.token, head) + b"5\r\n{")
    with daemon.client() as c:
        time.sleep(0.5)  # the daemon notices the closed connections
        assert c.get("/v2/health/live").status_code == 200
    log = daemon.log_path.read_bytes()[before:].decode(errors="replace")
    assert "Traceback" not in log and "Exception in ASGI" not in log, log


# ------------------------------------------------------------------------------ inference
def test_deeply_nested_json_is_a_400(daemon: LocalDaemon) -> None:
    with daemon.client() as c:
        r = c.post(INFER, content=b'{"inputs": ' + b"[" * 100_000)
        assert r.status_code == 400, r.text
        assert r.json() == {"error": "the request JSON is nested too deeply"}
        r = c.post(INFER, content=b"[" * 100_000)
        assert r.status_code == 400, r.text


def _binary_infer(c: httpx.Client, x: np.ndarray) -> httpx.Response:
    raw = x.astype("<f4").tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    return c.post(
        INFER,
        content=head + raw,
        headers={
            "Inference-Header-Content-Length": str(len(head)),
            "content-type": "application/octet-stream",
        },
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_binary_input_is_a_400_like_json(daemon: LocalDaemon, bad: float) -> None:
    with daemon.client() as c:
        wait_until(
            "tiny_mlp ready",
            lambda: c.get("/v1/models/tiny_mlp").json()["status"] == "ready",
            60,
            daemon.procs[0],
        )
        x = np.ones((2, 64), np.float32)
        r = _binary_infer(c, x)
        assert r.status_code == 200, r.text  # the same request with finite values is served
        x[1, 3] = bad
        r = _binary_infer(c, x)
        assert r.status_code == 400, r.text
        assert r.json() == {"error": "input 'input': data holds NaN or infinity"}


# ------------------------------------------------------------------------------ token file
@pytest.mark.parametrize("mode", [0o666, 0o620], ids=["0666", "0620"])
def test_a_token_file_others_may_write_stops_the_daemon(tmp_path: Path, mode: int) -> None:
    d = LocalDaemon(tmp_path, '[backend]\nkind = "simulated"\n')
    token = tmp_path / "token"
    token.chmod(mode)
    assert stat.S_IMODE(token.stat().st_mode) == mode
    proc = subprocess.run(
        [sys.executable, "-m", "api.cli", "serve", "--config", str(d.config)],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"stgs: error: {token}: the token file is writable by group or others"
        f" (mode {mode:04o}); chmod go-w {token}"
    ]


def test_concurrency_bound_answers_at_once(tmp_path: Path) -> None:
    """``server.max_concurrency``: past it a frontend answers HTTP 503 and gRPC
    RESOURCE_EXHAUSTED at once instead of queueing (idle connections and open streams count)."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    bound = 16
    d = LocalDaemon(
        tmp_path,
        '[backend]\nkind = "simulated"\n',
        server_options=f"frontends = 1\nmax_concurrency = {bound}\n",
    )
    p = d.start()
    held: list[socket.socket] = []
    try:
        with d.client() as c:
            wait_until("ready", lambda: c.get("/v2/health/ready").status_code == 200, 30, p)
        for _ in range(bound + 4):  # idle keep-alive connections, as a slow client holds them
            held.append(_connect(d))
        time.sleep(0.3)  # the frontend has accepted them
        t0 = time.monotonic()
        r = httpx.get(f"{d.url}/v2/health/live", timeout=10)
        assert r.status_code == 503, r.text
        assert time.monotonic() - t0 < 2.0
        for s in held:
            s.close()
        held.clear()
        wait_until(
            "served again",
            lambda: httpx.get(f"{d.url}/v2/health/live", timeout=10).status_code == 200,
            10,
            p,
        )

        channel = grpc.insecure_channel(f"127.0.0.1:{d.grpc_port}")
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        stop = threading.Event()

        def idle() -> Iterator[pb.ModelInferRequest]:  # a stream that sends nothing
            stop.wait(30)
            return
            yield

        streams = [stub.ModelStreamInfer(idle()) for _ in range(bound + 4)]
        try:
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as err:
                stub.ServerLive(pb.ServerLiveRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
        finally:
            stop.set()
            for st in streams:
                st.cancel()

        def live() -> bool:
            try:
                return bool(stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live)
            except grpc.RpcError:
                return False

        wait_until("gRPC served again", live, 10, p)
        channel.close()
    finally:
        for s in held:
            s.close()
        d.stop()
