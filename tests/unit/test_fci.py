"""FCI (spec §5.2): hand-computed math, and the streaming collector against a naive full-attention reference."""

from __future__ import annotations

import random

import pytest
import torch

from attnrl.fci import FCICollector, forward_influence, mask_scores, step_attention
from attnrl.fci_kernel import block_rows
from attnrl.steps import SeparatorVocab, StepSegmentation, segment_response

# ---------------------------------------------------------------------------------------------- hand-computed

# Prompt = tokens 0-1 (step 0), step 1 = token 2, step 2 = tokens 3-4, step 3 = token 5.
HAND_BOUNDARIES = (0, 2, 3, 5, 6)
HAND_ATTENTION = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],
        [0.2, 0.2, 0.6, 0.0, 0.0, 0.0],
        [0.1, 0.1, 0.4, 0.4, 0.0, 0.0],
        [0.1, 0.1, 0.2, 0.2, 0.4, 0.0],
        [0.1, 0.1, 0.3, 0.1, 0.1, 0.3],
    ]
)


def test_hand_computed_fci():
    # mean_mean, α[q, k] = mean over query tokens of step q of the mean over key tokens of step k:
    #   α[1,0] = (.2+.2)/2 = .2      α[2,0] = mean(row3 (.1+.1)/2, row4 (.1+.1)/2) = .1    α[3,0] = .1
    #   α[2,1] = mean(.4, .2) = .3   α[3,1] = .3
    #   α[3,2] = (.1+.1)/2 = .1
    # Δ = 1: y_0 = .2+.1+.1 = .4, y_1 = .3+.3 = .6, y_2 = .1, y_3 = 0 (no step after it).
    # Δ = 2: y_0 = .1+.1 = .2, y_1 = α[3,1] = .3, y_2 = y_3 = 0.
    # mean_sum (sum over key tokens), Δ = 1: y_0 = .4+.2+.2 = .8, y_1 = .6, y_2 = .1+.1 = .2, y_3 = 0.
    attn = HAND_ATTENTION[None]
    alpha = step_attention(attn, HAND_BOUNDARIES, "mean_mean")
    assert alpha[0, 2, 1].item() == pytest.approx(0.3)
    torch.testing.assert_close(forward_influence(alpha, 1)[0], torch.tensor([0.4, 0.6, 0.1, 0.0]))
    torch.testing.assert_close(forward_influence(alpha, 2)[0], torch.tensor([0.2, 0.3, 0.0, 0.0]))
    mass = forward_influence(step_attention(attn, HAND_BOUNDARIES, "mean_sum"), 1)[0]
    torch.testing.assert_close(mass, torch.tensor([0.8, 0.6, 0.2, 0.0]))

    # Masking: the prompt always; the first response step on request; </think> step (2) and later.
    y = torch.tensor([0.4, 0.6, 0.1, 0.0])
    torch.testing.assert_close(mask_scores(y, -1, False, True), torch.tensor([0.0, 0.6, 0.1, 0.0]))
    torch.testing.assert_close(mask_scores(y, -1, True, True), torch.tensor([0.0, 0.0, 0.1, 0.0]))
    torch.testing.assert_close(mask_scores(y, 2, False, True), torch.tensor([0.0, 0.6, 0.0, 0.0]))
    torch.testing.assert_close(mask_scores(y, 2, False, False), torch.tensor([0.0, 0.6, 0.1, 0.0]))
    assert y[0] == 0.4  # inputs are not modified


def test_forward_influence_treats_nan_as_zero():
    alpha = torch.tensor([[[0.0, 0.0, 0.0], [float("nan"), 0.0, 0.0], [0.5, 0.25, 0.0]]])
    torch.testing.assert_close(forward_influence(alpha, 1), torch.tensor([[0.5, 0.25, 0.0]]))


# ---------------------------------------------------------------------------------------------- streaming vs naive


