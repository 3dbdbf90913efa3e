"""The policy objective: PPO clip-higher with dual clip, k3 KL to the reference, entropy bonus (spec §11).

All functions work on padded tensors of shape [batch, T] with a float ``mask`` (1 = valid response
token, 0 = padding). Values at padded positions never reach the result, even if they are NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean")

LOG_RATIO_CLAMP = 20.0  # spec §11: log-ratios are clamped to ±20 before exp
KL_VALUE_CLAMP = 10.0  # spec §11: k3 values are clamped to [−10, 10]


class LossConfig(Protocol):
    """What ``policy_objective`` reads; ``attnrl.config.schema.AlgorithmConfig`` satisfies it."""

    clip_low: float
    clip_high: float
    dual_clip: float
    kl_coef: float
    entropy_coef: float
    loss_aggregation: str


@dataclass(frozen=True)
class LossSettings:
    """A standalone ``LossConfig`` with the spec §12 defaults (clip 0.2/0.28, dual clip 3, KL 0.001)."""

    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 3.0
    kl_coef: float = 0.001
    entropy_coef: float = 0.0
    loss_aggregation: str = "token_mean"


@dataclass(frozen=True)
class Normaliser:
    """The denominators of one mini-batch's aggregate, for an exact loss over any split into micro-batches.

    A micro-batch's term is the *sum* of its per-token (``token_mean``) or per-sequence
    (``seq_mean_token_mean``) values divided by the mini-batch's valid ``tokens`` or ``sequences``, so
    the micro-batch losses of a mini-batch add up to exactly its loss, and so do their gradients,
    however the mini-batch is split (spec §11 / AMBIG-11: verl's size-weighted mean of
    micro-batch means is not the global token mean).
    """

    tokens: float
    sequences: float

    @classmethod
    def of(cls, response_lengths: Sequence[int]) -> Normaliser:
        """For a mini-batch whose sequences have these numbers of valid response tokens."""
        if any(n < 0 for n in response_lengths):
            raise ValueError(f"response lengths must be >= 0, got {list(response_lengths)}")
        return cls(tokens=float(sum(response_lengths)), sequences=float(sum(1 for n in response_lengths if n > 0)))

    def per_rank(self, world_size: int) -> Normaliser:
        """The denominators for one of ``world_size`` data-parallel ranks, whose gradients DeepSpeed
        averages: dividing by count / world makes that average the whole mini-batch's exact gradient."""
        return Normaliser(tokens=self.tokens / world_size, sequences=self.sequences / world_size)


def aggregate(values: Tensor, mask: Tensor, mode: str, normaliser: Normaliser | None = None) -> Tensor:
    """Reduce per-token ``values`` to a scalar over the valid tokens (spec §11, AMBIG-11).

    * ``token_mean``: masked mean over all valid tokens of the batch (the code, all methods);
    * ``seq_mean_token_mean``: each sequence's masked token mean, then the mean over sequences (the
      per-sequence 1/|o_i| of paper Eq. 1). Rows without any valid token are left out of the mean.

    With a ``normaliser`` the batch is one micro-batch of a larger mini-batch: the sums are divided
    by the mini-batch's token or sequence count instead of this batch's own (see ``Normaliser``).
    An all-padding batch gives 0 (with a graph), not NaN.
    """
    _check_same_shape(values=values, mask=mask)
    mask = mask.to(values.dtype)  # a bool mask would make the counts integer
    masked = torch.where(mask > 0, values * mask, torch.zeros_like(values))  # where: NaN at pads must not leak
    if mode == "token_mean":
        count = mask.sum() if normaliser is None else _as_count(normaliser.tokens, values)
        return masked.sum() / _safe_count(count)
    if mode == "seq_mean_token_mean":
        if values.dim() != 2:
            raise ValueError(f"seq_mean_token_mean needs [batch, T] values, got shape {tuple(values.shape)}")
        per_token_counts = mask.sum(dim=-1)
        per_sequence = masked.sum(dim=-1) / _safe_count(per_token_counts)
        has_tokens = (per_token_counts > 0).to(values.dtype)
        count = has_tokens.sum() if normaliser is None else _as_count(normaliser.sequences, values)
        return (per_sequence * has_tokens).sum() / _safe_count(count)
    raise ValueError(f"unknown loss aggregation {mode!r}; known: {', '.join(AGGREGATIONS)}")


def _as_count(count: float, like: Tensor) -> Tensor:
    return torch.tensor(count, dtype=like.dtype, device=like.device)


def _safe_count(count: Tensor) -> Tensor:
    # A zero count only occurs with a zero numerator; dividing by "tiny" then yields 0 instead of NaN,
    # and leaves every real count (>= 1 for a 0/1 mask) unchanged.
    return count.clamp_min(torch.finfo(count.dtype).tiny)


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


