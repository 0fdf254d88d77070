"""The whole path on a machine with no GPU: `stgs serve` on the simulated node, in ~30 s.

Starts the daemon (simulated H100, CPU workers) with a throw-away config and state directory,
registers two tiny models over REST (each is profiled in the background with the profiler's
CPU mode, admitted and planned), sends KServe v2 inference (JSON tensors), prints the models,
the plan the daemon applied and a few metrics, then stops the daemon (SIGTERM).

    .venv/bin/python scripts/demo.py [--keep]     # --keep: leave the state directory behind
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from api.launch import LocalDaemon, wait_until


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the temporary state directory")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stgs-demo-"))
    d = LocalDaemon(
        work,
        '[backend]\nkind = "simulated"\nsimulated_gpus = [{ sku = "H100-80GB", count = 1 }]\n',
    )
    print(f"demo: starting `stgs serve` on 127.0.0.1:{d.port} (simulated H100, CPU workers)")
    proc = d.start()
    try:
        with d.client(30.0) as c:
            wait_until("the daemon", lambda: c.get("/v2/health/live").status_code == 200, 30, proc)
            for name, slo, rate in (("tiny_mlp", 500, 20), ("tiny_cnn", 500, 10)):
                r = c.post("/v1/models", json={"name": name, "slo_ms": slo, "rate_rps": rate})
                print(f"demo: POST /v1/models {name} -> {r.status_code} {r.json().get('status')}")
            try:
                d.wait_all_ready(90)  # both models profiled, planned and ready
            except RuntimeError as exc:
                raise SystemExit(f"demo: {exc}") from None
            body = {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [2, 64],
                        "datatype": "FP32",
                        "data": [0.01 * i for i in range(128)],
                    }
                ]
            }
            t = time.perf_counter()
            r = c.post("/v2/models/tiny_mlp/infer", json=body)
            ms = (time.perf_counter() - t) * 1000
            out = r.json()["outputs"][0]
            print(
                f"demo: POST /v2/models/tiny_mlp/infer -> {r.status_code}, output"
                f" {out['name']} shape {out['shape']} in {ms:.1f} ms"
            )
            print("\ndemo: GET /v1/models")
            for m in c.get("/v1/models").json():
                print(
                    f"  {m['name']:10s} status={m['status']:8s} slo_ms={m['spec']['slo_ms']:g}"
                    f" planned_rate_rps={m.get('planned_rate_rps')}"
                )
            print("\ndemo: GET /v1/plan (partitions the daemon applied)")
            plan = c.get("/v1/plan").json()
            for g in plan["plan"]["gpus"]:
                for p in g["partitions"]:
                    names = ", ".join(f"{x['name']} b{x['batch']}" for x in p["models"])
                    label = p["kind"] + (f" {p['mps_pct']}%" if p.get("mps_pct") else "")
                    print(
                        f"  GPU {g['index']} {label:8s} cycle {p['duty_cycle_ms']:.1f} ms: {names}"
                    )

            def counted() -> list[str]:  # the frontends report about once a second
                return [
                    ln
                    for ln in c.get("/metrics").text.splitlines()
                    if ln.startswith("stgs_inference_request_duration_seconds_count")
                ]

            metrics = wait_until("the request in /metrics", counted, 10, proc)
            print("\ndemo: GET /metrics (excerpt)")
            for ln in metrics:
                print("  " + ln)
    except RuntimeError as exc:
        raise SystemExit(f"demo: {exc}") from exc
    finally:
        d.stop(20)
        if args.keep:
            print(f"\ndemo: state and log kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("\ndemo: daemon stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
