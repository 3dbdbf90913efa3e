"""What the research benchmarks share: the synthetic tasks they run on, a warmed-up policy to start from, and
results written as data (each JSON names the command and commit that produced it).

Tasks (configuration overrides over the tiny preset):

* ``chain``: the embedded default (``make demo``): chained additions, errors independent per step.
* ``planted``: problems with one planted critical step (attnrl/data/planted.py), levels of 2-4 definitions;
  its responses (up to ~55 tokens) fit the limits, and the tiny model needs 3000 warmup steps (not the chain's
  800) to read a variable back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attnrl.config.schema import RunConfig
from attnrl.lineage import git_state
from attnrl.stages.prepare import prepare
from attnrl.stages.warmup import initial_policy_path, warmup

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASKS: dict[str, list[str]] = {
    "chain": [],
    "planted": ["data.synthetic.family=planted", "data.synthetic.levels=[2, 3, 4]",
                "rollout.sampling.max_new_tokens=80", "eval.max_new_tokens=80", "warmup.steps=3000"],
}


def log_to_stderr(*names: str) -> None:
    """Progress lines on stderr (stdout is the JSON alone), INFO for ``names``."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s  %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for name in names:
        logging.getLogger(name).setLevel(logging.INFO)


@contextlib.contextmanager
def workdir(keep: Path | None, prefix: str) -> Iterator[Path]:
    """``keep``, or a temporary directory removed afterwards; stdout goes to stderr meanwhile (libraries print)."""
    path = keep or Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield path
    finally:
        if keep is None:
            shutil.rmtree(path, ignore_errors=True)


def warmed_up(config: RunConfig, root: Path) -> Path:
    """The initial policy under ``root``, prepared and warmed up as ``make demo`` does unless it is there."""
    if not initial_policy_path(config, root).is_dir():
        prepare(config, root)
        warmup(config, root)
    return initial_policy_path(config, root)


def provenance(script: str, argv: list[str]) -> dict[str, Any]:
    """The command (as typed from the project root) and the commit that produce a result."""
    git = git_state(ROOT)
    return {"command": " ".join(["python", f"benchmarks/{script}", *argv]), "commit": git["commit"],
            "uncommitted_changes": git["dirty"]}


def write_json(record: dict[str, Any], path: Path) -> None:
    """Write ``record`` atomically (a temporary file, then a rename) and print it."""
    text = json.dumps(record, indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)
    print(text)


def add_policy_options(parser: argparse.ArgumentParser, keep_help: str) -> None:
    """The options of a benchmark that analyses one warmed-up policy: its seed, overrides and where it is kept."""
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--keep", type=Path, default=None, help=keep_help)
