"""A bare one-process FastAPI KServe v2 endpoint: the yardstick of ``benchmarks/api_load.py``.

What a user would write in an afternoon: one FastAPI route that takes a KServe v2 binary-tensor
request for ``tiny_mlp`` ([batch, 64] FP32), runs the same network (stgs's runtime builds it,
same weights) on the CPU in this process, and answers binary. No batching, no planner, no
workers: the cost of the HTTP path alone plus the model.

    python benchmarks/_bare_kserve.py --port 8000
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request, Response

from stgs.runtime.models import build_module

HEADER = "Inference-Header-Content-Length"


def make_app() -> FastAPI:
    torch.set_num_threads(1)
    module = build_module("tiny_mlp")
    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v2/models/{model}/infer")
    async def infer(model: str, request: Request) -> Response:
        body = await request.body()
        n = int(request.headers[HEADER])
        head = json.loads(body[:n])
        shape = head["inputs"][0]["shape"]
        x = np.frombuffer(body[n:], dtype=np.float32).reshape(shape)
        with torch.inference_mode():
            out = module(torch.from_numpy(x.copy())).numpy()
        raw = out.tobytes()
        meta = json.dumps(
            {
                "model_name": model,
                "outputs": [
                    {
                        "name": "output",
                        "datatype": "FP32",
                        "shape": list(out.shape),
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ],
            }
        ).encode()
        return Response(meta + raw, headers={HEADER: str(len(meta))})

    return app


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    uvicorn.run(make_app(), host="127.0.0.1", port=args.port, log_level="warning")
