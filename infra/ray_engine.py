"""``RayRolloutPool``: the ``RolloutEngine`` protocol over a pool of Ray actors.

Each actor loads the policy from a model directory (``attnrl.model.loading.load_policy``) and
generates with its own ``HFRolloutEngine``. A ``generate`` call splits its requests into
contiguous chunks, one per actor, in order; actor ``i`` samples with
``derive_seed(seed, i)``. Results are therefore reproducible for a fixed seed *and pool size*,
but differ between pool sizes (and from the in-process ``hf`` engine).

Weights: ``update_weights`` puts the state dict in the object store once and every actor loads
it; the latest reference is kept, so an actor that replaces a dead one starts from the newest
weights. Fault tolerance: when an actor dies during a call (``RayActorError``, e.g.
``ActorDiedError``: process killed, node lost) it is replaced by a fresh actor (same model
directory, latest weights) and its chunk is retried with the same seed, at most
``max_actor_restarts`` times per call. ``replaced_actors`` counts replacements over the pool's
life.

Connection: ``ray.init(address=...)`` with a configured address or ``RAY_ADDRESS``; otherwise a
local Ray with a small object store and no dashboard. ``PREFECT_API_URL`` is passed to the actors
explicitly in their runtime env (prefect-ray does not propagate it, stack-notes.md).
The pure core never imports this module; ``attnrl.rollout.factory`` resolves it by import path
when ``rollout.ray.enabled`` is true.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError

from attnrl.errors import AttnRLError
from attnrl.rollout.engine import Completion, GenerationRequest, SamplingParams
from attnrl.utils.seeding import derive_seed

logger = logging.getLogger(__name__)


class RolloutPoolError(AttnRLError):
    """The pool could not finish a call (actors kept dying)."""


class RolloutWorker:
    """One actor's state: a policy loaded from ``model_path`` behind an ``HFRolloutEngine``."""

    def __init__(self, model_path: str, dtype: str, device: str, batch_size: int, threads: int) -> None:
        from attnrl.model.loading import load_policy
        from attnrl.rollout.hf_engine import HFRolloutEngine
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per actor is noise in the driver's log
        torch.set_num_threads(threads)
        policy = load_policy(model_path, dtype=dtype, device=device)
        self.engine = HFRolloutEngine(
            policy.model,
            pad_token_id=policy.tokenizer.pad_token_id,
            eos_token_id=policy.tokenizer.eos_token_id,
            batch_size=batch_size,
            progress=False,
        )

    def ready(self) -> int:
        return os.getpid()

    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams, seed: int
    ) -> list[list[Completion]]:
        return self.engine.generate(requests, params, seed)

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.engine.update_weights(state_dict)

    def weights_fingerprint(self) -> float:
        """Sum of all weights (float64): lets tests check which weights an actor holds."""
        return float(sum(p.detach().double().sum() for p in self.engine.model.state_dict().values()))


def connect(address: str | None = None, object_store_mb: int = 256, num_cpus: int | None = None) -> bool:
    """Make sure this process is connected to Ray; True when this call started the connection."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=object_store_mb * 2**20,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    return True


def worker_runtime_env() -> dict[str, Any] | None:
    """The actors' runtime env: PREFECT_API_URL passed explicitly when set (stack-notes.md)."""
    url = os.environ.get("PREFECT_API_URL")
    return {"env_vars": {"PREFECT_API_URL": url}} if url else None


