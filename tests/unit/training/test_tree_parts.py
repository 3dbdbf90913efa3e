"""One run of questions' trees (spec §8-§11): rewards from the continuation alone, behaviour log-probs
from the engine or the policy, empty continuations left out, reference log-probs only with a KL term."""

from __future__ import annotations

from attnrl.config import resolve_config
from attnrl.data.problem import make_problem
from attnrl.model.tokenizer import build_tokenizer
from attnrl.reward.verifier import Verifier
from attnrl.rollout.engine import Completion
from attnrl.sampling import ExpansionPlan
from attnrl.steps import StepSegmentation
from attnrl.training.rollouts import BranchPoint, ScoredQuestion, ScoredResponse
from attnrl.training.tree_parts import TreePartBuilder

PROMPT = (1, 2, 3)
RESPONSE = tuple(range(10, 18))


class RecordingTrainer:
    """Answers ``logprobs`` with -1 per token (-2 from the reference) and remembers what it was asked."""

    def __init__(self):
        self.asked: list[tuple[list[tuple[int, ...]], list[tuple[int, ...]], bool]] = []

    def logprobs(self, prompts, responses, *, reference=False):
        self.asked.append((list(prompts), list(responses), reference))
        return [tuple(-2.0 if reference else -1.0 for _ in r) for r in responses]


def _question(rewards, tokens=RESPONSE, steps=(0, 3, 6, 9, 11), fci=(0.0, 0.9, 0.1)):
    problem = make_problem(id=0, prompt="q", answers=["7"], source="toy", split="train", where="test")
    response = [ScoredResponse(tokens, tuple(-0.5 for _ in tokens), tuple(1.0 for _ in tokens),
                               StepSegmentation(steps), fci, r, "stop") for r in rewards]
    return ScoredQuestion(problem, PROMPT, tuple(response))


def _builder(trainer, *overrides):
    algorithm = resolve_config(preset="tiny", method="attnrl", overrides=list(overrides)).algorithm
    return TreePartBuilder(trainer, build_tokenizer(), Verifier(timeout_s=5.0), algorithm)


def _build(builder, continuations, engine_logprobs=None):
    questions = [_question([1.0, 0.0, 0.0, 0.0])]
    plans = [ExpansionPlan("0", False, (0,))]
    points = [BranchPoint(question=0, response=0, offset=3)]
    return builder.build(questions, plans, points, continuations, engine_logprobs)


def test_continuations_are_graded_alone_and_scored_by_the_policy_after_their_prefix():
    tokenizer, trainer = build_tokenizer(), RecordingTrainer()
    right = tuple(tokenizer.encode("\\boxed{7}", add_special_tokens=False))
    wrong = tuple(tokenizer.encode("\\boxed{8}", add_special_tokens=False))
    part = _build(_builder(trainer, "algorithm.kl_coef=0"),
                  [[Completion(right, (0.0,) * len(right), "stop"), Completion((), (), "stop"),
                    Completion(wrong, (0.0,) * len(wrong), "stop")]])
    (prompts, responses, reference), = trainer.asked  # one policy pass, no reference pass with the KL off
    assert not reference and responses == [right, wrong]  # the empty continuation is left out
    assert prompts == [PROMPT + RESPONSE[:3]] * 2
    (tree,) = part.built
    assert sorted(tree.leaf_rewards) == sorted([1.0, 0.0, 0.0, 0.0] + [1.0, 0.0])  # four initial, two continuations
    rewards = {path.token_ids[3:]: path.reward for path in tree.paths if path.ends_in_continuation}
    assert rewards == {right: 1.0, wrong: 0.0}  # each continuation's own reward
    paths = [s for s in part.sequences if s.response_ids[3:] in (right, wrong)]
    assert sorted(s.response_ids[3:] for s in paths) == sorted([right, wrong])
    for s in paths:  # stored prefix log-probs, the policy's for the continuation (spec §10.2)
        assert s.old_logprobs == (-0.5,) * 3 + (-1.0,) * (len(s.response_ids) - 3)
        assert s.ref_logprobs is None


def test_the_engines_log_probs_replace_the_policy_pass_and_the_kl_term_asks_the_reference():
    tokenizer, trainer = build_tokenizer(), RecordingTrainer()
    right = tuple(tokenizer.encode("\\boxed{7}", add_special_tokens=False))
    wrong = tuple(tokenizer.encode("\\boxed{8}", add_special_tokens=False))
    engine = [[tuple(-3.0 for _ in right), tuple(-4.0 for _ in wrong)]]
    part = _build(_builder(trainer, "algorithm.kl_coef=0.01"),
                  [[Completion(right, (0.0,) * len(right), "stop"), Completion(wrong, (0.0,) * len(wrong), "stop")]],
                  engine)
    assert [reference for *_, reference in trainer.asked] == [True]  # only the reference: the engine sent the rest
    for continuation, logprobs in zip((right, wrong), engine[0], strict=True):
        (path,) = [s for s in part.sequences if s.response_ids[3:] == continuation]
        assert path.old_logprobs[3:] == logprobs
    assert part.sequences and all(s.ref_logprobs == (-2.0,) * len(s.response_ids) for s in part.sequences)


def test_a_continuation_is_graded_without_the_prefix_it_continues():
    tokenizer, trainer = build_tokenizer(), RecordingTrainer()
    boxed = tuple(tokenizer.encode("\\boxed{7}", add_special_tokens=False))  # the prefix holds the right answer
    tokens = boxed + tuple(tokenizer.encode("so", add_special_tokens=False))
    question = _question([1.0, 0.0, 0.0, 0.0], tokens, (0, 3, 3 + len(boxed), 3 + len(tokens)), (0.0, 0.5))
    unsure = tuple(tokenizer.encode("or not", add_special_tokens=False))
    part = _builder(trainer, "algorithm.kl_coef=0").build(
        [question], [ExpansionPlan("0", False, (0,))], [BranchPoint(question=0, response=0, offset=len(boxed))],
        [[Completion(unsure, (0.0,) * len(unsure), "stop")]])
    (tree,) = part.built
    [continued] = [path for path in tree.paths if path.ends_in_continuation]
    assert continued.token_ids == boxed + unsure and continued.reward == 0.0  # "or not" answers nothing
