"""``stgs completion bash|zsh``: the shell completion script of the ``stgs`` command, generated
from its argparse parser by shtab (every sub-command, option and choice, as the parser has them
now: nothing to keep in step by hand).

Arguments that take a path are marked where they are defined, with :func:`path_argument`; the shells
complete file (or directory) names for them. shtab is imported only when a script is asked for,
so the other verbs start as light as before.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

SHELLS = ("bash", "zsh")
_MARK = "stgs_path"


def path_argument(action: argparse.Action, *, directory: bool = False) -> argparse.Action:
    """Mark ``action`` (what ``add_argument`` returned) as a file path, or a directory."""
    vars(action)[_MARK] = "directory" if directory else "file"
    return action


def _actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases: one parser, once
                yield from _actions(sub)


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script of ``parser`` for ``shell`` (one of :data:`SHELLS`)."""
    import shtab

    for action in _actions(parser):
        kind = vars(action).get(_MARK)
        if kind is not None:
            vars(action)["complete"] = shtab.DIRECTORY if kind == "directory" else shtab.FILE
    text: str = shtab.complete(parser, shell=shell)
    return text
