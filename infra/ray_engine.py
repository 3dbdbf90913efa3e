"""``RayRolloutPool``: the ``RolloutEngine`` protocol over a pool of Ray actors, one engine each
(what runs inside an actor: ``infra.engine_worker``).

Engines (``EngineSpec.kind``):

* ``hf``: an ``HFRolloutEngine`` on a policy loaded from a model directory, in the driver's
  environment. It samples a whole sub-batch with one generator, seeded ``derive_seed(seed, i)``
  for actor ``i``: results are reproducible for a fixed seed *and pool size*.
* ``vllm``: a ``VLLMRolloutEngine`` (``infra.vllm_engine``) in the worker environment: the actor
  runs under that environment's interpreter (``runtime_env.py_executable``), since vLLM cannot
  share an environment with Prefect (stack-notes.md). Each request is seeded from the call seed
  and its position in the *call*, so results do not depend on the pool size.

A call's requests are split by tokens with a question's requests together
(``attnrl.rollout.balance``, spec §5.4) and sent to all actors at once; ``submit`` returns before
they finish, so the caller can score or train meanwhile (spec §3.2).

Weights: ``update_weights`` puts the state dict (cast to the engines' dtype) in the object store
once; every actor loads it and answers with its weight fingerprint, which must equal the
trainer's (``attnrl.rollout.fingerprint``), else ``WeightSyncError``. The latest reference is kept,
so an actor that replaces a dead one starts from the newest weights.

Faults: an actor that dies during a call (``RayActorError``: process killed, node lost), or hangs
(no answer within ``call_timeout_s``), is replaced by a fresh one (latest weights, fingerprint
checked) and its part of the call is retried, at most ``max_actor_restarts`` times per call.
``replaced_actors`` counts replacements over the pool's life.

Connection: ``ray.init(address=...)`` with a configured address or ``RAY_ADDRESS``; otherwise a
local Ray with a small object store and no dashboard. ``PREFECT_API_URL`` is passed to the actors
explicitly in their runtime env (prefect-ray does not propagate it, stack-notes.md). The pure core
never imports this module; ``attnrl.rollout.factory`` resolves it by import path.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from attnrl.errors import AttnRLError
from attnrl.rollout.balance import assign_by_tokens
from attnrl.rollout.engine import Completion, GenerationRequest, SamplingParams
from attnrl.rollout.fingerprint import Fingerprint, fingerprint, mismatches
from infra.engine_worker import EngineFailed, EngineWorker
from attnrl.rollout.scoring import ScoreKind, ScoringSpec, check_score_kind
from attnrl.utils.seeding import derive_seed

logger = logging.getLogger(__name__)
# What makes an actor's share of a call retried on a replacement: it died, failed, or hung.
ACTOR_FAULTS = (RayActorError, EngineFailed, GetTimeoutError)


class RolloutPoolError(AttnRLError):
    """The pool could not start its engines, or could not finish a call (actors kept dying)."""


class WeightSyncError(AttnRLError):
    """An engine does not hold the weights it was sent (its fingerprint differs from the trainer's)."""


@dataclass(frozen=True)
class EngineSpec:
    """What each actor builds: ``kind`` ('hf' or 'vllm') and its keyword arguments.

    ``python`` is the interpreter the actor runs under (None: the driver's); ``env_vars`` are
    set in the actor's process; ``dtype`` is the engines' weight dtype, which the pool casts to
    before a push and uses for the trainer-side fingerprint. With ``scoring``, ``submit_scored``
    has the engines score their completions too (``attnrl.rollout.scoring``).
    """

    kind: str
    options: dict[str, Any]
    dtype: str
    python: str | None = None
    env_vars: dict[str, str] = field(default_factory=dict)
    scoring: ScoringSpec | None = None  # engines also score what they generate (split placement, overlap)


def connect(address: str | None = None, object_store_mb: int = 256, num_cpus: int | None = None,
            num_gpus: int | None = None) -> bool:
    """Make sure this process is connected to Ray; True when this call started the connection."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    with _sigterm_handler_kept():
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                object_store_memory=object_store_mb * 2**20,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
    return True


@contextlib.contextmanager
def _sigterm_handler_kept() -> Iterator[None]:
    """``ray.init`` replaces the process's SIGTERM handler with ``sys.exit(15)``: put back the run's own (Prefect's,
    which marks the flow run; the command line's, which stops the run and says so: ``flows.stopping``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, handler if handler is not None else signal.SIG_DFL)


def worker_runtime_env(spec: EngineSpec) -> dict[str, Any] | None:
    """The actors' runtime env: their interpreter, their variables, and PREFECT_API_URL when set
    (prefect-ray does not propagate it, stack-notes.md)."""
    env_vars = dict(spec.env_vars)
    if url := os.environ.get("PREFECT_API_URL"):
        env_vars["PREFECT_API_URL"] = url
    runtime_env: dict[str, Any] = {}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    if spec.python is not None:
        runtime_env["py_executable"] = spec.python
    return runtime_env or None


class RayRolloutPool:
    """``RolloutEngine`` over ``num_actors`` Ray actors, each building the engine of ``spec``."""

    worker_class: type[EngineWorker] = EngineWorker  # what each actor runs

    def __init__(
        self,
        spec: EngineSpec,
        *,
        num_actors: int = 2,
        num_cpus_per_actor: float = 1.0,
        num_gpus_per_actor: float = 0.0,
        max_actor_restarts: int = 3,
        call_timeout_s: float | None = None,
        address: str | None = None,
        object_store_mb: int = 256,
        initial_state_dict: Mapping[str, torch.Tensor] | None = None,
        placement: Callable[[int], dict[str, Any]] | None = None,
    ) -> None:
        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        self.spec = spec
        self.dtype = getattr(torch, spec.dtype)
        self.max_actor_restarts = max_actor_restarts
        self.call_timeout_s = call_timeout_s
        self.replaced_actors = 0
        local_cpus = max(os.cpu_count() or 1, math.ceil(num_actors * num_cpus_per_actor))
        local_gpus = math.ceil(num_actors * num_gpus_per_actor) if num_gpus_per_actor else None
        self._started_ray = connect(address, object_store_mb, num_cpus=local_cpus, num_gpus=local_gpus)
        options: dict[str, Any] = {"num_cpus": num_cpus_per_actor, "num_gpus": num_gpus_per_actor, "max_restarts": 0}
        if runtime_env := worker_runtime_env(spec):
            options["runtime_env"] = runtime_env
        self._actor_options = options
        # Where actor i goes (a placement-group bundle, infra/placement.py); a replacement goes there too.
        self._placement = placement
        self._weights_ref: ray.ObjectRef | None = None
        self._expected: Fingerprint | None = None
        # Where a replacement actor gets the latest weights when they arrived by another transport (vLLM's
        # native transfer) than this pool's object store: (a reference to them in the object store, their
        # fingerprint); called only on replacement.
        self.weights_source: Callable[[], tuple[ray.ObjectRef, Fingerprint]] | None = None
        self.actors: list[Any] = []
        self.actor_info: list[dict[str, Any]] = []  # EngineWorker.ready() of each actor
        self.packed: dict[str, list[str]] = {}
        try:
            self.actors = [self._new_actor(i) for i in range(num_actors)]
            self.actor_info = self._started([actor.ready.remote() for actor in self.actors])
            self.packed = self.actor_info[0]["packed"]
            if initial_state_dict is not None:
                self.update_weights(initial_state_dict)
        except BaseException:
            self.close()
            raise

    # -- RolloutEngine -------------------------------------------------------------------------

    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams, seed: int
    ) -> list[list[Completion]]:
        return self.submit(requests, params, seed).result()

    def submit(self, requests: Sequence[GenerationRequest], params: SamplingParams, seed: int) -> PendingRollout:
        """Send each actor its share and return at once; ``result()`` collects (and retries) them."""
        return PendingRollout(self, list(requests), params, seed)

    def submit_scored(self, requests: Sequence[GenerationRequest], params: SamplingParams, seed: int,
                      kind: ScoreKind = "sequences") -> PendingRollout:
        """``submit``, and each engine then scores its completions with the weights that sampled them
        (``scores()``): ``sequences`` (log-probs, entropies, FCI) or just their ``logprobs``; the
        samples are the ones ``submit`` gives."""
        if self.spec.scoring is None:
            raise ValueError("this pool's engines were built without scoring settings (EngineSpec.scoring)")
        check_score_kind(kind)
        return PendingRollout(self, list(requests), params, seed, scored=kind)

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Push ``state_dict`` to every actor and prove it arrived (fingerprints)."""
        engine_state = {name: t.detach().to("cpu", self.dtype) for name, t in state_dict.items()}
        # Once in the object store; every actor reads the same object.
        self.load_weights(ray.put(engine_state), fingerprint(engine_state.items(), packed=self.packed))

    def load_weights(self, weights: ray.ObjectRef, expected: Fingerprint) -> None:
        """Every actor loads the state dict at ``weights`` (already in the engines' dtype, put there by
        whoever holds the policy: a trainer rank in distributed mode) and must report ``expected``."""
        self._expected, self._weights_ref = expected, weights
        refs = {i: actor.update_weights.remote(self._weights_ref) for i, actor in enumerate(self.actors)}
        restarts = 0
        for i in range(len(self.actors)):
            try:
                self._verify(i, self._answer(refs[i]))
            except ACTOR_FAULTS as exc:
                restarts += 1
                # The replacement already loads (and verifies) the latest weights; nothing left to retry.
                self._handle_death(i, exc, restarts, "update_weights")

    def sleep(self) -> None:
        """Colocated placement: every engine frees its GPU memory while the trainer works (vLLM sleep
        mode, level 1: weights to host memory, KV cache dropped); engines without one ignore it."""
        self._broadcast("sleep")

    def wake(self) -> None:
        """Every engine takes its memory back before the next weight push or generation."""
        self._broadcast("wake")

    def _broadcast(self, method: str) -> None:
        refs = [getattr(actor, method).remote() for actor in self.actors]
        for i, ref in enumerate(refs):
            try:
                self._answer(ref)
            except ACTOR_FAULTS as exc:
                # The replacement starts awake with the latest weights; a sleeping one is not needed.
                self._handle_death(i, exc, 1, method)

    def verify_after_transfer(self, expected: Fingerprint) -> None:
        """Every engine resets its prefix cache and must hold ``expected`` (after a native transfer)."""
        self._expected = expected
        self._weights_ref = None  # the object store no longer holds the latest weights
        for i, reported in enumerate(self._answer([actor.after_weight_update.remote() for actor in self.actors])):
            self._verify(i, reported)

    # -- inspection ----------------------------------------------------------------------------

    def weights_fingerprints(self) -> list[Fingerprint]:
        return self._answer([actor.fingerprint.remote() for actor in self.actors])

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]], actor: int = 0) -> list[list[float]]:
        """What actor ``actor`` computes for ``sequences`` now (tests compare it with the trainer)."""
        return self._answer(self.actors[actor].prompt_logprobs.remote([list(s) for s in sequences]))

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Kill the actors; shut Ray down only if this pool started it."""
        kill_actors(self.actors)
        self.actors = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False

    def __enter__(self) -> RayRolloutPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _new_actor(self, index: int) -> Any:
        options = self._actor_options | (self._placement(index) if self._placement is not None else {})
        return ray.remote(self.worker_class).options(**options).remote(self.spec.kind, self.spec.options,
                                                                       self.spec.scoring)

    def _started(self, refs: list[ray.ObjectRef]) -> list[dict[str, Any]]:
        try:
            return ray.get(refs)  # unbounded: starting an engine (a vLLM one) can take minutes
        except RayActorError as exc:
            raise RolloutPoolError(f"a {self.spec.kind} rollout engine could not start: {last_line(exc)}") from exc

    def _submit(self, index: int, requests: list[GenerationRequest], params: SamplingParams, seed: int,
                keys: list[int], scored: ScoreKind | None) -> ray.ObjectRef:
        return self.actors[index].generate.remote(requests, params, seed, keys, scored)

    def _verify(self, index: int, reported: Fingerprint) -> None:
        if not reported:
            raise WeightSyncError(f"rollout actor {index} reports no weights: nothing proves the sync reached it")
        bad = mismatches(self._expected or {}, reported)
        if bad:
            shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise WeightSyncError(
                f"rollout actor {index} ({self.spec.kind}) does not hold the trainer's weights after the sync: {shown}"
            )

    def _answer(self, ref: ray.ObjectRef | list[ray.ObjectRef]) -> Any:
        """``ray.get`` bounded by ``call_timeout_s`` (``GetTimeoutError`` past it: the actor is hung)."""
        return ray.get(ref, timeout=self.call_timeout_s)

    def _handle_death(self, index: int, exc: Exception, restarts: int, during: str) -> None:
        """Replace actor ``index``, dead, failed (``EngineFailed``) or hung (no answer within
        ``call_timeout_s``), unless the call used up its restarts."""
        if isinstance(exc, GetTimeoutError):
            what, cause = "hung", f"no answer in {self.call_timeout_s:g} s (rollout.ray.call_timeout_s)"
        else:
            what, cause = ("failed" if isinstance(exc, EngineFailed) else "died"), last_line(exc)
        if restarts > self.max_actor_restarts:
            raise RolloutPoolError(
                f"rollout actor {index} {what} during {during} and {self.max_actor_restarts} replacements "
                f"(rollout.ray.max_actor_restarts) did not help: {cause}"
            ) from exc
        logger.warning("rollout actor %d %s during %s (%s); replacing it (%d/%d)",
                       index, what, during, cause, restarts, self.max_actor_restarts)
        self._replace(index)

    def _replace(self, index: int) -> None:
        try:
            ray.kill(self.actors[index], no_restart=True)
        except Exception:  # already gone
            pass
        actor = self._new_actor(index)
        [self.actor_info[index]] = self._started([actor.ready.remote()])
        self.actors[index] = actor
        if self._weights_ref is None and self.weights_source is not None:
            self._weights_ref, self._expected = self.weights_source()
        if self._weights_ref is not None:
            self._verify(index, self._answer(actor.update_weights.remote(self._weights_ref)))
        self.replaced_actors += 1


def kill_actors(actors: Sequence[Any]) -> None:
    """``ray.kill`` each of ``actors``, alive or not."""
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass


def last_line(exc: Exception) -> str:
    """Ray's messages carry the actor's whole traceback; its last line is the error itself."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


class PendingRollout:
    """One ``generate`` call in flight on a pool, split into per-actor shares; the driver is free until
    ``result()``. A share whose actor died (or failed) is resent to its replacement, which holds the
    latest weights."""

    def __init__(self, pool: RayRolloutPool, requests: list[GenerationRequest], params: SamplingParams,
                 seed: int, scored: ScoreKind | None = None) -> None:
        self._pool = pool
        self._requests, self._params, self._seed, self._scored = requests, params, seed, scored
        self._results: list[list[Completion]] | None = None
        self._scores: list[list[Any]] | None = None
        shares = assign_by_tokens(requests, len(pool.actors), params.max_new_tokens) if requests else []
        self._shares = [(i, indices) for i, indices in enumerate(shares) if indices]
        self._sent_to: dict[int, Any] = {}  # the actor each share went to
        self._refs = {i: self._send(i, indices) for i, indices in self._shares}

    def _send(self, index: int, indices: list[int]) -> ray.ObjectRef:
        self._sent_to[index] = self._pool.actors[index]
        return self._pool._submit(index, [self._requests[k] for k in indices], self._params,
                                  derive_seed(self._seed, index) if self._pool.spec.kind == "hf" else self._seed,
                                  indices, self._scored)

    def _share_results(self) -> list[tuple[list[int], Any]]:
        """Each share's indices and what its actor returned, retrying dead actors."""
        restarts = 0
        out = []
        for i, indices in self._shares:
            while True:
                try:
                    out.append((indices, self._pool._answer(self._refs[i])))
                    break
                except ACTOR_FAULTS as exc:
                    # Another call in flight may have replaced this actor already: then just resend.
                    if self._pool.actors[i] is self._sent_to[i]:
                        restarts += 1
                        self._pool._handle_death(i, exc, restarts, "generate")
                    self._refs[i] = self._send(i, indices)
        return out

    def result(self) -> list[list[Completion]]:
        """The completions in request order; a share whose actor died is resent to its replacement."""
        if self._results is not None:
            return self._results
        results: list[list[Completion]] = [[] for _ in self._requests]
        scores: list[list[Any]] = [[] for _ in self._requests]
        for indices, share in self._share_results():
            completions, scored = share if self._scored is not None else (share, [[] for _ in indices])
            for k, group, group_scores in zip(indices, completions, scored, strict=True):
                results[k], scores[k] = group, group_scores
        self._results, self._scores = results, scores
        return self._results

    def scores(self) -> list[list[Any]]:
        """``submit_scored``: per request, per completion, its ``ScoredSequence`` or log-probs (None where
        it is empty)."""
        if self._scored is None:
            raise ValueError("this call was submitted without scoring (use submit_scored)")
        self.result()
        return self._scores or []
