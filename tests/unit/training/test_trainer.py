"""The trainer's scoring forward and PPO update on the tiny model."""

from __future__ import annotations

import copy

import pytest
import torch

from attnrl.config import resolve_config
from attnrl.rollout import GenerationRequest, SamplingParams, encode_prompt
from attnrl.rollout.hf_engine import HFRolloutEngine
from attnrl.steps import SeparatorVocab, segment_response
from attnrl.training.backend import TorchBackend, build_backend, enable_activation_checkpointing
from attnrl.training.chunked_head import ResponseScorer
from attnrl.training.trainer import PolicyTrainer, TrainSequence
from attnrl.errors import ConfigError


def _trainer(model, tokenizer, *overrides, temperature=1.0):
    config = resolve_config(preset="tiny", overrides=["train.max_tokens_per_micro_batch=48", "train.mini_batch_sequences=3", *overrides])
    return PolicyTrainer(model, build_backend("torch", model, config.train), reference=copy.deepcopy(model),
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
        PolicyTrainer(model, build_backend("torch", model, config.train), reference=None, pad_token_id=0,
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


class _RecordingBackend(TorchBackend):
    """Plain AdamW that also keeps the accumulated gradient of every optimizer step."""

    def step(self) -> float:
        self.grads.append({n: p.grad.clone() for n, p in self.scorer.lm.named_parameters()})
        return super().step()


def _sequences(seed: int) -> list[TrainSequence]:
    rng = torch.Generator().manual_seed(seed)
    out = []
    for prompt_len, response_len in [(3, 7), (2, 1), (5, 4), (1, 6), (4, 2), (2, 5)]:
        prompt = tuple(torch.randint(4, 30, (prompt_len,), generator=rng).tolist())
        response = tuple(torch.randint(4, 30, (response_len,), generator=rng).tolist())
        noise = torch.randn(3, response_len, generator=rng)
        out.append(TrainSequence(prompt, response, tuple((noise[0] - 3).tolist()), tuple(noise[1].tolist()),
                                 tuple((noise[2] - 3).tolist())))
    return out


def _tree_sequences(seed: int) -> list[TrainSequence]:
    """Two questions' trees in by-question order: responses, continuations that repeat a prefix of one (their
    shared tokens carry other old log-probs: θ_k against θ_{k-1}, spec §3.2), and a response sampled twice."""
    rng = torch.Generator().manual_seed(seed)
    out = []
    for prompt_len in (4, 3):
        prompt = tuple(torch.randint(4, 30, (prompt_len,), generator=rng).tolist())
        responses = [tuple(torch.randint(4, 30, (n,), generator=rng).tolist()) for n in (6, 5)]
        paths = [*responses, responses[1], responses[0][:2] + (31, 32, 33), responses[0][:4] + (34,)]
        for response in paths:
            noise = torch.randn(3, len(response), generator=rng)
            out.append(TrainSequence(prompt, response, tuple((noise[0] - 3).tolist()), tuple(noise[1].tolist()),
                                     tuple((noise[2] - 3).tolist())))
    return out


def _step_gradients(model, tokenizer, overrides, *, checkpointing=False, sequences=None):
    config = resolve_config(preset="tiny", overrides=["train.mini_batch_sequences=4", "algorithm.entropy_coef=0.01",
                                                      *overrides])
    model = copy.deepcopy(model)
    if checkpointing:
        enable_activation_checkpointing(model)
    backend = _RecordingBackend(ResponseScorer(model, config.train.logits_chunk_tokens), config.train)
    backend.grads = []
    trainer = PolicyTrainer(model, backend, reference=copy.deepcopy(model), pad_token_id=tokenizer.pad_token_id,
                            algorithm=config.algorithm, train=config.train, temperature=0.9)
    # The MLP inside a checkpointed layer runs again when the backward recomputes the layer (module
    # hooks stay outside transformers' checkpoint, so its forward is counted directly).
    mlp = model.model.layers[0].mlp
    calls, forward = [], mlp.forward
    mlp.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    backwards = []
    mlp.register_full_backward_hook(lambda *args: backwards.append(1))
    sequences = _sequences(seed=3) if sequences is None else sequences
    stats = trainer.update(sequences)
    steps = -(-len(sequences) // 4)  # 4 per mini-batch
    assert stats["optimizer_steps"] == steps and len(backend.grads) == steps
    assert len(calls) == (2 if checkpointing else 1) * len(backwards)  # one backward per micro-batch
    return backend.grads, stats


def _assert_same_steps(variants: dict, whole: list, whole_stats: dict, *, grad_atol: float) -> None:
    """Every variant's gradients, step by step, and its update statistics equal the single-micro-batch run's."""
    for name, (grads, stats) in variants.items():
        for step, (got, want) in enumerate(zip(grads, whole, strict=True)):
            for key in want:
                torch.testing.assert_close(got[key], want[key], atol=grad_atol, rtol=0, msg=f"{name}, step {step}: {key}")
        for key in ("loss", "pg_loss", "kl", "entropy", "clip_fraction"):
            assert stats[key] == pytest.approx(whole_stats[key], abs=1e-6), (name, key)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_micro_batching_and_checkpointing_leave_the_gradient_unchanged(tiny_policy, aggregation):
    model, tokenizer = tiny_policy
    common = [f"algorithm.loss_aggregation={aggregation}"]
    whole, whole_stats = _step_gradients(model, tokenizer, [*common, "train.max_tokens_per_micro_batch=100000"])
    variants = {
        # 10 token slots: most mini-batches split into 2–4 micro-batches of unequal size.
        "token budget": _step_gradients(model, tokenizer, [*common, "train.max_tokens_per_micro_batch=10"]),
        "padding-free": _step_gradients(model, tokenizer, [*common, "train.max_tokens_per_micro_batch=10",
                                                           "train.packing=padding_free"]),
        "checkpointing": _step_gradients(model, tokenizer, [*common, "train.max_tokens_per_micro_batch=100000"],
                                         checkpointing=True),
    }
    _assert_same_steps(variants, whole, whole_stats, grad_atol=1e-6)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_tree_packing_leaves_every_pass_and_the_gradient_unchanged(tiny_policy, implementation):
    model, tokenizer = tiny_policy
    model = copy.deepcopy(model)
    model.set_attn_implementation(implementation)
    sequences = _tree_sequences(seed=5)
    common = ["algorithm.loss_aggregation=token_mean", "train.packing=left_padded"]
    whole, whole_stats = _step_gradients(model, tokenizer, [*common, "train.max_tokens_per_micro_batch=100000"],
                                         sequences=sequences)
    variants = {
        "tree": _step_gradients(model, tokenizer, [*common, "train.tree_packing=true",
                                                   "train.max_tokens_per_micro_batch=100000"], sequences=sequences),
        # 12 distinct tokens: trees cut into several micro-batches, a shared prefix in more than one.
        "tree, budget": _step_gradients(model, tokenizer, [*common, "train.tree_packing=true",
                                                           "train.max_tokens_per_micro_batch=12"], sequences=sequences),
        "tree, checkpointing": _step_gradients(model, tokenizer, [*common, "train.tree_packing=true"],
                                               checkpointing=True, sequences=sequences),
    }
    _assert_same_steps(variants, whole, whole_stats, grad_atol=2e-6)
    # The no-grad passes: per-path values, in the callers' order.
    prompts, responses = [s.prompt_ids for s in sequences], [s.response_ids for s in sequences]
    per_path = _trainer(model, tokenizer, "train.packing=left_padded")
    packed = _trainer(model, tokenizer, "train.tree_packing=true", "train.max_tokens_per_micro_batch=12")
    for reference in (False, True):
        for got, want in zip(packed.logprobs(prompts, responses, reference=reference),
                             per_path.logprobs(prompts, responses, reference=reference), strict=True):
            assert got == pytest.approx(want, abs=1e-5)
    for got, want in zip(packed.score(prompts, responses), per_path.score(prompts, responses), strict=True):
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)
        assert got.entropies == pytest.approx(want.entropies, abs=1e-5)


def test_tree_packing_runs_fewer_tokens_through_the_model(tiny_policy):
    model, tokenizer = tiny_policy
    sequences = _tree_sequences(seed=5)
    widths = {}
    for setting in ("false", "true"):
        trainer = _trainer(model, tokenizer, f"train.tree_packing={setting}", "train.packing=padding_free",
                           "train.max_tokens_per_micro_batch=100000")
        batches = trainer._micro_batches([s.prompt_ids for s in sequences], [s.response_ids for s in sequences], "sdpa")
        widths[setting] = sum(batch.input_ids.numel() for _, batch, _ in batches)
    # Per path: 7 prompt tokens x 5 paths + 6+5+5+5+5 response tokens per question; tree: 4+6+5+3+1 and 3+6+5+3+1.
    assert widths == {"false": 5 * 4 + 26 + 5 * 3 + 26, "true": 19 + 18}


def test_tree_packing_falls_back_where_the_kernel_takes_no_mask(tiny_policy, caplog):
    from attnrl.training.trainer import FCI_KERNEL

    model, tokenizer = tiny_policy
    trainer = _trainer(model, tokenizer, "train.tree_packing=true")
    assert trainer._tree_packed("sdpa") and trainer._tree_packed("flex_attention")
    assert not trainer._tree_packed(FCI_KERNEL) and not caplog.records
    assert not trainer._tree_packed("flash_attention_2") and not trainer._tree_packed("flash_attention_2")
    [record] = caplog.records
    assert "flash_attention_2" in record.getMessage() and "train.packing" in record.getMessage()


def test_update_and_scoring_never_hold_full_logits(tiny_policy):
    # The LM head only ever sees chunks of response positions (train.logits_chunk_tokens).
    model, tokenizer = tiny_policy
    model = copy.deepcopy(model)
    shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: shapes.append(out.shape))
    trainer = _trainer(model, tokenizer, "train.logits_chunk_tokens=3", "algorithm.entropy_coef=0.01")
    sequences = _sequences(seed=1)
    trainer.score([s.prompt_ids for s in sequences], [s.response_ids for s in sequences])
    trainer.update(sequences)
    handle.remove()
    assert shapes and all(len(shape) == 2 and shape[0] <= 3 for shape in shapes)


def test_the_layout_follows_the_attention_kernel():
    from attnrl.training.trainer import FCI_KERNEL, uses_padding_free

    # auto: padding-free only where attention runs per sequence (varlen kernels, the FCI kernel); SDPA and
    # eager would get a dense [total, total] mask over the packed row.
    assert uses_padding_free("auto", "flash_attention_2") and uses_padding_free("auto", FCI_KERNEL)
    assert not uses_padding_free("auto", "sdpa") and not uses_padding_free("auto", "eager")
    assert uses_padding_free("padding_free", "sdpa") and not uses_padding_free("left_padded", "flash_attention_2")
    with pytest.raises(ConfigError, match="train.packing"):
        uses_padding_free("padding_free", "some_custom_kernel")


def test_fci_follows_the_configured_delta(tiny_policy):
    # Δ decides which later steps count towards a step's FCI (spec §5.2): the trainer must pass the config's on.
    model, tokenizer = tiny_policy
    engine = HFRolloutEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    prompt = tuple(encode_prompt(tokenizer, [{"role": "user", "content": "1+2+3+4+5"}]))
    [group] = engine.generate([GenerationRequest(prompt, n=4)], SamplingParams(temperature=1.0, max_new_tokens=48), seed=2)
    vocab = SeparatorVocab.from_tokenizer(tokenizer)
    responses = [c.token_ids for c in group]
    segmentations = [segment_response(r, len(prompt), vocab) for r in responses]
    assert max(s.num_steps for s in segmentations) >= 3
    fci = {delta: [s.fci for s in _trainer(copy.deepcopy(model), tokenizer, f"algorithm.fci_delta={delta}").score(
        [prompt] * len(responses), responses, segmentations)] for delta in (1, 2, 64)}
    assert fci[1] != fci[2]
    # Δ longer than any response: no later step is far enough away, every score is 0.
    assert all(v == 0.0 for scores in fci[64] for v in scores)
