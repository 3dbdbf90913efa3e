"""Per-token log-probs and entropies of a causal LM without [tokens × vocabulary] logits (spec §10.2, §11).

The decoder runs once. Its final hidden states at the positions that predict response tokens are
gathered ([N, hidden]; prompt and padding positions never reach the head), and the LM head is
applied to ``chunk_tokens`` of them at a time: logits in fp32, divided by the sampling temperature
(as verl's actor does, so log-probs match the engine's), reduced to log π(target) and, if asked,
the full-vocabulary entropy, then dropped. Logit memory is O(chunk × vocabulary) instead of
O(batch × length × vocabulary): one 9 k-token sequence of the 1.5B model (vocabulary 151,936)
would otherwise hold 5.6 GB of fp32 logits, a 24-sequence micro-batch over 100 GB.

With gradients, every chunk runs under non-reentrant activation checkpointing: the forward keeps
only the chunk's hidden states, the backward recomputes that chunk's logits and frees them again,
so one chunk's logits are the peak of the update as well (the idea of verl's chunked entropy and
fused linear cross-entropy and of OpenRLHF's chunked logsumexp). The head *module* is called inside
the checkpoint, not its weight, because DeepSpeed ZeRO-3 gathers partitioned parameters in module
hooks, which then fire on the recompute too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

# HF configs that rescale logits after the head; the chunked head would silently drop that step.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def head_calls(tokens: int, chunk_tokens: int) -> int:
    """How many times ``chunked_token_stats`` runs the head over ``tokens`` positions (at least once)."""
    return max(1, -(-tokens // chunk_tokens))


def chunked_token_stats(
    head: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    *,
    temperature: float,
    chunk_tokens: int,
    with_entropy: bool,
    calls: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """log π(target) [N] and (``with_entropy``) entropy [N] from ``hidden`` [N, H] through ``head``, chunk by chunk.

    ``calls`` (at least ``head_calls(N, chunk_tokens)``) fixes how many times the head module runs: the
    same chunks as without it, then calls that see no positions. Data-parallel ranks under
    ZeRO-3 gather the head's partitioned weights in each call (and again in each recompute of the
    backward), so they must all make the same number (``PolicyTrainer.lockstep``).
    """
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states but {targets.shape[0]} targets")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    tokens = hidden.shape[0]
    needed = head_calls(tokens, chunk_tokens)
    calls = needed if calls is None else calls
    if calls < needed:
        raise ValueError(f"{tokens} positions need {needed} head calls of {chunk_tokens}; got calls={calls}")
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    logprobs, entropies = [], []
    for k in range(calls):
        h, t = hidden[k * chunk_tokens:(k + 1) * chunk_tokens], targets[k * chunk_tokens:(k + 1) * chunk_tokens]
        if grad:
            logprob, entropy = checkpoint(_chunk_with_grad, head, h, t, temperature, with_entropy,
                                          use_reentrant=False, preserve_rng_state=False)
        else:
            logprob, entropy = _chunk_no_grad(head, h, t, temperature, with_entropy)
        logprobs.append(logprob)
        entropies.append(entropy)
    return torch.cat(logprobs), torch.cat(entropies) if with_entropy else None


def _chunk_with_grad(head: nn.Module, h: Tensor, t: Tensor, temperature: float, with_entropy: bool):
    logits = head(h).float() / temperature
    logprob = logits.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    if not with_entropy:
        return logprob, None
    logp = torch.log_softmax(logits, dim=-1)
    return logprob, -(logp.exp() * logp).sum(dim=-1)


@torch.no_grad()
def _chunk_no_grad(head: nn.Module, h: Tensor, t: Tensor, temperature: float, with_entropy: bool):
    logits = head(h).float()
    # In place from here on: this pass owns its logits, and each [chunk, V] temporary avoided is
    # as large as the logits themselves.
    logits.div_(temperature)
    lse = torch.logsumexp(logits, dim=-1)
    logprob = logits.gather(-1, t[:, None]).squeeze(-1).sub_(lse)
    if not with_entropy:
        return logprob, None
    logp = logits.sub_(lse[:, None])
    # H = −Σ p·log p with the product formed in p's buffer: two [chunk, V] buffers in all. torch's
    # sum, not a GEMV: over 151,936 terms its pairwise summation is what keeps fp32 within 1e-6.
    return logprob, logp.exp().mul_(logp).sum(dim=-1).neg_()


class ResponseScorer(nn.Module):
    """A causal LM whose forward returns per-token log-probs (and entropies) of given target tokens.

    ``forward`` takes the fields of a ``sequences.ModelBatch``; the update calls it through the
    optimisation backend (a DeepSpeed engine wraps this module, so its hooks see the whole pass),
    the no-grad passes call it directly. It owns no parameters besides the LM's (``self.lm``).
    """

    def __init__(self, lm: PreTrainedModel, chunk_tokens: int) -> None:
        super().__init__()
        for name in _LOGIT_TRANSFORMS:
            if getattr(lm.config, name, None) not in (None, 1.0):
                raise ValueError(f"{type(lm).__name__} transforms its logits ({name}); the chunked head does not")
        if lm.get_output_embeddings() is None:
            raise ValueError(f"{type(lm).__name__} has no LM head (get_output_embeddings() is None)")
        self.lm = lm
        self.chunk_tokens = chunk_tokens

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        logit_index: Tensor,
        targets: Tensor,
        *,
        temperature: float,
        with_entropy: bool,
        head_calls: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        out = self.lm.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        hidden = out.last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, logit_index)
        return chunked_token_stats(self.lm.get_output_embeddings(), hidden, targets, temperature=temperature,
                                   chunk_tokens=self.chunk_tokens, with_entropy=with_entropy, calls=head_calls)
