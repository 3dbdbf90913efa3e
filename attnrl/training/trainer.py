"""The policy trainer: scoring forwards (log-probs, entropies, FCI) and PPO updates (spec §3, §5, §11).

``score`` is the no-grad forward after initial sampling: per-token behaviour log-probs and
entropies, and FCI per step from the same forward (spec §5.1). ``logprobs`` recomputes
log-probs with the policy or the frozen reference. ``update`` runs one PPO epoch over
mini-batches of ``train.mini_batch_sequences``, each split into micro-batches whose losses are
weighted by their share of the mini-batch (spec §11). Logits are divided by the sampling
temperature before every log-softmax, as the actor does in verl, so log-probs match the
engine's.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from attnrl.config.schema import AlgorithmConfig, TrainConfig
from attnrl.fci import FCICollector
from attnrl.loss import entropy_from_logits, policy_objective, token_logprobs
from attnrl.steps import StepSegmentation
from attnrl.training.backend import OptimizerBackend
from attnrl.training.sequences import pack, response_logits, right_aligned, unpack_rows


@dataclass(frozen=True)
class ScoredSequence:
    """What the scoring forward returns for one response."""

    logprobs: tuple[float, ...]
    entropies: tuple[float, ...]
    fci: tuple[float, ...] | None  # per step, index 0 = prompt (spec §5.1); None without FCI


@dataclass(frozen=True)
class TrainSequence:
    """One training sequence (a root-to-leaf path, or a GRPO response)."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    old_logprobs: tuple[float, ...]
    advantages: tuple[float, ...]
    ref_logprobs: tuple[float, ...] | None = None


