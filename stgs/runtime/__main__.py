"""``python -m stgs.runtime --fd N --spec JSON``: the worker process (see :mod:`.worker`)."""

import sys

from stgs.runtime.worker import main

sys.exit(main())
