"""``RolloutScorer``: an engine scores what it sampled exactly as the trainer would (spec §3.2, §10.2)."""

from __future__ import annotations

import copy

import pytest

from attnrl.config import resolve_config
from attnrl.rollout import GenerationRequest, SamplingParams
from attnrl.rollout.engine import Completion
from attnrl.rollout.hf_engine import HFRolloutEngine
from attnrl.rollout.scoring import RolloutScorer, ScoringSpec
from attnrl.steps import SeparatorVocab
from attnrl.training.trainer import PolicyTrainer


def _spec(config, tokenizer) -> ScoringSpec:
    return ScoringSpec(algorithm=config.algorithm, train=config.train, temperature=1.0,
                       pad_token_id=tokenizer.pad_token_id, separators=SeparatorVocab.from_tokenizer(tokenizer),
                       with_fci=False)


def test_engine_side_behaviour_logprobs_are_the_trainers_and_empty_completions_stay_empty(tiny_policy):
    model, tokenizer = tiny_policy
    config = resolve_config(preset="tiny", overrides=["train.max_tokens_per_micro_batch=48"])
    engine = HFRolloutEngine(copy.deepcopy(model), pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, vocab_size=len(tokenizer))
    requests = [GenerationRequest(tuple(tokenizer.encode(t)), n=2) for t in ("1+2", "3+4+5+6", "7")]
    groups = engine.generate(requests, SamplingParams(temperature=1.0, max_new_tokens=12), seed=3)
    empty = Completion((), (), "length")  # an out-of-vocabulary first id (spec §5.4)
    groups[1] = [groups[1][0], empty]
    scorer = RolloutScorer(engine.model, _spec(config, tokenizer))

    logprobs = scorer.run("logprobs", requests, groups)
    assert [[v is None for v in group] for group in logprobs] == [[False, False], [False, True], [False, False]]
    trainer = PolicyTrainer(copy.deepcopy(model), None, reference=None, pad_token_id=tokenizer.pad_token_id,
                            algorithm=config.algorithm, train=config.train, temperature=1.0)
    flat = [(r, c) for r, group in zip(requests, groups) for c in group if c.token_ids]
    expected = trainer.logprobs([r.prompt_ids for r, _ in flat], [c.token_ids for _, c in flat])
    assert [v for group in logprobs for v in group if v is not None] == expected  # bit for bit
    # The full scores carry the same log-probs.
    sequences = scorer.run("sequences", requests, groups)
    assert [s.logprobs for group in sequences for s in group if s is not None] == expected

    with pytest.raises(ValueError, match="unknown score kind 'entropy'; known: sequences, logprobs"):
        scorer.run("entropy", requests, groups)
