"""Turning problems into prompt token ids and response tokens back into text (spec §2.4)."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> list[int]:
    """Apply the chat template with the generation prompt (verl's RLHFDataset does the same)."""
    encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(i) for i in ids]


def decode_response(tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int]) -> str:
    """Response text as the verifier sees it: special tokens (EOS) dropped (spec §8)."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=True)
