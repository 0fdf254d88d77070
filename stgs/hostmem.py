"""Large request buffers without page faults on every request.

glibc's malloc serves a block above ``M_MMAP_THRESHOLD`` (128 KiB at start, then adapting to
what was freed) from fresh ``mmap``'d pages and returns them to the kernel when it is freed. A
serving process allocates and frees several such blocks per image request (a 3x224x224 FP32
tensor is 602 KB: the event loop's read buffers, the HTTP parser's body pieces, the joined body,
a worker's received frame), and each fresh page costs a page fault and zeroing: 262 page faults
and about 0.7 ms of the 1.6 ms that one 600 KB POST into a frontend took on the 2-core VM
(``python -m benchmarks.http_body``; docs/benchmarks.md, session 9). With the threshold raised,
such blocks come from
the heap and are reused, already mapped, by the next request; freed memory is kept up to the
trim threshold instead of being returned at once.

:func:`keep_large_buffers` sets both, once, at the start of the daemon, every frontend process
and every worker process (glibc only; elsewhere it does nothing). ``STGS_KEEP_LARGE_BUFFERS=0``
in the environment turns it off (the benchmarks' "before" column).
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["ENV", "LARGE_BUFFER_BYTES", "keep_large_buffers"]

ENV = "STGS_KEEP_LARGE_BUFFERS"
# glibc caps M_MMAP_THRESHOLD at 32 MiB on 64-bit hosts (HEAP_MAX_SIZE / 2)
LARGE_BUFFER_BYTES = 32 << 20
_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3


def keep_large_buffers(threshold: int = LARGE_BUFFER_BYTES) -> bool:
    """Blocks up to ``threshold`` bytes from the heap, and up to 4 x ``threshold`` of freed
    heap kept for reuse. True when glibc took both settings; False where they do not apply (not
    Linux, not glibc, or turned off by ``STGS_KEEP_LARGE_BUFFERS=0``)."""
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 4 * threshold)
    )
