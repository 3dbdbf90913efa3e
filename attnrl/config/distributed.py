"""The ``distributed`` section: the trainer as a Ray actor group of DeepSpeed ranks (docs/scaling.md).

Off (the default), training runs in the driver process, as on a laptop. On, the driver (the
Prefect train flow) holds no model: a ``TrainerGroup`` of ``trainer_ranks`` Ray actors, one
DeepSpeed rank each, scores and trains, and the rollout engines (``rollout.ray``) form the
``RolloutGroup``. ``placement`` says whether the two share GPUs. Part of the one schema
(``attnrl.config.schema.RunConfig.distributed``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from attnrl.config.section import Section


class DistributedConfig(Section):
    """Trainer ranks as Ray actors and where they sit relative to the rollout engines."""

    enabled: bool = Field(
        default=False,
        description="Train through a TrainerGroup of Ray actors (one DeepSpeed rank each) instead of in the driver "
        "process; the driver then loads no model and the rollout engines always run as Ray actors.",
    )
    trainer_ranks: int = Field(
        default=8, ge=1, description="DeepSpeed ranks (data-parallel; spec §12: 8 GPUs), one Ray actor each."
    )
    placement: Literal["colocated", "split"] = Field(
        default="colocated",
        description="'colocated': every GPU holds one trainer rank and one rollout engine (rollout.ray.num_actors "
        "must equal trainer_ranks); the engines sleep during the update (vLLM on CUDA). 'split': trainer ranks and "
        "engines on different GPUs; with 'overlap' the next batch is generated and scored while the trainer updates.",
    )
    overlap: bool = Field(
        default=False,
        description="split placement, one-step off-policy loop: the rollout engines score the next batch's initial "
        "samples (behaviour log-probs, entropies, FCI) with the weights that sampled them while the trainer updates "
        "(spec §3.2's policy versions; the samples are the same either way). Needs a rollout side of its own "
        "(placement 'split') whose engines can score (rollout.engine 'hf' for now).",
    )
    num_cpus_per_rank: float = Field(
        default=4, gt=0, description="CPUs Ray reserves per trainer rank; also its torch threads (at least 1)."
    )
    num_gpus_per_rank: float = Field(
        default=1, ge=0, description="GPUs per trainer rank: 1 on GPU clusters, 0 on CPU."
    )
    comm_backend: Literal["auto", "gloo", "nccl"] = Field(
        default="auto", description="torch.distributed backend of the ranks; 'auto' = nccl with GPUs, else gloo."
    )
    python: str | None = Field(
        default=None,
        description="Interpreter of the trainer ranks (an environment with DeepSpeed, torch, attnrl and the driver's "
        "Ray), e.g. the GPU worker environment; null = the driver's own interpreter.",
    )
    start_timeout_s: float = Field(
        default=600, gt=0, description="How long the ranks may take to be placed, join the process group and load."
    )
    call_timeout_s: float | None = Field(
        default=7200, gt=0,
        description="The longest the ranks may take to answer one call (a pass, an update, a save); past it the "
        "call fails with TrainerRankFailed naming the ranks that did not answer. null: no bound.",
    )
