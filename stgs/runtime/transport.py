"""Transport between the daemon and its workers: requests in, results out.

The I/O boundary is one small interface, :class:`Transport` (``submit`` a request's tensors for
a model, get a :class:`~concurrent.futures.Future` of the result), with two implementations:

* :class:`SocketTransport`: a worker process at the other end of a Unix stream socket (a
  ``socketpair`` made by the supervisor). Tensors travel as raw buffers: one ``sendmsg`` of a
  fixed header, the shape and the array's own memory (no pickling, no copy on send), received
  with ``recv_into`` straight into the array's buffer. A reader thread resolves the futures;
  when the socket closes (the worker died) every request in flight fails at once with
  :class:`~stgs.errors.WorkerDiedError`.
* :class:`MockTransport`: a handler function in this process, for tests (httpx's idea).

Frames (little endian)::

    header  kind u8 | status u8 | dtype u8 | ndim u8 | model u32 | req_id u64 | deadline_ns i64
            | nbytes u64                                                       (32 bytes)
    shape   ndim x u32
    payload nbytes bytes (the array, C order; for an error: its UTF-8 message)

A request's or a response's tensors (:data:`Tensors`) are one array, or a tuple of arrays (a
model of several inputs or outputs, in the model's order; each its own dtype and shape). One
array travels as above. A tuple travels in the same frame layout, self-described by the dtype
code ``MULTI`` (255): ``ndim`` then counts the u32 words of a tensor table instead of a shape,
and the payload holds the tensors one after another, each padded to 8 bytes::

    table   per tensor: dtype u8 | ndim u8 | 0 u16 (one word), then its ndim x u32 dims
    payload per tensor: its bytes (C order), then zeros up to a multiple of 8

So a single-array frame is byte for byte what it always was (and as cheap), a receiver tells
the two apart by the dtype code alone, and a tuple is still sent with one ``sendmsg`` of the
header, the table and the arrays' own buffers (no copy). The table holds at most 255 words
(e.g. 64 tensors of up to 2 dims, 32 of up to 6).

``deadline_ns`` is on ``time.monotonic_ns()``, which is one clock for every process of a Linux
host; 0 means no deadline.

Data connections: a worker started with ``WorkerSpec.listen`` also accepts connections on that
Unix socket path (see :mod:`stgs.runtime.worker`), for frontend processes that send requests to
it directly. They speak these frames too, but only REQUEST from the client (``model``: the slot
index in the worker's ``spec.models`` order; ``req_id``: the client's own, unique on its
connection; other kinds are ignored) and RESPONSE back, with the same ``req_id`` and status.
HEARTBEAT, STATS and READY travel only on the supervisor's connection. :class:`SocketTransport`
over a connected ``AF_UNIX`` socket is such a client.

Liveness: the worker's duty-cycle loop sends a HEARTBEAT frame whenever it has sent nothing for
``HEARTBEAT_INTERVAL_S`` (idle or between batches), carrying its longest batch so far. The
transport notes when the last frame of any kind arrived (:attr:`SocketTransport.last_frame_ns`)
and that longest batch (:attr:`SocketTransport.max_batch_ns`), so the supervisor can tell a hung
worker (SIGSTOP, a stuck kernel) from a busy one.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import socket
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from stgs.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    ServingError,
    WorkerDiedError,
    WorkerError,
)

__all__ = [
    "MULTI",
    "Frame",
    "FrameSocket",
    "MockTransport",
    "SocketTransport",
    "Tensors",
    "Transport",
    "as_tuple",
    "decode_tensors",
]

HEADER = struct.Struct("<BBBBIQqQ")
SOCKET_BUFFER_BYTES = 4 << 20
_SO_SNDBUFFORCE, _SO_RCVBUFFORCE = 32, 33  # Linux's; Python's socket module does not name them
RECV_BUFFER_BYTES = 64 << 10

# kinds
REQUEST = 1
RESPONSE = 2
READY = 3  # worker -> daemon once its models are loaded; payload: JSON facts
STOP = 4  # daemon -> worker: drain (deadline_ns: how long at most), then exit
STATS = 5  # worker -> daemon: cumulative batch statistics per model slot; payload: JSON
STATS_KEYS = ("batches", "run_ns", "full_batches", "full_run_ns")
HEARTBEAT = 6  # worker -> daemon from its duty-cycle loop; req_id: its longest batch so far (ns)
# statuses of a response
OK = 0
DEADLINE = 1
INVALID = 2
FAILED = 3

# (append only: a dtype's code is its index)
_DTYPES: tuple[np.dtype[Any], ...] = tuple(
    np.dtype(t)
    for t in (
        "float32",
        "float16",
        "float64",
        "int64",
        "int32",
        "uint8",
        "int8",
        "bool",
        "int16",
        "uint16",
        "uint32",
        "uint64",
    )
)
MULTI = 0xFF  # the dtype code of a frame of several tensors (module docstring)
_MAX_WORDS = 0xFF  # u32 words of a shape, or of a MULTI frame's tensor table
_DTYPE_CODE = {dt: i for i, dt in enumerate(_DTYPES)}
_UINT8 = _DTYPE_CODE[np.dtype("uint8")]
_MAX_IOV = 512  # buffers per sendmsg (Linux IOV_MAX: 1024)
HEARTBEAT_INTERVAL_S = 0.2  # the longest the worker's loop stays silent while it is not in a batch

Array = npt.NDArray[Any]
Tensors = Array | tuple[Array, ...]
"""A request's or a response's tensors: one array, or a tuple (several, in the model's order)."""
_PAD = bytes(8)


def as_tuple(t: Tensors) -> tuple[Array, ...]:
    """``t`` as a tuple of arrays (one array: a tuple of one)."""
    return t if isinstance(t, tuple) else (t,)


def dtype_code(dtype: np.dtype[Any]) -> int:
    try:
        return _DTYPE_CODE[np.dtype(dtype)]
    except KeyError:
        known = ", ".join(str(d) for d in _DTYPES)
        raise InvalidRequestError(f"dtype {dtype} cannot travel; known: {known}") from None


def dtype_of(code: int) -> np.dtype[Any]:
    """The dtype of a frame's dtype code (ValueError for an unknown code)."""
    if not 0 <= code < len(_DTYPES):
        raise ValueError(f"bad dtype code {code}")
    return _DTYPES[code]


@dataclass
class Frame:
    kind: int
    status: int
    model: int
    req_id: int
    deadline_ns: int
    dtype: int
    shape: tuple[int, ...]
    payload: bytearray

    def array(self) -> Array:
        """The payload as an array (no copy: it views the receive buffer); ValueError for a
        frame of several tensors."""
        dt = dtype_of(self.dtype)
        return np.frombuffer(self.payload, dtype=dt).reshape(self.shape)

    def tensors(self) -> Tensors:
        """The payload as its tensors: an array, or a tuple of arrays for a ``MULTI`` frame (no
        copy); ValueError when malformed."""
        return decode_tensors(self.dtype, self.shape, self.payload)

    def text(self) -> str:
        return self.payload.decode("utf-8", errors="replace")


def size_buffers(sock: socket.socket) -> None:
    """Room for a whole image batch in a connection's socket buffers (``SOCKET_BUFFER_BYTES``):
    a Unix socket's send buffer bounds what is in flight, so at the default (~200 KiB) one large
    tensor takes several write -> read -> writable rounds between the two processes. The kernel
    caps the size at ``net.core.wmem_max`` / ``rmem_max``; a process that may (root) forces it
    past them."""
    for opt, force in ((socket.SO_SNDBUF, _SO_SNDBUFFORCE), (socket.SO_RCVBUF, _SO_RCVBUFFORCE)):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
        if sock.getsockopt(socket.SOL_SOCKET, opt) < SOCKET_BUFFER_BYTES:  # Linux reports 2x
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER_BYTES)


