"""How a ``stgs`` sub-command runs, for :mod:`api.cli` and :mod:`api.client`: the handler that
``args.cmd`` names, and an error as one line on stderr with its exit code. Standard library only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping

EXIT_OK, EXIT_INFEASIBLE, EXIT_USAGE = 0, 1, 2
EXIT_INCOMPLETE = 3  # it ran, but part of the work failed (``stgs compare``: a cell raised)

Handler = Callable[[argparse.Namespace], int]


def dispatch(args: argparse.Namespace, handlers: Mapping[str, Handler]) -> int:
    """Run the handler of ``args.cmd``; a command without one is a usage error."""
    handler = handlers.get(args.cmd)
    return EXIT_USAGE if handler is None else handler(args)


def fail(exc: BaseException, code: int) -> int:
    """Print ``stgs: error: <exc>`` on stderr; return ``code``."""
    print(f"stgs: error: {exc}", file=sys.stderr)
    return code
