"""The daemon's end-to-end flow with real workers: register, infer (KServe v2, JSON and binary),
kill -9, restart, infer again. Issue #5's flow on a lent GPU (``--backend nvml``) or on the
simulated node with CPU workers (``--backend simulated``, tiny models).

    python -m benchmarks.daemon_gpu [--backend nvml|simulated] [--json OUT.json]

Starts ``stgs serve`` as a subprocess with a throw-away config (state, runtime and MPS pipe
directories in a temp dir), registers the models over REST (the shipped H100 profiles serve the
zoo models; no profiling on the GPU), waits until they are ready, sends JSON and binary-tensor
inference to each and checks that both answers agree, measures sequential request latency,
SIGKILLs the daemon, restarts it on the same state, waits until every model answers again, and
stops it. MPS daemons left by the killed process are quit at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from api.launch import LocalDaemon, wait_until
from benchmarks.lib.node import quit_mps
from benchmarks.lib.runs import run_header, write_summary

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32}


def _input(c: httpx.Client, model: str, batch: int, seed: int) -> tuple[str, str, np.ndarray]:
    meta = c.get(f"/v2/models/{model}").json()
    inp = meta["inputs"][0]
    shape = [batch if d == -1 else int(d) for d in inp["shape"]]
    dt = DTYPES[inp["datatype"]]
    rng = np.random.default_rng(seed)
    if np.issubdtype(dt, np.integer):
        x = rng.integers(0, 1000, size=shape).astype(dt)
    else:
        x = rng.standard_normal(shape).astype(dt)
    return str(inp["name"]), str(inp["datatype"]), x


def infer_json(c: httpx.Client, model: str, name: str, dtype: str, x: np.ndarray) -> np.ndarray:
    body = {
        "inputs": [
            {"name": name, "shape": list(x.shape), "datatype": dtype, "data": x.ravel().tolist()}
        ]
    }
    r = c.post(f"/v2/models/{model}/infer", json=body)
    r.raise_for_status()
    out = r.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def infer_binary(c: httpx.Client, model: str, name: str, dtype: str, x: np.ndarray) -> np.ndarray:
    raw = np.ascontiguousarray(x).tobytes()
    header = {
        "inputs": [
            {
                "name": name,
                "shape": list(x.shape),
                "datatype": dtype,
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
    }
    h = json.dumps(header).encode()
    r = c.post(
        f"/v2/models/{model}/infer",
        content=h + raw,
        headers={
            "Inference-Header-Content-Length": str(len(h)),
            "Content-Type": "application/octet-stream",
        },
    )
    r.raise_for_status()
    n = int(r.headers.get("Inference-Header-Content-Length", len(r.content)))
    meta = json.loads(r.content[:n])
    out = meta["outputs"][0]
    dt = DTYPES.get(out["datatype"], np.float32)
    return np.frombuffer(r.content[n:], dtype=dt).reshape(out["shape"]).astype(np.float32)


def triton_pair(port: int, model: str, name: str, dtype: str, x: np.ndarray) -> tuple[Any, Any]:
    """JSON and binary inference with tritonclient (the real KServe v2 client); None if absent."""
    try:
        import tritonclient.http as th
    except ImportError:
        return None, None
    tc = th.InferenceServerClient(url=f"127.0.0.1:{port}", network_timeout=60.0)
    try:
        res = []
        for binary in (False, True):
            inp = th.InferInput(name, list(x.shape), dtype)
            inp.set_data_from_numpy(x, binary_data=binary)
            out = th.InferRequestedOutput("output", binary_data=binary)
            r = tc.infer(model, [inp], outputs=[out])
            res.append(np.asarray(r.as_numpy("output"), dtype=np.float32))
        return res[0], res[1]
    finally:
        tc.close()


def check_models(c: httpx.Client, models: list[str], seed: int, port: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, m in enumerate(models):
        name, dtype, x = _input(c, m, 2, seed + i)
        a, b = triton_pair(port, m, name, dtype, x) if port else (None, None)
        client = "tritonclient"
        if a is None:
            a = infer_json(c, m, name, dtype, x)
            b = infer_binary(c, m, name, dtype, x)
            client = "httpx"
        same = bool(np.allclose(a, b, rtol=1e-2, atol=1e-2))
        lat = []
        _, _, one = _input(c, m, 1, seed + 100 + i)
        shed = 0
        for _ in range(30):
            t = time.perf_counter()
            try:
                infer_binary(c, m, name, dtype, one)
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 429:
                    raise
                shed += 1  # "deadline exceeded": the worker predicted a miss (e.g. still cold)
                continue
            lat.append((time.perf_counter() - t) * 1000)
        if not lat:
            raise RuntimeError(f"{m}: every request answered 'deadline exceeded'")
        out[m] = {
            "client": client,
            "output_shape": list(a.shape),
            "json_equals_binary": same,
            "deadline_exceeded_of_30": shed,
            "seq_latency_p50_ms": round(statistics.median(lat), 3),
            "seq_latency_max_ms": round(max(lat), 3),
        }
        print(
            f"  {m} ({client}): output {list(a.shape)}, JSON == binary: {same}, batch-1 latency"
            f" p50 {statistics.median(lat):.2f} ms (max {max(lat):.2f})"
        )
    return out


def raise_load(
    c: httpx.Client, model: str, registered: float, proc: subprocess.Popen[bytes]
) -> dict[str, Any]:
    """Send one model far more than its registered rate until the controller re-plans it."""
    import threading

    name, dtype, x = _input(c, model, 1, 99)
    stop = threading.Event()
    sent = [0]
    refused = [0]

    def sender() -> None:
        with httpx.Client(base_url=c.base_url, headers=c.headers, timeout=60.0) as cc:
            while not stop.is_set():
                try:
                    infer_binary(cc, model, name, dtype, x)
                    sent[0] += 1
                except httpx.HTTPStatusError:  # 429: the daemon sheds load past the plan
                    refused[0] += 1

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(6)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    planned = registered
    try:
        end = t0 + 60
        while time.monotonic() < end and proc.poll() is None:
            time.sleep(0.5)
            planned = float(c.get(f"/v1/models/{model}").json()["planned_rate_rps"])
            if planned > 1.5 * registered:
                break
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    dt = time.monotonic() - t0
    ctrl = c.get("/v1/plan").json().get("controller", {})
    out = {
        "model": model,
        "registered_rps": registered,
        "offered_rps": round(sent[0] / dt, 1),
        "refused_429": refused[0],
        "planned_rps_after": planned,
        "replanned": planned > 1.5 * registered,
        "seconds": round(dt, 2),
        "controller": ctrl,
    }
    print(
        f"load on {model}: {out['offered_rps']} req/s for {dt:.1f} s (registered {registered:g});"
        f" planned rate now {planned:g} -> {'re-planned' if out['replanned'] else 'NOT re-planned'}"
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["nvml", "simulated"], default="nvml")
    ap.add_argument("--models", default="", help="name:slo_ms:rate_rps,... (default per backend)")
    ap.add_argument("--ready-timeout-s", type=float, default=240.0)
    ap.add_argument("--json", default=None, help="summary path (default $OUT/daemon_gpu.json)")
    args = ap.parse_args()
    default = (
        "resnet50:30:200,mobilenet_v3_large:20:20"
        if args.backend == "nvml"
        else "tiny_mlp:500:20,tiny_cnn:500:10"
    )
    specs = [s.split(":") for s in (args.models or default).split(",")]
    names = [s[0] for s in specs]
    work = Path(tempfile.mkdtemp(prefix="stgs-daemon-gpu-"))
    d = LocalDaemon(
        work,
        f"""[backend]
