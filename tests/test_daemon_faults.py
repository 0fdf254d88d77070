"""A daemon killed with SIGKILL loses nothing and leaves nothing behind (issue 13).

The real daemon process (``stgs serve``, simulated node, CPU workers), killed at the two moments
where it has children and half-done work: while a model profiles (the profiler's measuring
process, a temporary directory under ``state/profiling``) and while a plan is applied (a worker
loading its model, the client of the registration waiting for its reply). After each kill: the
children are gone within a second (they die with the daemon, not when they next read their
pipe or socket); a restart on the same state directory removes what profiling left, finishes
the registration, and answers the client's retry of the same request with 200 (the reply it
lost), not 409.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.launch import LocalDaemon, wait_until

pytestmark = pytest.mark.slow

SECTIONS = """
[backend]
kind = "simulated"
simulated_gpus = [{ sku = "H100-80GB", count = 1 }]
"""
TINY = {"name": "tiny_mlp", "slo_ms": 5000, "rate_rps": 2}
BERT = {"name": "bert_base", "slo_ms": 5000, "rate_rps": 1}  # profiled already: no profiling
# The children of a killed daemon are gone within this (measured on a shared 2-core machine:
# 0.02-0.25 s from the SIGKILL, the daemon's reaping included; 3.8-4.0 s before they died with
# it, when they noticed only once they read their pipe or socket again).
GONE_WITHIN_S = 1.0


@pytest.fixture
def node(tmp_path: Path) -> Iterator[LocalDaemon]:
    d = LocalDaemon(tmp_path, SECTIONS)
    try:
        yield d
    finally:
        for p in d.procs:  # a failed test may leave the daemon running: its children die with it
            if p.poll() is None:
                p.kill()
                p.wait(10)
        d.stop()


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, ...); None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")  # a zombie has exited


def children(ppid: int, module: str) -> list[int]:
    """Live processes whose parent is ``ppid`` running ``python -m <module>``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = _stat(int(entry.name))
        if st is None or int(st[1]) != ppid or not _alive(int(entry.name)):
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if module.encode() in argv:
            out.append(int(entry.name))
    return out


def sigkill_and_time_children(p: subprocess.Popen[bytes], pids: list[int]) -> float:
    """SIGKILL the daemon; seconds until every one of ``pids`` has exited (10 s at most)."""
    t0 = time.monotonic()
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    while any(_alive(c) for c in pids) and time.monotonic() - t0 < 10:
        time.sleep(0.005)
    return time.monotonic() - t0


def wait_ready(c: httpx.Client, p: subprocess.Popen[bytes]) -> None:
    wait_until("ready", lambda: c.get("/v2/health/ready").status_code == 200, 60, p)


def model_status(c: httpx.Client, name: str) -> Any:
    return c.get(f"/v1/models/{name}").json()["status"]


def test_sigkill_while_profiling(node: LocalDaemon) -> None:
    prof = node.work / "state" / "profiling"
    p = node.start()
    with node.client() as c:
        wait_ready(c, p)
        r = c.post("/v1/models", json=TINY)
        assert r.status_code == 202 and r.json()["status"] == "profiling", r.text
        measuring = wait_until(
            "the profiler's measuring process", lambda: children(p.pid, "profiler.worker"), 60, p
        )
        tmp = [x.name for x in prof.iterdir() if x.is_dir()]
        assert tmp and model_status(c, "tiny_mlp") == "profiling"
    took = sigkill_and_time_children(p, measuring)
    assert took < GONE_WITHIN_S, f"the measuring process outlived the daemon by {took:.2f} s"
    assert all((prof / n).is_dir() for n in tmp)  # left behind by the kill

    p = node.start()
    with node.client() as c:
        wait_ready(c, p)
        assert not any((prof / n).exists() for n in tmp), "stale profiling dirs not removed"
        assert "stale profiling dir" in node.log_path.read_text()
        wait_until("tiny_mlp ready", lambda: model_status(c, "tiny_mlp") == "ready", 90, p)
        again = c.post("/v1/models", json=TINY)  # the client's retry of the lost reply
        assert again.status_code == 200 and again.json()["status"] == "ready", again.text
        other = c.post("/v1/models", json={**TINY, "rate_rps": 3})
        assert other.status_code == 409, other.text
        assert not [x for x in prof.iterdir() if x.is_dir()]


def test_sigkill_while_a_worker_loads(node: LocalDaemon) -> None:
    p = node.start()
    replies: list[Any] = []

    def register() -> None:  # blocks until the plan is applied: the daemon dies first
        try:
            with node.client() as c:
                replies.append(c.post("/v1/models", json=BERT))
        except httpx.HTTPError as exc:
            replies.append(exc)

    with node.client() as c:
        wait_ready(c, p)
        t = threading.Thread(target=register)
        t.start()
        workers = wait_until("a worker", lambda: children(p.pid, "stgs.runtime"), 30, p)
        states = [x["state"] for x in c.get("/v1/plan").json()["partitions"]]
        assert states == ["starting"], states  # still loading its model
        frontends = children(p.pid, "api.frontend")
        assert frontends  # the data plane's (server.frontends = auto)
    took = sigkill_and_time_children(p, workers + frontends)
    t.join(10)
    assert took < GONE_WITHIN_S, f"a worker or frontend outlived the daemon by {took:.2f} s"
    # no reply: the connection broke, or (through a frontend) its proxy answered 502
    lost = replies[0] if replies else None
    assert isinstance(lost, httpx.HTTPError) or (
        isinstance(lost, httpx.Response) and lost.status_code == 502
    ), replies

    p = node.start()
    with node.client() as c:
        wait_ready(c, p)
        assert model_status(c, "bert_base") in ("pending", "ready")  # the registration survived
        again = c.post("/v1/models", json=BERT)
        assert again.status_code == 200 and again.json()["name"] == "bert_base", again.text
