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
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from transformers import PreTrainedModel

from attnrl.errors import ConfigError
from attnrl.fci import FCICollector
from attnrl.loss import Normaliser, policy_objective
from attnrl.rollout.engine import RolloutEngine
from attnrl.steps import StepSegmentation
from attnrl.training.backend import OptimizerBackend
from attnrl.training.chunked_head import ResponseScorer, head_calls
from attnrl.training.micro_batches import token_budget_batches, tree_budget_batches
from attnrl.training.prefix_tree import TREE_KERNELS, block_mask
from attnrl.training.sequences import (
    ModelBatch,
    left_padded,
    padding_free,
    response_mask,
    right_aligned,
    rows_from_flat,
    split_flat,
    tree_packed,
)
from attnrl.training.tree_attention import TreeAttention
from attnrl.utils import stopping

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # read by attribute only: the trainer runs without pydantic (benchmarks/gpu_scale_check.py)
    from attnrl.config.schema import AlgorithmConfig, TrainConfig

# Attention implementations that keep padding-free sequences apart when given restarting position
# ids (transformers' packed-sequence detection): varlen kernels attend within each sequence, the
# others get a block-diagonal mask over the whole row. FlexAttention's document mask is block-sparse,
# so it skips the blocks between sequences as a varlen kernel does. The FCI collector's kernel
# (spec §5) attends within each span by construction, so it counts as varlen.
FCI_KERNEL = "attnrl_fci"
VARLEN_KERNELS = frozenset({"flash_attention_2", "flash_attention_3", "flex_attention", FCI_KERNEL})
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


@dataclass(frozen=True)
class MiniBatch:
    """One optimizer step's sequences on this process, and the denominators of the whole mini-batch.

    In one process these are the whole mini-batch and ``Normaliser.of`` its lengths. A rank of a
    data-parallel group holds its share; its normaliser is the whole mini-batch's, divided by the
    world size, because the ranks' gradients are averaged (``infra/trainer_group.py``).
    """

    sequences: tuple[TrainSequence, ...]
    normaliser: Normaliser


def mini_batches(sequences: Sequence[TrainSequence], size: int) -> list[MiniBatch]:
    """Consecutive mini-batches of ``size`` sequences (spec §11: one epoch, no shuffling)."""
    out = []
    for start in range(0, len(sequences), size):
        chunk = tuple(sequences[start : start + size])
        out.append(MiniBatch(chunk, Normaliser.of([len(s.response_ids) for s in chunk])))
    return out


# The element-wise maximum over the ranks of this rank's counts. Ranks of a DeepSpeed group must run
# the same number of forwards (ZeRO-3 gathers parameters in each), backwards (gradients are reduced
# in them) and LM-head calls per forward (the head's weights are gathered in each), so a rank with
# fewer runs empty ones. One process: its own counts.
Lockstep = Callable[[list[int]], list[int]]


def solo(counts: list[int]) -> list[int]:
    return counts


