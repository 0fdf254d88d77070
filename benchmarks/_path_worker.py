"""A worker that serves one data connection on a Unix path (tests and benchmarks of the frontend).

``python benchmarks/_path_worker.py PATH SPEC_JSON``: listens on PATH (made atomically: it exists
once a connect can succeed), accepts one connection, and becomes ``python -m stgs.runtime --fd
<that connection>``: a worker whose frames flow over a connection a frontend opened, as they will
over the worker's own data socket (``WorkerSpec.listen``).
"""

import os
import socket
import sys

path, spec = sys.argv[1], sys.argv[2]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path + ".tmp")
srv.listen(1)
os.rename(path + ".tmp", path)
conn, _ = srv.accept()
srv.close()
os.set_inheritable(conn.fileno(), True)
os.execv(
    sys.executable,
    [sys.executable, "-m", "stgs.runtime", "--fd", str(conn.fileno()), "--spec", spec],
)
