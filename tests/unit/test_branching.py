from __future__ import annotations

import random

import pytest

from attnrl.branching import (
    BRANCH_SELECTORS,
    BranchSettings,
    ResponseView,
    fci_candidates,
    fci_threshold,
    get_branch_selector,
    select_entropy,
    select_fci,
    select_none,
    select_random,
)
from attnrl.config.schema import AlgorithmConfig


def _view(step_lens, fci=None, prompt_len=0, entropies=None):
    """A response whose steps have the given token lengths (contiguous, first at offset 0)."""
    offsets, ends, pos = [], [], 0
    for length in step_lens:
        offsets.append(pos)
        pos += length
        ends.append(pos)
    return ResponseView(
        prompt_len=prompt_len,
        response_len=pos,
        step_offsets=tuple(offsets),
        step_ends=tuple(ends),
        fci=None if fci is None else tuple(float(v) for v in fci),
        entropies=None if entropies is None else tuple(float(v) for v in entropies),
    )


def _settings(n, min_position=0, min_spacing=0, quantile=0.8):
    return BranchSettings(num_points=n, quantile=quantile, min_position=min_position, min_spacing=min_spacing)


RNG = random.Random(0)


# --- fci: threshold and candidates (§6.1) ------------------------------------------------------


def test_threshold_is_torch_linear_quantile():
    # sorted [0, .1, .2, .3, .5, .9]: position 0.8·5 = 4 -> exactly 0.5
    assert fci_threshold([0, 0.1, 0.5, 0.2, 0.9, 0.3], 0.8) == pytest.approx(0.5)
    # 0..7: position 0.8·7 = 5.6 -> 5 + 0.6·(6 − 5) = 5.6 (interpolated, not a sample value)
    assert fci_threshold(list(range(8)), 0.8) == pytest.approx(5.6)
    view = _view([10] * 8, fci=range(8))
    assert fci_candidates(view, 0.8) == [6, 7]


def test_candidates_exclude_the_first_step_and_count_zeroed_steps_in_the_quantile():
    # The first step has the top score but is never a candidate. The seven zeros (forced by §5.2)
    # stay in the quantile: position 7.2 -> 0.3 + 0.2·(0.6 − 0.3) = 0.36, so step 2 qualifies.
    # Over the non-zero scores alone ([1, .3, .6], position 1.6 -> 0.84) nothing would.
    view = _view([10] * 10, fci=[1.0, 0.3, 0.6] + [0.0] * 7)
    assert fci_threshold(view.fci, 0.8) == pytest.approx(0.36)
    assert fci_candidates(view, 0.8) == [2]


def test_zero_threshold_is_lifted_to_the_smallest_positive_score():
    # nine zeros and one 0.3: the 0.8-quantile is 0; without the rule every step would qualify.
    fci = [0.0] * 10
    fci[8] = 0.3
    view = _view([10] * 10, fci=fci)
    assert fci_threshold(view.fci, 0.8) == pytest.approx(0.3)
    assert fci_candidates(view, 0.8) == [8]
    assert select_fci(view, _settings(1), RNG) == [80]


def test_all_zero_scores_make_every_later_step_a_candidate():
    view = _view([10] * 4, fci=[0.0] * 4)
    assert fci_candidates(view, 0.8) == [1, 2, 3]


# --- fci: earliest first, position and spacing (§6.2) ------------------------------------------


def _three_peaks():
    # 15 steps of 50 tokens; peaks at steps 2, 5, 8 with *increasing* scores. Position 0.8·14 = 11.2
    # in the sorted scores -> τ = 0.2·0.7 = 0.14, so all three peaks are candidates.
    fci = [0.0] * 15
    fci[2], fci[5], fci[8] = 0.7, 0.8, 0.9
    return fci


def test_picks_the_earliest_candidates_not_the_highest_scores():
    view = _view([50] * 15, fci=_three_peaks())
    assert fci_candidates(view, 0.8) == [2, 5, 8]
    assert select_fci(view, _settings(2), RNG) == [100, 250]  # steps 2 and 5, not 5 and 8


