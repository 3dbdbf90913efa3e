"""vLLM's native weight transfer, sent by the trainer ranks to the engines of a ``RayRolloutPool`` (CUDA only).

vLLM 0.32 ships the four-phase protocol (``init_weight_transfer_engine`` once, then per sync
``start_weight_update`` → ``update_weights`` → ``finish_weight_update``) and the trainer side that drives
it, ``WeightTransferTrainerFactory.trainer_init(info, client=..., source=...)``, with two dense backends:

* ``ipc`` (colocated placement): every trainer rank makes its full copies and shares them by CUDA IPC
  handle with the engine on its own GPU; the ranks all-gather the handles over their process group and
  rank 0 sends them to every engine, which picks the one of its GPU;
* ``nccl`` (split placement): rank 0 broadcasts to every engine's workers in one NCCL group (rank 0 the
  trainer, then each engine's ``tensor_parallel_size`` workers).

The source is the backend's ``WeightStream``: under ZeRO-3 each module's parameters are gathered
(a collective on every rank, so every rank iterates the source) and sent at full shape in the
engines' dtype, under the checkpoint names that vLLM's ``load_weights`` maps onto its fused layers
(vLLM's own ``ModuleSource`` reads ``named_parameters()`` as they are, which under ZeRO-3 are empty
partitions). Rank 0 checksums what it sends; after each transfer every engine resets its prefix
cache and must report that fingerprint (``RayRolloutPool.verify_after_transfer``).

This module imports vLLM, so it runs where vLLM is installed: the trainer ranks in the worker
environment (``distributed.python``). On CPU the weights go through Ray's object store instead
(``RayRolloutPool.load_weights``): vLLM's transfer engines need a CUDA device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ray
import torch

from attnrl.rollout.fingerprint import Fingerprint, FingerprintBuilder
from attnrl.training.weights import WeightStream

BACKENDS = ("nccl", "ipc")


def engine_init_info(init_info: Mapping[str, Any], engine: int, tensor_parallel_size: int) -> dict[str, Any]:
    """The init info engine ``engine`` receives: in one NCCL group the trainer is rank 0 and each
    engine's ``tensor_parallel_size`` workers take the next ranks, engine after engine."""
    info = dict(init_info)
    if "rank_offset" in info:
        info["rank_offset"] = 1 + engine * tensor_parallel_size
    return info


class EngineWeightSyncClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over the engine actors of a pool (``EngineWorker.native_transfer``
    relays each phase to the engine's workers with ``collective_rpc``)."""

    def __init__(self, actors: Sequence[Any], tensor_parallel_size: int, timeout_s: float | None) -> None:
        self.actors = list(actors)
        self.tensor_parallel_size = tensor_parallel_size
        self.timeout_s = timeout_s

    def _all(self, phase: str, payloads: list[dict[str, Any] | None]) -> None:
        ray.get([actor.native_transfer.remote(phase, payload) for actor, payload in zip(self.actors, payloads,
                                                                                         strict=True)],
                timeout=self.timeout_s)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._all("init_weight_transfer_engine",
                  [engine_init_info(init_info, i, self.tensor_parallel_size) for i in range(len(self.actors))])

    def start_weight_update(self) -> None:
        self._all("start_weight_update", [None] * len(self.actors))

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._all("update_weights", [update_info] * len(self.actors))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update", [None] * len(self.actors))


def stream_source(stream: WeightStream, observe: Callable[[], Callable[[str, torch.Tensor], None] | None]):
    """vLLM's ``WeightSource`` over ``stream``; ``observe()`` gives, per pass, what sees each sent tensor.

    vLLM 0.33 (the GPU worker's) declares ``metadata`` as a cached property and takes full tensors from
    ``iter_full()``; 0.32 (the CPU build here) calls ``metadata()`` and iterates the source itself.
    """
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    def declared() -> list[ParamMeta]:
        return [ParamMeta(m.name, m.dtype, m.shape) for m in stream.metadata()]

    def full_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        seen = observe()
        for name, tensor in stream:
            if seen is not None:
                seen(name, tensor)
            yield name, tensor

    if hasattr(WeightSource, "iter_full"):
        class StreamSource(WeightSource):
            metadata = functools.cached_property(lambda self: declared())

            def iter_full(self) -> Iterator[tuple[str, torch.Tensor]]:
                return full_tensors()
    else:
        class StreamSource(WeightSource):  # type: ignore[no-redef]
            def metadata(self) -> list[ParamMeta]:
                return declared()

            def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
                return full_tensors()

    return StreamSource()


def trainer_init_info(backend: str, *, rank: int, engines: int, tensor_parallel_size: int,
                      master: tuple[str, int] | None) -> Any:
    """vLLM's trainer init info for ``backend``; rank 0 is the sender. Both backends send packed: chunks through
    reused 1 GiB buffers (one for IPC, two in flight for NCCL) instead of a second full copy of the model."""
    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        if master is None:
            raise ValueError("the nccl weight transfer needs a rendezvous address (rank 0's)")
        return NCCLTrainerInitInfo(master_address=master[0], master_port=master[1],
                                   world_size=1 + engines * tensor_parallel_size, packed=True, rank=rank)
    if backend == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        return IPCTrainerInitInfo(packed=True, rank=rank)
    raise ValueError(f"unknown weight transfer backend {backend!r}; known: {', '.join(BACKENDS)}")


class NativeWeightSender:
    """One trainer rank's side of the transfer; every rank of the group holds one and sends together."""

    def __init__(self, stream: WeightStream, actors: Sequence[Any], *, backend: str, rank: int,
                 tensor_parallel_size: int, packed_modules: Mapping[str, list[str]],
                 master: tuple[str, int] | None = None, timeout_s: float | None = None) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError(f"vLLM's '{backend}' weight transfer needs CUDA; on CPU the weights go through the "
                               "object store (rollout.vllm.weight_sync: object_store)")
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

        self.rank = rank
        self._packed_modules = dict(packed_modules)
        self._fingerprint: FingerprintBuilder | None = None
        source = stream_source(stream, lambda: None if self._fingerprint is None else self._fingerprint.add)
        info = trainer_init_info(backend, rank=rank, engines=len(actors), tensor_parallel_size=tensor_parallel_size,
                                 master=master)
        client = EngineWeightSyncClient(actors, tensor_parallel_size, timeout_s)
        self.engine = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)

    def send(self) -> Fingerprint | None:
        """One transfer of the current weights; rank 0 returns the fingerprint of what it sent."""
        self._fingerprint = FingerprintBuilder(packed=self._packed_modules) if self.rank == 0 else None
        try:
            self.engine.send_weights()
            return None if self._fingerprint is None else self._fingerprint.result()
        finally:
            self._fingerprint = None

    def close(self) -> None:
        self.engine.shutdown()