def split_contiguous(total: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous [start, stop) ranges covering ``range(total)``, sizes differing by at most one."""
    base, extra = divmod(total, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class RayRolloutPool:
    """``RolloutEngine`` over ``num_actors`` Ray actors, each loading ``model_path``."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        num_actors: int = 2,
        num_cpus_per_actor: float = 1.0,
        dtype: str = "float32",
        device: str = "cpu",
        batch_size: int = 64,
        max_actor_restarts: int = 3,
        address: str | None = None,
        object_store_mb: int = 256,
        initial_state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        self.model_path = str(Path(model_path).expanduser().resolve())
        self.max_actor_restarts = max_actor_restarts
        self.replaced_actors = 0
        local_cpus = max(os.cpu_count() or 1, math.ceil(num_actors * num_cpus_per_actor))
        self._started_ray = connect(address, object_store_mb, num_cpus=local_cpus)
        options: dict[str, Any] = {"num_cpus": num_cpus_per_actor, "max_restarts": 0}
        runtime_env = worker_runtime_env()
        if runtime_env:
            options["runtime_env"] = runtime_env
        self._actor_class = ray.remote(RolloutWorker).options(**options)
        self._actor_args = (self.model_path, dtype, device, batch_size, max(1, int(num_cpus_per_actor)))
        self._weights_ref: ray.ObjectRef | None = None
        self.actors: list[Any] = []
        try:
            self.actors = [self._actor_class.remote(*self._actor_args) for _ in range(num_actors)]
            ray.get([actor.ready.remote() for actor in self.actors])
            if initial_state_dict is not None:
                self.update_weights(initial_state_dict)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_policy(cls, policy: Any, config: Any) -> RayRolloutPool:
        """Build from a ``PolicyBundle`` and a ``RolloutConfig`` (``attnrl.rollout.factory``).

        The actors load ``policy.path`` and then receive ``policy.model``'s current weights, so a
        pool built for training starts from the trainer's weights, not the directory's.
        """
        model = policy.model
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        ray_config = config.ray
        return cls(
            policy.path,
            num_actors=ray_config.num_actors,
            num_cpus_per_actor=ray_config.num_cpus_per_actor,
            dtype=dtype,
            batch_size=config.batch_size,
            max_actor_restarts=ray_config.max_actor_restarts,
            address=ray_config.address,
            object_store_mb=ray_config.object_store_mb,
            initial_state_dict=model.state_dict(),
        )

    # -- RolloutEngine -------------------------------------------------------------------------

    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams, seed: int
    ) -> list[list[Completion]]:
        return self.submit(requests, params, seed).result()

    def submit(self, requests: Sequence[GenerationRequest], params: SamplingParams, seed: int) -> PendingRollout:
        """Send the chunks to the actors and return at once; ``result()`` collects (and retries) them."""
        return PendingRollout(self, list(requests), params, seed)

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        cpu_state = {name: tensor.detach().cpu() for name, tensor in state_dict.items()}
        self._weights_ref = ray.put(cpu_state)  # once; every actor reads the same object
        refs = {i: actor.update_weights.remote(self._weights_ref) for i, actor in enumerate(self.actors)}
        restarts = 0
        for i in range(len(self.actors)):
            while True:
                try:
                    ray.get(refs[i])
                    break
                except RayActorError as exc:
                    restarts += 1
                    # The replacement already loads the latest weights; nothing left to retry.
                    self._handle_death(i, exc, restarts, "update_weights")
                    break

    # -- lifecycle -----------------------------------------------------------------------------

    def weights_fingerprints(self) -> list[float]:
        return ray.get([actor.weights_fingerprint.remote() for actor in self.actors])

    def close(self) -> None:
        """Kill the actors; shut Ray down only if this pool started it."""
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False

    def __enter__(self) -> RayRolloutPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _submit(
        self, index: int, requests: list[GenerationRequest], params: SamplingParams, seed: int
    ) -> ray.ObjectRef:
        return self.actors[index].generate.remote(requests, params, seed)

    def _handle_death(self, index: int, exc: Exception, restarts: int, during: str) -> None:
        if restarts > self.max_actor_restarts:
            raise RolloutPoolError(
                f"rollout actor {index} died during {during} and {self.max_actor_restarts} replacements "
                f"(rollout.ray.max_actor_restarts) did not help: {exc}"
            ) from exc
        logger.warning("rollout actor %d died during %s (%s); replacing it (%d/%d)",
                       index, during, type(exc).__name__, restarts, self.max_actor_restarts)
        self._replace(index)

    def _replace(self, index: int) -> None:
        try:
            ray.kill(self.actors[index], no_restart=True)
        except Exception:  # already gone
            pass
        actor = self._actor_class.remote(*self._actor_args)
        ray.get(actor.ready.remote())
        if self._weights_ref is not None:
            ray.get(actor.update_weights.remote(self._weights_ref))
        self.actors[index] = actor
        self.replaced_actors += 1


class PendingRollout:
    """One ``generate`` call in flight on a pool; the driver is free until ``result()``."""

    def __init__(self, pool: RayRolloutPool, requests: list[GenerationRequest], params: SamplingParams,
                 seed: int) -> None:
        self._pool, self._requests, self._params, self._seed = pool, requests, params, seed
        self._chunks = [(i, start, stop) for i, (start, stop) in
                        enumerate(split_contiguous(len(requests), len(pool.actors))) if stop > start]
        self._refs = {i: self._send(i, start, stop) for i, start, stop in self._chunks}
        self._results: list[list[Completion]] | None = None

    def _send(self, index: int, start: int, stop: int) -> ray.ObjectRef:
        return self._pool._submit(index, self._requests[start:stop], self._params, derive_seed(self._seed, index))

    def result(self) -> list[list[Completion]]:
        """The completions in request order; a chunk whose actor died is resent to its replacement."""
        if self._results is not None:
            return self._results
        restarts = 0
        results: list[list[Completion]] = []
        for i, start, stop in self._chunks:
            while True:
                try:
                    results.extend(ray.get(self._refs[i]))
                    break
                except RayActorError as exc:
                    restarts += 1
                    self._pool._handle_death(i, exc, restarts, "generate")
                    self._refs[i] = self._send(i, start, stop)
        self._results = results
        return results
