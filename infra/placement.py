"""Where the trainer ranks and the rollout engines run: one Ray placement group (``distributed.placement``).

* ``split``: one bundle per trainer rank ({CPU, GPU} of ``distributed``) and one per engine ({CPU,
  GPU} of ``rollout.ray``). Trainer GPUs and rollout GPUs are apart.
* ``colocated``: one bundle per GPU holding one trainer rank and one engine; each takes half of the
  bundle's GPUs (Ray's fractional GPUs: both processes see the same device), and the engines sleep
  during the update where they can (vLLM on CUDA).

The group is ``PACK``ed: on one node where it fits, across nodes otherwise (``rollout.ray.address``).
Creating it waits until the cluster can place every bundle, up to ``distributed.start_timeout_s``,
and then fails with the bundles it asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from attnrl.config.schema import RunConfig
from attnrl.errors import ConfigError


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


@dataclass
class Placement:
    """A placement group and which bundle each trainer rank and engine goes to, with its resources."""

    group: PlacementGroup
    trainer_bundles: list[int]
    engine_bundles: list[int]
    trainer_resources: dict[str, float]  # num_cpus / num_gpus of one rank's actor
    engine_resources: dict[str, float]

    def trainer_options(self, rank: int) -> dict[str, Any]:
        return {**self.trainer_resources, "scheduling_strategy": self._strategy(self.trainer_bundles[rank])}

    def engine_options(self, index: int) -> dict[str, Any]:
        return {**self.engine_resources, "scheduling_strategy": self._strategy(self.engine_bundles[index])}

    def _strategy(self, bundle: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=bundle)

    def remove(self) -> None:
        remove_placement_group(self.group)


def required_resources(config: RunConfig) -> tuple[float, float]:
    """CPUs and GPUs the whole layout reserves (a local Ray is started with at least these)."""
    d, r = config.distributed, config.rollout.ray
    if d.placement == "colocated":
        return d.trainer_ranks * (d.num_cpus_per_rank + r.num_cpus_per_actor), d.trainer_ranks * d.num_gpus_per_rank
    return (d.trainer_ranks * d.num_cpus_per_rank + r.num_actors * r.num_cpus_per_actor,
            d.trainer_ranks * d.num_gpus_per_rank + r.num_actors * r.num_gpus_per_actor)


def place(config: RunConfig) -> Placement:
    """The placement group of the layout (its rules were checked when the configuration was resolved)."""
    d, r = config.distributed, config.rollout.ray
    if d.placement == "colocated":
        bundles = [_bundle(d.num_cpus_per_rank + r.num_cpus_per_actor, d.num_gpus_per_rank)] * d.trainer_ranks
        half = d.num_gpus_per_rank / 2
        placement_args = (list(range(d.trainer_ranks)), list(range(d.trainer_ranks)),
                          {"num_cpus": d.num_cpus_per_rank, "num_gpus": half},
                          {"num_cpus": r.num_cpus_per_actor, "num_gpus": half})
    else:
        bundles = ([_bundle(d.num_cpus_per_rank, d.num_gpus_per_rank)] * d.trainer_ranks
                   + [_bundle(r.num_cpus_per_actor, r.num_gpus_per_actor)] * r.num_actors)
        placement_args = (list(range(d.trainer_ranks)), list(range(d.trainer_ranks, d.trainer_ranks + r.num_actors)),
                          {"num_cpus": d.num_cpus_per_rank, "num_gpus": d.num_gpus_per_rank},
                          {"num_cpus": r.num_cpus_per_actor, "num_gpus": r.num_gpus_per_actor})
    group = placement_group(bundles, strategy="PACK", name="")
    ready, _ = ray.wait([group.ready()], timeout=d.start_timeout_s)
    if not ready:
        remove_placement_group(group)
        raise ConfigError(
            f"distributed.placement: the Ray cluster could not place {len(bundles)} bundles {bundles} within "
            f"{d.start_timeout_s:.0f} s (distributed.start_timeout_s); it has {ray.cluster_resources()}"
        )
    return Placement(group, *placement_args)
