"""An asyncio client for a worker's data connection: requests out, responses in, no thread.

A frontend process (``api.frontend``) serves inference on its own event loop and talks to the
workers directly, over each worker's Unix data socket (``WorkerSpec.listen``). The frames are
:mod:`stgs.runtime.transport`'s (one definition of the format): REQUEST frames out, RESPONSE
frames back with the request's ``req_id``. Responses are parsed incrementally in
:meth:`_Protocol.data_received`, on the loop, so a response costs no thread switch and no GIL
hand-off, which is what the control plane's reader thread pays per request.

Requests submitted during one pass of the event loop go out together, in one write at the start
of the next pass (:meth:`AsyncWorkerConnection.submit`): under load one system call and one
wake-up of the worker carry many requests instead of one each; an idle frontend sends a request
within microseconds, as before.

When the connection is lost (the worker died or closed it) every request in flight fails at once
with :class:`~stgs.errors.WorkerDiedError`, as :class:`~stgs.runtime.transport.SocketTransport`
does.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct

from stgs.errors import InvalidRequestError, WorkerDiedError
from stgs.runtime.transport import (
    HEADER,
    OK,
    REQUEST,
    RESPONSE,
    Tensors,
    decode_tensors,
    error_of,
    frame_parts,
    size_buffers,
)

__all__ = ["AsyncWorkerConnection"]


class _Protocol(asyncio.Protocol):
    """Parses RESPONSE frames as bytes arrive and resolves their futures."""

    def __init__(self, conn: AsyncWorkerConnection) -> None:
        self.conn = conn
        self.buf = bytearray()

    def connection_lost(self, exc: Exception | None) -> None:
        why = f"connection lost: {exc}" if exc else "the worker closed the connection"
        self.conn._lost(why)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        end = len(buf)
        head = HEADER.size
        pending = self.conn._pending
        with memoryview(buf) as view:  # payloads are copied out once, straight from it
            while end - pos >= head:
                kind, status, dt, ndim, _model, req_id, _dl, nbytes = HEADER.unpack_from(buf, pos)
                start = pos + head + 4 * ndim
                stop = start + nbytes
                if stop > end:
                    break
                if kind == RESPONSE:
                    fut = pending.pop(req_id, None)
                    if fut is not None and not fut.done():
                        payload = bytes(view[start:stop])
                        if status == OK:
                            try:
                                shape = struct.unpack_from(f"<{ndim}I", buf, pos + head)
                                arr = decode_tensors(dt, shape, payload)
                            except ValueError as exc:  # a malformed frame: that request fails
                                fut.set_exception(WorkerDiedError(f"bad response frame: {exc}"))
                            else:
                                fut.set_result(arr)
                        else:
                            fut.set_exception(error_of(status, payload.decode("utf-8", "replace")))
                # other kinds (READY, HEARTBEAT, STATS) only flow on a supervisor's connection
                pos = stop
        if pos:  # the view is released: the buffer can shrink
            del buf[:pos]


class AsyncWorkerConnection:
    """One data connection to a worker; use from the event loop that opened it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._pending: dict[int, asyncio.Future[Tensors]] = {}
        self._ids = itertools.count(1)
        self._transport: asyncio.Transport | None = None
        self._closed = False
        self._reason = "connection closed"
        self._out: list[bytes | memoryview] = []  # frames submitted this pass of the loop

    @classmethod
    async def open(cls, path: str, *, name: str = "worker") -> AsyncWorkerConnection:
        """Connect to the worker's data socket at ``path`` (OSError when nobody listens)."""
        conn = cls(name)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Room for whole requests in the socket, as the worker's end has: at the default
            # send buffer a 600 KB image took several write -> worker read -> writable rounds
            # between the two processes, milliseconds when the worker's GIL was busy.
            size_buffers(sock)
            sock.setblocking(False)
            await loop.sock_connect(sock, path)
            transport, _ = await loop.create_unix_connection(lambda: _Protocol(conn), sock=sock)
        except BaseException:
            sock.close()
            raise
        conn._transport = transport
        return conn

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    @property
    def awaited(self) -> int:
        """Requests in flight that a caller still waits for (not given up on: cancelled)."""
        return sum(1 for f in self._pending.values() if not f.done())

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, slot: int, array: Tensors, deadline_ns: int) -> asyncio.Future[Tensors]:
        """Send one request for the model in ``slot`` (its index in the worker's spec): an
        array, or a tuple of arrays for a model of several inputs; the future gives the outputs
        likewise, or raises a :class:`~stgs.errors.ServingError` subclass on failure."""
        fut: asyncio.Future[Tensors] = asyncio.get_running_loop().create_future()
        if self._closed or self._transport is None:
            fut.set_exception(WorkerDiedError(f"{self.name}: {self._reason}"))
            return fut
        req_id = next(self._ids)
        try:
            parts = frame_parts(REQUEST, OK, slot, req_id, deadline_ns, array, b"")
        except InvalidRequestError as exc:  # a dtype that cannot travel
            fut.set_exception(exc)
            return fut
        self._pending[req_id] = fut
        if not self._out:  # the first of this pass: flush once the pass is done
            fut.get_loop().call_soon(self._flush)
        self._out += parts
        return fut

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and not self._closed and self._transport is not None:
            self._transport.writelines(out)

    def _lost(self, reason: str) -> None:
        self._closed = True
        self._reason = reason
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(WorkerDiedError(f"{self.name}: {reason}; request lost in flight"))

    def close(self) -> None:
        """Fail what is in flight and close the connection."""
        if self._transport is not None:
            self._transport.close()
        self._lost("closed by the frontend")
