"""The ``RolloutEngine`` contract, written once and run against every engine (hf in-process, hf
on Ray, vLLM on Ray): the engine tests call these checks with their own engine.

Stop, length and out-of-vocabulary behaviour need a model whose next token is predictable.
``steered_state`` builds one from any tiny Qwen2 whose config vocabulary has ``OOV_ROWS`` rows
beyond the tokenizer (as Qwen's 151,936 rows exceed its 151,665 tokens): its blocks are silenced
(``o_proj`` and ``down_proj`` zero), so the last hidden state is the last token's embedding, and
the tied embedding rows are placed along one direction ``a`` so that the logits are set by
each row's coefficient on ``a``. ``plain`` keeps the random blocks but reserves hidden
coordinate 0: the blocks never write to it, every token's embedding has 1 there and the
out-of-vocabulary rows -30, so the padded rows are never sampled. Both engines receive these
weights through ``update_weights``, so the checks also exercise each engine's weight push.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from attnrl.rollout.engine import GenerationRequest, SamplingParams
from attnrl.training.trainer import PolicyTrainer

OOV_ROWS = 8
Steering = Literal["plain", "stop", "never_stop", "oov"]


def steered_state(model: torch.nn.Module, vocab_size: int, eos_token_id: int, mode: Steering) -> dict[str, torch.Tensor]:
    """A state dict for ``model``'s architecture whose sampling is steered (see the module docstring)."""
    generator = torch.Generator().manual_seed(0)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    embedding = state["model.embed_tokens.weight"]
    if mode == "plain":
        for name, tensor in state.items():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                tensor[0].zero_()  # the blocks leave coordinate 0 alone
        embedding[:vocab_size, 0] = 1.0
        embedding[vocab_size:, 0] = -30.0
        if "lm_head.weight" in state:
            state["lm_head.weight"] = embedding.clone()
        return state
    for name, tensor in state.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensor.zero_()
    rows, width = embedding.shape
    if rows <= vocab_size and mode == "oov":
        raise ValueError("the oov steering needs a model vocabulary larger than the tokenizer's")
    a = torch.zeros(width)
    a[0] = 1.0
    # Every in-vocabulary token: mostly `a`, a little noise so samples differ. Noise and the final
    # norm scale with the width so that the logits, hence the rates below, do not depend on it.
    scale = (32 / width) ** 0.5
    embedding.copy_(a + 0.1 * scale * torch.randn(rows, width, generator=generator))
    state["model.norm.weight"].fill_(scale)
    embedding[eos_token_id] = (20.0 if mode == "stop" else -20.0) * a
    # Out-of-vocabulary rows: never in 'stop'/'never_stop'; about one step in five in 'oov'.
    embedding[vocab_size:] = (1.25 if mode == "oov" else -20.0) * a
    if "lm_head.weight" in state:
        state["lm_head.weight"] = embedding.clone()
    return state


def prompt(tokenizer, text: str) -> tuple[int, ...]:
    from attnrl.rollout import encode_prompt

    return tuple(encode_prompt(tokenizer, [{"role": "user", "content": text}]))


def _requests(tokenizer, n: int = 3) -> list[GenerationRequest]:
    return [GenerationRequest(prompt(tokenizer, q), n=n, group=q) for q in ("3+5", "1-2+3-4", "7")]


def check_n_samples_in_order_and_reproducible(engine, tokenizer) -> None:
    params = SamplingParams(max_new_tokens=12)
    requests = [GenerationRequest(r.prompt_ids, n=1 + i, group=r.group) for i, r in enumerate(_requests(tokenizer))]
    first = engine.generate(requests, params, seed=11)
    assert [len(group) for group in first] == [1, 2, 3]
    assert first == engine.generate(requests, params, seed=11)
    assert first != engine.generate(requests, params, seed=12)
    assert len({c.token_ids for c in first[2]}) > 1  # the n samples of one request are not copies
    assert engine.generate([], params, seed=11) == []


def check_stop_and_length(engine, model, tokenizer) -> None:
    """EOS ends a sample and is kept ('stop'); otherwise each request's own limit ends it ('length')."""
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    engine.update_weights(steered_state(model, vocab, eos, "stop"))
    [[stopped]] = engine.generate([GenerationRequest(prompt(tokenizer, "1+1"))], SamplingParams(max_new_tokens=8), 0)
    assert (stopped.token_ids, stopped.finish_reason) == ((eos,), "stop")

    engine.update_weights(steered_state(model, vocab, eos, "never_stop"))
    short, long, default = engine.generate(
        [GenerationRequest(prompt(tokenizer, "1+1"), n=2, max_new_tokens=3),
         GenerationRequest(prompt(tokenizer, "2+2"), max_new_tokens=6),
         GenerationRequest(prompt(tokenizer, "3+3"))],
        SamplingParams(max_new_tokens=9),
        seed=0,
    )
    assert [(len(c.token_ids), c.finish_reason) for c in short] == [(3, "length")] * 2
    assert (len(long[0].token_ids), long[0].finish_reason) == (6, "length")
    assert (len(default[0].token_ids), default[0].finish_reason) == (9, "length")


def check_out_of_vocabulary_truncates(engine, model, tokenizer) -> None:
    """Ids >= len(tokenizer) cut a response just before them (spec §5.4)."""
    vocab = len(tokenizer)
    engine.update_weights(steered_state(model, vocab, tokenizer.eos_token_id, "oov"))
    [samples] = engine.generate([GenerationRequest(prompt(tokenizer, "1+1"), n=16)], SamplingParams(max_new_tokens=40),
                                seed=0)
    assert all(t < vocab for c in samples for t in c.token_ids)
    assert all(len(c.token_ids) == len(c.logprobs) for c in samples)
    cut = [c for c in samples if c.finish_reason == "oov"]
    assert len(cut) >= 12  # p(oov) is about 0.2 per step: nearly every 40-token sample meets one
    assert len({len(c.token_ids) for c in cut}) > 1  # cut where the id came, not at a fixed place
    assert all(c.finish_reason == "length" and len(c.token_ids) == 40 for c in samples if c not in cut)


def check_continuation_returns_only_new_tokens(engine, tokenizer) -> None:
    base = prompt(tokenizer, "3+5-7")
    prefix = tuple(tokenizer.encode("8-7\n\n", add_special_tokens=False))
    [[continuation]] = engine.generate([GenerationRequest(base + prefix, max_new_tokens=5)],
                                       SamplingParams(max_new_tokens=50), seed=0)
    assert 1 <= len(continuation.token_ids) <= 5


def check_logprobs_equal_the_trainer(engine, trainer: PolicyTrainer, tokenizer, temperature: float,
                                     tolerance: float) -> float:
    """Every sampled token's log-prob equals the trainer's recomputation at the same temperature;
    returns the largest difference seen."""
    requests = _requests(tokenizer, n=2)
    params = SamplingParams(temperature=temperature, max_new_tokens=10)
    groups = engine.generate(requests, params, seed=3)
    prompts = [r.prompt_ids for r, group in zip(requests, groups, strict=True) for _ in group]
    samples = [c for group in groups for c in group if c.token_ids]
    recomputed = trainer.logprobs(prompts, [c.token_ids for c in samples])
    worst = max(abs(a - b) for c, values in zip(samples, recomputed, strict=True)
                for a, b in zip(c.logprobs, values, strict=True))
    assert worst <= tolerance, f"engine and trainer log-probs differ by {worst:.3g} (> {tolerance})"
    return worst


def load(engine, state: Mapping[str, torch.Tensor]) -> None:
    engine.update_weights(dict(state))
