"""Layout rules that need no machine: how trainer ranks, engines, GPUs and the weight sync fit together.

``RunConfig`` applies them when a configuration is resolved (``attnrl config``, the CLI's early check,
every flow), so a layout that cannot work fails in one line naming its fields before any Prefect API,
Ray cluster or model starts (docs/scaling.md). What depends on the machine (is there CUDA, does the
worker interpreter exist, does the cluster have the GPUs) is checked later, by the preflights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from attnrl.config.schema import RunConfig


def layout_problems(config: RunConfig) -> list[str]:
    """Every rule the configuration breaks, each a sentence that starts with the fields it names."""
    return _engine_problems(config) + _weight_sync_problems(config) + _distributed_problems(config)


def _engine_problems(config: RunConfig) -> list[str]:
    ray, vllm = config.rollout.ray, config.rollout.vllm
    if config.rollout.engine != "vllm":
        return []
    tp, gpus = vllm.tensor_parallel_size, ray.num_gpus_per_actor
    if (tp > 1 or gpus > 0) and gpus != tp:
        return [f"rollout.vllm.tensor_parallel_size ({tp}) must equal rollout.ray.num_gpus_per_actor ({gpus:g}): "
                "each tensor-parallel worker of an engine drives one GPU of its own"]
    return []


def _weight_sync_problems(config: RunConfig) -> list[str]:
    d, sync = config.distributed, config.rollout.vllm.weight_sync
    if sync == "object_store":
        return []
    named = f"rollout.vllm.weight_sync ('{sync}')"
    if config.rollout.engine != "vllm":
        return [f"{named} is vLLM's own transfer: it needs rollout.engine 'vllm' (got '{config.rollout.engine}')"]
    if not d.enabled:
        return [f"{named} is sent by the trainer ranks: it needs distributed.enabled (the single-process trainer runs "
                "in the driver environment, which cannot hold vLLM)"]
    problems = []
    if sync == "ipc" and (d.placement != "colocated" or d.num_gpus_per_rank == 0):
        problems.append(f"{named} hands each engine CUDA memory of the rank on its GPU: it needs distributed.placement "
                        f"'colocated' with GPU ranks (got '{d.placement}', distributed.num_gpus_per_rank "
                        f"{d.num_gpus_per_rank:g}); split placement uses 'nccl'")
    if sync == "nccl" and (d.placement != "split" or d.num_gpus_per_rank == 0):
        problems.append(f"{named} broadcasts from a trainer GPU to the engines' GPUs: it needs distributed.placement "
                        f"'split' with GPU ranks (got '{d.placement}', distributed.num_gpus_per_rank "
                        f"{d.num_gpus_per_rank:g}); NCCL cannot join two processes on one GPU, colocated uses 'ipc'")
    if d.python is None:
        problems.append(f"{named} is driven by vLLM inside the trainer ranks: set distributed.python to the worker "
                        "environment's interpreter (the driver's has no vLLM)")
    return problems


def _distributed_problems(config: RunConfig) -> list[str]:
    d, ray = config.distributed, config.rollout.ray
    if not d.enabled:
        return []
    problems = []
    if d.trainer_ranks > 1 and config.train.backend != "deepspeed":
        problems.append(f"train.backend ('{config.train.backend}') trains in one process: distributed.trainer_ranks "
                        f"({d.trainer_ranks}) needs 'deepspeed' (data-parallel ranks)")
    if d.comm_backend == "nccl" and d.num_gpus_per_rank == 0:
        problems.append("distributed.comm_backend ('nccl') needs GPU ranks (distributed.num_gpus_per_rank > 0)")
    if d.placement == "colocated":
        if ray.num_actors != d.trainer_ranks:
            problems.append(f"rollout.ray.num_actors ({ray.num_actors}) must equal distributed.trainer_ranks "
                            f"({d.trainer_ranks}): colocated placement puts one engine beside each trainer rank")
        if d.num_gpus_per_rank not in (0, 1):
            problems.append(f"distributed.num_gpus_per_rank ({d.num_gpus_per_rank:g}) must be 1 (0 on CPU) with "
                            "colocated placement: each GPU holds one trainer rank and one engine")
        elif ray.num_gpus_per_actor not in (0, d.num_gpus_per_rank):
            problems.append(f"rollout.ray.num_gpus_per_actor ({ray.num_gpus_per_actor:g}) must equal "
                            f"distributed.num_gpus_per_rank ({d.num_gpus_per_rank:g}): colocated, an engine shares "
                            "its rank's GPU")
        if d.overlap:
            problems.append("distributed.overlap needs a rollout side of its own, and distributed.placement "
                            "'colocated' has none (the engines sleep while the ranks work): set it false, or "
                            "placement 'split'")
    elif d.overlap and config.algorithm.off_policy and config.rollout.engine != "hf":
        problems.append(f"distributed.overlap: the rollout side scores with a transformers copy of the policy, which "
                        f"only the hf engines hold for now (rollout.engine is '{config.rollout.engine}'): set "
                        "rollout.engine 'hf' or distributed.overlap false")
    return problems