def test_min_position_counts_the_prompt():
    # Threshold 150 on absolute positions. Without a prompt, step 2 (offset 100) fails and the
    # walk takes steps 5 and 8; a 100-token prompt puts step 2 at 200, so it passes.
    bare = _view([50] * 15, fci=_three_peaks(), prompt_len=0)
    assert select_fci(bare, _settings(2, min_position=150), RNG) == [250, 400]
    prompted = _view([50] * 15, fci=_three_peaks(), prompt_len=100)
    assert select_fci(prompted, _settings(2, min_position=150), RNG) == [100, 250]
    # 100 + 250 = 350 >= 350 (inclusive); step 8 then still fits.
    assert select_fci(prompted, _settings(2, min_position=350), RNG) == [250, 400]


def test_spacing_is_start_of_later_minus_end_of_earlier():
    # 10-token steps; candidates 2 [20,30), 3 [30,40), 8 [80,90).
    fci = [0.0] * 10
    fci[2], fci[3], fci[8] = 0.5, 0.6, 0.7
    view = _view([10] * 10, fci=fci)
    # 0.7-quantile: position 6.3 -> 0.3·0.5 = 0.15, so all three peaks are candidates.
    assert fci_candidates(view, 0.7) == [2, 3, 8]
    # gap(2, 3) = 30 − 30 = 0 rejects step 3; gap(2, 8) = 80 − 30 = 50 accepts step 8.
    assert select_fci(view, _settings(2, min_spacing=50, quantile=0.7), RNG) == [20, 80]
    # At 51 step 8 fails too; the fallback then adds response step 2 (offset 10), unchecked.
    assert select_fci(view, _settings(2, min_spacing=51, quantile=0.7), RNG) == [10, 20]


# --- fci: fallbacks (§6.3, AMBIG-14e) ----------------------------------------------------------


def test_fallback_uses_earliest_steps_without_fci_or_distance_checks():
    view = _view([10] * 6, fci=[0.0, 0.0, 0.0, 0.0, 0.0, 0.9])
    # Step 5 (offset 50) is the only candidate but fails the position rule.
    assert select_fci(view, _settings(2, min_position=1000), RNG) == [10, 20]
    # Accepted candidate first, then step 2 (offset 10), skipping already chosen offsets.
    assert select_fci(view, _settings(3), RNG) == [10, 20, 50]


def test_fallback_cycles_with_duplicates_when_steps_run_out():
    two_steps = _view([10, 10], fci=[0.0, 0.0])
    assert select_fci(two_steps, _settings(3, min_position=1000), RNG) == [10, 10, 10]
    three_steps = _view([5, 5, 5], fci=[0.0, 0.0, 0.0])
    assert select_fci(three_steps, _settings(4, min_position=1000), RNG) == [5, 5, 10, 10]


@pytest.mark.timeout(10)
def test_one_step_response_terminates_with_no_branch_points():
    # The official fallback loops forever here (AMBIG-14e).
    assert select_fci(_view([12], fci=[0.0]), _settings(2), RNG) == []
    assert select_fci(_view([12], fci=[0.4]), _settings(2, min_position=10**6), RNG) == []
    empty = ResponseView(prompt_len=5, response_len=0, step_offsets=(), step_ends=(), fci=())
    assert select_fci(empty, _settings(2), RNG) == []


def test_fci_offsets_are_always_inside_the_response():
    rng = random.Random(7)
    for _ in range(200):
        lens = [rng.randint(1, 30) for _ in range(rng.randint(1, 12))]
        view = _view(lens, fci=[rng.choice([0.0, rng.random()]) for _ in lens], prompt_len=rng.randint(0, 50))
        settings = _settings(rng.randint(1, 4), rng.randint(0, 200), rng.randint(0, 100))
        offsets = select_fci(view, settings, rng)
        assert offsets == sorted(offsets)
        assert all(0 < o < view.response_len for o in offsets)
        assert len(offsets) == (settings.num_points if len(lens) > 1 else 0)


