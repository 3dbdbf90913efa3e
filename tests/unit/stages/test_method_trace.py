"""The report's trace of the method: what it records agrees with the tree, the branch points and the
steps it was built from; the view draws one box per node and one mark per branch point."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from attnrl.config import resolve_config
from attnrl.stages.method_trace import Piece, StepTrace, trace_problems
from attnrl.stages.prepare import prepare
from attnrl.stages.report import trace_candidates
from attnrl.stages.trace_view import traces_html
from attnrl.stages.warmup import initial_policy_path, warmup
from tests.conftest import small_overrides

# Enough warmup for responses of several steps (the branch selectors need more than one).
OVERRIDES = ["warmup.steps=150", "warmup.batch_size=16", "data.synthetic.levels=[2, 3]",
             "rollout.sampling.max_new_tokens=32", "report.trace_problems=3"]


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    root = tmp_path_factory.mktemp("trace")
    config = resolve_config(preset="tiny", overrides=small_overrides() + OVERRIDES)
    prepare(config, root)
    warmup(config, root)
    candidates = trace_candidates(config, root)
    policy = initial_policy_path(config, root)
    every = trace_problems(config, policy, candidates, len(candidates))
    return config, candidates, every, trace_problems(config, policy, candidates, config.report.trace_problems)


def test_candidates_are_the_highest_level_first(traced):
    _, candidates, every, _ = traced
    assert len(candidates) == len(every) == 12  # four per traced problem
    levels = [p.level for p in candidates]
    assert levels == sorted(levels, reverse=True) and len(set(levels)) == 2


def test_problems_whose_samples_disagree_come_first(traced):
    _, _, every, three = traced
    unanimous = [len(set(t.rewards)) == 1 for t in every]
    assert unanimous == sorted(unanimous) and not unanimous[0]
    assert [t.problem_id for t in three] == [t.problem_id for t in every[:3]]


def test_steps_tile_the_response_and_carry_every_branch_mark(traced):
    for trace in traced[3]:
        assert trace.steps[0].start == 0
        assert all(a.end == b.start for a, b in zip(trace.steps, trace.steps[1:]))
        chain = [s for s in trace.segments if not s.node.continuation]
        assert trace.steps[-1].end == chain[-1].node.end  # the expanded response, whole
        assert "".join(s.text for s in trace.steps) == "".join(s.text for s in chain)
        pieces = [piece for step in trace.steps for piece in step.pieces]
        assert [p.start for p in pieces] == sorted(p.start for p in pieces)
        assert all(step.start == step.pieces[0].start for step in trace.steps)
        for name, offsets in (("fci", trace.fci_offsets), ("entropy", trace.entropy_offsets)):
            marked = [piece.start for piece in pieces if name in piece.branches]
            assert marked == sorted(set(offsets)) and marked
        assert trace.branch_offsets == trace.fci_offsets  # the tiny preset branches on FCI
        assert all(trace.steps[trace.step_of(o)].start == o for o in trace.fci_offsets)  # ATB cuts at step starts


def test_the_tree_hangs_the_continuations_at_the_branch_points_with_spec_values(traced):
    config, _, _, three = traced
    for trace in three:
        nodes = [s.node for s in trace.segments]
        chain = [s for s in nodes if not s.continuation]
        assert [s.start for s in chain] == [0, *sorted(set(trace.branch_offsets))]
        assert [s.parent for s in chain] == [None, *range(len(chain) - 1)]
        continuations = [s for s in nodes if s.continuation]
        assert len(continuations) == config.algorithm.continuations_per_branch * len(trace.branch_offsets)
        for c in continuations:
            assert chain[c.parent].end == c.start and c.leaves == 1 and c.reward in (0.0, 1.0)
        leaves = [*trace.rewards, *(c.reward for c in continuations)]
        assert trace.root_value == pytest.approx(sum(leaves) / len(leaves))
        for segment in nodes:  # spec §9.3 from the recorded values
            parent = trace.root_value if segment.parent is None else nodes[segment.parent].value
            expected = (2 * segment.value - trace.root_value - parent) / math.sqrt(segment.leaves)
            assert segment.advantage == pytest.approx(expected)


def test_the_view_draws_a_box_per_node_and_a_mark_per_branch_point(traced):
    three = traced[3]
    page = traces_html(three)
    trees = re.findall(r'<svg class="tree".*?</svg>', page, flags=re.S)
    assert [tree.count("<rect") for tree in trees] == [len(t.segments) + 1 for t in three]  # + the question
    assert page.count('class="mark fci"') == sum(len(set(t.fci_offsets)) for t in three) + 1  # + the legend's
    # A row per step, or a token per step where a response has no line break (inline, spec §4's fallback).
    assert page.count('<div class="step"') + page.count('<span class="tok"') == sum(len(t.steps) for t in three)


def test_a_response_without_line_breaks_runs_inline_token_by_token(traced):
    trace = traced[3][0]
    tokens = tuple(StepTrace(start=i, end=i + 1, fci=float(i), entropy=0.5, pieces=(Piece(i, f"t{i} ", ()),))
                   for i in range(5))
    page = traces_html([dataclasses.replace(trace, steps=tokens)])
    assert '<div class="step"' not in page and page.count('<span class="tok"') == 5
    assert "no line break, so every token is a step" in page and 'title="step 5: FCI 4.000 · entropy 0.50"' in page
    lines = tuple(StepTrace(start=2 * i, end=2 * i + 2, fci=1.0, entropy=0.5, pieces=(Piece(2 * i, "a\n", ()),))
                  for i in range(3))
    page = traces_html([dataclasses.replace(trace, steps=lines)])  # steps of several tokens: a row each
    assert page.count('<div class="step"') == 3 and '<span class="tok"' not in page


def test_no_trace_when_none_is_asked_for(traced):
    config = traced[0]
    assert trace_problems(config, initial_policy_path(config, "."), [], 2) == []
    assert "report.trace_problems: 0" in traces_html([])
