"""vLLM's native weight transfer from a trainer to the engines of a ``RayRolloutPool`` (CUDA only).

vLLM 0.32 ships the four-phase protocol (``init_weight_transfer_engine`` once, then per sync
``start_weight_update`` → ``update_weights`` → ``finish_weight_update``) with two dense backends:
NCCL broadcast when trainer and engines hold different GPUs, CUDA IPC handles when they share one.
The trainer side is ``WeightTransferTrainerFactory.trainer_init(...)``, which drives any object
with those four methods; ``PoolWeightSyncClient`` is that object for our pool. Each engine actor
relays a phase to its workers with ``collective_rpc`` (``VLLMRolloutEngine.native_transfer``).

Where it runs: the trainer side imports vLLM, so it runs in a process of the worker environment
(the trainer actors of the distributed runtime). The single-process trainer lives in the driver
environment, which cannot install vLLM next to Prefect, and pushes weights through Ray's object
store instead (``RayRolloutPool.update_weights``). After every transfer, as after the object-store
route, each engine resets its prefix cache and proves the new weights with its fingerprint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ray
import torch

from attnrl.rollout.fingerprint import fingerprint
from infra.ray_engine import RayRolloutPool


def engine_init_info(init_info: Mapping[str, Any], engine: int, tensor_parallel_size: int) -> dict[str, Any]:
    """The init info engine ``engine`` receives: in one NCCL group the trainer is rank 0 and each
    engine's ``tensor_parallel_size`` workers take the next ranks, engine after engine."""
    info = dict(init_info)
    if "rank_offset" in info:
        info["rank_offset"] = 1 + engine * tensor_parallel_size
    return info


class PoolWeightSyncClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over every engine of a pool."""

    def __init__(self, pool: RayRolloutPool, tensor_parallel_size: int) -> None:
        self.pool = pool
        self.tensor_parallel_size = tensor_parallel_size

    def _all(self, phase: str, payloads: list[dict[str, Any] | None]) -> None:
        ray.get([actor.native_transfer.remote(phase, payload) for actor, payload in zip(self.pool.actors, payloads)])

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._all("init_weight_transfer_engine",
                  [engine_init_info(init_info, i, self.tensor_parallel_size) for i in range(len(self.pool.actors))])

    def start_weight_update(self) -> None:
        self._all("start_weight_update", [None] * len(self.pool.actors))

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._all("update_weights", [update_info] * len(self.pool.actors))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update", [None] * len(self.pool.actors))


class NativeWeightSync:
    """The trainer side: one ``send_weights`` per update, then the pool's checks."""

    def __init__(self, pool: RayRolloutPool, model: torch.nn.Module, *, backend: str, tensor_parallel_size: int,
                 master_address: str = "127.0.0.1", master_port: int = 0) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError(f"vLLM's '{backend}' weight transfer needs CUDA; use the object-store route on CPU")
        from vllm.distributed.weight_transfer import ModuleSource, WeightTransferTrainerFactory

        if backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            info: Any = NCCLTrainerInitInfo(rank=0, master_address=master_address, master_port=master_port,
                                            world_size=1 + len(pool.actors) * tensor_parallel_size)
        elif backend == "ipc":
            from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

            info = IPCTrainerInitInfo(rank=0)
        else:
            raise ValueError(f"unknown weight transfer backend {backend!r}; known: nccl, ipc")
        self.pool, self.model = pool, model
        self.engine = WeightTransferTrainerFactory.trainer_init(
            info, client=PoolWeightSyncClient(pool, tensor_parallel_size), source=ModuleSource(model))

    def sync(self) -> None:
        self.engine.send_weights()
        expected = fingerprint(self.model.named_parameters(), packed=self.pool.packed, dtype=self.pool.dtype)
        self.pool.verify_after_transfer(expected)

    def close(self) -> None:
        self.engine.shutdown()