class FrameSocket:
    """Frames over a connected stream socket; ``send`` is thread safe, ``recv`` is not."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        size_buffers(sock)
        self._send_lock = threading.Lock()
        # Receive buffer: one ``recv`` takes every frame that has arrived (a batch's replies, a
        # burst of requests), so a busy reader makes one system call, and takes the GIL once, for
        # many small frames instead of three calls per frame. Payloads larger than what is
        # buffered are received straight into their own array.
        self._rbuf = bytearray(RECV_BUFFER_BYTES)
        self._rview = memoryview(self._rbuf)
        self._rpos = 0  # next unread byte
        self._rend = 0  # end of the bytes received

    def send(
        self,
        kind: int,
        *,
        status: int = OK,
        model: int = 0,
        req_id: int = 0,
        deadline_ns: int = 0,
        array: Tensors | None = None,
        data: bytes = b"",
    ) -> None:
        parts = frame_parts(kind, status, model, req_id, deadline_ns, array, data)
        with self._send_lock:
            _sendmsg_all(self.sock, parts)

    def send_responses(self, replies: Sequence[tuple[int, Tensors]]) -> None:
        """OK responses ``(req_id, tensors)``, in order, in as few system calls as fit."""
        parts: list[bytes | memoryview] = []
        for req_id, arr in replies:
            parts += frame_parts(RESPONSE, OK, 0, req_id, 0, arr, b"")
        with self._send_lock:
            for k in range(0, len(parts), _MAX_IOV):
                _sendmsg_all(self.sock, parts[k : k + _MAX_IOV])

    def recv(self) -> Frame | None:
        """The next frame, or None when the peer closed the socket."""
        if not self._fill(HEADER.size):
            return None
        kind, status, dt, ndim, model, req_id, deadline_ns, nbytes = HEADER.unpack_from(
            self._rbuf, self._rpos
        )
        self._rpos += HEADER.size
        shape: tuple[int, ...] = ()
        if ndim:
            if not self._fill(4 * ndim):
                return None
            shape = struct.unpack_from(f"<{ndim}I", self._rbuf, self._rpos)
            self._rpos += 4 * ndim
        if dt >= len(_DTYPES) and dt != MULTI:
            raise ValueError(f"bad dtype code {dt}")
        have = self._rend - self._rpos
        if nbytes <= have:  # whole payload buffered: one copy out of the buffer
            payload = bytearray(self._rview[self._rpos : self._rpos + nbytes])
            self._rpos += nbytes
        else:  # what is buffered, then the rest straight into the payload
            payload = bytearray(nbytes)
            payload[:have] = self._rview[self._rpos : self._rend]
            self._rpos = self._rend = 0
            if not _recv_exact(self.sock, memoryview(payload)[have:]):
                return None
        return Frame(kind, status, model, req_id, deadline_ns, dt, shape, payload)

    def _fill(self, n: int) -> bool:
        """At least ``n`` unread bytes in the buffer (n <= its size); False at end of file."""
        if self._rend - self._rpos >= n:
            return True
        if self._rpos:  # move the unread tail to the front
            left = self._rend - self._rpos
            self._rbuf[:left] = self._rview[self._rpos : self._rend]
            self._rpos, self._rend = 0, left
        while self._rend < n:
            k = self.sock.recv_into(self._rview[self._rend :])
            if k == 0:
                return False
            self._rend += k
        return True

    def close(self) -> None:
        """Safe beside a sender in another thread: the shutdown wakes a sender blocked on a full
        socket, and the close waits for it to leave, so its descriptor number is never reused
        under it (a worker's reader closes a data connection its batch loop may be answering)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with self._send_lock:
            self.sock.close()


def frame_parts(
    kind: int,
    status: int,
    model: int,
    req_id: int,
    deadline_ns: int,
    array: Tensors | None,
    data: bytes,
) -> list[bytes | memoryview]:
    """A frame as the buffers to send: header (+ shape), then the body when not empty; a
    tuple of arrays as a ``MULTI`` frame. InvalidRequestError for what cannot travel."""
    if isinstance(array, tuple):
        return _multi_parts(kind, status, model, req_id, deadline_ns, array)
    if array is not None:
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        shape = array.shape
        code = dtype_code(array.dtype)
        body: memoryview | bytes = memoryview(array.data).cast("B") if array.size else b""
    else:
        shape, code, body = (len(data),), _UINT8, data
    head = HEADER.pack(kind, status, code, len(shape), model, req_id, deadline_ns, len(body))
    if shape:
        head += struct.pack(f"<{len(shape)}I", *shape)
    return [head, body] if len(body) else [head]


def _multi_parts(
    kind: int, status: int, model: int, req_id: int, deadline_ns: int, arrays: tuple[Array, ...]
) -> list[bytes | memoryview]:
    if not arrays:
        raise InvalidRequestError("a frame carries at least one tensor")
    words: list[int] = []
    bodies: list[bytes | memoryview] = []
    total = 0
    for a in arrays:
        if not isinstance(a, np.ndarray):
            raise InvalidRequestError(f"a tensor must be a numpy array, not {type(a).__name__}")
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        words.append(dtype_code(a.dtype) | a.ndim << 8)
        words += a.shape
        n = a.nbytes
        if n:
            bodies.append(memoryview(a.data).cast("B"))
        pad = -n % 8
        if pad:
            bodies.append(_PAD[:pad])
        total += n + pad
    if len(words) > _MAX_WORDS:
        raise InvalidRequestError(
            f"{len(arrays)} tensors of {len(words) - len(arrays)} dims in all cannot travel in one"
            f" frame (at most {_MAX_WORDS} words: tensors plus their dims)"
        )
    head = HEADER.pack(kind, status, MULTI, len(words), model, req_id, deadline_ns, total)
    head += struct.pack(f"<{len(words)}I", *words)
    return [head, *bodies]


def decode_tensors(code: int, shape: Sequence[int], payload: bytes | bytearray) -> Tensors:
    """A frame's tensors from its dtype code, shape words and payload (no copy: views of the
    payload); ValueError when malformed. The one decoder of every receiver."""
    if code != MULTI:
        return np.frombuffer(payload, dtype=dtype_of(code)).reshape(shape)
    out: list[Array] = []
    i = off = 0
    nwords = len(shape)
    while i < nwords:
        w = shape[i]
        nd = w >> 8
        if nd > 0xFF or i + 1 + nd > nwords:
            raise ValueError(f"bad tensor table word {w:#x}")
        dims = tuple(shape[i + 1 : i + 1 + nd])
        i += 1 + nd
        dt = dtype_of(w & 0xFF)
        count = math.prod(dims)
        n = count * dt.itemsize
        if off + n > len(payload):
            raise ValueError("the tensors need more bytes than the frame carries")
        if n:
            out.append(np.frombuffer(payload, dtype=dt, count=count, offset=off).reshape(dims))
        else:
            out.append(np.zeros(dims, dt))
        off += n + (-n % 8)
    if not out or off != len(payload):
        raise ValueError(f"the tensors take {off} bytes, the frame carries {len(payload)}")
    return tuple(out)


def _sendmsg_all(sock: socket.socket, parts: Sequence[bytes | memoryview]) -> None:
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    got = 0
    n = len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        if k == 0:
            return False
        got += k
    return True


class Transport(ABC):
    """Requests in, results out: how the daemon talks to one worker."""

    name: str
    models: tuple[str, ...]
    # the worker's latest STATS: model name -> key (STATS_KEYS) -> cumulative value; empty for
    # a transport whose worker sends none
    batch_stats: Mapping[str, Mapping[str, int]] = MappingProxyType({})

    @abstractmethod
    def submit(self, model: str, array: Tensors, *, deadline_ns: int = 0) -> Future[Tensors]:
        """Send one request (an array, or a tuple of arrays for a model of several inputs); the
        future gives the outputs likewise, or raises a :class:`~stgs.errors.ServingError`
        subclass."""

    @property
    @abstractmethod
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""

    @property
    @abstractmethod
    def closed(self) -> bool:
        """True once the worker is gone: every later ``submit`` fails at once."""

    @abstractmethod
    def close(self) -> None:
        """Fail what is in flight and release the connection."""


def _nothing() -> None:
    pass


def error_of(status: int, message: str) -> ServingError:
    """The serving error a non-OK response status stands for."""
    if status == DEADLINE:
        return DeadlineExceededError(message)
    if status == INVALID:
        return InvalidRequestError(message)
    return WorkerError(message)


class SocketTransport(Transport):
    """The daemon's end of a worker's socket: ``submit`` from any thread."""

    def __init__(
        self,
        sock: socket.socket,
        models: Sequence[str],
        *,
        name: str = "worker",
        on_ready: Callable[[Frame], None] | None = None,
        on_close: Callable[[SocketTransport], None] | None = None,
    ) -> None:
        self.name = name
        self.models = tuple(models)
        self._index = {m: i for i, m in enumerate(self.models)}
        self._fs = FrameSocket(sock)
        self._pending: dict[int, Future[Tensors]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = False
        self._reason = "worker connection closed"
        self._on_ready = on_ready
        self._on_close = on_close
        self.ready = threading.Event()
        self.ready_info: Frame | None = None
        self.batch_stats: dict[str, dict[str, int]] = {}  # (Transport.batch_stats)
        self.last_frame_ns = time.monotonic_ns()  # when the last frame of any kind arrived
        self.max_batch_ns = 0  # the worker's longest batch so far (from its heartbeats)
        self._reader = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)
        self._reader.start()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, model: str, array: Tensors, *, deadline_ns: int = 0) -> Future[Tensors]:
        fut, send = self.reserve(model, array, deadline_ns=deadline_ns)
        send()
        return fut

    def reserve(
        self, model: str, array: Tensors, *, deadline_ns: int = 0
    ) -> tuple[Future[Tensors], Callable[[], None]]:
        """Register a request (it counts as in flight from now on) and return its sender.

        The router reserves under its lock, so a worker it is about to drain never misses a
        request, and sends outside it, so that large tensors to different workers go in parallel.
        """
        fut: Future[Tensors] = Future()
        idx = self._index.get(model)
        if idx is None:
            fut.set_exception(InvalidRequestError(f"{self.name} does not serve {model!r}"))
            return fut, _nothing
        req_id = next(self._ids)
        with self._lock:
            if self._closed:
                fut.set_exception(WorkerDiedError(f"{self.name}: {self._reason}"))
                return fut, _nothing
            self._pending[req_id] = fut

        def send() -> None:
            try:
                self._fs.send(
                    REQUEST, model=idx, req_id=req_id, deadline_ns=deadline_ns, array=array
                )
            except InvalidRequestError as exc:
                if self._pop(req_id) is not None:
                    _resolve(fut, exc)
            except OSError as exc:
                if self._pop(req_id) is not None:
                    _resolve(fut, WorkerDiedError(f"{self.name}: send failed: {exc}"))

        return fut, send

    def stop(self, deadline_ns: int = 0) -> None:
        """Ask the worker to drain and exit (it closes the socket when done): it serves what is
        queued, and its data connections' clients until they hang up or ``deadline_ns`` (on
        ``time.monotonic_ns()``; 0: no deadline) passes (:mod:`stgs.runtime.worker`, Drain)."""
        with contextlib.suppress(OSError):
            self._fs.send(STOP, deadline_ns=deadline_ns)

    def _pop(self, req_id: int) -> Future[Tensors] | None:
        with self._lock:
            return self._pending.pop(req_id, None)

    def _read(self) -> None:
        try:
            while True:
                frame = self._fs.recv()
                if frame is None:
                    break
                self.last_frame_ns = time.monotonic_ns()
                if frame.kind == RESPONSE:
                    fut = self._pop(frame.req_id)
                    if fut is None:
                        continue
                    if frame.status == OK:
                        _resolve(fut, frame.tensors())
                    else:
                        _resolve(fut, error_of(frame.status, frame.text()))
                elif frame.kind == HEARTBEAT:
                    self.max_batch_ns = max(self.max_batch_ns, frame.req_id)
                elif frame.kind == STATS:
                    stats = _parse_stats(frame.text(), self.models)
                    if stats is not None:  # a malformed one keeps the last good totals
                        self.batch_stats = stats
                elif frame.kind == READY:
                    self.ready_info = frame
                    self.ready.set()
                    if self._on_ready is not None:
                        self._on_ready(frame)
        except (OSError, ValueError) as exc:
            self._reason = f"worker connection broke: {exc}"
        self._shutdown(self._reason)

    def fail(self, reason: str) -> None:
        """Mark the worker dead (the supervisor saw the process exit): fail everything."""
        self._reason = reason
        self._shutdown(reason)

    def _shutdown(self, reason: str) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            _resolve(fut, WorkerDiedError(f"{self.name}: {reason}; request lost in flight"))
        self._fs.close()
        if self._on_close is not None:
            self._on_close(self)

    def close(self) -> None:
        self._shutdown("closed by the daemon")