kind = "{args.backend}"
simulated_gpus = [{{ sku = "H100-80GB", count = 1, mig = false }}]
allow_mig_changes = false
[controller]
interval_s = 0.5
rate_halflife_s = 1.0
hysteresis = 0.5
hold_s = 1.0
""",
    )
    port = d.port
    result: dict[str, Any] = {
        "backend": args.backend,
        "models": specs,
        **run_header("daemon_gpu"),  # command, machine, date
    }
    start = d.start
    rc = 1
    try:
        with d.client() as c:
            t0 = time.monotonic()
            p = start()
            wait_until("the daemon", lambda: c.get("/v2/health/live").status_code == 200, 120, p)
            print(f"daemon up in {time.monotonic() - t0:.1f} s ({args.backend})")
            gpus = c.get("/v1/gpus").json()
            result["gpus"] = gpus
            print(f"GET /v1/gpus: {json.dumps(gpus)[:300]}")
            for name, slo, rate in specs:
                r = c.post(
                    "/v1/models", json={"name": name, "slo_ms": float(slo), "rate_rps": float(rate)}
                )
                print(f"POST /v1/models {name} -> {r.status_code} {r.json().get('status')}")
                if r.status_code not in (201, 202):
                    raise RuntimeError(f"registration of {name} failed: {r.text}")

            t1 = time.monotonic()
            d.wait_all_ready(args.ready_timeout_s)
            result["ready_s"] = round(time.monotonic() - t1, 2)
            print(f"models ready in {result['ready_s']} s; plan:")
            plan = c.get("/v1/plan").json()
            for part in plan.get("partitions", []):
                print(f"  {json.dumps(part)[:200]}")
            result["plan"] = plan
            result["first"] = check_models(c, names, 0, port)
            result["replan"] = raise_load(c, names[-1], float(specs[-1][2]), p)

            os.kill(p.pid, signal.SIGKILL)
            p.wait(30)
            print("daemon killed with SIGKILL; restarting on the same state")
            t2 = time.monotonic()
            p2 = start()
            wait_until(
                "the daemon after restart",
                lambda: c.get("/v2/health/live").status_code == 200,
                120,
                p2,
            )
            d.wait_all_ready(args.ready_timeout_s)
            result["restart_ready_s"] = round(time.monotonic() - t2, 2)
            listed = sorted(m["name"] for m in c.get("/v1/models").json())
            result["listed_after_restart"] = listed
            print(f"after restart ({result['restart_ready_s']} s): models {listed}")
            result["after_restart"] = check_models(c, names, 7, port)
            ok = (
                listed == sorted(names)
                and bool(result["replan"]["replanned"])
                and all(
                    v["json_equals_binary"]
                    for k in ("first", "after_restart")
                    for v in result[k].values()
                )
            )
            result["ok"] = ok
            print(f"\nresult: {'PASS' if ok else 'FAIL'}")
            rc = 0 if ok else 1
    except Exception as exc:  # report, clean up, fail
        result["error"] = f"{type(exc).__name__}: {exc}"
        print(f"error: {result['error']}", file=sys.stderr)
    finally:
        d.stop()
        quit_mps(work / "run")  # what the killed daemon left behind
        result["log_tail"] = d.log_path.read_text(errors="replace")[-4000:]
        write_summary(result, args.json, "daemon_gpu")
        shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
