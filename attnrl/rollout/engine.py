"""The ``RolloutEngine`` protocol (architecture.md, "Engines behind protocols").

One call serves both kinds of generation AttnRL needs in a step (spec §3.2): initial samples
(``prompt_ids`` = the templated prompt, ``n`` = G) and tree continuations (``prompt_ids`` =
prompt ⧺ response prefix up to a branch point, ``n`` = T). The loop never knows whether it
talks to transformers on a CPU or vLLM on a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch

# "oov": the engine sampled an id outside the tokenizer's vocabulary (a padded LM-head row) and the
# response was cut before it (spec §5.4).
FinishReason = Literal["stop", "length", "oov"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. Log-probs are reported under ``temperature`` (no top-p renormalisation)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8192

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class GenerationRequest:
    """Sample ``n`` continuations of ``prompt_ids``.

    ``max_new_tokens`` overrides the call's limit for this request (a continuation's budget is
    the response limit minus its prefix, spec §5.4). Requests with the same ``group`` (the
    question they belong to) share a prompt prefix, so an engine pool sends them to the same
    engine, where its prefix cache serves them (spec §5.4 ``balance_gen_batch``).
    """

    prompt_ids: tuple[int, ...]
    n: int = 1
    max_new_tokens: int | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("a generation request needs at least one prompt token")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class Completion:
    """One sampled continuation: its tokens (EOS included when it stopped), the behaviour
    log-prob of each token under the distribution it was sampled from (temperature applied; at
    top_p < 1 renormalised over the nucleus), and why it ended. It is empty only when the very
    first sampled id was out of the vocabulary."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: FinishReason

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError("token_ids and logprobs must have the same length")


def cut_at_vocabulary(
    token_ids: Sequence[int], logprobs: Sequence[float], vocab_size: int | None
) -> tuple[tuple[int, ...], tuple[float, ...], bool]:
    """Drop everything from the first id >= ``vocab_size`` on (spec §5.4: out-of-vocabulary ids
    truncate a response); True when something was cut. ``None`` keeps every id."""
    if vocab_size is not None:
        for position, token in enumerate(token_ids):
            if token >= vocab_size:
                return tuple(token_ids[:position]), tuple(logprobs[:position]), True
    return tuple(token_ids), tuple(logprobs), False


@runtime_checkable
class RolloutEngine(Protocol):
    """What the training loop needs from a generator."""

    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams, seed: int
    ) -> list[list[Completion]]:
        """For each request, its ``n`` completions, in request order. Same inputs and seed ⇒ same
        outputs."""
        ...

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load new policy weights (called by the trainer after each update)."""
        ...


class PendingGeneration(Protocol):
    """A generation call in flight: ``result()`` blocks until its completions are back."""

    def result(self) -> list[list[Completion]]: ...


@dataclass(frozen=True)
class FinishedGeneration:
    """A call that already ran (engines without background generation)."""

    completions: list[list[Completion]]

    def result(self) -> list[list[Completion]]:
        return self.completions


def submit_generation(
    engine: RolloutEngine, requests: Sequence[GenerationRequest], params: SamplingParams, seed: int
) -> PendingGeneration:
    """Start ``engine.generate(requests, params, seed)``; return before it finishes where the engine can.

    Engines with a ``submit`` method (the Ray actor pool) generate in the background, so the caller
    can score or train meanwhile (the overlap of the one-step off-policy loop, spec §3.2); the others
    run the call here. Either way ``result()`` gives exactly what ``generate`` would.
    """
    submit = getattr(engine, "submit", None)
    if submit is not None:
        return submit(requests, params, seed)
    return FinishedGeneration(engine.generate(requests, params, seed))
