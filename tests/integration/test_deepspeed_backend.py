"""The DeepSpeed backend on CPU: starts without JIT-compiling ops and trains like plain AdamW."""

from __future__ import annotations

import copy

import torch

from attnrl.config import resolve_config
from attnrl.training.backend import TorchBackend, build_backend
from attnrl.training.trainer import PolicyTrainer, TrainSequence


def _trainer(model, backend, config, tokenizer):
    return PolicyTrainer(model, backend, reference=None, pad_token_id=tokenizer.pad_token_id,
                         algorithm=config.algorithm, train=config.train, temperature=1.0)


def test_deepspeed_zero0_update_matches_torch_adamw(tiny_policy):
    model, tokenizer = tiny_policy
    config = resolve_config(preset="tiny", overrides=[
        "algorithm.kl_coef=0", "train.lr=1e-2", "train.mini_batch_sequences=3", "train.micro_batch_sequences=2",
    ])
    sequences = [
        TrainSequence((5, 6, 7), (8, 9, 10, 0), (-2.0, -1.5, -3.0, -0.5), (1.0, 1.0, -0.5, 0.3)),
        TrainSequence((5, 6), (9, 9), (-2.5, -2.0), (-1.0, -1.0)),
        TrainSequence((7,), (8, 8, 8), (-1.0, -1.0, -1.0), (0.5, 0.0, 0.5)),
        TrainSequence((7, 7), (11,), (-3.0,), (2.0,)),
    ]
    plain_model, ds_model = copy.deepcopy(model), copy.deepcopy(model)
    plain = _trainer(plain_model, TorchBackend(plain_model, config.train), config, tokenizer)
    backend = build_backend("deepspeed", ds_model, config.train)
    deep = _trainer(ds_model, backend, config, tokenizer)
    for _ in range(2):
        plain_stats = plain.update(sequences)
        deep_stats = deep.update(sequences)
    assert deep_stats["optimizer_steps"] == plain_stats["optimizer_steps"] == 2
    assert abs(deep_stats["grad_norm"] - plain_stats["grad_norm"]) < 1e-4
    for (name, a), b in zip(plain_model.state_dict().items(), ds_model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), ds_model.state_dict().values()))
    # Optimizer state round-trips for checkpoints.
    state = backend.state_dict()
    backend.load_state_dict(state)
    assert backend.state_dict()["state"].keys() == state["state"].keys()


def test_zero_stage_1_trains_and_its_optimizer_state_round_trips(tiny_policy):
    model, tokenizer = tiny_policy
    config = resolve_config(preset="tiny", overrides=[
        "algorithm.kl_coef=0", "train.zero_stage=1", "train.mini_batch_sequences=2", "train.micro_batch_sequences=1",
    ])
    ds_model = copy.deepcopy(model)
    backend = build_backend("deepspeed", ds_model, config.train)
    trainer = _trainer(ds_model, backend, config, tokenizer)
    sequences = [TrainSequence((5, 6), (8, 9), (-2.0, -2.0), (1.0, 1.0)), TrainSequence((7,), (9,), (-1.0,), (-1.0,))]
    assert trainer.update(sequences)["optimizer_steps"] == 1
    state = backend.state_dict()
    backend.load_state_dict(state)
    assert trainer.update(sequences)["optimizer_steps"] == 1


def test_zero_stage_3_is_refused_with_the_field_named(tiny_policy):
    import pytest

    from attnrl.errors import ConfigError

    config = resolve_config(preset="tiny", overrides=["train.zero_stage=3"])
    with pytest.raises(ConfigError, match="train.zero_stage"):
        build_backend("deepspeed", copy.deepcopy(tiny_policy[0]), config.train)
