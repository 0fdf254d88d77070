"""``stgs completion bash|zsh``: shtab's script covers every verb and option of the parser, bash
parses it, and bash, sourcing it, completes verbs, options, choices and file names."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from api.cli import _parser

ROOT = Path(__file__).resolve().parents[1]


def stgs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def verbs(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, list[str]]:
    """Every verb ("models add" included) -> its option strings."""
    out: dict[str, list[str]] = {}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                path = f"{prefix} {name}".strip()
                out[path] = [o for b in sub._actions for o in b.option_strings]
                out.update(verbs(sub, path))
    return out


@pytest.fixture(scope="module")
def scripts() -> dict[str, str]:
    out = {}
    for shell in ("bash", "zsh"):
        r = stgs("completion", shell)
        assert r.returncode == 0, r.stderr
        out[shell] = r.stdout
    return out


def test_every_verb_and_option_is_in_the_scripts(scripts: dict[str, str]) -> None:
    all_verbs = verbs(_parser())
    assert {"plan", "serve", "status", "models add", "models rm", "completion"} <= set(all_verbs)
    for shell, text in scripts.items():
        for verb, options in all_verbs.items():
            assert verb.split()[-1] in text, (shell, verb)
            for opt in options:
                assert opt in text, (shell, verb, opt)
    assert scripts["bash"].rstrip().endswith("-F _shtab_stgs stgs")
    assert scripts["zsh"].startswith("#compdef stgs")


def test_unknown_shell_is_a_usage_error() -> None:
    r = stgs("completion", "fish")
    assert r.returncode == 2 and "invalid choice: 'fish'" in r.stderr and not r.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")
def test_bash_parses_the_script(scripts: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "stgs.bash"
    f.write_text(scripts["bash"])
    r = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("zsh") is None, reason="no zsh here")
def test_zsh_parses_the_script(scripts: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "_stgs"
    f.write_text(scripts["zsh"])
    r = subprocess.run(["zsh", "-n", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# what bash offers, the script sourced, for the words typed so far (the last one being completed)
CASES = [
    (["stgs", "mo"], ["models"]),
    (["stgs", "models", ""], ["add", "list", "rm"]),
    (["stgs", "models", "add", "--dt"], ["--dtype"]),
    (["stgs", "models", "add", "--dtype", ""], ["fp16", "bf16", "fp32"]),
    (["stgs", "completion", ""], ["bash", "zsh"]),
    (["stgs", "serve", "--config", "node"], ["node.toml"]),  # a path: file names
    (["stgs", "serve", "--model-repository", ""], ["repo"]),  # a directory: directories only
]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")
def test_bash_completes_with_the_script(scripts: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "stgs.bash").write_text(scripts["bash"])
    (tmp_path / "node.toml").write_text("")
    (tmp_path / "repo").mkdir()
    probe = (
        "source stgs.bash\n"
        'COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMP_LINE="$*"; '
        "COMP_POINT=${#COMP_LINE}; COMPREPLY=(); _shtab_stgs; printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    for words, want in CASES:
        r = subprocess.run(
            ["bash", "-c", probe, "probe", *words],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "LC_ALL": "C"},
        )
        assert r.returncode == 0, r.stderr
        assert sorted(r.stdout.split()) == sorted(want), (words, r.stdout)
