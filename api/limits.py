"""Limits on what one HTTP request can make the daemon spend: body bytes, body time, header time.

Two layers, because uvicorn reads a request's line and headers and the ASGI app its body:

- :class:`BodyLimits`, a pure ASGI middleware (the outermost of the app's own, so every route
  is behind it): it reads the whole body before the app sees the request, counting bytes as they
  arrive. A ``Content-Length`` over the limit is answered 413 at once, before any body byte is
  read; a chunked body is refused 413 as soon as it passes the limit, so at most the limit (and
  one network read) is ever held. The body must arrive within ``body_timeout_s`` and pause no
  longer than ``idle_body_timeout_s`` between pieces, else 408. Each refusal closes the
  connection (``Connection: close``): the rest of the body is never read. A client that
  disconnects mid-body ends the request quietly (a debug line). The app then gets the body as
  one message: it buffered the whole body anyway (``request.body()``), and no route streams.
- :func:`header_limits_protocol`: uvicorn's httptools protocol with a deadline on the request
  line and headers, which uvicorn lacks (its keep-alive timeout covers only the idle time
  between requests), and a size limit on them. The timer starts when a connection opens and
  when a request's first byte arrives, stops at the end of the headers; when it fires the daemon
  answers 408, past ``max_header_bytes`` 431 (either only when no response to an earlier
  pipelined request is going out), and closes the connection.

Errors are ``{"error": "..."}`` like the rest of the API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")


@dataclass(frozen=True)
class _Refusal:
    """A body that broke a limit: answer ``status`` with ``message`` and close the connection."""

    status: int
    message: str


def _error_response(status: int, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = json.dumps({"error": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    return headers, body


class BodyLimits:
    """Read each HTTP request's body under a size limit and deadlines before the app runs.

    ``max_infer_body_bytes`` applies to ``POST /v2/models/{m}[/versions/{v}]/infer`` (tensors),
    ``max_body_bytes`` to every other path (JSON documents). See the module docstring for what a
    client gets.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        max_infer_body_bytes: int,
        body_timeout_s: float,
        idle_body_timeout_s: float,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_infer_body_bytes = max_infer_body_bytes
        self.body_timeout_s = body_timeout_s
        self.idle_body_timeout_s = idle_body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = (
            self.max_infer_body_bytes if INFER_PATH.match(scope["path"]) else self.max_body_bytes
        )
        declared = _content_length(scope["headers"])
        if declared is not None and declared > limit:
            got: bytes | _Refusal | None = _Refusal(
                413, f"the request body ({declared} bytes) is over {limit} bytes"
            )
        else:
            got = await self._read_body(receive, limit)
        if got is None:
            log.debug("%s %s: the client left mid-body", scope["method"], scope["path"])
            return
        if isinstance(got, _Refusal):
            log.debug("%s %s: %d %s", scope["method"], scope["path"], got.status, got.message)
            headers, content = _error_response(got.status, got.message)
            await send({"type": "http.response.start", "status": got.status, "headers": headers})
            await send({"type": "http.response.body", "body": content})
            return
        body = got
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:  # the app waits for the disconnect (or a late one arrives)
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive, limit: int) -> bytes | _Refusal | None:
        """The whole body; a refusal (413 over ``limit``, 408 too slow); None: the client left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            left_s = deadline - loop.time()
            idle = self.idle_body_timeout_s < left_s
            try:
                async with asyncio.timeout(min(self.idle_body_timeout_s, left_s)):
                    message = await receive()
            except TimeoutError:
                if idle:
                    why = f"no request body bytes for {self.idle_body_timeout_s:g} s"
                else:
                    why = f"the request body did not arrive within {self.body_timeout_s:g} s"
                return _Refusal(408, why)
            if message["type"] == "http.disconnect":
                return None
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return _Refusal(413, f"the request body is over {limit} bytes")
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The declared body length, or None (chunked; the HTTP parser rejects malformed ones)."""
    for name, value in headers:
        if name == b"content-length" and value.isdigit():
            return int(value)
    return None


class HeaderLimitsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline and a size limit on each request's line and
    headers (httptools grows a header by concatenation: one endless header costs memory and
    quadratic CPU until it ends).

    Subclass it with the limits set (:func:`header_limits_protocol`): uvicorn makes the protocol
    from its class with its own arguments.
    """

    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 << 10

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None  # set while headers are awaited
        self._header_bytes = 0  # read while they were awaited: exact to within one network read
        self._in_headers = False  # a request's first byte came, its headers did not end yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_header_timer()  # a connection that sends nothing is closed as well

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is not None:
            self._header_bytes += len(data)
        super().data_received(data)
        # checked after parsing: a read that ends the headers and carries body bytes is fine
        if self._header_timer is not None and self._header_bytes > self.max_header_bytes:
            self._cancel_header_timer()
            self._refuse(431, f"the request headers are over {self.max_header_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # The request's first bytes were just read: its SLO clock starts here (api.app's
        # ArrivalStamp keeps this stamp), not when the app gets to it under load.
        self.scope["state"]["arrival_ns"] = time.monotonic_ns()
        self._in_headers = True
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        self._in_headers = False
        super().on_headers_complete()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:  # the deadline counts from the first byte or the open
            loop = asyncio.get_running_loop()
            self._header_timer = loop.call_later(self.header_timeout_s, self._header_timed_out)
            self._header_bytes = 0

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        self._refuse(408, f"the request headers did not arrive within {self.header_timeout_s:g} s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` (unless a response to an earlier request is going out: it must not
        be cut) and close the connection."""
        transport = self.transport
        if transport.is_closing():
            return
        log.debug("%s: %d %s", self.client, status, message)
        busy = self.cycle is not None and not self.cycle.response_complete
        if self._in_headers and not busy:
            headers, body = _error_response(status, message)
            head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode() + b"".join(
                name + b": " + value + b"\r\n" for name, value in headers
            )
            transport.write(head + b"\r\n" + body)
        transport.close()


def uvicorn_config(
    app: Any,
    *,
    header_timeout_s: float,
    max_header_bytes: int,
    max_concurrency: int,
    log_level: str,
    graceful_s: int,
    access_log: bool = False,
    **where: Any,
) -> Any:
    """The ``uvicorn.Config`` of a serving process (the daemon's, a frontend's): the header
    limits' protocol, the concurrency bound (503 above it), the access log when asked for, and
    uvicorn's loggers through the process's own handler (:mod:`api.logs`); ``where``: host and
    port, or fd."""
    import uvicorn

    return uvicorn.Config(
        app,
        **where,
        log_level=log_level,
        log_config=None,  # uvicorn's loggers go through the process's handler (api.logs)
        access_log=access_log,
        lifespan="on",
        timeout_graceful_shutdown=graceful_s,
        limit_concurrency=max_concurrency,
        http=header_limits_protocol(header_timeout_s, max_header_bytes),
    )


def header_limits_protocol(
    header_timeout_s: float, max_header_bytes: int
) -> type[HeaderLimitsProtocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``."""
    return type(
        "HeaderLimitsProtocol",
        (HeaderLimitsProtocol,),
        {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes},
    )
