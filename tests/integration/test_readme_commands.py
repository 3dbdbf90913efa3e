"""Every command the README and the pages of docs/ show runs as shown, checked from their own text.

Each command line of its ``bash`` blocks is checked by what it calls, as far as this machine can
without a GPU cluster or an S3 bucket: ``attnrl config`` runs for real; other ``attnrl`` commands
go through the CLI's own parser and configuration resolution (what the CLI does before any server
starts, so a bad flag or ``--set`` key fails here); ``dvc`` through DVC's parser; ``prefect``, ``ray``
and the benchmark scripts through their ``--help``, which must list every option used; ``make``
targets through ``make -n``; files a command reads must exist. A command of a kind not listed here fails
the test, so a new command in the README is checked or consciously listed. docs/attnrl-spec.md and
docs/stack-notes.md are reference material (the official code's commands, the stack as measured), not
instructions for this project, and are not checked.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from attnrl.config import resolve_config
from attnrl.config.loading import dump_config, load_config

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = {"attnrl-spec.md", "stack-notes.md"}
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in REFERENCE)]
VENV = ROOT / ".venv" / "bin"
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
# Commands for a machine this project's tests do not have; what they read is checked instead.
ELSEWHERE = {
    "git": "the user's own repository and remote",
    "cd": "a directory of the user's",
    "export": "the user's credentials",
    "python3.11": "a GPU host's virtual environments (README \"Training on a GPU node\")",
}


def page_commands(page: Path) -> list[tuple[str, list[str]]]:
    """("page:line", argv) of every command in the page's ``bash`` blocks: continuation lines (and quotes
    that go on over several lines) joined, comments dropped, ``a && b`` split, redirections removed, and
    the page's own ``NAME="..."`` variables expanded where a command uses ``$NAME``."""
    commands, block, joined, start, variables = [], False, "", 0, {}
    where = page.relative_to(ROOT).as_posix()
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        if line.startswith("```"):
            block = line.strip() == "```bash" if not block else False
            continue
        if not block:
            continue
        if not joined:
            start = number
        joined += line.rstrip("\\") + " "
        if line.endswith("\\"):
            continue
        try:
            words, joined = shlex.split(joined, comments=True), ""
        except ValueError:  # a quotation that goes on on the next line
            continue
        words = [w for word in words for w in (shlex.split(variables[word[1:]]) if word[1:] in variables else [word])]
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            argv, words = words[:cut], words[cut + 1 :]
            if ">" in argv:
                argv = argv[: argv.index(">")]
            assignments = 0
            while assignments < len(argv) and ENV_ASSIGNMENT.match(argv[assignments]):
                assignments += 1
            if assignments == len(argv):  # NAME=value alone: a variable of the page
                variables.update(a.split("=", 1) for a in argv)
            elif argv:
                commands.append((f"{where}:{start}", argv[assignments:]))
    return commands


COMMANDS = [command for page in PAGES for command in page_commands(page)]


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs)


@functools.cache
def _help(help_argv: tuple[str, ...]) -> str:
    """A program's ``--help``, once per program and subcommand: several pages show one script many times."""
    done = _run(list(help_argv))
    assert done.returncode == 0, f"{' '.join(help_argv)}: {done.stdout}{done.stderr}"
    return done.stdout


def _options_in_help(argv: list[str], help_argv: list[str]) -> None:
    shown = _help(tuple(help_argv))
    for option in (w.split("=")[0] for w in argv if w.startswith("--")):
        assert option in shown, f"{' '.join(argv)}: {option} is not in {' '.join(help_argv)}"


def check_attnrl(argv: list[str]) -> None:
    from flows.cli import _parser

    args = _parser().parse_args(argv[1:])  # SystemExit on a bad flag or choice
    if args.command == "config":
        done = _run([str(VENV / "attnrl"), *argv[1:]])
        assert done.returncode == 0, done.stderr
        printed = yaml.safe_load(done.stdout)
        assert dump_config(resolve_config(preset=args.preset, overrides=args.set)) == done.stdout and printed
        if args.preset == "tiny" and not args.set:  # README: "regenerate a complete params.yaml"
            assert done.stdout == (ROOT / "params.yaml").read_text()
    elif args.command in ("alerts", "remote"):
        return  # need a webhook receiver or $ATTNRL_DVC_REMOTE; parsed above
    else:
        resolve_config(path=ROOT / args.config, method=args.method, overrides=args.set)


