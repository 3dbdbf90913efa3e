"""Step segmentation of a response (spec §4).

A response is cut into reasoning steps at separator tokens: tokens whose decoded text contains
``"\\n\\n"`` (falling back to ``"\\n"``, then to one step per token). The prompt is step 0, so a
sequence ``prompt ⧺ response`` with T response steps has T + 1 ranges. Everything here is pure
Python; the tokenizer is only read once, by :meth:`SeparatorVocab.from_tokenizer`.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DOUBLE_NEWLINE = "\n\n"
SINGLE_NEWLINE = "\n"
THINK_END = "</think>"


@dataclass(frozen=True)
class SeparatorVocab:
    """Token ids that end a step (spec §4): ``double`` (S2, primary) and ``single`` (S1, fallback).

    ``think_end_id`` is the id of ``</think>`` when the tokenizer has it as one token, else None.
    """

    double: frozenset[int]
    single: frozenset[int]
    think_end_id: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SeparatorVocab:
        """Decode every base-vocabulary id (``range(tokenizer.vocab_size)``, added tokens excluded, spec §4)."""
        ids = list(range(tokenizer.vocab_size))
        # One batched decode: for a fast tokenizer this is a single call into Rust, about a second for
        # a 150k vocabulary, where a Python loop over ``decode`` takes several times longer.
        texts = tokenizer.batch_decode(
            [[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        double = frozenset(i for i, text in zip(ids, texts) if DOUBLE_NEWLINE in text)
        single = frozenset(i for i, text in zip(ids, texts) if SINGLE_NEWLINE in text)
        return cls(double=double, single=single, think_end_id=_single_token_id(tokenizer, THINK_END))


def _single_token_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` if the vocabulary (added tokens included) holds it whole, else None."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (tokenizer.unk_token_id is not None and token_id == tokenizer.unk_token_id):
        return None
    encoded = tokenizer.encode(token, add_special_tokens=False)
    # The spec takes ``encode('</think>')[-1]``; it is only meaningful when that is the whole token.
    return encoded[-1] if encoded and encoded[-1] == token_id else None


@dataclass(frozen=True)
class StepSegmentation:
    """Step boundaries of one ``prompt ⧺ response`` sequence, in unpadded coordinates (spec §4).

    ``boundaries`` is ``[0, P, P+s1+1, ..., P+R]``: range 0 is the prompt, ranges 1..T the response
    steps. ``think_position`` is the absolute position of the last ``</think>`` token, or -1.
    """

    boundaries: tuple[int, ...]
    think_position: int = -1

    def __post_init__(self) -> None:
        b = self.boundaries
        if len(b) < 3 or b[0] != 0 or any(lo >= hi for lo, hi in zip(b, b[1:])):
            raise ValueError(f"boundaries must start at 0, increase strictly and hold at least one response step: {b}")

    @property
    def num_steps(self) -> int:
        """T: response steps only (``step_nums`` in the spec)."""
        return len(self.boundaries) - 2

    @property
    def num_ranges(self) -> int:
        """T + 1: the prompt plus the response steps."""
        return len(self.boundaries) - 1

    @property
    def length(self) -> int:
        """P + R: tokens in the unpadded sequence."""
        return self.boundaries[-1]

    @property
    def prompt_len(self) -> int:
        return self.boundaries[1]

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """Half-open ``(start, end)`` per step: index 0 the prompt, 1..T the response steps."""
        return list(zip(self.boundaries, self.boundaries[1:]))

    @property
    def response_step_offsets(self) -> list[int]:
        """Start of each response step, relative to the first response token."""
        prompt_len = self.prompt_len
        return [start - prompt_len for start in self.boundaries[1:-1]]

    @property
    def response_step_ends(self) -> list[int]:
        """End (exclusive) of each response step, relative to the first response token."""
        prompt_len = self.prompt_len
        return [end - prompt_len for end in self.boundaries[2:]]

    @property
    def think_step(self) -> int:
        """Index of the range holding the last ``</think>`` (``stop_think_step_idx``), or -1."""
        if self.think_position < 0:
            return -1
        return bisect.bisect_right(self.boundaries, self.think_position) - 1


def separator_offsets(response_ids: Sequence[int], vocab: SeparatorVocab) -> list[int]:
    """Offsets of the separator tokens in ``response_ids``, with the spec §4 fallbacks."""
    for separators in (vocab.double, vocab.single):
        offsets = [i for i, token in enumerate(response_ids) if token in separators]
        if offsets:
            return offsets
    # No newline at all: every token is its own step.
    return list(range(len(response_ids)))


def segment_response(response_ids: Sequence[int], prompt_len: int, vocab: SeparatorVocab) -> StepSegmentation:
    """Segment one response (EOS included, padding excluded) that follows a ``prompt_len``-token prompt.

    The boundary is one past each separator, so a separator ends its step; ``P + R`` closes a
    trailing step that has no separator (spec §4).
    """
    if not response_ids:
        raise ValueError("cannot segment an empty response")
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be at least 1 (the prompt is step 0), got {prompt_len}")
    response_len = len(response_ids)
    offsets = separator_offsets(response_ids, vocab)
    boundaries = [0, prompt_len, *(prompt_len + s + 1 for s in offsets)]
    if offsets[-1] != response_len - 1:
        boundaries.append(prompt_len + response_len)
    think_position = -1
    if vocab.think_end_id is not None:
        hits = [i for i, token in enumerate(response_ids) if token == vocab.think_end_id]
        if hits:
            think_position = prompt_len + hits[-1]
    return StepSegmentation(boundaries=tuple(boundaries), think_position=think_position)
