"""KServe v2 inference over gRPC: the standard ``inference.GRPCInferenceService``.

The messages and the service come from Triton's published protos as the ``tritonclient`` package
ships them compiled (``tritonclient.grpc.service_pb2`` / ``service_pb2_grpc``), so
``tritonclient.grpc`` and any client built from the same protos work unchanged. Served:
``ServerLive``, ``ServerReady``, ``ServerMetadata``, ``ModelReady``, ``ModelMetadata``,
``ModelInfer`` and ``ModelStreamInfer`` (each request of the stream answered as it completes),
and Triton's model API: ``ModelConfig``, ``ModelStatistics``, ``RepositoryIndex``,
``RepositoryModelLoad`` and ``RepositoryModelUnload``, which the control plane serves
(:mod:`api.triton`): the servicer forwards them to its HTTP API with a small internal call
(:class:`ControlClient`: over the control plane's Unix socket from a frontend, in process in the
daemon without frontends) and turns the JSON back into the protos. The other methods answer
``UNIMPLEMENTED``.

Semantics are those of the HTTP endpoints (:mod:`api.kserve`), through the same code
(:mod:`api.inference`): the same checks, the same SLO clock (from the call's arrival), the same
errors, mapped to gRPC codes (400 INVALID_ARGUMENT, 404 NOT_FOUND, 429 RESOURCE_EXHAUSTED when a
request is shed, 503 UNAVAILABLE). Inputs may come as ``raw_input_contents`` (what
``tritonclient`` sends) or as typed ``contents``; outputs always come back as
``raw_output_contents``, as Triton answers. With a token and an address off loopback every call
needs ``authorization: Bearer <token>`` metadata, as on HTTP.

The server runs on the daemon's event loop (``grpc.aio``), on ``server.grpc_port``.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from api import inference
from api.inference import InferenceBackend, InferError, ModelIO
from stgs import __version__
from stgs.errors import StgsError

# typed contents field of InferTensorContents by KServe datatype (FP16 travels raw only)
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def _code(status: int) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, inference.GRPC_CODE_OF.get(status, "UNKNOWN"))


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The KServe v2 gRPC service over an :class:`~api.inference.InferenceBackend`: the daemon's
    :class:`~api.service.Service`, or a frontend process's router."""

    def __init__(self, svc: InferenceBackend, control: ControlClient | None = None) -> None:
        self.svc = svc
        self.control = control

    # ------------------------------------------------------------------ health, metadata
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=bool(self.svc.restored))

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(
            name="stgs", version=__version__, extensions=list(inference.EXTENSIONS)
        )

    async def ModelReady(self, request: Any, context: Any) -> Any:
        await self._io(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=self.svc.model_ready(request.name))

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        io = await self._io(request.name, request.version, context)
        meta = io.metadata()
        tensors = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=io.name,
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensors(**t) for t in meta["inputs"]],  # type: ignore[attr-defined]
            outputs=[tensors(**t) for t in meta["outputs"]],  # type: ignore[attr-defined]
        )

    async def _io(self, name: str, version: str, context: Any) -> ModelIO:
        try:
            return self.svc.model_io(name, version)
        except InferError as exc:
            await context.abort(_code(exc.status), exc.message)
            raise  # not reached: abort raises

    # ------------------------------------------------------------------ Triton's model API
    # Served by the control plane's HTTP API (api.triton): a frontend forwards the call over
    # the control socket, the daemon without frontends to its own app in process, with the
    # caller's authorization metadata as the Authorization header (the control plane checks it).
    async def _call(
        self, context: Any, method: str, path: str, body: dict[str, Any] | None = None
    ) -> Any:
        if self.control is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no control plane to ask")
        assert self.control is not None
        auth = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                auth = str(value)
        try:
            status, data = await self.control(method, path, body, auth)
        except Exception as exc:  # the control plane is gone (a daemon restarting)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"control plane unreachable: {exc}")
        if status != 200:
            msg = data.get("error") if isinstance(data, dict) else None
            await context.abort(_code(status), str(msg or f"HTTP {status}"))
        return data

    @staticmethod
    def _model_path(name: str, version: str, tail: str) -> str:
        v = f"/versions/{quote(version, safe='')}" if version else ""
        return f"/v2/models/{quote(name, safe='')}{v}/{tail}"

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        data = await self._call(
            context, "GET", self._model_path(request.name, request.version, "config")
        )
        cfg = json_format.ParseDict(data, mc.ModelConfig(), ignore_unknown_fields=True)
        return pb.ModelConfigResponse(config=cfg)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        path = (
            self._model_path(request.name, request.version, "stats")
            if request.name
            else "/v2/models/stats"
        )
        data = await self._call(context, "GET", path)
        return json_format.ParseDict(data, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        rows = await self._call(context, "POST", "/v2/repository/index", {"ready": request.ready})
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**row) for row in rows]
        )

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        params = {k: _param_value(v) for k, v in request.parameters.items()}
        path = f"/v2/repository/models/{quote(request.model_name, safe='')}/load"
        await self._call(context, "POST", path, {"parameters": params})
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        path = f"/v2/repository/models/{quote(request.model_name, safe='')}/unload"
        await self._call(context, "POST", path, {})
        return pb.RepositoryModelUnloadResponse()

    # ------------------------------------------------------------------ inference
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        arrival_ns = time.monotonic_ns()
        try:
            return await self._infer(request, arrival_ns)
        except InferError as exc:
            await context.abort(_code(exc.status), exc.message)
        except StgsError as exc:
            await context.abort(_code(inference.status_of(exc)), str(exc))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        """Each request runs as it arrives; responses (or their errors, in ``error_message``)
        are sent as they complete, in completion order (a response carries its request's id)."""
        done: asyncio.Queue[Any] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def one(req: Any, arrival_ns: int) -> None:
            try:
                resp = await self._infer(req, arrival_ns)
                await done.put(pb.ModelStreamInferResponse(infer_response=resp))
            except (InferError, StgsError) as exc:
                msg = exc.message if isinstance(exc, InferError) else str(exc)
                await done.put(pb.ModelStreamInferResponse(error_message=msg))

        async def read() -> None:
            async for req in request_iterator:
                t = asyncio.create_task(one(req, time.monotonic_ns()))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks))
            await done.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await done.get()) is not None:
                yield item
        finally:
            reader.cancel()
            for t in list(tasks):
                t.cancel()

    async def _infer(self, req: Any, arrival_ns: int) -> Any:
        io = self.svc.model_io(req.model_name, req.model_version)
        if len(req.inputs) > 1 and len(io.inputs) == 1:
            raise InferError(400, f"model {io.name!r} takes one input, {io.input_name!r}")
        for inp in req.inputs:
            io.input_index(inp.name)
        # binary_data is an HTTP notion: gRPC answers every output in raw_output_contents
        selected = inference.select_outputs(io, [(o.name, True) for o in req.outputs], True)
        if req.raw_input_contents and len(req.raw_input_contents) != len(req.inputs):
            raise InferError(
                400,
                f"{len(req.raw_input_contents)} raw_input_contents for {len(req.inputs)} inputs"
                " (one per input, in order, or none)",
            )
        named = [
            (
                inp.name,
                _decode(io, inp, req.raw_input_contents[k] if req.raw_input_contents else None),
            )
            for k, inp in enumerate(req.inputs)
        ]
        arrays = inference.order_inputs(io, named)
        result = inference.outputs_of(io, await self.svc.infer_arrays(io.name, arrays, arrival_ns))
        tensors = []
        raws = []
        for k, _ in selected:
            out = result[k]
            if out.dtype.name not in inference.KSERVE_OF:
                out = out.astype(np.float32)
            raws.append(np.ascontiguousarray(out, dtype=out.dtype.newbyteorder("<")).tobytes())
            tensors.append(
                pb.ModelInferResponse.InferOutputTensor(
                    name=io.outputs[k].name,
                    datatype=inference.KSERVE_OF[out.dtype.name],
                    shape=list(out.shape),
                )
            )
        return pb.ModelInferResponse(
            model_name=io.name,
            model_version=io.version,
            id=req.id,
            outputs=tensors,
            raw_output_contents=raws,
        )


