"""The token budget's sizing rule (attnrl/training/budget.py), by hand."""

from __future__ import annotations

from attnrl.training.budget import PromptCosts


def test_the_first_batch_is_taken_whole_while_a_cost_is_unknown():
    costs = PromptCosts()
    assert costs.prompts_that_fit(16, 10.0, continuations=True) == 16
    assert costs.prompts_that_fit(16, 0.0, continuations=True) == 0
    # Initial samples measured, continuations not yet: a branching method still cannot price a prompt.
    costs.initial_prompts, costs.initial_tokens = 4, 400
    assert costs.prompts_that_fit(16, 150.0, continuations=True) == 16
    assert costs.prompts_that_fit(2, 150.0, continuations=False) == 1


def test_a_batch_is_cut_to_the_prompts_whose_measured_cost_fits_but_not_below_half():
    # 100 tokens of initial samples and 300 of continuations per prompt, measured over two rounds.
    costs = PromptCosts(initial_tokens=800, initial_prompts=8, continuation_tokens=1200, continued_prompts=4)
    assert (costs.initial, costs.continuation) == (100.0, 300.0)
    assert costs.prompts_that_fit(16, 10_000.0, continuations=True) == 16
    assert costs.prompts_that_fit(16, 4_799.0, continuations=True) == 11  # floor: 11.99 prompts fit
    assert costs.prompts_that_fit(16, 3_200.0, continuations=True) == 8   # half the batch: still taken
    assert costs.prompts_that_fit(16, 3_199.0, continuations=True) == 0   # 7 prompts: a step too noisy to take
    assert costs.prompts_that_fit(16, -50.0, continuations=True) == 0
    assert costs.prompts_that_fit(16, 1_999.0, continuations=False) == 16  # GRPO: initial samples only
    # An odd batch: half of 15 is 7.5, so 8 prompts is the least taken and 7 is too few.
    assert costs.prompts_that_fit(15, 3_200.0, continuations=True) == 8
    assert costs.prompts_that_fit(15, 2_800.0, continuations=True) == 0


def test_batches_already_taken_are_paid_for_first():
    costs = PromptCosts(initial_tokens=800, initial_prompts=8, continuation_tokens=1200, continued_prompts=4)
    # 3 prompts sampled but not generated (400 each), 2 scored without their continuations (300 each).
    assert costs.committed(sampled=3, scored=2, continuations=True) == 3 * 400 + 2 * 300
    assert costs.committed(sampled=3, scored=2, continuations=False) == 3 * 100
    assert PromptCosts().committed(sampled=3, scored=2, continuations=True) == 0.0


def test_the_next_batch_is_what_fits_after_the_spent_and_committed_tokens():
    costs = PromptCosts()
    costs.add(8, 800, initial=True)  # 100 per prompt
    costs.add(3, 1200, initial=False)
    assert costs.initial == 100.0 and costs.continuation is None  # continuations' prompts: not counted by add
    costs.continued_prompts = 4  # counted once the round is whole: 300 per prompt
    assert costs.continuation == 300.0
    # 10,000 − 6,000 spent − 2 scored prompts' continuations (600) = 3,400: 8 prompts of 400 fit, of 16 wanted.
    assert costs.prompts_to_sample(16, budget=10_000, spent=6_000, sampled=0, scored=2, continuations=True) == 8
    assert costs.prompts_to_sample(16, budget=10_000, spent=6_400, sampled=0, scored=2, continuations=True) == 0
    assert costs.prompts_to_sample(16, budget=None, spent=10**9, sampled=5, scored=5, continuations=True) == 16
