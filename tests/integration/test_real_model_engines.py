"""A published checkpoint, SmolLM2-135M-Instruct (`make fixtures`, scripts/fixtures.py), where the tiny model
cannot reach: its tokenizer (byte-level BPE, ChatML, ``<|im_end|>`` as EOS), FCI on Llama attention with
grouped queries (9 heads on 3), and sampled log-probs of the hf engine and of vLLM's CPU build equal to the
trainer's, before and after a weight push that changes the tied embedding."""

from __future__ import annotations

import copy

import pytest
import torch

from attnrl.config import resolve_config
from attnrl.model.loading import load_policy
from attnrl.rollout import GenerationRequest, SamplingParams, encode_prompt
from attnrl.rollout.factory import build_engine
from attnrl.steps import SeparatorVocab
from attnrl.training.backend import build_backend
from attnrl.training.trainer import PolicyTrainer, TrainSequence
from scripts.fixtures import SMOLLM2, fixture_dir
from tests.unit.test_fci import make_batch, naive_fci, streaming_fci

pytestmark = pytest.mark.integration

# 30 fp32 layers through different kernels (oneDNN and vLLM's paged attention against torch's SDPA): the
# differences measured here stay below 4e-5 (the test prints them); weights left unpushed move them by > 1e-2.
TOLERANCE = 2e-4
QUESTIONS = ("What is 2+3?", "Evaluate $\\log_464$.", "Simplify $\\sqrt{288}$.")


@pytest.fixture(scope="module")
def smollm2():
    path = fixture_dir(SMOLLM2)
    policy = load_policy(path)
    return policy.model, policy.tokenizer, path


def _config(*overrides: str):
    return resolve_config(preset="tiny", overrides=["data.max_prompt_tokens=128", *overrides])


def _trainer(model, tokenizer, lr=None):
    config = _config(*([f"train.lr={lr}"] if lr else []))
    return PolicyTrainer(model, build_backend("torch", model, config.train) if lr else None, reference=None,
                         pad_token_id=tokenizer.pad_token_id, algorithm=config.algorithm.model_copy(update={"kl_coef": 0.0}),
                         train=config.train, temperature=1.0)


def _requests(tokenizer) -> list[GenerationRequest]:
    return [GenerationRequest(tuple(encode_prompt(tokenizer, [{"role": "user", "content": q}])), n=2, group=q)
            for q in QUESTIONS]


def _check_engine(engine, trainer, tokenizer, *, some_stop: bool = True) -> float:
    """Samples end at ``<|im_end|>`` exactly when they stop (some do, for the published weights: ``some_stop``);
    their log-probs are the trainer's. Returns the worst gap."""
    requests = _requests(tokenizer)
    groups = engine.generate(requests, SamplingParams(max_new_tokens=24), seed=5)
    samples = [(r.prompt_ids, c) for r, group in zip(requests, groups, strict=True) for c in group]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for _, c in samples:
        assert (c.finish_reason == "stop") == (c.token_ids[-1:] == (eos,)) and eos not in c.token_ids[:-1]
    assert not some_stop or any(c.finish_reason == "stop" for _, c in samples), "no sample stopped: EOS is not <|im_end|>?"
    recomputed = trainer.logprobs([p for p, _ in samples], [c.token_ids for _, c in samples])
    return max(abs(a - b) for (_, c), values in zip(samples, recomputed, strict=True)
               for a, b in zip(c.logprobs, values, strict=True))