@runtime_checkable
class Trainer(Protocol):
    """What ``RLLoop`` needs from a trainer: ``PolicyTrainer`` in one process, or a ``TrainerGroup`` of
    ranks (``infra/trainer_group.py``)."""

    def score(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
              segmentations: Sequence[StepSegmentation] | None = None) -> list[ScoredSequence]: ...

    def logprobs(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                 reference: bool = False) -> list[tuple[float, ...]]: ...

    def update(self, sequences: Sequence[TrainSequence]) -> dict[str, float]: ...

    def push_weights(self, engine: RolloutEngine) -> None: ...


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
        lockstep: Lockstep = solo,
    ) -> None:
        self.model = model
        self.lockstep = lockstep
        self.backend = backend
        self.pad_token_id = pad_token_id
        self.algorithm = algorithm
        self.train_config = train
        self.temperature = temperature
        self.autocast = autocast
        self._untreed: set[str] = set()  # kernels the tree-packing fallback was already logged for
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

    def _tree_packed(self, attn_implementation: str) -> bool:
        """Whether this pass merges its sequences into prefix trees (``train.tree_packing``): only where the
        attention kernel can run a tree; elsewhere (flash attention) it says so once and lays them out per
        sequence. The FCI pass reads whole sequences by construction and is never tree-packed."""
        if not self.train_config.tree_packing or attn_implementation == FCI_KERNEL:
            return False
        if attn_implementation in TREE_KERNELS:
            return True
        if attn_implementation not in self._untreed:
            self._untreed.add(attn_implementation)
            logger.warning("train.tree_packing: the %r attention kernel takes no tree mask; its passes run every "
                           "sequence whole (train.packing) instead", attn_implementation)
        return False

    def _micro_batches(
        self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], attn_implementation: str
    ) -> list[tuple[range, ModelBatch, int | None]]:
        """Consecutive token-budget micro-batches, each laid out for the pass's attention implementation,
        then empty ones (``range(0)``, one pad token) up to the count every rank runs, each with the number
        of LM-head calls every rank makes in it (``lockstep``; None in one process: as many as it needs)."""
        budget = self.train_config.max_tokens_per_micro_batch
        out = []
        if self._tree_packed(attn_implementation):
            sequences = [[*p, *r] for p, r in zip(prompts, responses, strict=True)]
            for chunk in tree_budget_batches(sequences, budget):
                batch = tree_packed([prompts[i] for i in chunk], [responses[i] for i in chunk])
                out.append((chunk, batch.to(self.device)))
        else:
            packed = uses_padding_free(self.train_config.packing, attn_implementation)
            lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
            for chunk in token_budget_batches(lengths, budget, packed=packed):
                ps, rs = [prompts[i] for i in chunk], [responses[i] for i in chunk]
                batch = padding_free(ps, rs) if packed else left_padded(ps, rs, self.pad_token_id)
                out.append((chunk, batch.to(self.device)))
        if self.lockstep is solo:
            return [(chunk, batch, None) for chunk, batch in out]
        [count] = self.lockstep([len(out)])
        filler = left_padded([[self.pad_token_id]], [[self.pad_token_id]], self.pad_token_id).to(self.device)
        out += [(range(0), filler)] * (count - len(out))
        calls = self.lockstep([head_calls(len(b.targets), self.train_config.logits_chunk_tokens) for _, b in out])
        return [(chunk, batch, n) for (chunk, batch), n in zip(out, calls, strict=True)]

    @staticmethod
    def _tree_attention(lm: PreTrainedModel, batch: ModelBatch, implementation: str) -> contextlib.AbstractContextManager:
        """For a tree-packed batch on SDPA or eager, ``lm``'s attention through the segment kernel: around the
        forward and, where gradient checkpointing recomputes layers, the backward."""
        if batch.tree and implementation != "flex_attention":
            return TreeAttention(lm, batch.tree_parent)
        return contextlib.nullcontext()

    def _run(self, scorer: torch.nn.Module, batch: ModelBatch, *, with_entropy: bool, head_calls: int | None,
             implementation: str):
        """Per-token log-probs (and entropies) of every response token of ``batch``, flat [N]. A tree's block
        mask (FlexAttention) is built here, for one micro-batch at a time; SDPA and eager need none (they run
        inside ``_tree_attention``)."""
        mask = batch.attention_mask
        if batch.tree and implementation == "flex_attention":
            mask = block_mask(batch.tree_end)
        with self._precision():
            logprobs, entropies = scorer(batch.input_ids, mask, batch.position_ids, batch.logit_index, batch.targets,
                                         temperature=self.temperature, with_entropy=with_entropy,
                                         head_calls=head_calls)
        return batch.expanded(logprobs), None if entropies is None else batch.expanded(entropies)

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
        for chunk, batch, calls in self._micro_batches(prompts, responses, implementation):
            if not chunk:  # lockstep filler: the forward only keeps the ranks' collectives in step
                self._run(self.scorer, batch, with_entropy=False, head_calls=calls, implementation=implementation)
                continue
            fci = None
            if segmentations is not None:
                with FCICollector(
                    self.model,
                    [segmentations[i] for i in chunk],
                    delta=self.algorithm.fci_delta,
                    aggregation=self.algorithm.step_attention,
                    spans=batch.spans,
                ) as collector:
                    logprobs, entropies = self._run(self.scorer, batch, with_entropy=True, head_calls=calls,
                                                    implementation=implementation)
                fci = collector.scores(
                    mask_first_step=self.algorithm.fci_mask_first_step,
                    mask_after_think=self.algorithm.fci_mask_after_think,
                )
            else:
                with self._tree_attention(self.model, batch, implementation):
                    logprobs, entropies = self._run(self.scorer, batch, with_entropy=True, head_calls=calls,
                                                    implementation=implementation)
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
        implementation = scorer.lm.config._attn_implementation
        for chunk, batch, calls in self._micro_batches(prompts, responses, implementation):
            with self._tree_attention(scorer.lm, batch, implementation):
                values, _ = self._run(scorer, batch, with_entropy=False, head_calls=calls, implementation=implementation)
            if chunk:  # else a lockstep filler
                out.extend(split_flat(values, batch.response_lengths))
        return out

    def update(self, sequences: Sequence[TrainSequence]) -> dict[str, float]:
        """One PPO epoch over ``sequences`` in order (spec §11: no shuffling); mean stats per optimizer step."""
        return self.train_mini_batches(mini_batches(sequences, self.train_config.mini_batch_sequences))

    def train_mini_batches(self, batches: Sequence[MiniBatch]) -> dict[str, float]:
        """One optimizer step per mini-batch; a rank's share may be empty (it still steps, in lockstep)."""
        if not batches:
            return {}
        if self.backend is None:
            raise ValueError("this trainer only scores: it was built without an optimizer backend")
        self.model.train()
        totals: dict[str, float] = defaultdict(float)
        implementation = self.model.config._attn_implementation
        for minibatch in batches:
            seqs = minibatch.sequences
            micro = self._micro_batches([s.prompt_ids for s in seqs], [s.response_ids for s in seqs], implementation)
            for k, (chunk, batch, calls) in enumerate(micro):
                stopping.checkpoint()
                stats = self._micro_step([seqs[i] for i in chunk], batch, minibatch.normaliser,
                                         boundary=k == len(micro) - 1, head_calls=calls, implementation=implementation)
                for key, value in stats.items():
                    totals[key] += value  # each is this micro-batch's share of the mini-batch value
            totals["grad_norm"] += self.backend.step()
        self.model.eval()
        steps = len(batches)
        return {key: value / steps for key, value in totals.items()} | {"optimizer_steps": float(steps)}

    def _micro_step(
        self, sequences: Sequence[TrainSequence], batch: ModelBatch, normaliser: Normaliser, *, boundary: bool,
        head_calls: int | None, implementation: str,
    ) -> dict[str, float]:
        with self._tree_attention(self.model, batch, implementation):
            logprobs, entropy = self._run(self.backend.module, batch, with_entropy=self.algorithm.entropy_coef > 0,
                                          head_calls=head_calls, implementation=implementation)
            if not sequences:  # lockstep filler: a zero loss whose backward takes part in the gradient reduction
                self.backend.backward(logprobs.sum() * 0.0, boundary=boundary)
                return {}
            loss, stats = self._loss(sequences, batch, logprobs, entropy, normaliser)
            self.backend.backward(loss, boundary=boundary)
        return stats

    def _loss(self, sequences: Sequence[TrainSequence], batch: ModelBatch, logprobs: torch.Tensor,
              entropy: torch.Tensor | None, normaliser: Normaliser) -> tuple[torch.Tensor, dict[str, float]]:
        """The PPO objective over the micro-batch's sequences, each with its own old log-probs and advantages (a
        tree's shared tokens included: ``logprobs`` holds every sequence's copy of them)."""
        mask = response_mask(batch.response_lengths).to(self.device)
        width = mask.shape[1]

        def aligned(values: Sequence[Sequence[float]]) -> torch.Tensor:
            return right_aligned(values, width).to(self.device)

        ref = aligned([s.ref_logprobs or () for s in sequences]) if self.algorithm.kl_coef > 0 else None
        return policy_objective(
            rows_from_flat(logprobs, mask),
            aligned([s.old_logprobs for s in sequences]),
            ref,
            aligned([s.advantages for s in sequences]),
            mask,
            None if entropy is None else rows_from_flat(entropy, mask),
            self.algorithm,
            normaliser,
        )

    def push_weights(self, engine: RolloutEngine) -> None:
        """Send the updated policy to the rollout engine (after every update, spec §3.2)."""
        engine.update_weights(self.policy_state())

    def policy_state(self) -> dict[str, torch.Tensor]:
        """Weights to push to the rollout engine after an update: the full state dict, Hugging Face names
        (gathered from the partitions under ZeRO-3)."""
        if self.backend is not None:
            return self.backend.export_weights()
        return {k: v.detach() for k, v in self.model.state_dict().items()}
