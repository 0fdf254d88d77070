"""Children started through :mod:`stgs.lifeline` die with their parent, and only then.

The kernel's parent-death signal follows the thread that forked the child: a child forked by a
thread that then ends would be killed with its parent alive. ``lifeline.popen`` forks on one
long-lived thread; a child whose parent is already gone exits at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from stgs import lifeline

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux")

CHILD = "from stgs.lifeline import die_with_parent; die_with_parent(); import time; time.sleep(30)"


def test_child_outlives_the_thread_that_started_it() -> None:
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:  # like a profiling thread: start a worker, end a while later
        procs.append(lifeline.popen([sys.executable, "-c", CHILD]))
        time.sleep(1.0)  # the child has called prctl by now (~0.1 s)

    t = threading.Thread(target=start)
    t.start()
    t.join()
    try:
        time.sleep(0.3)  # a child forked by this thread was killed by now (measured: -9)
        assert procs[0].poll() is None, "killed when the thread that started it ended"
    finally:
        procs[0].kill()
        procs[0].wait()


def test_child_of_a_parent_already_gone_exits() -> None:
    env = {**os.environ, lifeline.PARENT_ENV: "1" if os.getpid() != 1 else "2"}
    r = subprocess.run([sys.executable, "-c", CHILD], env=env, timeout=30, capture_output=True)
    assert r.returncode == lifeline.EXIT_ORPHANED, r.stderr
    assert b"is gone" in r.stderr
