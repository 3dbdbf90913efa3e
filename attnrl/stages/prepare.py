"""Stage 'prepare': load every configured source, drop overlong prompts, write verl parquet.

Prompts longer than ``data.max_prompt_tokens`` after templating are dropped, as verl's
``filter_overlong_prompts`` does (spec §2.2); with ``data.overlong_prompts: error`` the first one
stops the stage instead, naming its row. Duplicate problem ids within a source are an error.
Outputs ``data/prepared/train.parquet`` and ``data/prepared/eval/<benchmark>.parquet``, replaced
together: the directory is written aside, checked (``check``), then renamed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from attnrl.config.schema import DataConfig, RunConfig, SourceSpec
from attnrl.data.loaders import load_source, write_problems
from attnrl.data.problem import Problem
from attnrl.errors import DataError
from attnrl.model.policy import policy_tokenizer
from attnrl.rollout.prompts import encode_prompt
from attnrl.stages.layout import TRAIN_FILE, Layout, OutputCheck, eval_file
from attnrl.stages.results import PreparedData
from attnrl.utils.atomic import atomic_path

logger = logging.getLogger(__name__)


def benchmark_name(spec: SourceSpec) -> str:
    """The name a benchmark's file and metrics go by."""
    return spec.name or Path(spec.path or spec.kind).stem


def prepare(config: RunConfig, root: str | Path = ".", *, check: OutputCheck | None = None) -> PreparedData:
    """``check`` sees the complete new ``data/prepared`` directory before it replaces the old one."""
    layout = Layout.of(config, root)
    tokenizer = policy_tokenizer(config)
    dropped = 0
    train: list[Problem] = []
    for spec in config.data.train:
        problems = _check_unique(load_source(spec, config.data, split="train", seed=config.seed), spec.path or spec.kind)
        kept, n_dropped = _within_prompt_limit(problems, tokenizer, config.data, spec.path or spec.kind)
        train.extend(kept)
        dropped += n_dropped
    _check_unique(train, "training data")
    if not train:
        raise DataError("prepare: the training sources yielded no problems")

    evaluation: dict[str, list[Problem]] = {}
    for spec in config.data.eval:
        name = benchmark_name(spec)
        if name in evaluation:
            raise DataError(f"prepare: two evaluation benchmarks are named {name!r}; give each a distinct name")
        problems = _check_unique(load_source(spec, config.data, split="test", seed=config.seed), f"benchmark {name!r}")
        problems, n_dropped = _within_prompt_limit(problems, tokenizer, config.data, f"benchmark {name!r}")
        dropped += n_dropped
        if not problems:
            raise DataError(f"prepare: benchmark {name!r} has no problems left")
        evaluation[name] = problems
    with atomic_path(layout.prepared_dir, validate=check) as tmp:
        tmp.mkdir()
        write_problems(train, tmp / TRAIN_FILE)
        for name, problems in evaluation.items():
            write_problems(problems, tmp / eval_file(name))
    eval_paths = {name: layout.prepared_eval(name) for name in evaluation}
    eval_counts = {name: len(problems) for name, problems in evaluation.items()}
    return PreparedData(layout.prepared_train, len(train), eval_paths, eval_counts, dropped)


def _within_prompt_limit(
    problems: list[Problem], tokenizer: PreTrainedTokenizerBase, data: DataConfig, what: str
) -> tuple[list[Problem], int]:
    """Positions are file rows within one source (with ``on_invalid: error``)."""
    limit = data.max_prompt_tokens
    kept = []
    for position, problem in enumerate(problems):
        length = len(encode_prompt(tokenizer, problem.prompt))
        if length <= limit:
            kept.append(problem)
        elif data.overlong_prompts == "error":
            raise DataError(f"{what}: row {position} (id {problem.uid!r}) has a {length}-token prompt, over "
                            f"data.max_prompt_tokens={limit} (data.overlong_prompts is 'error')")
    if len(kept) < len(problems):
        logger.warning("dropped %d prompts longer than %d tokens", len(problems) - len(kept), limit)
    return kept, len(problems) - len(kept)


def _check_unique(problems: list[Problem], what: str) -> list[Problem]:
    """Within one source, positions are file rows (with ``on_invalid: error``)."""
    seen: dict[str, int] = {}
    for position, problem in enumerate(problems):
        if problem.uid in seen:
            raise DataError(f"{what}: row {position} repeats the problem id {problem.uid!r} of row {seen[problem.uid]}")
        seen[problem.uid] = position
    return problems