def make_batch(tokenizer, lengths: list[int], seed: int):
    """Left-padded random prompt ⧺ response rows with "\\n\\n" steps, and their segmentations."""
    rng = random.Random(seed)
    vocab = SeparatorVocab.from_tokenizer(tokenizer)
    step_id = next(iter(vocab.double))
    plain = [i for i in range(4, tokenizer.vocab_size) if i not in vocab.single]
    total = max(lengths)
    rows, segs = [], []
    for length in lengths:
        prompt_len = rng.randint(3, max(3, length // 5))
        response = [rng.choice(plain) for _ in range(length - prompt_len)]
        for offset in range(len(response)):
            if rng.random() < 0.15:
                response[offset] = step_id
        segs.append(segment_response(response, prompt_len, vocab))
        prompt = [rng.choice(plain) for _ in range(prompt_len)]
        rows.append([tokenizer.pad_token_id] * (total - length) + prompt + response)
    input_ids = torch.tensor(rows)
    attention_mask = torch.tensor([[0] * (total - n) + [1] * n for n in lengths])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}, segs


def naive_fci(model, inputs, segs, delta, aggregation, mask_first_step=True, mask_after_think=True):
    """Reference: full eager attention matrices of every layer, reduced with the pure helpers."""
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(original)
    total = inputs["input_ids"].shape[1]
    out = []
    for row, seg in enumerate(segs):
        pad = total - seg.length
        per_layer = [
            forward_influence(step_attention(layer[row, :, pad:, pad:], seg.boundaries, aggregation), delta)
            for layer in attentions
        ]
        y = torch.stack(per_layer).amax(dim=(0, 1))  # max over layers and heads (spec §5.2 step 4)
        out.append(mask_scores(y, seg.think_step, mask_first_step, mask_after_think))
    return out


def streaming_fci(model, inputs, segs, delta, aggregation, block_size, mask_first_step=True, mask_after_think=True,
                  precision=None):
    with torch.no_grad(), FCICollector(model, segs, delta=delta, aggregation=aggregation, block_size=block_size,
                                       precision=precision) as c:
        logits = model(**inputs).logits
    return c.scores(mask_first_step=mask_first_step, mask_after_think=mask_after_think), logits, c


@pytest.mark.parametrize(
    ("length", "block_size", "delta"), [(20, 7, 1), (64, 16, 4), (150, 32, 2), (150, 1024, 4)]
)
@pytest.mark.parametrize("aggregation", ["mean_mean", "mean_sum"])
def test_streaming_matches_naive(tiny_policy, length, block_size, delta, aggregation):
    model, tokenizer = tiny_policy
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA is exercised
    inputs, segs = make_batch(tokenizer, [length, length - 9, length // 2], seed=length + delta)
    assert all(seg.num_steps >= 2 for seg in segs)
    got, _, collector = streaming_fci(model, inputs, segs, delta, aggregation, block_size, mask_first_step=False)
    want = naive_fci(model, inputs, segs, delta, aggregation, mask_first_step=False)
    assert collector.layers_seen == model.config.num_hidden_layers
    for g, w, seg in zip(got, want, segs):
        assert g.shape == (seg.num_steps + 1,)
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert any(bool((g > 0).any()) for g in got)


@pytest.mark.parametrize(("length", "block_size"), [(150, 64), (150, 1024), (150, None)])
def test_the_cuda_path_matches_naive_in_fp32(tiny_policy, length, block_size):
    """The GPU path (matmuls in the model's dtype writing fp32 scores, the log2 scale on the scores, large blocks)
    computes what the naive reference does when it is given fp32."""
    model, tokenizer = tiny_policy
    inputs, segs = make_batch(tokenizer, [length, length - 9, length // 2], seed=7)
    got, logits, _ = streaming_fci(model, inputs, segs, 2, "mean_mean", block_size, mask_first_step=False,
                                   precision="input")
    want = naive_fci(model, inputs, segs, 2, "mean_mean", mask_first_step=False)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        plain = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], plain[valid], atol=1e-5, rtol=1e-5)


def test_gpu_blocks_are_as_large_as_the_workspace_holds():
    assert block_rows(9216, 12) == 2368  # 1 GiB of fp32 scores [12, rows, 9216], in multiples of 64
    assert block_rows(9216, 12, workspace_bytes=1) == 64  # never below one multiple
    assert 4 * 12 * block_rows(2048, 12) * 2048 <= 1 << 30


def test_think_mask_and_too_few_steps(tiny_policy):
    model, tokenizer = tiny_policy
    inputs, segs = make_batch(tokenizer, [40, 33], seed=3)
    # A row with no step Δ after its first response step has all zeros; a </think> in step 3 zeroes steps 3+.
    first = segs[0]
    segs[0] = StepSegmentation(first.boundaries, think_position=first.boundaries[3])
    segs[1] = StepSegmentation((0, 5, 20, 33))  # 3 ranges: only the masked prompt step is ever attended Δ later
    got, _, _ = streaming_fci(model, inputs, segs, delta=2, aggregation="mean_mean", block_size=8)
    want = naive_fci(model, inputs, segs, delta=2, aggregation="mean_mean")
    assert segs[0].think_step == 3 and segs[0].num_steps >= 4
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert bool((got[0][3:] == 0).all()) and got[0][2] > 0
    assert bool((got[1] == 0).all())
    # Δ beyond the last step: no query block runs at all.
    none, _, _ = streaming_fci(model, inputs, segs, delta=8, aggregation="mean_sum", block_size=8)
    assert all(bool((y == 0).all()) for y in none)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_outputs_unchanged_and_implementation_restored(tiny_policy, implementation):
    model, tokenizer = tiny_policy
    inputs, segs = make_batch(tokenizer, [48, 30], seed=1)
    original = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        with torch.no_grad():
            plain = model(**inputs).logits
        _, logits, _ = streaming_fci(model, inputs, segs, delta=2, aggregation="mean_mean", block_size=16)
        assert model.config._attn_implementation == implementation
        # Padding positions carry no meaning (nothing valid attends to them); every real one must agree.
        valid = inputs["attention_mask"].bool()
        torch.testing.assert_close(logits[valid], plain[valid], atol=1e-5, rtol=1e-5)
    finally:
        model.set_attn_implementation(original)


def test_restored_after_an_error(tiny_policy):
    model, tokenizer = tiny_policy
    original = model.config._attn_implementation
    inputs, segs = make_batch(tokenizer, [30, 30], seed=2)
    with pytest.raises(ZeroDivisionError), FCICollector(model, segs):
        assert model.config._attn_implementation != original
        1 / 0
    assert model.config._attn_implementation == original


def test_misuse_is_reported(tiny_policy):
    model, tokenizer = tiny_policy
    inputs, segs = make_batch(tokenizer, [30, 24], seed=4)
    collector = FCICollector(model, segs)
    with pytest.raises(RuntimeError, match="no attention layer"):
        collector.scores()
    # Right padding contradicts the left-padded coordinates of the segmentations.
    right = {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"].flip(-1),
    }
    with torch.no_grad(), pytest.raises(ValueError, match="LEFT padding"), FCICollector(model, segs):
        model(**right)
    with torch.no_grad(), pytest.raises(RuntimeError, match="one forward"), FCICollector(model, segs):
        model(**inputs)
        model(**inputs)
    with pytest.raises(ValueError, match="segmentations"), torch.no_grad(), FCICollector(model, segs[:1]):
        model(**inputs)
    with pytest.raises(ValueError):
        FCICollector(model, segs, aggregation="sum_sum")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- packed sequences


def _packed(tokenizer, lengths, seed):
    """The make_batch sequences laid out padding-free: one row, position ids restarting per sequence."""
    from attnrl.training.sequences import Span

    inputs, segs = make_batch(tokenizer, lengths, seed=seed)
    total = inputs["input_ids"].shape[1]
    rows = [inputs["input_ids"][i, total - n:] for i, n in enumerate(lengths)]
    spans, start = [], 0
    for n in lengths:
        spans.append(Span(0, start, n))
        start += n
    packed = {"input_ids": torch.cat(rows)[None], "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    return packed, inputs, segs, spans


@pytest.mark.parametrize("block_size", [5, 64])
def test_padding_free_rows_give_the_same_fci_and_outputs(tiny_policy, block_size):
    model, tokenizer = tiny_policy
    lengths = [70, 41, 55]
    packed, padded, segs, spans = _packed(tokenizer, lengths, seed=11)
    # use_cache=False: with a cache transformers skips its packed-sequence detection (the layout check catches it).
    with torch.no_grad(), FCICollector(model, segs, delta=2, block_size=block_size, spans=spans) as collector:
        packed_logits = model(**packed, use_cache=False).logits
    got = collector.scores(mask_first_step=False)
    want = naive_fci(model, padded, segs, delta=2, aggregation="mean_mean", mask_first_step=False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        plain = model(**padded).logits
    total = padded["input_ids"].shape[1]
    for span, n, row in zip(spans, lengths, range(len(lengths))):
        torch.testing.assert_close(packed_logits[0, span.start:span.start + n], plain[row, total - n:],
                                   atol=1e-5, rtol=1e-5)


def test_a_packed_row_without_restarting_positions_is_refused(tiny_policy):
    model, tokenizer = tiny_policy
    packed, _, segs, spans = _packed(tokenizer, [30, 20], seed=5)
    # Without position ids transformers cannot see where sequences start: each would attend to the previous one.
    with torch.no_grad(), pytest.raises(ValueError, match="restart"), FCICollector(model, segs, spans=spans):
        model(input_ids=packed["input_ids"], use_cache=False)
    with pytest.raises(ValueError, match="covers"):
        FCICollector(model, segs, spans=spans[::-1])
