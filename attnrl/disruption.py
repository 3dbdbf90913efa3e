"""Attention disruption: generation that cannot see one step (spec §5.3 ``disrupted_token_ranges``; P §3.1.2, Fig. 3).

The paper's evidence that high-FCI steps matter: zero the attention that every query pays to one step's key
tokens, after the softmax and without renormalising (as the official ``eager_attention_forward`` does), let
the model write the rest of the response, and see how much accuracy drops. Not part of training.

``DisruptedAttention(model, length)`` runs every attention layer of ``model`` inside the block as eager
attention with the weights of the last ``length`` tokens of the prompt zeroed, in every layer and head, for
every query: the disrupted step is the end of the prefix that generation continues from. Each generation
call starts with a forward over the whole (left-padded) prompt, whose length fixes the columns; the decode
steps that follow keep them. ``length = 0`` is the same eager attention with nothing zeroed: the control.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
from torch import Tensor

from attnrl.model.attention_swap import AttentionSwap

_NAME = "attnrl_disrupted_eager"  # "eager" in the name: transformers keys its implementation checks on it
_ACTIVE: dict[int, DisruptedAttention] = {}  # module id -> the block its model is in


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    def attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs):
        block = _ACTIVE.get(id(module))
        if block is None:
            raise RuntimeError(f"{_NAME} is the attention of a model inside DisruptedAttention; this one is not")
        return block._attend(query, key, value, attention_mask, kwargs.get("scaling")), None

    AttentionInterface.register(_NAME, attention)
    AttentionMaskInterface.register(_NAME, eager_mask)  # the additive [batch, 1, q, k] mask, padding included


class DisruptedAttention:
    """Zero the attention to the last ``length`` prompt tokens in every layer of ``model`` (see the module doc)."""

    def __init__(self, model: torch.nn.Module, length: int) -> None:
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.model = model
        self.length = length
        self.width: int | None = None  # the prompt's padded length, from the call's first (whole-prompt) forward
        self._swap: AttentionSwap | None = None

    def __enter__(self) -> DisruptedAttention:
        if self.model.config._attn_implementation == _NAME:
            raise RuntimeError("this model is already inside DisruptedAttention")
        _register()
        self._swap = AttentionSwap(self.model, _NAME, _ACTIVE, self)
        self._swap.enter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._swap is not None:
            self._swap.exit()
            self._swap = None

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float | None) -> Tensor:
        heads, kv_heads, keys = query.shape[1], key.shape[1], key.shape[2]
        if query.shape[2] == keys:  # a forward over the whole prompt: a new generation call (or a plain forward)
            self.width = keys
        if self.width is None:
            raise RuntimeError("DisruptedAttention saw a cached decode step before any whole-prompt forward")
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = torch.matmul(query, key.transpose(2, 3)).float() * scale
        if mask is not None:
            scores = scores + mask[:, :, :, :keys].float()
        probs = torch.softmax(scores, dim=-1)
        if self.length:
            probs[..., self.width - self.length : self.width] = 0.0  # after the softmax: not renormalised
        return torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous()
