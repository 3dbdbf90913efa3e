"""Stage 'warmup': produce the initial policy at ``models/init/``.

Tiny default: build the tiny Qwen2 and SFT it on the synthetic reference solutions (so RL has a
policy that solves some problems). Real runs (``model.path`` set): record which checkpoint is
the initial policy, without copying gigabytes, in ``models/init/source.json``.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from attnrl.config.schema import RunConfig
from attnrl.data.loaders import load_verl_parquet
from attnrl.data.synthetic import reference_solution
from attnrl.errors import ConfigError
from attnrl.model.loading import save_policy
from attnrl.model.policy import fresh_tiny_policy
from attnrl.rollout.prompts import encode_prompt
from attnrl.stages.layout import Layout
from attnrl.stages.results import WarmupResult
from attnrl.utils.atomic import atomic_path
from attnrl.utils.seeding import derive_seed, seed_everything
from attnrl.warmup import run_warmup, sft_example

logger = logging.getLogger(__name__)
SOURCE_FILE = "source.json"


def warmup(config: RunConfig, root: str | Path = ".") -> WarmupResult:
    layout = Layout.of(config, root)
    if config.model.path is not None:
        if config.warmup.enabled:
            raise ConfigError("warmup.enabled: SFT warmup is for the tiny default model; set it false with model.path")
        with atomic_path(layout.init_model) as tmp:
            tmp.mkdir()
            (tmp / SOURCE_FILE).write_text(json.dumps({"path": str(Path(config.model.path).resolve())}, indent=2))
        return WarmupResult(layout.init_model, [])

    seed_everything(config.seed)
    model, tokenizer = fresh_tiny_policy(config)
    history: list[dict[str, float]] = []
    if config.warmup.enabled:
        problems = load_verl_parquet(layout.prepared_train)
        non_synthetic = sorted({p.source for p in problems if p.level is None})
        if non_synthetic:
            raise ConfigError(
                f"warmup.enabled: SFT needs reference solutions, which only the synthetic task has; "
                f"sources without them: {non_synthetic}"
            )
        modulus = config.data.synthetic.modulus
        teacher = random.Random(derive_seed(config.seed, "teacher"))
        error_rate = config.warmup.teacher_error_rate
        examples = [
            sft_example(
                tokenizer,
                encode_prompt(tokenizer, p.prompt),
                reference_solution(p.question, modulus, family=config.data.synthetic.family, error_rate=error_rate,
                                   rng=teacher),
            )
            for p in problems
        ]
        history = run_warmup(model, examples, config.warmup, pad_token_id=tokenizer.pad_token_id, seed=config.seed)
    save_policy(model, tokenizer, layout.init_model, {"warmup_history.json": json.dumps(history, indent=2)})
    return WarmupResult(layout.init_model, history)


def initial_policy_path(config: RunConfig, root: str | Path = ".") -> Path:
    """The directory to load the initial policy from (the tiny model, or the recorded checkpoint)."""
    init = Layout.of(config, root).init_model
    source = init / SOURCE_FILE
    if source.is_file():
        return Path(json.loads(source.read_text())["path"])
    return init
