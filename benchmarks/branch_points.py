"""Branch-point precision and recall against planted critical steps.

    python benchmarks/branch_points.py [--problems 300] [--seed 1] [--set key=value ...] [--out FILE]

On the ``planted`` task family (attnrl/data/planted.py: every problem's one critical step is known)
it warms up the tiny model as ``make demo`` does, samples the training step's G responses to held-out
problems, scores them (FCI per step, entropy per token: spec §5, §6.6), and asks where each criterion
would branch:

* ``fci``: ATB (spec §6.1-§6.3), ``entropy``: the TreeRL baseline (top-N token entropy, spec §6.6),
  ``random``: N random step starts; ``earliest``: the first N step starts after the first, the
  position baseline (ATB takes the earliest high-FCI steps, and a branch point is never step 0);
* precision: the share of a criterion's branch points that fall in the critical step; recall: the
  share of responses with a branch point in it; ``top1``: the share of responses whose highest-scoring
  step (FCI, or mean token entropy; ``step1``: always step 1) is the critical one. 95 % intervals by
  bootstrap over problems.

Only responses laid out as the reference is (one step per definition, the query, the box) are
scored, so step k is definition k. It also reports the accuracy of those responses by where their
first wrong value is (the critical step, another definition, none): what makes the step critical.
Writes the JSON (with the command, commit, configuration overrides and wall time) to ``--out``
(default ``benchmarks/results/branch_points-planted.json``) and prints it.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from statistics import fmean

from attnrl.branching import BranchSettings, select_entropy, select_fci, select_random
from attnrl.config import resolve_config
from attnrl.data.loaders import load_verl_parquet
from attnrl.data.planted import parse_planted, planted_critical_step, planted_steps
from attnrl.eval.intervals import ratio_interval
from attnrl.rollout.prompts import decode_response
from attnrl.stages.layout import Layout
from attnrl.stages.method_trace import policy_session
from attnrl.stages.prepare import benchmark_name
from attnrl.stages.warmup import initial_policy_path
from attnrl.training.rollouts import response_view
from attnrl.utils.seeding import derive_seed

from common import RESULTS, TASKS, add_policy_options, log_to_stderr, provenance, warmed_up, workdir, write_json  # benchmarks/common.py

TASK = [*TASKS["planted"], "rollout.progress=false"]


def select_earliest(view, settings, rng) -> list[int]:
    """Position alone: the first N step starts after the first step (where ATB's fallback lands, spec §6.3)."""
    return list(view.step_offsets[1 : 1 + settings.num_points])


CRITERIA = {"fci": select_fci, "entropy": select_entropy, "random": select_random, "earliest": select_earliest}


def _first_error(question: str, steps: list[str], modulus: int) -> int | None:
    """The first step that differs from the reference solution's (a wrong value or a garbled step)."""
    reference = planted_steps(question, modulus)
    return next((index for index, (mine, theirs) in enumerate(zip(steps, reference, strict=True)) if mine != theirs),
                None)


def measure(config, root: Path, problems_limit: int) -> dict:
    layout = Layout.of(config, root)
    problems = load_verl_parquet(layout.prepared_eval(benchmark_name(config.data.eval[0])))[:problems_limit]
    with policy_session(config, initial_policy_path(config, root)) as session:
        scored = session.sample_scored(problems, derive_seed(config.seed, "branch-points"))
    tokenizer = session.tokenizer
    settings = BranchSettings.from_config(config.algorithm)
    rng = random.Random(derive_seed(config.seed, "branch-points", "random"))
    hits = {name: [] for name in CRITERIA}      # per problem: (branch points in the critical step, branch points)
    recall = {name: [] for name in CRITERIA}    # per problem: (responses with one there, responses)
    top1 = {"fci": [], "entropy": [], "step1": []}
    by_error = {"critical": [], "other definition": [], "query or box": [], "none": []}
    by_position = {name: {} for name in CRITERIA}  # critical step index -> [responses hit, responses]
    laid_out = 0
    for question in scored:
        text = question.problem.question
        definitions, _ = parse_planted(text)
        critical = planted_critical_step(text)
        counts = {name: [0, 0, 0, 0] for name in CRITERIA}  # hits, points, responses hit, responses
        tops = {"fci": [0, 0], "entropy": [0, 0], "step1": [0, 0]}
        for response in question.responses:
            steps = decode_response(tokenizer, response.token_ids).split("\n\n")
            if response.segmentation.num_steps != len(definitions) + 2 or len(steps) != len(definitions) + 2:
                continue  # not laid out as the reference: step k is not definition k
            laid_out += 1
            first = _first_error(text, steps, config.data.synthetic.modulus)
            kind = "none" if first is None else "critical" if first == critical else \
                "query or box" if first >= len(definitions) else "other definition"
            by_error[kind].append(response.reward)
            view = response_view(question, response)
            step_of = [next(k for k, end in enumerate(view.step_ends) if o < end) for o in range(view.response_len)]
            for name, select in CRITERIA.items():
                points = [step_of[o] for o in select(view, settings, rng)]
                c = counts[name]
                c[0] += sum(p == critical for p in points)
                c[1] += len(points)
                c[2] += any(p == critical for p in points)
                c[3] += 1
                at = by_position[name].setdefault(critical, [0, 0])
                at[0] += any(p == critical for p in points)
                at[1] += 1
            entropy = [fmean(response.entropies[a:b]) for a, b in zip(view.step_offsets, view.step_ends, strict=True)]
            first_branchable = [0.0, 1.0] + [0.0] * (len(entropy) - 2)
            for name, scores in (("fci", response.fci), ("entropy", entropy), ("step1", first_branchable)):
                tops[name][0] += max(range(len(scores)), key=lambda k: scores[k]) == critical
                tops[name][1] += 1
        for name, (hit, points, hit_responses, responses) in counts.items():
            if responses:
                hits[name].append((hit, points))
                recall[name].append((hit_responses, responses))
        for name, (hit, responses) in tops.items():
            if responses:
                top1[name].append((hit, responses))
    rng = random.Random(0)
    return {
        "problems": len(problems),
        "responses": sum(len(q.responses) for q in scored),
        "responses_laid_out": laid_out,
        "precision": {name: ratio_interval(per, rng) for name, per in hits.items()},
        "recall": {name: ratio_interval(per, rng) for name, per in recall.items()},
        "top1": {name: ratio_interval(per, rng) for name, per in top1.items()},
        # the first response step's FCI is zeroed (algorithm.fci_mask_first_step, AMBIG-4): ATB never picks step 0
        "recall_by_critical_step": {name: {str(k): round(h / n, 4) for k, (h, n) in sorted(at.items())}
                                    for name, at in by_position.items()},
        "accuracy_by_first_error": {kind: {"responses": len(r), "accuracy": round(fmean(r), 4) if r else None}
                                    for kind, r in by_error.items()},
    }


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=300, help="held-out problems (of 300: 100 per level)")
    parser.add_argument("--out", type=Path, default=RESULTS / "branch_points-planted.json")
    add_policy_options(parser, "keep the warmed-up run here; a later run with the same --keep reuses it (other "
                             "branching settings on the same policy)")
    return parser


def main() -> None:
    args = parser().parse_args()
    source = provenance("branch_points.py", sys.argv[1:])  # at the start: the code that produces the result
    log_to_stderr("attnrl")  # the warmup's loss every 10 s
    overrides = [f"seed={args.seed}", *TASK, *args.set]
    config = resolve_config(preset="tiny", overrides=overrides)
    started = time.perf_counter()
    with workdir(args.keep, "attnrl-branch-points-") as root:
        warmed_up(config, root)
        result = measure(config, root, args.problems)
    write_json({**source, "overrides": overrides,
                "wall_s": round(time.perf_counter() - started, 1), **result}, args.out)


if __name__ == "__main__":
    main()