def _resolve(fut: Future[Tensors], outcome: Tensors | BaseException) -> None:
    """Complete ``fut`` unless its caller gave up on it (cancelled): the reader thread must
    never die of an answer that came too late."""
    if not fut.set_running_or_notify_cancel():  # cancelled: nobody waits for it
        return
    if isinstance(outcome, BaseException):
        fut.set_exception(outcome)
    else:
        fut.set_result(outcome)


def _parse_stats(text: str, models: Sequence[str]) -> dict[str, dict[str, int]] | None:
    """A STATS payload by model name (slots of one model summed); None when malformed (a read
    path: statistics never break serving)."""
    try:
        raw = json.loads(text)
        out: dict[str, dict[str, int]] = {}
        for slot, name in enumerate(models):
            d = out.setdefault(name, dict.fromkeys(STATS_KEYS, 0))
            for k in STATS_KEYS:
                d[k] += int(raw[k][slot])
        return out
    except (ValueError, KeyError, IndexError, TypeError):
        return None


class MockTransport(Transport):
    """A transport that calls ``handler(model, tensors) -> tensors`` in this process."""

    def __init__(
        self,
        handler: Callable[[str, Tensors], Tensors],
        models: Sequence[str],
        name: str = "mock",
    ) -> None:
        self.name = name
        self.models = tuple(models)
        self._handler = handler
        self._closed = False

    @property
    def in_flight(self) -> int:
        return 0

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, model: str, array: Tensors, *, deadline_ns: int = 0) -> Future[Tensors]:
        fut: Future[Tensors] = Future()
        if self._closed:
            fut.set_exception(WorkerDiedError(f"{self.name}: closed"))
        elif model not in self.models:
            fut.set_exception(InvalidRequestError(f"{self.name} does not serve {model!r}"))
        elif deadline_ns and time.monotonic_ns() > deadline_ns:
            fut.set_exception(DeadlineExceededError(f"{model}: deadline exceeded"))
        else:
            try:
                fut.set_result(self._handler(model, array))
            except ServingError as exc:
                fut.set_exception(exc)
        return fut

    def close(self) -> None:
        self._closed = True
