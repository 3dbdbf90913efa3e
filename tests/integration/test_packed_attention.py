"""FlexAttention, the trainer's attention on CUDA (``model.attn_implementation: auto``), keeps packed sequences
apart: padding-free log-probs equal the left-padded SDPA ones. On CPU FlexAttention runs forward only (torch has
no CPU backward for it) and compiles on first use (~15 s), hence an integration test."""

from __future__ import annotations

import pytest
import torch

from attnrl.config import resolve_config
from attnrl.model.loading import attention_implementation
from attnrl.training.trainer import PolicyTrainer, uses_padding_free

PROMPTS = [(5, 6, 7), (5, 6), (7,), (6, 5, 7, 7)]
RESPONSES = [(8, 9, 10, 14, 9), (9, 9), (8, 8, 8, 9, 9, 9, 9), (11, 12)]


def test_auto_picks_flex_attention_on_cuda_and_sdpa_on_cpu():
    assert attention_implementation("auto", torch.device("cuda", 3)) == "flex_attention"
    assert attention_implementation("auto", torch.device("cpu")) == "sdpa"
    assert attention_implementation("eager", torch.device("cuda", 0)) == "eager"
    assert uses_padding_free("auto", "flex_attention") and not uses_padding_free("auto", "sdpa")


def test_flex_attention_keeps_packed_sequences_apart(tiny_policy):
    model, tokenizer = tiny_policy
    config = resolve_config(preset="tiny")
    results = {}
    original = model.config._attn_implementation
    try:
        for implementation, packing in (("sdpa", "left_padded"), ("flex_attention", "auto")):
            model.set_attn_implementation(implementation)
            train = config.train.model_copy(update={"packing": packing})
            trainer = PolicyTrainer(model, None, reference=None, pad_token_id=tokenizer.pad_token_id,
                                    algorithm=config.algorithm, train=train, temperature=1.0)
            layouts = [b.padding_free for _, b, _ in trainer._micro_batches(PROMPTS, RESPONSES, implementation)]
            assert layouts == [implementation == "flex_attention"]  # one row of four sequences when packed
            results[implementation] = trainer.logprobs(PROMPTS, RESPONSES)
    finally:
        model.set_attn_implementation(original)
    for packed, padded in zip(results["flex_attention"], results["sdpa"], strict=True):
        assert packed == pytest.approx(padded, abs=1e-5)
