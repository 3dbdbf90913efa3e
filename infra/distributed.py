"""The distributed training runtime: a ``TrainerGroup`` and a ``RolloutGroup`` on one Ray placement group.

``distributed_runtime`` is what the train stage starts when ``distributed.enabled`` (resolved by
import path, so the core never imports Ray): it connects to Ray (``rollout.ray.address`` or
``RAY_ADDRESS`` for a cluster; else a local Ray sized for the layout), places the bundles
(``infra.placement``), starts the trainer ranks and the rollout engines (a ``RayRolloutPool``,
the RolloutGroup) and tears all of it down on exit. The driver loads only the tokenizer.
``preflight`` refuses, before anything starts, the layouts that cannot work.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
import torch

from attnrl.config.schema import RunConfig
from attnrl.errors import ConfigError
from attnrl.model.loading import load_tokenizer
from attnrl.stages.train import TrainingRuntime
from attnrl.training.checkpoint import MODEL_DIR
from attnrl.rollout.scoring import engine_scores, scoring_spec
from infra.engine_specs import build_pool
from infra.placement import place, required_resources
from infra.ray_engine import connect
from infra.trainer_group import TrainerGroup


def preflight(config: RunConfig) -> None:
    """``ConfigError`` naming the field, for layouts this machine or cluster cannot run (the rules that need no
    machine are the schema's: ``attnrl.config.layout``)."""
    d = config.distributed
    cluster = config.rollout.ray.address or os.environ.get("RAY_ADDRESS")
    if d.num_gpus_per_rank > 0 and not cluster:
        _, gpus = required_resources(config)
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise ConfigError(
                f"distributed.num_gpus_per_rank: {d.num_gpus_per_rank:g} asks for GPUs and this machine has no CUDA "
                "device (set it to 0 to train on CPU ranks, or connect to a cluster with rollout.ray.address)"
            )
        if gpus > available:
            raise ConfigError(
                f"distributed.trainer_ranks: the layout needs {gpus:g} GPUs ({d.trainer_ranks} ranks, "
                f"rollout.ray.num_actors {config.rollout.ray.num_actors}, placement '{d.placement}') and this machine "
                f"has {available}; lower them, or connect to a cluster with rollout.ray.address"
            )
    if d.python is not None and not Path(d.python).expanduser().is_file():
        raise ConfigError(
            f"distributed.python: {d.python} does not exist (the trainer ranks' environment: DeepSpeed, torch, attnrl "
            "and the driver's Ray; README 'Training on a GPU node' makes one), or set null for the driver's interpreter"
        )


@contextmanager
def distributed_runtime(config: RunConfig, *, init: Path, resume: Path | None) -> Iterator[TrainingRuntime]:
    cpus, gpus = required_resources(config)
    # A local Ray is started with room for every bundle (logical CPUs: the actors set their own threads).
    started = connect(config.rollout.ray.address, config.rollout.ray.object_store_mb,
                      num_cpus=max(os.cpu_count() or 1, math.ceil(cpus)), num_gpus=math.ceil(gpus) or None)
    placement = group = pool = None
    try:
        placement = place(config)
        group = TrainerGroup(config, placement, model_dir=init, resume=resume)
        weights = resume / MODEL_DIR if resume is not None else init  # what the trainer ranks hold now
        tokenizer = load_tokenizer(weights)
        pool = build_pool(config, model_dir=weights, tokenizer=tokenizer,
                          max_new_tokens=config.rollout.sampling.max_new_tokens, state_dict=None,
                          placement=placement.engine_options,
                          scoring=scoring_spec(config, tokenizer) if engine_scores(config) else None)
        yield TrainingRuntime(engine=pool, trainer=group, tokenizer=tokenizer, write_state=group.write_state,
                              save_final=group.save_final)
    finally:
        for part in (pool, group):
            if part is not None:
                part.close()
        if placement is not None:
            placement.remove()
        if started and ray.is_initialized():
            ray.shutdown()
