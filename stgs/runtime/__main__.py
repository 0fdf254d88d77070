"""``python -m stgs.runtime --fd N --spec JSON``: the worker process (see :mod:`.worker`)."""

from stgs.runtime.worker import run

run()
