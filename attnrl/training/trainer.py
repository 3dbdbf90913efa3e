"""The policy trainer: scoring forwards (log-probs, entropies, FCI) and PPO updates (spec §3, §5, §11).

``score`` is the no-grad forward after initial sampling: per-token behaviour log-probs and
entropies, and FCI per step from the same forward (spec §5.1). ``logprobs`` recomputes
log-probs with the policy or the frozen reference. ``update`` runs one PPO epoch over
mini-batches of ``train.mini_batch_sequences``; each is split into token-budget micro-batches
(``train.max_tokens_per_micro_batch``) whose losses are normalised by the whole mini-batch, so
the accumulated gradient is that of the exact mini-batch loss (spec §11, ``loss.Normaliser``).

Memory (architecture.md: no pass holds [batch × length × vocabulary] logits): every pass goes
through ``ResponseScorer``, which applies the LM head in chunks to the response positions only;
micro-batches are bounded in tokens; layouts are left-padded or padding-free
(``train.packing``). Logits are divided by the sampling temperature before every log-softmax,
as the actor does in verl, so log-probs match the engine's.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from attnrl.errors import ConfigError
from attnrl.fci import FCICollector
from attnrl.loss import Normaliser, policy_objective
from attnrl.steps import StepSegmentation
from attnrl.training.backend import OptimizerBackend
from attnrl.training.chunked_head import ResponseScorer
from attnrl.training.micro_batches import token_budget_batches
from attnrl.training.sequences import (
    ModelBatch,
    left_padded,
    padding_free,
    response_mask,
    right_aligned,
    rows_from_flat,
    split_flat,
)

if TYPE_CHECKING:  # read by attribute only: the trainer runs without pydantic (benchmarks/gpu_scale_check.py)
    from attnrl.config.schema import AlgorithmConfig, TrainConfig

# Attention implementations that keep padding-free sequences apart when given restarting position
# ids (transformers' packed-sequence detection): varlen kernels attend within each sequence, the
# others get a block-diagonal mask over the whole row. The FCI collector's kernel (spec §5) attends
# within each span by construction, so it counts as varlen.
FCI_KERNEL = "attnrl_fci"
VARLEN_KERNELS = frozenset({"flash_attention_2", "flash_attention_3", FCI_KERNEL})
PACKING_KERNELS = VARLEN_KERNELS | {"sdpa", "eager", "flex_attention"}


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


def uses_padding_free(packing: str, attn_implementation: str) -> bool:
    """Whether a pass on this attention implementation lays micro-batches out padding-free (``train.packing``)."""
    if packing == "left_padded":
        return False
    if packing == "padding_free":
        if attn_implementation not in PACKING_KERNELS:
            raise ConfigError(
                f"train.packing: 'padding_free' needs an attention implementation that keeps packed sequences "
                f"apart ({', '.join(sorted(PACKING_KERNELS))}); the model uses {attn_implementation!r}"
            )
        return True
    if packing == "auto":
        return attn_implementation in VARLEN_KERNELS
    raise ConfigError(f"train.packing: unknown layout {packing!r}; known: auto, padding_free, left_padded")


class PolicyTrainer:
    """Drives an ``OptimizerBackend`` over a causal LM, with an optional frozen reference.

    Without a backend it only scores (the difficulty stage uses it that way). With one, the
    backend must have been built over this model (``backend.build_backend``).
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
        if backend is not None and backend.scorer.lm is not model:
            raise ValueError("the backend optimises another model: build it with build_backend(name, model, config)")
        # The no-grad passes call the scorer directly; under DeepSpeed ZeRO-3 the parameter hooks on the
        # model's modules gather the weights layer by layer all the same.
        self.scorer = backend.scorer if backend is not None else ResponseScorer(model, train.logits_chunk_tokens)
        self.reference: ResponseScorer | None = None
        if reference is not None:
            # Frozen: the KL term anchors the policy to where it started, also after a resume.
            frozen = reference.eval().requires_grad_(False)
            if backend is not None:
                frozen = backend.prepare_reference(frozen)
            self.reference = ResponseScorer(frozen, train.logits_chunk_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _precision(self) -> contextlib.AbstractContextManager:
        """bf16 autocast over fp32 master weights when configured; log-softmax stays fp32."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)

    def _micro_batches(
        self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], attn_implementation: str
    ) -> list[tuple[range, ModelBatch]]:
        """Consecutive token-budget micro-batches, each laid out for the pass's attention implementation."""
        packed = uses_padding_free(self.train_config.packing, attn_implementation)
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
        out = []
        for chunk in token_budget_batches(lengths, self.train_config.max_tokens_per_micro_batch, packed=packed):
            ps, rs = [prompts[i] for i in chunk], [responses[i] for i in chunk]
            batch = padding_free(ps, rs) if packed else left_padded(ps, rs, self.pad_token_id)
            out.append((chunk, batch.to(self.device)))
        return out

    def _run(self, scorer: torch.nn.Module, batch: ModelBatch, *, with_entropy: bool):
        with self._precision():
            return scorer(batch.input_ids, batch.attention_mask, batch.position_ids, batch.logit_index, batch.targets,
                          temperature=self.temperature, with_entropy=with_entropy)

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        segmentations: Sequence[StepSegmentation] | None = None,
    ) -> list[ScoredSequence]:
        """Behaviour log-probs, entropies and (with segmentations) FCI, in one forward per micro-batch."""
        self.model.eval()
        implementation = FCI_KERNEL if segmentations is not None else self.model.config._attn_implementation
        scored: list[ScoredSequence] = []
        for chunk, batch in self._micro_batches(prompts, responses, implementation):
            fci = None
            if segmentations is not None:
                with FCICollector(
                    self.model,
                    [segmentations[i] for i in chunk],
                    delta=self.algorithm.fci_delta,
                    aggregation=self.algorithm.step_attention,
                    spans=batch.spans,
                ) as collector:
                    logprobs, entropies = self._run(self.scorer, batch, with_entropy=True)
                fci = collector.scores(
                    mask_first_step=self.algorithm.fci_mask_first_step,
                    mask_after_think=self.algorithm.fci_mask_after_think,
                )
            else:
                logprobs, entropies = self._run(self.scorer, batch, with_entropy=True)
            rows = zip(split_flat(logprobs, batch.response_lengths), split_flat(entropies, batch.response_lengths))
            for j, (lp, ent) in enumerate(rows):
                scored.append(ScoredSequence(lp, ent, None if fci is None else tuple(fci[j].tolist())))
        return scored

    @torch.no_grad()
    def logprobs(
        self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, reference: bool = False
    ) -> list[tuple[float, ...]]:
        """Per-token log-probs of ``responses`` under the policy (or the frozen reference)."""
        scorer = self.reference if reference else self.scorer
        if scorer is None:
            raise ValueError("no reference model: algorithm.kl_coef is 0")
        scorer.lm.eval()
        out: list[tuple[float, ...]] = []
        for _, batch in self._micro_batches(prompts, responses, scorer.lm.config._attn_implementation):
            values, _ = self._run(scorer, batch, with_entropy=False)
            out.extend(split_flat(values, batch.response_lengths))
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
        implementation = self.model.config._attn_implementation
        for start in range(0, len(sequences), mini):
            minibatch = sequences[start : start + mini]
            normaliser = Normaliser.of([len(s.response_ids) for s in minibatch])
            micro = self._micro_batches([s.prompt_ids for s in minibatch], [s.response_ids for s in minibatch],
                                        implementation)
            for k, (chunk, batch) in enumerate(micro):
                stats = self._micro_step([minibatch[i] for i in chunk], batch, normaliser, boundary=k == len(micro) - 1)
                for key, value in stats.items():
                    totals[key] += value  # each is this micro-batch's share of the mini-batch value
            totals["grad_norm"] += self.backend.step()
            steps += 1
        self.model.eval()
        return {key: value / steps for key, value in totals.items()} | {"optimizer_steps": float(steps)}

    def _micro_step(
        self, sequences: Sequence[TrainSequence], batch: ModelBatch, normaliser: Normaliser, *, boundary: bool
    ) -> dict[str, float]:
        logprobs, entropy = self._run(self.backend.module, batch, with_entropy=self.algorithm.entropy_coef > 0)
        mask = response_mask(batch.response_lengths).to(self.device)
        width = mask.shape[1]

        def aligned(values: Sequence[Sequence[float]]) -> torch.Tensor:
            return right_aligned(values, width).to(self.device)

        ref = aligned([s.ref_logprobs or () for s in sequences]) if self.algorithm.kl_coef > 0 else None
        loss, stats = policy_objective(
            rows_from_flat(logprobs, mask),
            aligned([s.old_logprobs for s in sequences]),
            ref,
            aligned([s.advantages for s in sequences]),
            mask,
            None if entropy is None else rows_from_flat(entropy, mask),
            self.algorithm,
            normaliser,
        )
        self.backend.backward(loss, boundary=boundary)
        return stats

    def policy_state(self) -> dict[str, torch.Tensor]:
        """Weights to push to the rollout engine after an update: the full state dict, Hugging Face names
        (gathered from the partitions under ZeRO-3)."""
        if self.backend is not None:
            return self.backend.export_weights()
        return {k: v.detach() for k, v in self.model.state_dict().items()}
