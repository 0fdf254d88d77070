"""Overload through the front door: the daemon's SLO metrics count what the clients see.

A tester drove ``stgs serve`` with 256 connections against a 100 ms SLO: clients saw a p50 of
809 ms while the daemon counted 99.8% of requests within SLO (its clock started after the HTTP
and thread-pool queues, and shed requests were not counted), so monitoring hid the outage.
Here a client process keeps 256 requests open for a few seconds (far past what the 2-core
machine serves), then the daemon's own ratio (``stgs_inference_slo_met_total`` over
``stgs_inference_request_duration_seconds_count``) must show the outage the clients saw.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import re
import time
from pathlib import Path

import numpy as np
import pytest

from api.kserve import binary_request
from api.launch import ONE_SIMULATED_GPU, LocalDaemon, wait_until

pytestmark = pytest.mark.slow

SLO_MS = 100.0


def _closed_loop(url: str, conns: int, seconds: float, path: str) -> None:
    """A client process: ``conns`` requests always open, (seconds, status) per answer."""
    import aiohttp

    body, headers = binary_request(np.ones((1, 64), np.float32))
    out: list[tuple[float, int]] = []

    async def main() -> None:
        conn = aiohttp.TCPConnector(limit=conns)
        async with aiohttp.ClientSession(connector=conn) as s:
            end = time.monotonic() + seconds

            async def loop() -> None:
                while time.monotonic() < end:
                    t0 = time.monotonic()
                    try:
                        async with s.post(
                            url + "/v2/models/tiny_mlp/infer", data=body, headers=headers
                        ) as r:
                            await r.read()
                            code = r.status
                    except aiohttp.ClientError:
                        code = -1
                    out.append((time.monotonic() - t0, code))

            await asyncio.gather(*[loop() for _ in range(conns)])

    asyncio.run(main())
    Path(path).write_text(json.dumps(out))


def _metric(text: str, name: str) -> float:
    m = re.search(rf'^{name}{{model="tiny_mlp"}} (\S+)$', text, re.M)
    return 0.0 if m is None else float(m.group(1))


@pytest.mark.parametrize("frontends", [0, 2], ids=["control-plane", "data-plane"])
def test_overload_shows_in_the_slo_metrics(tmp_path: Path, frontends: int) -> None:
    d = LocalDaemon(tmp_path, ONE_SIMULATED_GPU, server_options=f"frontends = {frontends}\n")
    count = "stgs_inference_request_duration_seconds_count"
    try:
        p = d.start_serving("tiny_mlp", SLO_MS, 20)
        with d.client() as c:
            before = c.get("/metrics").text
            out_path = tmp_path / "client.json"
            q = mp.get_context("spawn").Process(
                target=_closed_loop, args=(d.url, 256, 4.0, str(out_path))
            )
            q.start()
            q.join(120)
            assert q.exitcode == 0
            out = json.loads(out_path.read_text())
            # frontends report about once a second: wait until every answer is counted
            wait_until(
                "every answer counted",
                lambda: (
                    _metric(c.get("/metrics").text, count) - _metric(before, count)
                    >= 0.95 * len(out)
                ),
                10,
                p,
            )
            after = c.get("/metrics").text
        codes = {code for _, code in out}
        assert codes <= {200, 429, 503}, codes  # overload is answered, never a 500
        client_met = sum(1 for s, code in out if code == 200 and s <= SLO_MS / 1e3) / len(out)
        answers = _metric(after, count) - _metric(before, count)
        met = _metric(after, "stgs_inference_slo_met_total") - _metric(
            before, "stgs_inference_slo_met_total"
        )
        # every answer the clients got is counted, and the daemon's ratio is near what the
        # clients saw (before the fix it counted ~1.0 while the clients saw ~0). Not closer than
        # 0.4: the time a request waits in the socket buffer before a CPU-starved frontend reads
        # it is invisible to any server, and the client's own loop adds its delays (on this
        # 2-core machine with other work running, 0.83 against 0.54 was seen)
        assert answers >= 0.95 * len(out), (answers, len(out))
        daemon_met = met / answers
        if frontends == 0:  # the control plane alone cannot carry this load on this machine
            assert client_met < 0.5, client_met
        assert abs(daemon_met - client_met) < 0.4, (daemon_met, client_met)
    finally:
        d.stop()