def check_python(argv: list[str]) -> None:
    script = ROOT / argv[1]
    assert script.is_file(), f"{' '.join(argv)}: {argv[1]} is missing"
    _options_in_help(argv, [sys.executable, str(script), "--help"])
    overrides = [argv[i + 1] for i, word in enumerate(argv) if word == "--set"]
    resolve_config(preset="tiny", overrides=overrides)


def check_dvc(argv: list[str]) -> None:
    from dvc.cli import parse_args

    parse_args(argv[1:])  # DvcParserError on an unknown command or flag


def check_prefect(argv: list[str]) -> None:
    words = list(argv[1:])
    if words[:1] == ["--profile"]:
        words = words[2:]  # a profile the README creates first; the command's own help needs none
    _options_in_help(argv, [str(VENV / "prefect"), *[w for w in words if not w.startswith("-")], "--help"])
    if words[:2] == ["deployment", "run"]:
        deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
        names = {f"{d['entrypoint'].split(':')[1].removesuffix('_flow')}/{d['name']}" for d in deployments}
        assert words[2] in names or words[2].replace("_", "-") in names, (words[2], names)


def check_ray(argv: list[str]) -> None:
    _options_in_help(argv, [str(VENV / "ray"), argv[1], "--help"])


def check_make(argv: list[str]) -> None:
    for target in argv[1:]:
        done = _run(["make", "-n", target])
        assert done.returncode == 0, f"make {target}: {done.stderr}"


def check_pip(argv: list[str]) -> None:
    for i, word in enumerate(argv):
        if word == "-r":
            assert (ROOT / argv[i + 1]).is_file(), f"{' '.join(argv)}: {argv[i + 1]} is missing"


def check_elsewhere(argv: list[str]) -> None:
    for word in argv:
        if word.endswith((".lock", ".txt", ".yaml")):
            assert (ROOT / word).is_file(), f"{' '.join(argv)}: {word} is missing"


def checker(argv: list[str]):
    program = Path(argv[0]).name
    if program == "pip" or argv[1:3] == ["-m", "pip"]:
        return check_pip
    if program == "python" and argv[1].endswith(".py"):
        return check_python
    known = {"attnrl": check_attnrl, "dvc": check_dvc, "prefect": check_prefect, "make": check_make, "ray": check_ray}
    if program in known:
        return known[program]
    if argv[0] in ELSEWHERE:
        return check_elsewhere
    raise AssertionError(f"the docs show `{' '.join(argv)}`, which this test does not know how to check")


def test_the_pages_show_commands_of_every_kind():
    assert {"README.md", "docs/orchestration.md", "docs/research.md"} <= {where.split(":")[0] for where, _ in COMMANDS}
    programs = {Path(argv[0]).name for _, argv in COMMANDS}
    assert {"make", "attnrl", "dvc", "prefect", "python", "pip"} <= programs, programs
    assert ["attnrl", "evaluate", "--set", "eval.temperature=1.0", "--set", "data.eval.0.k=8"] in (
        [Path(argv[0]).name, *argv[1:]] for _, argv in COMMANDS)


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_a_documented_command_runs_as_shown(where, argv):
    checker(argv)(argv)


def test_a_bad_override_fails_in_one_line_before_any_server(tmp_path):
    done = _run([str(VENV / "attnrl"), "evaluate", "--set", "data.eval.7.k=8"])
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr  # one line, no traceback
    assert "data.eval.7.k" in done.stderr and "Starting temporary server" not in done.stdout + done.stderr
    assert load_config(ROOT / "params.yaml")  # the file the README's commands read
