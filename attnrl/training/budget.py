"""A generated-token budget that binds inside a training step (methods compared at equal cost).

Not in the paper, whose runs stop after a number of steps (spec §12, §15.3). To compare methods at the same
generation cost (``train.max_generated_tokens``), the loop sizes every new prompt batch so that what it will
generate fits in what is left of the budget: the batch's n initial samples and, for the tree methods, their
continuations, at the per-prompt costs measured so far in the run. A batch that does not fit whole is cut to
the prompts that do, but not below ``MIN_BATCH_FRACTION`` of it: when fewer fit, no batch is sampled and
training stops, leaving less than half a batch's cost unspent. The one-step off-policy
pipeline (spec §3.2) counts the batches it has already sampled (their continuations, and the initial samples
of the batch not generated yet) against the budget, so it stops sampling first and then trains on what it
holds: every generated batch is trained on.

The costs are measured means, so the last batch may still cost more than its estimate; what is generated past
the budget is the run's overshoot (``TrainResult.generated_tokens`` minus the budget), which a comparison
must report. Before any cost is known (the first batch) the batch is taken whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# A batch of a few prompts is trained as a whole step at the full learning rate: one very noisy update.
# Measured on the embedded default: a last step of 1 prompt (15 paths instead of ~350) took one seed's
# held-out mean@K from 78.9 % to 67.3 %. So a cut batch keeps at least half of its prompts.
MIN_BATCH_FRACTION = 0.5


@dataclass
class PromptCosts:
    """Generated tokens per prompt so far, initial samples and continuations apart (cumulative sums)."""

    initial_tokens: int = 0
    initial_prompts: int = 0
    continuation_tokens: int = 0
    continued_prompts: int = 0  # prompts whose continuations were generated, whether they had branch points or not

    @property
    def initial(self) -> float | None:
        """Mean tokens of one prompt's initial samples; None before any were generated."""
        return self.initial_tokens / self.initial_prompts if self.initial_prompts else None

    @property
    def continuation(self) -> float | None:
        """Mean tokens of one prompt's continuations; None before any round of continuations."""
        return self.continuation_tokens / self.continued_prompts if self.continued_prompts else None

    def prompts_that_fit(self, wanted: int, remaining: float, *, continuations: bool) -> int:
        """How many of ``wanted`` new prompts fit in ``remaining`` tokens: initial samples and (``continuations``:
        the method branches) their continuations; none when fewer than ``MIN_BATCH_FRACTION`` of them fit. All
        of them while a cost is still unknown."""
        cost = self.initial
        if continuations:
            cost = None if cost is None or self.continuation is None else cost + self.continuation
        if cost is None:
            return wanted if remaining > 0 else 0
        fit = min(wanted, int(remaining // cost))
        return fit if fit >= math.ceil(MIN_BATCH_FRACTION * wanted) else 0

    def add(self, prompts: int, tokens: int, *, initial: bool) -> None:
        """Count a collected submission: ``initial`` samples of ``prompts`` prompts, or continuations (whose
        prompts are counted once the round is whole: ``continued_prompts``)."""
        if initial:
            self.initial_prompts += prompts
            self.initial_tokens += tokens
        else:
            self.continuation_tokens += tokens

    def prompts_to_sample(self, wanted: int, *, budget: int | None, spent: int, sampled: int, scored: int,
                          continuations: bool) -> int:
        """The next batch's size: ``wanted`` without a budget, else what fits in ``budget`` once the ``spent``
        tokens and the batches already taken (see ``committed``) are paid for."""
        if budget is None:
            return wanted
        remaining = budget - spent - self.committed(sampled=sampled, scored=scored, continuations=continuations)
        return self.prompts_that_fit(wanted, remaining, continuations=continuations)

    def committed(self, *, sampled: int, scored: int, continuations: bool) -> float:
        """Expected tokens still to generate for batches already taken: ``sampled`` prompts whose initial
        samples are not generated yet, ``scored`` prompts whose continuations are not."""
        continuation = (self.continuation or 0.0) if continuations else 0.0
        return sampled * ((self.initial or 0.0) + continuation) + scored * continuation
