from __future__ import annotations

import copy

import pytest
import torch

from attnrl.config.schema import WarmupConfig
from attnrl.warmup import IGNORE_INDEX, collate, learning_rate, response_loss, run_warmup, sft_example


def test_collate_puts_labels_on_response_tokens_only():
    from attnrl.warmup import SFTExample

    batch = collate([SFTExample((5, 6, 7), (8, 9)), SFTExample((5,), (8,))], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX] * 3 + [8, 9], [IGNORE_INDEX, 8] + [IGNORE_INDEX] * 3]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = WarmupConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(0, config) == pytest.approx(0.1)
    assert learning_rate(9, config) == pytest.approx(1.0)
    assert learning_rate(10, config) == pytest.approx(1.0)
    assert learning_rate(100, config) == pytest.approx(0.1)
    rates = [learning_rate(s, config) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_warmup_fits_a_solution(tiny_policy):
    model, tokenizer = tiny_policy
    model = copy.deepcopy(model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "3+5"}], add_generation_prompt=True)["input_ids"]
    example = sft_example(tokenizer, prompt, "8\n\n\\boxed{8}")
    assert example.response_ids[-1] == tokenizer.eos_token_id
    batch = collate([example], tokenizer.pad_token_id)
    with torch.no_grad():
        before = response_loss(model, batch).item()
    config = WarmupConfig(steps=30, batch_size=2, lr=3e-3, warmup_steps=2, threads=1, log_every=10)
    history = run_warmup(model, [example], config, pad_token_id=tokenizer.pad_token_id, seed=0)
    with torch.no_grad():
        after = response_loss(model, batch).item()
    assert [row["step"] for row in history] == [10, 20, 30]
    assert after < before / 2
    assert not model.training


def test_warmup_needs_examples(tiny_policy):
    model, tokenizer = tiny_policy
    with pytest.raises(ValueError):
        run_warmup(model, [], WarmupConfig(steps=1), pad_token_id=0, seed=0)