def test_fci_selector_requires_scores():
    with pytest.raises(ValueError, match="needs view.fci"):
        select_fci(_view([5, 5]), _settings(2), RNG)


# --- entropy (§6.6) ----------------------------------------------------------------------------


def test_entropy_picks_top_tokens_excluding_offset_zero_and_the_last_token():
    # offset 0 (9.0) and the last token (10.0) are the two highest but are excluded.
    view = _view([8], entropies=[9.0, 1.0, 5.0, 2.0, 7.0, 3.0, 0.0, 10.0])
    assert select_entropy(view, _settings(2), RNG) == [2, 4]
    assert select_entropy(view, _settings(3), RNG) == [2, 4, 5]


def test_entropy_ignores_steps_and_distances_and_breaks_ties_earliest():
    view = _view([3, 3], fci=[0.0, 0.0], entropies=[1.0] * 6, prompt_len=0)
    assert select_entropy(view, _settings(2, min_position=10**6, min_spacing=10**6), RNG) == [1, 2]
    short = _view([2], entropies=[5.0, 1.0])  # no token strictly between offset 0 and the last
    assert select_entropy(short, _settings(2), RNG) == []


def test_entropy_selector_requires_entropies():
    with pytest.raises(ValueError, match="needs view.entropies"):
        select_entropy(_view([5, 5], fci=[0, 0]), _settings(2), RNG)


# --- random, none, registry --------------------------------------------------------------------


def test_random_is_deterministic_for_a_seed_and_uses_later_step_starts():
    view = _view([4] * 20)
    picks = [select_random(view, _settings(3), random.Random(11)) for _ in range(3)]
    assert picks[0] == picks[1] == picks[2]
    assert len(set(picks[0])) == 3 and picks[0] == sorted(picks[0])
    assert all(o in view.step_offsets[1:] for o in picks[0])
    seen = {tuple(select_random(view, _settings(3), random.Random(seed))) for seed in range(20)}
    assert len(seen) > 1


def test_random_falls_back_to_distinct_token_offsets():
    view = _view([3, 3])  # one later step (offset 3), 6 tokens
    offsets = select_random(view, _settings(3), random.Random(0))
    assert 3 in offsets and len(set(offsets)) == 3 and all(0 < o < 6 for o in offsets)
    tiny = _view([2])  # only offset 1 is available
    assert select_random(tiny, _settings(3), random.Random(0)) == [1]


def test_none_never_branches():
    assert select_none(_view([5, 5], fci=[0, 1]), _settings(2), RNG) == []


def test_registry_matches_config_choices_and_names_known_on_error():
    assert set(BRANCH_SELECTORS) == {"fci", "entropy", "random", "none"}
    assert get_branch_selector("fci") is select_fci
    assert get_branch_selector("entropy") is select_entropy
    with pytest.raises(ValueError, match="unknown branch selector 'attn'; known: entropy, fci, none, random"):
        get_branch_selector("attn")


def test_settings_from_config():
    algorithm = AlgorithmConfig(num_branch_points=3, fci_quantile=0.7, min_branch_position=8, min_branch_spacing=16)
    assert BranchSettings.from_config(algorithm) == BranchSettings(3, 0.7, 8, 16)
    assert BranchSettings.from_config(AlgorithmConfig()) == BranchSettings(2, 0.8, 512, 512)


def test_view_validation():
    with pytest.raises(ValueError, match="fci has 1 values for 2"):
        _view([5, 5], fci=[0.0])
    with pytest.raises(ValueError, match="must start at offset 0"):
        ResponseView(0, 10, (2, 5), (5, 10), None, None)
    with pytest.raises(ValueError, match="outside a response"):
        ResponseView(0, 8, (0, 5), (5, 10), None, None)
    with pytest.raises(ValueError, match="entropies has 3 values"):
        _view([5], entropies=[0.0] * 3)