class PolicyTrainer:
    """Drives an ``OptimizerBackend`` over a causal LM, with an optional frozen reference.

    Without a backend it only scores (the difficulty stage uses it that way).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        backend: OptimizerBackend | None,
        *,
        reference: PreTrainedModel | None,
        pad_token_id: int,
        algorithm: AlgorithmConfig,
        train: TrainConfig,
        temperature: float,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.backend = backend
        self.pad_token_id = pad_token_id
        self.algorithm = algorithm
        self.train_config = train
        self.temperature = temperature
        self.autocast = autocast
        if backend is not None and algorithm.kl_coef > 0 and reference is None:
            raise ValueError("algorithm.kl_coef > 0 needs a reference model (the initial policy, spec §11)")
        # Frozen: the KL term anchors the policy to where it started, also after a resume.
        self.reference = reference.eval().requires_grad_(False) if reference is not None else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _precision(self) -> contextlib.AbstractContextManager:
        """bf16 autocast over fp32 master weights when configured; log-softmax stays fp32."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)

    def _chunks(self, count: int) -> list[range]:
        size = self.train_config.micro_batch_sequences
        return [range(i, min(i + size, count)) for i in range(0, count, size)]

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        segmentations: Sequence[StepSegmentation] | None = None,
    ) -> list[ScoredSequence]:
        """Behaviour log-probs, entropies and (with segmentations) FCI, in one forward per micro-batch."""
        self.model.eval()
        scored: list[ScoredSequence] = []
        for chunk in self._chunks(len(prompts)):
            batch = pack([prompts[i] for i in chunk], [responses[i] for i in chunk], self.pad_token_id)
            inputs = {"input_ids": batch.input_ids.to(self.device), "attention_mask": batch.attention_mask.to(self.device)}
            fci = None
            if segmentations is not None:
                with FCICollector(
                    self.model,
                    [segmentations[i] for i in chunk],
                    delta=self.algorithm.fci_delta,
                    aggregation=self.algorithm.step_attention,
                ) as collector, self._precision():
                    logits = self.model(**inputs).logits
                fci = collector.scores(
                    mask_first_step=self.algorithm.fci_mask_first_step,
                    mask_after_think=self.algorithm.fci_mask_after_think,
                )
            else:
                with self._precision():
                    logits = self.model(**inputs).logits
            logits = response_logits(logits, batch).float() / self.temperature
            targets = batch.response_ids.to(self.device)
            logprobs = unpack_rows(token_logprobs(logits, targets).cpu(), batch.response_lengths)
            entropies = unpack_rows(entropy_from_logits(logits).cpu(), batch.response_lengths)
            for j in range(len(chunk)):
                scored.append(
                    ScoredSequence(
                        tuple(logprobs[j]), tuple(entropies[j]), None if fci is None else tuple(fci[j].tolist())
                    )
                )
        return scored

    @torch.no_grad()
    def logprobs(
        self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, reference: bool = False
    ) -> list[tuple[float, ...]]:
        """Per-token log-probs of ``responses`` under the policy (or the frozen reference)."""
        model = self.reference if reference else self.model
        if model is None:
            raise ValueError("no reference model: algorithm.kl_coef is 0")
        model.eval()
        out: list[tuple[float, ...]] = []
        for chunk in self._chunks(len(prompts)):
            batch = pack([prompts[i] for i in chunk], [responses[i] for i in chunk], self.pad_token_id)
            with self._precision():
                logits = model(
                    input_ids=batch.input_ids.to(self.device), attention_mask=batch.attention_mask.to(self.device)
                ).logits
            values = token_logprobs(response_logits(logits, batch).float() / self.temperature, batch.response_ids.to(self.device))
            out.extend(tuple(row) for row in unpack_rows(values.cpu(), batch.response_lengths))
        return out

    def update(self, sequences: Sequence[TrainSequence]) -> dict[str, float]:
        """One PPO epoch over ``sequences`` in order (spec §11: no shuffling); mean stats per optimizer step."""
        if not sequences:
            return {}
        if self.backend is None:
            raise ValueError("this trainer only scores: it was built without an optimizer backend")
        self.model.train()
        totals: dict[str, float] = defaultdict(float)
        steps = 0
        mini = self.train_config.mini_batch_sequences
        for start in range(0, len(sequences), mini):
            minibatch = sequences[start : start + mini]
            chunks = [range(i, min(i + self.train_config.micro_batch_sequences, len(minibatch)))
                      for i in range(0, len(minibatch), self.train_config.micro_batch_sequences)]
            for k, chunk in enumerate(chunks):
                stats = self._micro_step([minibatch[i] for i in chunk], weight=len(chunk) / len(minibatch),
                                         boundary=k == len(chunks) - 1)
                for key, value in stats.items():
                    totals[key] += value * len(chunk) / len(minibatch)
            totals["grad_norm"] += self.backend.step()
            steps += 1
        self.model.eval()
        return {key: value / steps for key, value in totals.items()} | {"optimizer_steps": float(steps)}

    def _micro_step(self, sequences: Sequence[TrainSequence], *, weight: float, boundary: bool) -> dict[str, float]:
        batch = pack([s.prompt_ids for s in sequences], [s.response_ids for s in sequences], self.pad_token_id)
        width = batch.response_width
        with self._precision():
            logits = self.backend.module(
                input_ids=batch.input_ids.to(self.device), attention_mask=batch.attention_mask.to(self.device)
            ).logits
        logits = response_logits(logits, batch).float() / self.temperature
        logprobs = token_logprobs(logits, batch.response_ids.to(self.device))
        entropy = entropy_from_logits(logits) if self.algorithm.entropy_coef > 0 else None
        ref = None
        if self.algorithm.kl_coef > 0:
            ref = right_aligned([s.ref_logprobs or () for s in sequences], width).to(self.device)
        loss, stats = policy_objective(
            logprobs,
            right_aligned([s.old_logprobs for s in sequences], width).to(self.device),
            ref,
            right_aligned([s.advantages for s in sequences], width).to(self.device),
            batch.response_mask.to(self.device),
            entropy,
            self.algorithm,
        )
        self.backend.backward(loss * weight, boundary=boundary)
        return stats

    def policy_state(self) -> dict[str, torch.Tensor]:
        """Weights to push to the rollout engine after an update."""
        return {k: v.detach() for k, v in self.model.state_dict().items()}
