"""Which policy a run starts from: the tiny default (built here) or a local checkpoint."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attnrl.config.schema import RunConfig
from attnrl.model.loading import load_tokenizer
from attnrl.model.tiny import build_tiny_model
from attnrl.model.tokenizer import build_tokenizer


def policy_tokenizer(config: RunConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of the configured policy, without loading its weights."""
    return build_tokenizer() if config.model.path is None else load_tokenizer(config.model.path)


def fresh_tiny_policy(config: RunConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A randomly initialised tiny model and its tokenizer, seeded from the run seed."""
    tokenizer = build_tokenizer()
    model = build_tiny_model(config.model.tiny, tokenizer, seed=config.seed)
    return model.to(dtype=getattr(torch, config.model.dtype)), tokenizer
