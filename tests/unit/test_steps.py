"""Step segmentation (spec §4)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from attnrl.model.tokenizer import STEP_TOKEN, build_tokenizer
from attnrl.steps import SeparatorVocab, StepSegmentation, segment_response

# A fake vocabulary: 1 = "\n\n", 2 = ".\n\n", 3 = "\n", 9 = "</think>", anything else plain text.
VOCAB = SeparatorVocab(double=frozenset({1, 2}), single=frozenset({1, 2, 3}), think_end_id=9)


def assert_tiles(seg: StepSegmentation, total: int) -> None:
    ranges = seg.ranges
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(end == nxt for (_, end), (nxt, _) in zip(ranges, ranges[1:]))
    assert all(start < end for start, end in ranges)
    assert len(ranges) == seg.num_steps + 1


def test_tiny_tokenizer_step_token_is_a_double_separator():
    tokenizer = build_tokenizer()
    vocab = SeparatorVocab.from_tokenizer(tokenizer)
    step_id = tokenizer.convert_tokens_to_ids(STEP_TOKEN)
    newline_id = tokenizer.convert_tokens_to_ids("\n")
    assert vocab.double == frozenset({step_id})
    assert vocab.single == frozenset({step_id, newline_id})
    assert vocab.think_end_id is None  # "</think>" is not one token of the tiny vocabulary

    prompt = tokenizer.encode("Q:3+5-7", add_special_tokens=False)
    response = tokenizer.encode("8-7\n\n1\n\n\\boxed{1}", add_special_tokens=False) + [tokenizer.eos_token_id]
    seg = segment_response(response, len(prompt), vocab)
    p = len(prompt)
    # "8-7\n\n" = 4 tokens, "1\n\n" = 2 tokens, "\boxed{1}" + EOS = 10 tokens: the last step holds EOS.
    assert seg.boundaries == (0, p, p + 4, p + 6, p + 16)
    assert seg.num_steps == 3
    assert seg.response_step_offsets == [0, 4, 6]
    assert seg.think_step == -1
    assert_tiles(seg, p + len(response))


def test_added_tokens_are_not_separators():
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["\n\n\n"])  # outside range(vocab_size), as the spec's base-vocabulary scan
    vocab = SeparatorVocab.from_tokenizer(tokenizer)
    assert tokenizer.convert_tokens_to_ids("\n\n\n") not in vocab.double | vocab.single


def test_double_newline_wins_over_single():
    seg = segment_response([5, 3, 6, 1, 7, 2, 8], prompt_len=4, vocab=VOCAB)
    # Separators at offsets 3 and 5; the "\n" at offset 1 is ignored because "\n\n" exists.
    assert seg.boundaries == (0, 4, 8, 10, 11)
    assert seg.ranges == [(0, 4), (4, 8), (8, 10), (10, 11)]
    assert seg.response_step_offsets == [0, 4, 6]
    assert_tiles(seg, 11)


def test_falls_back_to_single_newline():
    seg = segment_response([5, 3, 6, 6, 3, 7], prompt_len=2, vocab=VOCAB)
    assert seg.boundaries == (0, 2, 4, 7, 8)
    assert seg.num_steps == 3
    assert_tiles(seg, 8)


def test_falls_back_to_one_step_per_token():
    seg = segment_response([5, 6, 7], prompt_len=2, vocab=VOCAB)
    assert seg.boundaries == (0, 2, 3, 4, 5)
    assert seg.num_steps == 3
    assert_tiles(seg, 5)


def test_single_token_response_is_one_step():
    # One token: it is its own separator, so exactly one step.
    seg = segment_response([7], prompt_len=3, vocab=VOCAB)
    assert seg.boundaries == (0, 3, 4) and seg.num_steps == 1


def test_one_step_ending_in_separator():
    seg = segment_response([5, 6, 1], prompt_len=3, vocab=VOCAB)
    assert seg.boundaries == (0, 3, 6)
    assert seg.num_steps == 1 and seg.ranges == [(0, 3), (3, 6)]


def test_separator_at_the_end_adds_no_empty_step():
    seg = segment_response([5, 1, 6, 2], prompt_len=1, vocab=VOCAB)
    assert seg.boundaries == (0, 1, 3, 5)
    assert seg.num_steps == 2
    assert_tiles(seg, 5)


def test_trailing_text_after_last_separator_is_a_step():
    seg = segment_response([1, 5, 6], prompt_len=1, vocab=VOCAB)
    assert seg.boundaries == (0, 1, 2, 4)
    assert seg.ranges[0] == (0, 1)  # the prompt is step 0


def test_think_step_is_the_range_of_the_last_think_end():
    response = [5, 1, 9, 6, 1, 6, 9, 1, 7, 8]
    # Steps: [5,1] [9,6,1] [6,9,1] [7,8]; the last </think> (offset 6) lies in response step 3.
    seg = segment_response(response, prompt_len=2, vocab=VOCAB)
    assert seg.boundaries == (0, 2, 4, 7, 10, 12)
    assert seg.think_position == 2 + 6
    assert seg.think_step == 3
    assert segment_response([5, 1, 6], 2, VOCAB).think_step == -1


def test_think_end_id_from_a_tokenizer_that_has_it():
    vocab = {t: i for i, t in enumerate(["<unk>", "a", "b", "\n", "\n\n", "x\n\n"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("\n", "\n")], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(["</think>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    separators = SeparatorVocab.from_tokenizer(tokenizer)
    assert separators.double == frozenset({4, 5}) and separators.single == frozenset({3, 4, 5})
    think_id = tokenizer.convert_tokens_to_ids("</think>")
    assert separators.think_end_id == think_id
    response = tokenizer.encode("ab\n\nab</think>a\n\nb", add_special_tokens=False)
    seg = segment_response(response, prompt_len=2, vocab=separators)
    assert seg.num_steps == 3 and seg.think_step == 2


def test_empty_response_and_bad_prompt_are_rejected():
    with pytest.raises(ValueError):
        segment_response([], prompt_len=3, vocab=VOCAB)
    with pytest.raises(ValueError):
        segment_response([5], prompt_len=0, vocab=VOCAB)
    with pytest.raises(ValueError):
        StepSegmentation(boundaries=(0, 3))
    with pytest.raises(ValueError):
        StepSegmentation(boundaries=(0, 3, 3, 5))


def test_response_step_ends_pair_with_the_offsets():
    from attnrl.steps import StepSegmentation

    seg = StepSegmentation((0, 3, 6, 9, 11))
    assert seg.response_step_offsets == [0, 3, 6] and seg.response_step_ends == [3, 6, 8]
