"""Stage 'train': RL from the initial policy, resumable from the newest checkpoint (spec §3).

Writes ``runs/train/checkpoints/step_*/`` (model, optimizer, loop state, lineage),
``runs/train/metrics.jsonl`` (one row of spec §15.4 metrics per step; the train task also logs them with
DVCLive in ``runs/train/dvclive/``),
``runs/train/lineage.json`` and ``runs/train/final/`` (the last policy, a plain ``save_pretrained``
directory the evaluate stage reads). A re-run continues from the newest
checkpoint instead of starting over.

Where the trainer runs is a ``TrainingRuntime``: ``local_runtime`` (this process, engines in-process
or on Ray) or, with ``distributed.enabled``, the extension ``distributed_runtime`` (a group of
DeepSpeed ranks and a pool of engines on Ray; this process holds no model).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from attnrl.config.identity import changed_keys
from attnrl.config.schema import RunConfig
from attnrl.data.loaders import load_verl_parquet
from attnrl.lineage import LINEAGE_FILE, lineage, write_lineage
from attnrl.model.loading import load_policy, save_policy
from attnrl.reward.verifier import Verifier
from attnrl.rollout.engine import RolloutEngine
from attnrl.rollout.factory import build_engine, engine_session, preflight, uses_pool
from attnrl.stages.difficulty import ads_seed
from attnrl.stages.layout import CHECKPOINTS_DIR, TRAIN_FILE, Layout
from attnrl.stages.results import TrainResult
from attnrl.stages.warmup import initial_policy_path
from attnrl.training.backend import autocast_dtype, build_backend
from attnrl.training.checkpoint import (
    StateWriter,
    latest_checkpoint,
    load_backend_state,
    load_loop_state,
    save_checkpoint,
    trainer_state,
)
from attnrl.training.loop import BatchCheck, PhaseRunner, RLLoop, run_directly
from attnrl.training.trainer import PolicyTrainer, Trainer
from attnrl.utils.atomic import atomic_path
from attnrl.utils.progress import Progress
from attnrl.utils.registry import extension
from attnrl.utils.seeding import seed_everything

logger = logging.getLogger(__name__)


def training_problems_path(config: RunConfig, root: str | Path = ".") -> Path:
    """What training reads: with the difficulty stage on, the problems it kept (spec §7: informative batches)."""
    layout = Layout.of(config, root)
    return layout.difficulty_dir / TRAIN_FILE if config.difficulty.enabled else layout.prepared_train


def train(
    config: RunConfig,
    root: str | Path = ".",
    *,
    run_dir: str | Path | None = None,
    on_metrics: Callable[[list[dict[str, float]]], None] | None = None,
    phases: PhaseRunner = run_directly,
    check_batch: BatchCheck | None = None,
) -> TrainResult:
    """Train to ``train.steps`` steps; ``on_metrics`` sees the whole history after each step is saved (a
    resumed run's restored steps first: what ``metrics.jsonl`` holds).

    ``phases`` runs each step and its phases (see ``RLLoop``); the train flow passes one that makes
    them Prefect task runs. ``check_batch`` sees each step's training paths before the update (the
    rollout-batch data check) and stops training by raising.
    """
    layout = Layout.of(config, root)
    run = Path(run_dir) if run_dir is not None else layout.train_dir
    checkpoints = run / CHECKPOINTS_DIR
    seed_everything(config.seed)
    init = initial_policy_path(config, root)
    max_new_tokens = config.rollout.sampling.max_new_tokens
    preflight(config, model_dir=init, max_new_tokens=max_new_tokens)  # before any model loads
    if config.distributed.enabled:
        extension("distributed_preflight", "distributed.enabled")(config)
    problems_path = training_problems_path(config, root)
    provenance = lineage(config, [problems_path, init], root)
    resume = latest_checkpoint(checkpoints)
    if resume is not None and (changed := resume_changes(resume, config, provenance)):
        # Another run's checkpoint (e.g. `dvc repro` after a change of parameters, code, data or the
        # initial model, the state DVC hashes for this stage): start over.
        logger.warning("%s was trained with a different %s; starting a new run in %s", resume, ", ".join(changed), run)
        shutil.rmtree(checkpoints)
        resume = None
    problems = load_verl_parquet(problems_path)
    start = extension("distributed_runtime", "distributed.enabled") if config.distributed.enabled else local_runtime
    with start(config, init=init, resume=resume) as runtime, \
            Verifier(timeout_s=config.reward.timeout_s, workers=config.reward.workers) as verifier:
        loop = RLLoop(config, problems=problems, engine=runtime.engine, trainer=runtime.trainer,
                      tokenizer=runtime.tokenizer, verifier=verifier, phases=phases, check_batch=check_batch)
        loop.easy_mean = ads_seed(config, root)
        if resume is not None:
            loop.load_state_dict(load_loop_state(resume))
            logger.info("resuming from %s (step %d)", resume, loop.state.step)
        # A line per step: each is seconds to hours of generation and update.
        progress = Progress(logger, "train", config.train.steps, "steps", every_s=0, start=loop.state.step)

        def record(stats: dict[str, float]) -> None:
            _write_metrics(run / "metrics.jsonl", loop.state.metrics)
            step = loop.state.step
            if step % config.train.save_every == 0 or step == config.train.steps:
                save_checkpoint(checkpoints, step=step, state=runtime.write_state, loop_state=loop.state_dict(),
                                keep=config.train.keep_checkpoints, lineage=provenance)
            if on_metrics is not None:
                on_metrics(loop.state.metrics)
            progress.update(reward=round(stats["reward"], 3), tokens=int(stats["generated_tokens"]),
                            step=f"{stats['step_time_s']:.1f}s")

        with progress:
            metrics = loop.run(config.train.steps, on_step=record)
        final = runtime.save_final(run / "final")
    _write_metrics(run / "metrics.jsonl", metrics)
    write_lineage(run, provenance)
    return TrainResult(final, run / "metrics.jsonl", metrics, resume, loop.state.generated_tokens)


@dataclass
class TrainingRuntime:
    """What the loop trains with: an engine, a trainer (``PolicyTrainer`` or a ``TrainerGroup``), and
    how checkpoints and the final policy are written."""

    engine: RolloutEngine
    trainer: Trainer
    tokenizer: PreTrainedTokenizerBase
    write_state: StateWriter
    save_final: Callable[[Path], Path]


@contextmanager
def local_runtime(config: RunConfig, *, init: Path, resume: Path | None) -> Iterator[TrainingRuntime]:
    """The trainer in this process; the engine in-process or a Ray pool (``rollout``)."""
    max_new_tokens = config.rollout.sampling.max_new_tokens
    # The trained copy is loaded in fp32: the torch backend keeps it as master weights (bf16 only inside
    # autocast), DeepSpeed in bf16 mode casts it and keeps its own fp32 master copy (train.precision); the
    # rollout engine and the frozen reference use model.dtype.
    settings = config.model
    policy = load_policy(resume / "model" if resume else init, dtype="float32", device=settings.device,
                         attn_implementation=settings.attn_implementation)
    reference = None
    if config.algorithm.kl_coef > 0:
        reference = load_policy(init, dtype=settings.dtype, device=settings.device,
                                attn_implementation=settings.attn_implementation).model
    # A pool's actors hold their own copies (cast on every push); the in-process engine needs one here.
    engine_model = policy.model if uses_pool(config) else copy.deepcopy(policy.model).to(dtype=getattr(torch, config.model.dtype))
    engine = build_engine(config, model_dir=policy.path, tokenizer=policy.tokenizer, max_new_tokens=max_new_tokens,
                          model=engine_model)
    backend = build_backend(config.train.backend, policy.model, config.train)
    trainer = PolicyTrainer(
        policy.model,
        backend,
        reference=reference,
        pad_token_id=policy.tokenizer.pad_token_id,
        algorithm=config.algorithm,
        train=config.train,
        temperature=config.rollout.sampling.temperature,
        autocast=autocast_dtype(config.train, policy.model.device),
    )
    if resume is not None:
        load_backend_state(resume, backend)
    with engine_session(engine):
        yield TrainingRuntime(
            engine=engine,
            trainer=trainer,
            tokenizer=policy.tokenizer,
            write_state=lambda d: trainer_state(policy.model, trainer.policy_state(), policy.tokenizer, backend)(d),
            save_final=lambda d: save_policy(policy.model, policy.tokenizer, d, state_dict=trainer.policy_state()),
        )


# What may change between a run and its resumption: how far to train and how often to save.
RESUMABLE_CHANGES = ("train.steps", "train.max_generated_tokens", "train.save_every", "train.keep_checkpoints")
IGNORED_SECTIONS = ("checks", "eval", "paths", "timeouts")  # read by other stages, or bounds only


def resume_changes(checkpoint: Path, config: RunConfig, provenance: dict[str, Any]) -> list[str]:
    """What differs between the run that wrote ``checkpoint`` (its lineage) and this one, whose lineage
    is ``provenance``: config keys, the code, input files. Empty: the checkpoint can be resumed (none
    recorded: a checkpoint from before lineage, resumed as it is)."""
    path = checkpoint / LINEAGE_FILE
    if not path.is_file():
        return []
    recorded = json.loads(path.read_text())
    changes = [k for k in changed_keys(recorded["config"], config)
               if k not in RESUMABLE_CHANGES and k.split(".")[0] not in IGNORED_SECTIONS]
    if recorded.get("code_md5") != provenance["code_md5"]:  # lineage from before code_md5: not the same code
        changes.append("code (code_md5)")
    return changes + [f"input {name}" for name in changed_keys(recorded["inputs_md5"], provenance["inputs_md5"])]


def _write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