def _masked_mean(values: Tensor, mask: Tensor, normaliser: Normaliser | None) -> float:
    """Detached token mean, for statistics (a micro-batch's share of it with a ``normaliser``)."""
    return float(aggregate(values.detach().to(torch.float32), mask.detach().to(torch.float32), "token_mean",
                           normaliser))


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float,
    aggregation: str,
    normaliser: Normaliser | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clip-higher policy-gradient loss with dual clip for negative advantages (spec §11).

    Per token, with r = exp(clamp(logp − old_logp, ±20)):
    loss = max(−A·r, −A·clip(r, 1 − clip_low, 1 + clip_high)); for A < 0 also loss = min(loss, −A·dual_clip),
    which bounds how hard a very off-policy token with a negative advantage can push (spec §10.2: the only
    off-policy control is this clipping).

    Stats (token means over valid tokens): ``clip_fraction`` (the clipped term is the active one),
    ``dual_clip_fraction`` (A < 0 and the dual clip is active), ``approx_kl`` (mean of old − new log-prob,
    after the ±20 clamp) and ``ratio_mean``. With a ``normaliser``, loss and stats are this micro-batch's
    shares of the mini-batch's values (they add up over its micro-batches).
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if not (clip_low > 0 and clip_high > 0):
        raise ValueError(f"clip_low and clip_high must be > 0, got {clip_low}, {clip_high}")
    if not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (spec §11: 3.0), got {dual_clip}")

    log_ratio = torch.clamp(logprobs - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clip_loss = torch.maximum(unclipped, clipped)
    dual_bound = -advantages * dual_clip
    negative = advantages < 0
    per_token = torch.where(negative, torch.minimum(clip_loss, dual_bound), clip_loss)

    loss = aggregate(per_token, mask, aggregation, normaliser)
    stats = {
        "clip_fraction": _masked_mean((clipped > unclipped).float(), mask, normaliser),
        "dual_clip_fraction": _masked_mean((negative & (clip_loss > dual_bound)).float(), mask, normaliser),
        "approx_kl": _masked_mean(-log_ratio, mask, normaliser),
        "ratio_mean": _masked_mean(ratio, mask, normaliser),
    }
    return loss, stats


def k3_kl_per_token(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 ("low_var_kl") estimate of KL(π ‖ π_ref) per token: e^d − d − 1 with d = ref − logp (spec §11).

    d is clamped to ±20 and the value to [−10, 10], so one wildly diverged token cannot dominate the loss.
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    diff = torch.clamp(ref_logprobs - logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.clamp(torch.exp(diff) - diff - 1.0, -KL_VALUE_CLAMP, KL_VALUE_CLAMP)


def k3_kl(
    logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, aggregation: str, normaliser: Normaliser | None = None
) -> Tensor:
    """The k3 KL-to-reference loss term, aggregated like the policy loss (spec §11)."""
    return aggregate(k3_kl_per_token(logprobs, ref_logprobs), mask, aggregation, normaliser)


def _upcast(logits: Tensor) -> Tensor:
    # bf16/fp16 softmax over a large vocabulary loses too much precision (spec §11 trains under bf16 autocast).
    if logits.is_floating_point() and torch.finfo(logits.dtype).bits < 32:
        return logits.float()
    return logits


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Full-vocabulary entropy per position, −Σ p·log p over the last dimension (spec §6.6, §11).

    Computed from log-softmax, so large logits do not overflow; ``-inf`` logits (banned tokens) count as
    p = 0 and give neither NaN values nor NaN gradients. Returns float32 for half-precision input.
    """
    logp = torch.log_softmax(_upcast(logits), dim=-1)
    p = logp.exp()
    # 0·(−inf) is NaN; zero the log where p == 0 so that both the value and its gradient stay finite.
    safe_logp = logp.masked_fill(p == 0, 0.0)
    return -(p * safe_logp).sum(dim=-1)


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log π(target) per position: logits [..., V], integer targets [...] -> [...] (spec §10.2)."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    logits = _upcast(logits)
    # gather − logsumexp avoids materialising a second [..., V] tensor of log-probs.
    picked = torch.gather(logits, -1, targets.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def policy_objective(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    entropy: Tensor | None,
    config: LossConfig,
    normaliser: Normaliser | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Total loss = pg − entropy_coef·entropy + kl_coef·kl, every term aggregated the same way (spec §11).

    ``config`` is anything with the ``LossConfig`` attributes (``AlgorithmConfig`` or ``LossSettings``).
    ``ref_logprobs`` is required when ``kl_coef > 0`` and ``entropy`` when ``entropy_coef > 0``; when
    given with a zero coefficient they are still reported in the stats. ``normaliser``: see ``aggregate``.
    """
    if config.kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={config.kl_coef} needs ref_logprobs")
    if config.entropy_coef > 0 and entropy is None:
        raise ValueError(f"entropy_coef={config.entropy_coef} needs entropy")
    aggregation = config.loss_aggregation

    pg_loss, stats = ppo_clip_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_low=config.clip_low,
        clip_high=config.clip_high,
        dual_clip=config.dual_clip,
        aggregation=aggregation,
        normaliser=normaliser,
    )
    total = pg_loss
    stats["pg_loss"] = float(pg_loss.detach())
    if entropy is not None:
        entropy_term = aggregate(entropy, mask, aggregation, normaliser)
        stats["entropy"] = float(entropy_term.detach())
        if config.entropy_coef > 0:  # skip the graph when the bonus is off (spec §12: coefficient 0)
            total = total - config.entropy_coef * entropy_term
    if ref_logprobs is not None:
        kl_term = k3_kl(logprobs, ref_logprobs, mask, aggregation, normaliser)
        stats["kl"] = float(kl_term.detach())
        if config.kl_coef > 0:
            total = total + config.kl_coef * kl_term
    stats["loss"] = float(total.detach())
    return total, stats
