"""What runs inside each rollout actor of ``infra.ray_engine.RayRolloutPool``: an ``EngineWorker``
holding one engine (``HFActorEngine`` or ``infra.vllm_engine.VLLMRolloutEngine``, both with the same
pool-facing methods) and, for the split-placement overlap, a ``RolloutScorer`` over its weights.
An engine that raised is marked failed (``EngineFailed``) so that the pool replaces it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from attnrl.errors import AttnRLError
from attnrl.rollout.engine import Completion, GenerationRequest, SamplingParams
from attnrl.rollout.fingerprint import Fingerprint, fingerprint
from attnrl.rollout.scoring import RolloutScorer, ScoreKind, ScoringSpec


class EngineFailed(AttnRLError):
    """An engine raised during a call. Its state is then unknown (vLLM keeps the failed call's
    requests scheduled, and a later call would spin on them), so every later call on that actor
    fails at once with this error and the pool replaces the actor."""



class HFActorEngine:
    """An ``HFRolloutEngine`` on a policy loaded from a directory, with the pool-facing methods the
    vLLM engine has, so ``EngineWorker`` drives both alike."""

    packed_modules: dict[str, list[str]] = {}  # transformers keeps the checkpoint's tensor names

    def __init__(self, model_path: str, dtype: str, device: str, batch_size: int, threads: int) -> None:
        from transformers.utils import logging as hf_logging

        from attnrl.model.loading import load_policy
        from attnrl.rollout.hf_engine import HFRolloutEngine

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per actor is noise in the driver's log
        torch.set_num_threads(threads)
        policy = load_policy(model_path, dtype=dtype, device=device)
        self.engine = HFRolloutEngine(
            policy.model,
            pad_token_id=policy.tokenizer.pad_token_id,
            eos_token_id=policy.tokenizer.eos_token_id,
            vocab_size=len(policy.tokenizer),
            batch_size=batch_size,
            progress=False,
        )

    def generate(self, requests: Sequence[GenerationRequest], params: SamplingParams, seed: int,
                 request_keys: Sequence[int] | None = None) -> list[list[Completion]]:
        """One generator for the whole share (seeded per actor by the pool): the keys are unused."""
        return self.engine.generate(requests, params, seed)

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> Fingerprint:
        self.engine.update_weights(state_dict)
        return self.fingerprint()

    def after_weight_update(self) -> Fingerprint:
        return self.fingerprint()

    def fingerprint(self) -> Fingerprint:
        return fingerprint(self.engine.model.named_parameters())

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        out = []
        with torch.no_grad():
            for seq in sequences:
                ids = torch.tensor([list(seq)], device=self.engine.device)
                logits = self.engine.model(ids).logits[0, :-1].float()
                out.append(torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0].tolist())
        return out

    def native_transfer(self, phase: str, payload: dict[str, Any] | None = None) -> None:
        raise ValueError("native weight transfer needs vLLM engines")

    def sleep(self) -> None:
        """No sleep mode: the model stays where it is (colocated hf engines only share CPUs here)."""

    def wake(self) -> None:
        """See ``sleep``."""


class EngineWorker:
    """One actor's state: an engine built from an ``EngineSpec`` (``HFActorEngine`` or ``VLLMRolloutEngine``)."""

    def __init__(self, kind: str, options: dict[str, Any], scoring: ScoringSpec | None = None) -> None:
        self.failure: str | None = None
        self.scorer: RolloutScorer | None = None
        if kind == "hf":
            self.engine: Any = HFActorEngine(**options)
            if scoring is not None:  # the engine's own model: it always holds the weights that sampled
                self.scorer = RolloutScorer(self.engine.engine.model, scoring)
        elif kind == "vllm":
            if scoring is not None:
                raise ValueError("vllm engines do not score (distributed.overlap needs rollout.engine=hf for now)")
            from infra.vllm_engine import VLLMRolloutEngine, VLLMSettings

            self.engine = VLLMRolloutEngine(VLLMSettings(**options))
        else:
            raise ValueError(f"unknown engine kind {kind!r}; known: hf, vllm")

    def ready(self) -> dict[str, Any]:
        """Who this actor is: process, interpreter and how the engine names fused tensors."""
        return {"pid": os.getpid(), "python": sys.executable, "packed": self.engine.packed_modules}

    def _guarded(self, call: Callable[[], Any]) -> Any:
        if self.failure is not None:
            raise EngineFailed(f"this engine failed before ({self.failure}); it must be replaced")
        try:
            return call()
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            raise EngineFailed(self.failure) from exc

    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams, seed: int, keys: Sequence[int],
        scored: ScoreKind | None = None,
    ) -> list[list[Completion]] | tuple[list[list[Completion]], list[list[Any]]]:
        """Completions; with ``scored``, also their scores of that kind with the weights that sampled them."""
        def call():
            completions = self.engine.generate(requests, params, seed, request_keys=keys)
            if scored is None:
                return completions
            if self.scorer is None:
                raise ValueError("this engine was built without scoring settings (EngineSpec.scoring)")
            return completions, self.scorer.run(scored, requests, completions)

        return self._guarded(call)

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> Fingerprint:
        return self._guarded(lambda: self.engine.update_weights(state_dict))

    def fingerprint(self) -> Fingerprint:
        return self.engine.fingerprint()

    def after_weight_update(self) -> Fingerprint:
        """After a transport that bypassed ``update_weights`` (vLLM's native transfer)."""
        return self.engine.after_weight_update()

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p of every token but the first (temperature 1): what the engine computes now."""
        return self.engine.prompt_logprobs(sequences)

    def native_transfer(self, phase: str, payload: dict[str, Any] | None) -> None:
        self.engine.native_transfer(phase, payload)

    def sleep(self) -> None:
        self._guarded(self.engine.sleep)

    def wake(self) -> None:
        self._guarded(self.engine.wake)
