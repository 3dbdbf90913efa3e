"""Layout rules that need no machine fail when the configuration is resolved, in one line naming the fields
(``attnrl.config.layout``); the paper's preset is one node's colocated 8 + 8 layout."""

from __future__ import annotations

import pytest

from attnrl.config import resolve_config
from attnrl.errors import ConfigError

PAPER = "r1-distill-1.5b"
# A split node: 4 GPU ranks and 4 GPU engines, the weights broadcast over NCCL from the worker environment.
SPLIT = ["distributed.placement=split", "distributed.trainer_ranks=4", "rollout.ray.num_actors=4",
         "rollout.vllm.weight_sync=nccl"]


def test_the_paper_preset_is_one_node_colocated_8_ranks_and_8_engines():
    config = resolve_config(preset=PAPER)
    d, ray, vllm = config.distributed, config.rollout.ray, config.rollout.vllm
    assert d.enabled and d.placement == "colocated" and not d.overlap
    assert (d.trainer_ranks, d.num_gpus_per_rank) == (8, 1) and (ray.num_actors, ray.num_gpus_per_actor) == (8, 1)
    assert config.train.backend == "deepspeed" and config.train.zero_stage == 3 and not config.train.reference_offload
    assert config.rollout.engine == "vllm" and vllm.tensor_parallel_size == 1 and vllm.weight_sync == "ipc"
    assert d.python == vllm.python  # the ranks drive vLLM's transfer: they run in the worker environment
    assert config.reward.workers > 1


@pytest.mark.parametrize(("overrides", "fields"), [
    (["rollout.ray.num_actors=7"], "rollout.ray.num_actors (7) must equal distributed.trainer_ranks (8)"),
    (["distributed.overlap=true"], "distributed.overlap needs a rollout side of its own, and distributed.placement "
                                   "'colocated' has none"),
    (["rollout.vllm.weight_sync=nccl"], "rollout.vllm.weight_sync ('nccl') broadcasts from a trainer GPU to the "
                                        "engines' GPUs: it needs distributed.placement 'split'"),
    ([*SPLIT, "rollout.vllm.weight_sync=ipc"], "rollout.vllm.weight_sync ('ipc') hands each engine CUDA memory of the "
                                               "rank on its GPU: it needs distributed.placement 'colocated'"),
    (["rollout.vllm.tensor_parallel_size=2"], "rollout.vllm.tensor_parallel_size (2) must equal "
                                              "rollout.ray.num_gpus_per_actor (1)"),
    (["train.backend=torch"], "train.backend ('torch') trains in one process: distributed.trainer_ranks (8) needs "
                              "'deepspeed'"),
    (["distributed.python=null"], "rollout.vllm.weight_sync ('ipc') is driven by vLLM inside the trainer ranks: set "
                                  "distributed.python"),
    (["distributed.num_gpus_per_rank=2", "rollout.ray.num_gpus_per_actor=2", "rollout.vllm.tensor_parallel_size=2"],
     "distributed.num_gpus_per_rank (2) must be 1 (0 on CPU) with colocated placement"),
    (["distributed.num_gpus_per_rank=0", "distributed.comm_backend=nccl", "rollout.vllm.weight_sync=object_store"],
     "distributed.comm_backend ('nccl') needs GPU ranks"),
    (["distributed.enabled=false"], "rollout.vllm.weight_sync ('ipc') is sent by the trainer ranks: it needs "
                                    "distributed.enabled"),
    ([*SPLIT, "distributed.overlap=true"], "distributed.overlap: the rollout side scores with a transformers copy"),
])
def test_a_layout_that_cannot_work_fails_at_resolve_time_in_one_line_naming_its_fields(overrides, fields):
    with pytest.raises(ConfigError) as failure:
        resolve_config(preset=PAPER, overrides=overrides)
    message = str(failure.value)
    assert message.startswith(f"invalid configuration in preset '{PAPER}': layout: {fields}"), message
    assert "\n" not in message


@pytest.mark.parametrize("overrides", [
    SPLIT,  # NCCL between a trainer GPU and engine GPUs
    [*SPLIT, "rollout.vllm.weight_sync=object_store", "distributed.python=null"],
    [*SPLIT, "distributed.overlap=true", "rollout.engine=hf", "rollout.vllm.weight_sync=object_store"],
    ["rollout.vllm.tensor_parallel_size=2", "rollout.ray.num_gpus_per_actor=2", "distributed.placement=split",
     "rollout.vllm.weight_sync=nccl"],
])
def test_layouts_that_can_work_resolve(overrides):
    resolve_config(preset=PAPER, overrides=overrides)


def test_the_embedded_default_resolves_with_its_distributed_layout_on():
    config = resolve_config(preset="tiny", overrides=["distributed.enabled=true"])
    assert config.distributed.placement == "split" and config.distributed.overlap