def test_the_tokenizer_is_the_published_one(smollm2):
    model, tokenizer, _ = smollm2
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.pad_token_id in tokenizer.all_special_ids  # padding is never a content token
    assert len(tokenizer) == model.config.vocab_size == 49_152
    ids = encode_prompt(tokenizer, [{"role": "user", "content": "What is 2+3?"}])
    text = tokenizer.decode(ids)
    # The template is applied once: one system turn (SmolLM2's default), one user turn, the assistant opened.
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    # Its BPE never merges "\n\n" across lines, so steps split at single newlines (spec §4's fallback).
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("a.\n\nb", add_special_tokens=False)) == ["a", ".", "Ċ", "Ċ", "b"]
    separators = SeparatorVocab.from_tokenizer(tokenizer)
    assert tokenizer.convert_tokens_to_ids("Ċ") in separators.single and separators.think_end_id is None
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.get_input_embeddings().weight
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.num_hidden_layers) == (9, 3, 30)


def test_fci_on_llama_attention_with_grouped_queries_equals_the_reference(smollm2):
    model, tokenizer, _ = smollm2
    inputs, segs = make_batch(tokenizer, [48, 40], seed=7)
    got, _, collector = streaming_fci(model, inputs, segs, 2, "mean_mean", block_size=16, mask_first_step=False)
    want = naive_fci(model, inputs, segs, 2, "mean_mean", mask_first_step=False)
    assert collector.layers_seen == 30
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    assert any(bool((g > 0).any()) for g in got)


def _updated(model, tokenizer, engine):
    """A copy of ``model`` after one real update on ``engine``'s samples (random ±1 advantages), and its trainer;
    the tied embedding, and so the head, has moved."""
    trained = copy.deepcopy(model)
    trainer = _trainer(trained, tokenizer, lr=1e-3)
    requests = _requests(tokenizer)
    groups = engine.generate(requests, SamplingParams(max_new_tokens=16), seed=6)
    sequences = [TrainSequence(r.prompt_ids, c.token_ids, c.logprobs, tuple([1.0 if i % 2 else -1.0] * len(c.token_ids)))
                 for r, group in zip(requests, groups, strict=True) for i, c in enumerate(group)]
    assert trainer.update(sequences)["optimizer_steps"] >= 1
    embedding = trained.get_input_embeddings().weight
    assert trained.lm_head.weight is embedding and not torch.equal(embedding, model.get_input_embeddings().weight)
    return trainer


def test_hf_engine_log_probs_equal_the_trainers_before_and_after_a_weight_push(smollm2):
    model, tokenizer, path = smollm2
    engine = build_engine(_config(), model_dir=path, tokenizer=tokenizer, max_new_tokens=24,
                          model=copy.deepcopy(model))
    worst = _check_engine(engine, _trainer(model, tokenizer), tokenizer)
    print(f"hf engine before the push: largest log-prob difference from the trainer {worst:.2e}")
    assert worst <= TOLERANCE
    trainer = _updated(model, tokenizer, engine)
    engine.update_weights(trainer.policy_state())
    worst = _check_engine(engine, trainer, tokenizer, some_stop=False)  # an update at lr 1e-3 may delay every stop
    print(f"hf engine after the push: largest log-prob difference from the trainer {worst:.2e}")
    assert worst <= TOLERANCE


def test_vllm_log_probs_equal_the_trainers_before_and_after_a_tied_weight_push(local_ray, smollm2):
    model, tokenizer, path = smollm2
    pool = build_engine(_config("rollout.engine=vllm", "rollout.vllm.max_num_seqs=16"), model_dir=path,
                        tokenizer=tokenizer, max_new_tokens=24)
    try:
        worst = _check_engine(pool, _trainer(model, tokenizer), tokenizer)
        print(f"vLLM before the push: largest log-prob difference from the trainer {worst:.2e}")
        assert worst <= TOLERANCE

        trainer = _updated(model, tokenizer, pool)
        # As a tied checkpoint stores it: no lm_head entry. The engine's head must follow the embedding anyway.
        pool.update_weights({k: v for k, v in trainer.policy_state().items() if k != "lm_head.weight"})
        worst = _check_engine(pool, trainer, tokenizer, some_stop=False)
        print(f"vLLM after the push: largest log-prob difference from the trainer {worst:.2e}")
        assert worst <= TOLERANCE
    finally:
        pool.close()
