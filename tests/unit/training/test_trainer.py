"""The trainer's scoring forward and PPO update on the tiny model."""

from __future__ import annotations

import copy

import pytest
import torch

from attnrl.config import resolve_config
from attnrl.rollout import GenerationRequest, SamplingParams, encode_prompt
from attnrl.rollout.hf_engine import HFRolloutEngine
from attnrl.steps import SeparatorVocab, segment_response
from attnrl.training.backend import TorchBackend, build_backend
from attnrl.training.trainer import PolicyTrainer, TrainSequence
from attnrl.errors import ConfigError


def _trainer(model, tokenizer, *overrides, temperature=1.0):
    config = resolve_config(preset="tiny", overrides=["train.micro_batch_sequences=2", "train.mini_batch_sequences=3", *overrides])
    return PolicyTrainer(model, TorchBackend(model, config.train), reference=copy.deepcopy(model),
                         pad_token_id=tokenizer.pad_token_id, algorithm=config.algorithm, train=config.train,
                         temperature=temperature)


def test_scoring_forward_matches_the_engines_behaviour_logprobs(tiny_policy):
    model, tokenizer = tiny_policy
    engine = HFRolloutEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    prompts = [tuple(encode_prompt(tokenizer, [{"role": "user", "content": q}])) for q in ("1+2", "3+4+5+6")]
    params = SamplingParams(temperature=0.8, max_new_tokens=20)
    groups = engine.generate([GenerationRequest(p, n=3) for p in prompts], params, seed=4)
    flat_prompts = [p for p, group in zip(prompts, groups) for _ in group]
    responses = [c.token_ids for group in groups for c in group]
    vocab = SeparatorVocab.from_tokenizer(tokenizer)
    segmentations = [segment_response(r, len(p), vocab) for p, r in zip(flat_prompts, responses)]
    scored = _trainer(copy.deepcopy(model), tokenizer, temperature=0.8).score(flat_prompts, responses, segmentations)
    for completion, score, seg in zip([c for g in groups for c in g], scored, segmentations):
        assert torch.allclose(torch.tensor(score.logprobs), torch.tensor(completion.logprobs), atol=1e-5)
        assert len(score.entropies) == len(completion.token_ids) and min(score.entropies) >= 0
        assert score.fci is not None and len(score.fci) == seg.num_steps + 1 and score.fci[0] == 0.0


def test_update_runs_one_optimizer_step_per_mini_batch_and_moves_the_policy(tiny_policy):
    model, tokenizer = tiny_policy
    model = copy.deepcopy(model)
    trainer = _trainer(model, tokenizer, "train.lr=1e-2")
    before = copy.deepcopy(model.state_dict())
    prompt = tuple(encode_prompt(tokenizer, [{"role": "user", "content": "1+2"}]))
    sequences = [TrainSequence(prompt, (10, 11, 12), (-4.0, -4.0, -4.0), (1.0, 1.0, 1.0)) for _ in range(7)]
    refs = trainer.logprobs([s.prompt_ids for s in sequences], [s.response_ids for s in sequences], reference=True)
    sequences = [TrainSequence(s.prompt_ids, s.response_ids, s.old_logprobs, s.advantages, r) for s, r in zip(sequences, refs)]
    stats = trainer.update(sequences)
    assert stats["optimizer_steps"] == 3  # ceil(7 / 3)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Positive advantages on these tokens make them more likely.
    after = trainer.logprobs([prompt], [(10, 11, 12)])[0]
    assert sum(after) > sum(refs[0])


def test_kl_needs_a_reference_and_unknown_backends_are_listed(tiny_policy):
    model, tokenizer = tiny_policy
    config = resolve_config(preset="tiny")
    with pytest.raises(ValueError, match="reference"):
        PolicyTrainer(model, TorchBackend(model, config.train), reference=None, pad_token_id=0,
                      algorithm=config.algorithm, train=config.train, temperature=1.0)
    with pytest.raises(ConfigError, match="known: deepspeed, torch"):
        build_backend("fsdp", model, config.train)


def test_mixed_precision_is_bf16_autocast_over_fp32_weights(tiny_policy):
    from attnrl.training.backend import autocast_dtype

    model, tokenizer = tiny_policy
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    settings = {mode: resolve_config(preset="tiny", overrides=[f"train.precision={mode}"]).train for mode in ("bf16", "fp32", "auto")}
    assert autocast_dtype(settings["bf16"], cpu) is torch.bfloat16
    assert autocast_dtype(settings["fp32"], cuda) is None
    assert autocast_dtype(settings["auto"], cpu) is None
    fp32 = _trainer(copy.deepcopy(model), tokenizer)
    bf16 = PolicyTrainer(copy.deepcopy(model), None, reference=None, pad_token_id=tokenizer.pad_token_id,
                         algorithm=fp32.algorithm, train=fp32.train_config,
                         temperature=1.0, autocast=torch.bfloat16)
    prompt = tuple(encode_prompt(tokenizer, [{"role": "user", "content": "1+2"}]))
    exact = fp32.logprobs([prompt], [(10, 11, 12)])[0]
    approx = bf16.logprobs([prompt], [(10, 11, 12)])[0]
    assert next(bf16.model.parameters()).dtype is torch.float32
    assert exact != approx and max(abs(a - b) for a, b in zip(exact, approx)) < 0.1
    with pytest.raises(ValueError, match="only scores"):
        bf16.update([TrainSequence(prompt, (10,), (-1.0,), (1.0,))])
