"""Child processes die with the daemon that started them, even when it is killed with SIGKILL.

A worker that is still loading its models does not read its socket, so it would notice a dead
daemon only once loaded (seconds for a large model), and hold its device meanwhile. Two halves:

* in the child, first thing: :func:`die_with_parent` asks the kernel for SIGKILL when its parent
  dies (``prctl(PR_SET_PDEATHSIG)``, Linux; nothing elsewhere), then checks that its parent is
  still the process that spawned it (:data:`PARENT_ENV`): a parent that died before the
  ``prctl`` call would never send the signal;
* in the parent: :func:`popen` starts the child. The kernel sends the death signal when the
  *thread* that forked the child ends, not the process, and the daemon spawns workers from
  short-lived threads (a profiling thread, the server's thread pool, whose idle threads exit).
  So every child is forked by one daemon thread that lives as long as the process.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

__all__ = ["EXIT_ORPHANED", "PARENT_ENV", "die_with_parent", "popen"]

PARENT_ENV = "STGS_PARENT_PID"
"""The pid of the process that spawned this one (set by :func:`popen`)."""
EXIT_ORPHANED = 75
"""Exit status of a child whose parent was gone before it could ask to die with it."""
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_Job = tuple[Callable[[], subprocess.Popen[Any]], "Future[subprocess.Popen[Any]]"]
_jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
_spawner: threading.Thread | None = None
_spawner_lock = threading.Lock()


def die_with_parent() -> None:
    """In a child: SIGKILL when the parent dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    want = os.environ.get(PARENT_ENV)
    if want is not None and os.getppid() != int(want):
        print(
            f"pid {os.getpid()}: parent {want} is gone (parent now {os.getppid()}); exiting",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_ORPHANED)


def _serve() -> None:
    while True:
        start, fut = _jobs.get()
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(start())
            except BaseException as exc:  # handed to the caller, raised there
                fut.set_exception(exc)


def popen(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, **kwargs: Any
) -> subprocess.Popen[Any]:
    """``subprocess.Popen(argv, env=env + PARENT_ENV, **kwargs)``, forked by the spawner
    thread (see the module docstring); exceptions are raised here, in the caller."""
    global _spawner
    full_env = dict(os.environ if env is None else env)
    full_env[PARENT_ENV] = str(os.getpid())
    with _spawner_lock:
        if _spawner is None or not _spawner.is_alive():
            _spawner = threading.Thread(target=_serve, name="stgs-spawner", daemon=True)
            _spawner.start()
    fut: Future[subprocess.Popen[Any]] = Future()
    _jobs.put((lambda: subprocess.Popen(list(argv), env=full_env, **kwargs), fut))
    return fut.result()
