"""``TrainerGroup``: the trainer as N Ray actors, one DeepSpeed rank each (architecture.md, "Scaling out").

The group serves what ``PolicyTrainer`` serves in one process — scoring (log-probs, entropies,
FCI), reference log-probs, the PPO update, checkpoints and the weight push — so ``RLLoop`` drives
it unchanged, from a driver that holds no model:

* every pass splits its sequences over the ranks balanced by tokens (``attnrl.training.sharding``)
  and returns the results in order;
* the update pads the batch to a multiple of the world size with zero-advantage copies (spec §11),
  cuts it into the single process's mini-batches and gives each rank its share with the whole
  mini-batch's normaliser per rank, so the averaged gradient is the single process's;
* ranks run their micro-batches in lockstep (``PolicyTrainer.lockstep``: an all-reduce of the
  counts), since ZeRO-3 gathers parameters in every forward and all stages reduce in the backward;
* the weights go from rank 0 straight to the rollout engines: rank 0 puts the engines' copy in the
  object store and the pool loads that reference (the driver never holds them);
* a checkpoint is written into one temporary directory by all ranks (rank 0 the model, each rank
  its DeepSpeed partition) and appears only once complete (``attnrl.training.checkpoint``).

Ranks join a ``torch.distributed`` group (gloo on CPU, NCCL on GPU) at rank 0's address. A rank
that dies (SIGKILL, OOM, node lost) fails the call with ``TrainerRankFailed`` naming it; the other
ranks, stuck in a collective, are killed with it, and the train task's retry starts a new group
from the newest complete checkpoint.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from attnrl.config.schema import RunConfig
from attnrl.errors import DETERMINISTIC_ERRORS, AttnRLError
from attnrl.rollout.fingerprint import fingerprint
from attnrl.steps import StepSegmentation
from attnrl.training.checkpoint import MODEL_DIR, OPTIMIZER_DIR
from attnrl.training.sharding import pad_to_world, shard_mini_batches, shard_sequences
from attnrl.training.trainer import MiniBatch, ScoredSequence, TrainSequence
from infra.deepspeed_backend import local_rank_of, visible_index
from infra.placement import Placement
from infra.ray_engine import kill_actors, last_line

logger = logging.getLogger(__name__)



class TrainerRankFailed(AttnRLError):
    """A trainer rank died or raised; the group is gone and the step did not complete."""


def comm_backend(config: RunConfig) -> str:
    chosen = config.distributed.comm_backend
    if chosen == "auto":
        return "nccl" if config.distributed.num_gpus_per_rank > 0 else "gloo"
    return chosen


def rank_device(num_gpus: float) -> torch.device:
    """This actor's device: the GPU Ray assigned it (``ray.get_gpu_ids``), as this process indexes it."""
    if num_gpus == 0:
        return torch.device("cpu")
    return torch.device("cuda", visible_index([str(i) for i in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES")))


class TrainerRank:
    """One DeepSpeed rank in its own process: a ``PolicyTrainer`` over its copy (or partition) of the policy."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.trainer: Any = None
        self.tokenizer: Any = None
        self.sender: Any = None  # vLLM's native weight transfer, once connected to the engines
        self.release_memory = False  # colocated on a GPU: hand the cached memory back to the engine after each call

    def address(self) -> tuple[str, int]:
        """Where the process group meets: this node's address and a free port on it (asked of rank 0)."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, config: RunConfig, master: tuple[str, int], model_dir: str, resume: str | None) -> dict[str, Any]:
        """Join the process group, load the policy (and the reference), build the backend, restore a checkpoint."""
        from transformers.utils import logging as hf_logging

        from attnrl.model.loading import load_policy
        from attnrl.training.backend import autocast_dtype, build_backend
        from attnrl.training.checkpoint import load_backend_state
        from attnrl.training.trainer import PolicyTrainer
        from attnrl.utils.seeding import seed_everything

        hf_logging.disable_progress_bar()  # a "Loading weights" bar per rank and checkpoint is noise in the driver's log
        torch.set_num_threads(max(1, int(config.distributed.num_cpus_per_rank)))
        self.device = rank_device(config.distributed.num_gpus_per_rank)
        # DeepSpeed's engine moves the model to device LOCAL_RANK: the GPU Ray gave this rank.
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(local_rank_of(self.device)),
                          MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
        backend = comm_backend(config)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.distributed.init_process_group(
            backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=self.rank, world_size=self.world_size,
            timeout=datetime.timedelta(seconds=config.distributed.start_timeout_s),
        )
        seed_everything(config.seed)
        attention = config.model.attn_implementation  # 'auto': FlexAttention on a GPU rank, SDPA on a CPU one
        policy = load_policy(Path(resume) / MODEL_DIR if resume else model_dir, dtype="float32", device=str(self.device),
                             attn_implementation=attention)
        self.tokenizer = policy.tokenizer
        reference = None
        if config.algorithm.kl_coef > 0:
            reference = load_policy(model_dir, dtype=config.model.dtype, device=str(self.device),
                                    attn_implementation=attention).model
        optimizer = build_backend(config.train.backend, policy.model, config.train)
        self.trainer = PolicyTrainer(
            policy.model, optimizer, reference=reference, pad_token_id=policy.tokenizer.pad_token_id,
            algorithm=config.algorithm, train=config.train, temperature=config.rollout.sampling.temperature,
            autocast=autocast_dtype(config.train, self.device), lockstep=self._lockstep,
        )
        if resume:
            load_backend_state(Path(resume), optimizer)
        self.release_memory = self.device.type == "cuda" and config.distributed.placement == "colocated"
        # The engine beside this rank starts next: the full fp32 copy DeepSpeed just partitioned is still cached.
        return self._released({"rank": self.rank, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                               "device": str(self.device), "backend": backend, "python": sys.executable})

    def _lockstep(self, counts: list[int]) -> list[int]:
        tensor = torch.tensor(counts, dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return [int(n) for n in tensor.tolist()]

    def _released(self, result: Any) -> Any:
        """The engine beside this rank wakes into the memory the pass cached (vLLM's sleep mode frees its own;
        PyTorch's allocator keeps what the pass used unless it is emptied)."""
        if self.release_memory:
            torch.cuda.empty_cache()
        return result

    def score(self, prompts: list[tuple[int, ...]], responses: list[tuple[int, ...]],
              segmentations: list[StepSegmentation] | None) -> list[ScoredSequence]:
        return self._released(self.trainer.score(prompts, responses, segmentations))

    def logprobs(self, prompts: list[tuple[int, ...]], responses: list[tuple[int, ...]],
                 reference: bool) -> list[tuple[float, ...]]:
        return self._released(self.trainer.logprobs(prompts, responses, reference=reference))

    def update(self, batches: list[MiniBatch]) -> dict[str, float]:
        return self._released(self.trainer.train_mini_batches(batches))

    def connect_engines(self, actors: list[Any], backend: str, tensor_parallel_size: int,
                        packed: dict[str, list[str]], dtype: str, master: tuple[str, int] | None,
                        timeout_s: float | None) -> None:
        """vLLM's native transfer from this rank (``infra.vllm_weight_transfer``): every rank iterates the
        gathered weights, rank 0 drives the engines."""
        from infra.vllm_weight_transfer import NativeWeightSender

        if self.sender is not None:
            self.sender.close()
        self.sender = NativeWeightSender(
            self.trainer.backend.weight_stream(getattr(torch, dtype)), actors, backend=backend, rank=self.rank,
            tensor_parallel_size=tensor_parallel_size, packed_modules=packed, master=master, timeout_s=timeout_s)

    def send_weights(self) -> Any:
        """One native transfer; rank 0 returns the fingerprint of what it sent (a list, so Ray does not resolve it)."""
        sent = self.sender.send()
        return None if sent is None else [sent]

    def publish_weights(self, dtype: str, packed: dict[str, list[str]]) -> list[Any] | None:
        """Every rank takes part in the export (ZeRO-3 gathers); rank 0 puts the engines' copy in the
        object store and returns [its reference, its fingerprint] (a list, so Ray does not resolve it)."""
        state = self.trainer.policy_state()
        if self.rank != 0:
            return None
        engine_state = {name: t.detach().to("cpu", getattr(torch, dtype)) for name, t in state.items()}
        return [ray.put(engine_state), fingerprint(engine_state.items(), packed=packed)]

    def save(self, directory: str) -> None:
        """Into ``directory``: the exported policy (rank 0) and every rank's backend state."""
        state = self.trainer.policy_state()
        path = Path(directory)
        if self.rank == 0:
            self.trainer.model.save_pretrained(path / MODEL_DIR, state_dict=state)
            self.tokenizer.save_pretrained(path / MODEL_DIR)
        (path / OPTIMIZER_DIR).mkdir(parents=True, exist_ok=True)
        self.trainer.backend.save(path / OPTIMIZER_DIR)

    def save_final(self, directory: str) -> str | None:
        """The final policy, a plain ``save_pretrained`` directory (written atomically by rank 0)."""
        from attnrl.model.loading import save_policy

        state = self.trainer.policy_state()
        if self.rank != 0:
            return None
        return str(save_policy(self.trainer.model, self.tokenizer, directory, state_dict=state))


class TrainerGroup:
    """The trainer protocol of ``RLLoop`` over ``distributed.trainer_ranks`` ``TrainerRank`` actors."""

    rank_class: type[TrainerRank] = TrainerRank  # what each actor runs

    def __init__(self, config: RunConfig, placement: Placement, *, model_dir: Path, resume: Path | None) -> None:
        self.world_size = config.distributed.trainer_ranks
        self.call_timeout_s = config.distributed.call_timeout_s
        # Placing the ranks, joining the process group and loading are bounded by their own field.
        starting = (config.distributed.start_timeout_s, "distributed.start_timeout_s")
        self.mini_batch = config.train.mini_batch_sequences
        self.trees = config.train.tree_packing  # a prompt's sequences stay on one rank (shard_sequences)
        self.kl = config.algorithm.kl_coef > 0
        sync = config.rollout.vllm.weight_sync
        self.native_sync = None if config.rollout.engine != "vllm" or sync == "object_store" else sync
        self.tensor_parallel_size = config.rollout.vllm.tensor_parallel_size
        self._connected: list[Any] = []  # the engine actors the native transfer was set up with
        runtime_env: dict[str, Any] = {"env_vars": {"OMP_NUM_THREADS": str(max(1, int(config.distributed.num_cpus_per_rank))),
                                                    "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}}
        if config.distributed.python is not None:
            runtime_env["py_executable"] = str(Path(config.distributed.python).expanduser().absolute())
        if not torch.cuda.is_available() and config.distributed.num_gpus_per_rank == 0:
            runtime_env["env_vars"]["DS_ACCELERATOR"] = "cpu"
        actor = ray.remote(self.rank_class)
        self.actors = [
            actor.options(max_restarts=0, runtime_env=runtime_env, **placement.trainer_options(rank)).remote(rank, self.world_size)
            for rank in range(self.world_size)
        ]
        try:
            master = self._gather([self.actors[0].address.remote()], "start", ranks=[0], bound=starting)[0]
            self.ranks = self._gather(
                [a.setup.remote(config, master, str(model_dir), None if resume is None else str(resume)) for a in self.actors],
                "start", bound=starting)
        except BaseException:
            self.close()
            raise
        logger.info("trainer group: %d ranks (%s) %s", self.world_size, self.ranks[0]["backend"],
                    ", ".join(f"rank {r['rank']} pid {r['pid']} on {r['node']} {r['device']}" for r in self.ranks))

    # -- the trainer protocol ------------------------------------------------------------------

    def score(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
              segmentations: Sequence[StepSegmentation] | None = None) -> list[ScoredSequence]:
        return self._sharded("score", prompts, responses, lambda idx: (
            None if segmentations is None else [segmentations[i] for i in idx],))

    def logprobs(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                 reference: bool = False) -> list[tuple[float, ...]]:
        if reference and not self.kl:
            raise ValueError("no reference model: algorithm.kl_coef is 0")
        return self._sharded("logprobs", prompts, responses, lambda idx: (reference,))

    def update(self, sequences: Sequence[TrainSequence]) -> dict[str, float]:
        if not sequences:
            return {}
        per_rank = shard_mini_batches(pad_to_world(sequences, self.world_size), self.mini_batch, self.world_size,
                                      trees=self.trees)
        stats = self._gather([a.update.remote(b) for a, b in zip(self.actors, per_rank, strict=True)], "update")
        # Each rank's values are its share scaled by the world size (Normaliser.per_rank): their mean is the
        # whole batch's. Gradient norms and step counts are the same on every rank.
        return {key: sum(s[key] for s in stats) / len(stats) for key in stats[0]}

    def push_weights(self, engine: Any) -> None:
        """The new weights into the rollout pool: vLLM's native transfer from the ranks (``rollout.vllm.weight_sync``
        nccl or ipc), else rank 0's export through the object store (``RayRolloutPool.load_weights``)."""
        if self.native_sync is None:
            engine.load_weights(*self.publish(engine))
            return
        if self._connected != engine.actors:  # first push, or the pool replaced an engine since
            master = (self._gather([self.actors[0].address.remote()], "weight transfer setup", ranks=[0])[0]
                      if self.native_sync == "nccl" else None)
            self._gather([a.connect_engines.remote(engine.actors, self.native_sync, self.tensor_parallel_size,
                                                   engine.packed, engine.spec.dtype, master, self.call_timeout_s)
                          for a in self.actors], "weight transfer setup")
            self._connected = list(engine.actors)
            # An engine that replaces a dead one starts from the object store: the ranks publish on demand.
            engine.weights_source = lambda: self.publish(engine)
        sent = self._gather([a.send_weights.remote() for a in self.actors], "weight transfer")
        engine.verify_after_transfer(sent[0][0])

    def publish(self, engine: Any) -> tuple[Any, Any]:
        """Rank 0's export in the engines' dtype, in the object store: (its reference, its fingerprint)."""
        ref, expected = self._gather([a.publish_weights.remote(engine.spec.dtype, engine.packed) for a in self.actors],
                                     "weight export")[0]  # [reference, fingerprint] from rank 0, None from the rest
        return ref, expected

    # -- checkpoints ---------------------------------------------------------------------------

    def write_state(self, directory: Path) -> None:
        """``StateWriter`` for ``save_checkpoint``: model/ by rank 0, optimizer/ by every rank."""
        self._gather([a.save.remote(str(directory)) for a in self.actors], "checkpoint save")

    def save_final(self, directory: Path) -> Path:
        return Path(self._gather([a.save_final.remote(str(directory)) for a in self.actors], "final save")[0])

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        kill_actors(self.actors)
        self.actors = []

    # -- internals -----------------------------------------------------------------------------

    def _sharded(self, method: str, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                 extra) -> list[Any]:
        shards = shard_sequences(prompts, responses, self.world_size, trees=self.trees)
        refs = [getattr(actor, method).remote([tuple(prompts[i]) for i in idx], [tuple(responses[i]) for i in idx],
                                              *extra(idx))
                for actor, idx in zip(self.actors, shards, strict=True)]
        results: list[Any] = [None] * len(prompts)
        for idx, values in zip(shards, self._gather(refs, method), strict=True):
            for i, value in zip(idx, values, strict=True):
                results[i] = value
        return results

    def _gather(self, refs: list[ray.ObjectRef], what: str, ranks: list[int] | None = None,
                bound: tuple[float | None, str] | None = None) -> list[Any]:
        """Every rank's result; the first rank to die or raise fails the call and takes the group down. ``bound``:
        (seconds, the field that sets them); default ``distributed.call_timeout_s``."""
        timeout, field = bound or (self.call_timeout_s, "distributed.call_timeout_s")
        ranks = ranks if ranks is not None else list(range(len(refs)))
        pending = dict(zip(refs, range(len(refs)), strict=True))
        results: list[Any] = [None] * len(refs)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if not ready:
                silent = sorted(ranks[p] for p in pending.values())
                self.close()
                raise TrainerRankFailed(
                    f"trainer rank(s) {', '.join(map(str, silent))} of {self.world_size} did not answer during {what} "
                    f"within {timeout:g} s ({field}); the group was stopped, and the "
                    "step is lost: a retry resumes from the newest complete checkpoint")
            position = pending.pop(ready[0])
            try:
                results[position] = ray.get(ready[0])
            except RayActorError as exc:
                self.close()
                raise TrainerRankFailed(
                    f"trainer rank {ranks[position]} of {self.world_size} died during {what} ({last_line(exc)}); "
                    "the other ranks were stopped with it, and the step is lost: a retry resumes from the newest "
                    "complete checkpoint") from None
            except RayTaskError as exc:
                self.close()
                cause = exc.cause if isinstance(exc.cause, Exception) else None
                if isinstance(cause, DETERMINISTIC_ERRORS):  # the same on every retry: passed on as they are
                    raise cause from None
                raise TrainerRankFailed(
                    f"trainer rank {ranks[position]} of {self.world_size} failed during {what}: {last_line(exc)}"
                ) from cause
        return results
