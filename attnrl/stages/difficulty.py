"""Stage 'difficulty': estimate each training problem's difficulty under the initial policy.

k samples per problem (the training sampling settings), graded, and scored in the same forward
that gives FCI (spec §5.1). Writes ``data/difficulty/``:

* ``difficulty.parquet``: one row per problem: source, id, samples, correct, pass_rate,
  mean_fci (mean over responses of their mean step FCI, spec §7.2), kept;
* ``train.parquet``: the kept problems (pass rate strictly between the configured bounds), which
  the train stage reads when ``difficulty.enabled`` (disabled: every prepared problem, passed through);
* ``ads_seed.json``: the ADS running mean (spec §7.2) seeded with the always-solved problems'
  mean FCI, so the easy filter has a reference from the first training step.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from attnrl.config.schema import RunConfig
from attnrl.data.loaders import load_verl_parquet, write_problems
from attnrl.data.problem import Problem
from attnrl.errors import DataError
from attnrl.model.loading import load_policy
from attnrl.reward.verifier import Verifier
from attnrl.rollout.engine import GenerationRequest, SamplingParams
from attnrl.rollout.factory import build_engine, engine_session, preflight, uses_pool
from attnrl.rollout.prompts import encode_prompt
from attnrl.sampling import RunningMean, response_mean_fci
from attnrl.stages.layout import TRAIN_FILE, Layout, OutputCheck
from attnrl.stages.results import DifficultyResult
from attnrl.stages.warmup import initial_policy_path
from attnrl.steps import SeparatorVocab
from attnrl.training.rollouts import score_initial
from attnrl.training.trainer import PolicyTrainer
from attnrl.utils.atomic import atomic_path
from attnrl.utils.seeding import derive_seed

ADS_SEED_FILE = "ads_seed.json"


TABLE_SCHEMA = pa.schema([("source", pa.string()), ("problem_id", pa.string()), ("level", pa.int64()),
                          ("samples", pa.int64()), ("correct", pa.int64()), ("pass_rate", pa.float64()),
                          ("mean_fci", pa.float64()), ("kept", pa.bool_())])


def estimate_difficulty(config: RunConfig, root: str | Path = ".", *,
                        check: OutputCheck | None = None) -> DifficultyResult:
    """``check`` sees the complete new ``data/difficulty`` directory before it replaces the old one.

    With ``difficulty.enabled`` false the stage passes every prepared problem through, with an empty
    table and an empty ADS seed, so the stage is always in the DAG (``dvc.yaml``): turning it on with
    ``dvc exp run -S difficulty.enabled=true`` reruns it and everything after it."""
    layout = Layout.of(config, root)
    settings = config.difficulty
    problems = load_verl_parquet(layout.prepared_train)
    if not settings.enabled:
        return _write(layout, [], problems, RunningMean(), check)
    if settings.max_problems is not None and settings.max_problems < len(problems):
        problems = random.Random(derive_seed(config.seed, "difficulty")).sample(problems, settings.max_problems)
    init = initial_policy_path(config, root)
    sampling = config.rollout.sampling
    preflight(config, model_dir=init, max_new_tokens=sampling.max_new_tokens)  # before any model loads
    policy = load_policy(init, dtype=config.model.dtype, device=config.model.device)
    # The scorer needs the model here; pool actors load their own copies of the same directory.
    engine = build_engine(config, model_dir=init, tokenizer=policy.tokenizer, max_new_tokens=sampling.max_new_tokens,
                          model=None if uses_pool(config) else policy.model)
    scorer = PolicyTrainer(policy.model, None, reference=None, pad_token_id=policy.tokenizer.pad_token_id,
                           algorithm=config.algorithm, train=config.train,
                           temperature=sampling.temperature)
    prompt_ids = [tuple(encode_prompt(policy.tokenizer, p.prompt)) for p in problems]
    with engine_session(engine):
        completions = engine.generate(
            [GenerationRequest(ids, n=settings.samples_per_problem) for ids in prompt_ids],
            SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                           max_new_tokens=sampling.max_new_tokens),
            seed=derive_seed(config.seed, "difficulty", "generate"),
        )
    with Verifier(timeout_s=config.reward.timeout_s, workers=config.reward.workers) as verifier:
        scored = score_initial(problems, prompt_ids, completions, trainer=scorer, tokenizer=policy.tokenizer,
                               verifier=verifier, vocab=SeparatorVocab.from_tokenizer(policy.tokenizer), with_fci=True)
    rows, kept, easy_mean = [], [], RunningMean()
    for question in scored:
        rewards = question.rewards
        pass_rate = sum(rewards) / len(rewards)
        mean_fci = sum(response_mean_fci(r.fci or ()) for r in question.responses) / len(question.responses)
        keep = settings.min_pass_rate < pass_rate < settings.max_pass_rate
        if pass_rate == 1.0:
            easy_mean.update([mean_fci])
        if keep:
            kept.append(question.problem)
        rows.append({"source": question.problem.source, "problem_id": question.problem.id, "level": question.problem.level,
                     "samples": len(rewards), "correct": int(sum(rewards)), "pass_rate": pass_rate,
                     "mean_fci": mean_fci, "kept": keep})
    if not kept:
        raise DataError(
            f"difficulty: no problem has a pass rate in ({settings.min_pass_rate}, {settings.max_pass_rate}); "
            "nothing is left to train on"
        )
    return _write(layout, rows, kept, easy_mean, check)


def _write(layout: Layout, rows: list[dict], kept: list[Problem], easy_mean: RunningMean,
           check: OutputCheck | None) -> DifficultyResult:
    out = layout.difficulty_dir
    with atomic_path(out, validate=check) as tmp:
        tmp.mkdir()
        pq.write_table(pa.Table.from_pylist(rows, schema=TABLE_SCHEMA), tmp / "difficulty.parquet")
        write_problems(kept, tmp / TRAIN_FILE)
        (tmp / ADS_SEED_FILE).write_text(json.dumps({"easy_mean": easy_mean.state_dict()}, indent=2))
    return DifficultyResult(out / "difficulty.parquet", out / TRAIN_FILE, len(rows), len(kept), easy_mean)


def ads_seed(config: RunConfig, root: str | Path = ".") -> RunningMean:
    """The running mean the difficulty stage measured (empty when the stage is off)."""
    mean = RunningMean()
    if config.difficulty.enabled:
        path = Layout.of(config, root).difficulty_dir / ADS_SEED_FILE
        if not path.is_file():
            raise DataError(f"{path} is missing: run the difficulty stage first (difficulty.enabled is true)")
        mean.load_state_dict(json.loads(path.read_text())["easy_mean"])
    return mean