def _param_value(p: Any) -> Any:
    """A ``ModelRepositoryParameter``'s value (its oneof)."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None or which == "bytes_param" else getattr(p, which)


class ControlClient:
    """Calls the control plane's HTTP API: ``(method, path, JSON body, authorization) ->
    (status, JSON)``; over its Unix socket (a frontend, as its HTTP proxy does) or, for the
    daemon without frontends, to its own app in process."""

    def __init__(self, transport: Any) -> None:
        import httpx

        self._client = httpx.AsyncClient(
            transport=transport, base_url="http://stgs-control", timeout=httpx.Timeout(None)
        )

    @classmethod
    def unix(cls, path: str) -> ControlClient:
        import httpx

        return cls(httpx.AsyncHTTPTransport(uds=path))

    @classmethod
    def in_process(cls, app: Any) -> ControlClient:
        import httpx

        return cls(httpx.ASGITransport(app=app))

    async def __call__(
        self, method: str, path: str, body: dict[str, Any] | None, authorization: str | None
    ) -> tuple[int, Any]:
        headers = {} if authorization is None else {"authorization": authorization}
        resp = await self._client.request(method, path, json=body, headers=headers)
        try:
            data = resp.json()
        except ValueError:
            data = {"error": resp.text[:500]}
        return resp.status_code, data

    async def aclose(self) -> None:
        await self._client.aclose()


def _decode(io: ModelIO, inp: Any, raw: bytes | None) -> np.ndarray:
    """One input as an array [batch, *sample] (``raw``: its raw_input_contents, None when the
    request has none); InferError(400) if malformed."""
    shape = [int(d) for d in inp.shape]
    np_dtype, count = inference.check_input(io, inp.name, inp.datatype, shape)
    if raw is not None:
        if inp.HasField("contents"):
            raise InferError(400, f"input {inp.name!r}: raw_input_contents and contents disagree")
        need = count * np.dtype(np_dtype).itemsize
        if len(raw) != need:
            raise InferError(
                400,
                f"input {inp.name!r}: {len(raw)} raw bytes, shape {shape} of {inp.datatype}"
                f" needs {need}",
            )
        arr = np.frombuffer(raw, dtype=np.dtype(np_dtype).newbyteorder("<")).astype(
            np_dtype, copy=False
        )
    else:
        field = _CONTENTS.get(inp.datatype)
        if field is None:
            raise InferError(400, f"input {inp.name!r}: {inp.datatype} travels as raw contents")
        values = getattr(inp.contents, field)
        if len(values) != count:
            raise InferError(
                400, f"input {inp.name!r}: {len(values)} values for shape {shape} ({count} needed)"
            )
        try:
            arr = np.asarray(values, dtype=np_dtype)
        except (ValueError, OverflowError) as exc:
            raise InferError(400, f"input {inp.name!r}: not {inp.datatype}: {exc}") from None
    inference.check_finite(inp.name, arr)
    return arr.reshape(shape)


class _TokenCheck(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Every call needs ``authorization: Bearer <token>`` (the daemon is bound off loopback)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

        async def deny(request: Any, context: Any) -> Any:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong bearer token (metadata authorization: Bearer <token>)",
            )

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                scheme, _, tok = str(value).partition(" ")
                if scheme.lower() == "bearer" and hmac.compare_digest(
                    tok.strip().encode(), self._token
                ):
                    return await continuation(handler_call_details)
        return self._deny


async def start(
    svc: InferenceBackend,
    host: str,
    port: int,
    *,
    token: str | None = None,
    auth_all: bool = False,
    max_message_bytes: int = 64 << 20,
    max_concurrent_rpcs: int | None = None,
    reuse_port: bool = False,
    control: ControlClient | None = None,
) -> tuple[Any, int]:
    """Start the gRPC server on the running event loop; (server, the port it bound).

    ``reuse_port``: bind with SO_REUSEPORT, so that every frontend process serves one port (the
    kernel spreads connections over them); the daemon alone binds without it, so a second daemon
    on the same port fails instead of sharing it. ``max_concurrent_rpcs``: calls above it are
    refused at once with RESOURCE_EXHAUSTED by gRPC itself (a bounded queue)."""
    interceptors = [_TokenCheck(token)] if token is not None and auth_all else []
    server = grpc.aio.server(
        interceptors=interceptors,
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", int(reuse_port)),
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(svc, control), server)
    bound = server.add_insecure_port(f"{'[::1]' if host == '::1' else host}:{port}")
    if bound == 0:
        raise OSError(f"gRPC: cannot bind {host}:{port}")
    await server.start()
    return server, bound
