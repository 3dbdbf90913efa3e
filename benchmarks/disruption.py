"""The disruption analysis of Fig. 3: which steps does the answer depend on?

    python benchmarks/disruption.py [--task chain|planted] [--problems 200] [--continuations 4] [--seed 1]
        [--model DIR] [--keep DIR] [--set key=value ...] [--out FILE]

On held-out problems the policy (default: the warmed-up initial policy, as the paper uses the base model;
``--model``: any saved policy) samples the training step's G responses, scored as training scores them (FCI
per step, spec §5; entropy per token). For each response with at least two steps before its last, one step is
drawn from each bin:

* ``fci_top20``: the top 20 % of its steps by FCI (at least one step); ``fci_20_100``: the rest;
* ``entropy_top20``: the top 20 % by mean token entropy; ``uniform``: any step.

The last step (the answer) is never drawn: nothing follows it. From the end of the drawn step the rest of the
response is sampled ``--continuations`` times with the attention to that step zeroed in every layer and head
(attnrl/disruption.py, spec §5.3 ``disrupted_token_ranges``), and as many times from the same prefix with the
same seeds and nothing zeroed (the control). The accuracy drop is the control's accuracy minus the disrupted
one's, per bin, and for the uniformly drawn steps by their position in the response (5 bins of step index /
number of steps). 95 % intervals by bootstrap over problems.

Writes the JSON (command, commit, settings) to ``--out`` (default ``benchmarks/results/disruption-<task>.json``)
and the figure beside it (``.png``), and prints the JSON.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

from attnrl.config import resolve_config
from attnrl.data.loaders import load_verl_parquet
from attnrl.disruption import DisruptedAttention
from attnrl.eval.intervals import ratio_interval
from attnrl.rollout.engine import GenerationRequest
from attnrl.rollout.prompts import decode_response
from attnrl.stages.layout import Layout
from attnrl.stages.method_trace import policy_session
from attnrl.stages.prepare import benchmark_name
from attnrl.stages.report import pyplot
from attnrl.stages.research_view import plot_disruption
from attnrl.utils.seeding import derive_seed

from common import RESULTS, TASKS, add_policy_options, log_to_stderr, provenance, warmed_up, workdir, write_json  # benchmarks/common.py

logger = logging.getLogger("benchmarks.disruption")
BINS = ("fci_top20", "entropy_top20", "fci_20_100", "uniform")
POSITION_BINS = 5
TOP = 0.2


@dataclass(frozen=True)
class Draw:
    """One drawn step: its problem and response, how it was drawn, where it lies."""

    problem: int
    response: int
    bin: str
    step: int
    end: int          # the step's end, in response tokens: the prefix generation continues from
    position: float   # step index / (steps - 1)


def draw_steps(fci: list[float], entropy: list[float], rng: random.Random) -> dict[str, int]:
    """One step index per bin among the response's steps but its last (see the module doc)."""
    candidates = list(range(len(fci) - 1))
    top = max(1, round(TOP * len(candidates)))
    by_fci = sorted(candidates, key=lambda k: (-fci[k], k))
    by_entropy = sorted(candidates, key=lambda k: (-entropy[k], k))
    drawn = {"fci_top20": rng.choice(by_fci[:top]), "entropy_top20": rng.choice(by_entropy[:top]),
             "uniform": rng.choice(candidates)}
    if by_fci[top:]:
        drawn["fci_20_100"] = rng.choice(by_fci[top:])
    return drawn


def measure(config, model_dir: Path, root: Path, problems_limit: int, continuations: int) -> dict:
    layout = Layout.of(config, root)
    problems = load_verl_parquet(layout.prepared_eval(benchmark_name(config.data.eval[0])))
    problems = random.Random(derive_seed(config.seed, "disruption", "problems")).sample(
        problems, min(problems_limit, len(problems)))
    rng = random.Random(derive_seed(config.seed, "disruption", "steps"))
    limit = config.rollout.sampling.max_new_tokens
    with policy_session(config, model_dir) as session:
        scored = session.sample_scored(problems, derive_seed(config.seed, "disruption", "initial"))
        draws: list[Draw] = []
        by_length: dict[int, list[int]] = defaultdict(list)  # the draws whose step has this many tokens
        agree = 0  # responses whose FCI and entropy top-20 % draws are the same step
        for p, question in enumerate(scored):
            for r, response in enumerate(question.responses):
                offsets, ends = response.segmentation.response_step_offsets, response.segmentation.response_step_ends
                if len(offsets) < 3:  # at least two steps before the last
                    continue
                entropy = [fmean(response.entropies[a:b]) for a, b in zip(offsets, ends, strict=True)]
                drawn = draw_steps(list(response.fci), entropy, rng)
                agree += drawn["fci_top20"] == drawn["entropy_top20"]
                for name, step in drawn.items():
                    by_length[ends[step] - offsets[step]].append(len(draws))
                    draws.append(Draw(p, r, name, step, ends[step], step / (len(offsets) - 1)))
        requests = [GenerationRequest(scored[d.problem].prompt_ids + scored[d.problem].responses[d.response].token_ids[: d.end],
                                      n=continuations, max_new_tokens=limit - d.end) for d in draws]
        outcomes: dict[bool, list[list[float]]] = {}
        model = session.engine.model
        for disrupted in (False, True):
            rewards: list[list[float]] = [[] for _ in draws]
            for length, indices in sorted(by_length.items()):
                with DisruptedAttention(model, length if disrupted else 0):
                    # The same seed for both: each disrupted continuation is paired with its control.
                    out = session.engine.generate([requests[i] for i in indices], session.params,
                                                  seed=derive_seed(config.seed, "disruption", length))
                texts = [(i, decode_response(session.tokenizer,
                                             scored[draws[i].problem].responses[draws[i].response].token_ids[: draws[i].end]
                                             + c.token_ids))
                         for i, group in zip(indices, out, strict=True) for c in group]
                graded = session.verifier.score_batch([(text, scored[draws[i].problem].problem.answers)
                                                       for i, text in texts])
                for (i, _), reward in zip(texts, graded, strict=True):
                    rewards[i].append(reward)
            outcomes[disrupted] = rewards
            logger.info("%s: %d continuations", "disrupted" if disrupted else "control", sum(map(len, rewards)))
    result = summarise(draws, outcomes)
    drawn = sum(d.bin == "uniform" for d in draws)
    return {"problems": len(problems), "responses": sum(len(q.responses) for q in scored), "responses_drawn": drawn,
            "fci_and_entropy_top_step_agree": round(agree / max(1, drawn), 4), **result}


def summarise(draws: list[Draw], outcomes: dict[bool, list[list[float]]]) -> dict:
    """Per bin (and per position bin): control and disrupted accuracy and the drop, in %, over problems."""
    def per_problem(selected: list[int], of) -> list[tuple[float, float]]:
        units: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for i in selected:
            units[draws[i].problem][0] += of(i)
            units[draws[i].problem][1] += 1
        return [tuple(u) for u in units.values()]

    def accuracies(selected: list[int]) -> dict:
        rng = random.Random(0)
        control, disrupted = (lambda i: 100 * fmean(outcomes[False][i])), (lambda i: 100 * fmean(outcomes[True][i]))
        drop = ratio_interval(per_problem(selected, lambda i: control(i) - disrupted(i)), rng, 2)
        return {"drop": drop, "control": ratio_interval(per_problem(selected, control), rng, 2)["value"],
                "disrupted": ratio_interval(per_problem(selected, disrupted), rng, 2)["value"],
                "draws": len(selected)}

    bins = {name: accuracies([i for i, d in enumerate(draws) if d.bin == name]) for name in BINS}
    uniform = [i for i, d in enumerate(draws) if d.bin == "uniform"]
    positions = {}
    for b in range(POSITION_BINS):  # the last bin closes at 1 (never reached: the last step is not drawn)
        low, high = b / POSITION_BINS, (b + 1) / POSITION_BINS
        if selected := [i for i in uniform if low <= draws[i].position < high]:
            positions[f"{low:.1f}-{high:.1f}"] = accuracies(selected)
    return {"bins": bins, "by_position": positions}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="chain")
    parser.add_argument("--problems", type=int, default=200, help="held-out problems (sampled from all levels)")
    parser.add_argument("--continuations", type=int, default=4, help="continuations per drawn step and condition")
    parser.add_argument("--model", type=Path, default=None, help="a saved policy (default: the warmed-up one)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/disruption-<task>.json")
    add_policy_options(parser, "keep the warmed-up run here; a later run with the same --keep reuses it (a learning "
                             "benchmark's --keep DIR/seedN works too)")
    return parser


def main() -> None:
    args = parser().parse_args()
    source = provenance("disruption.py", sys.argv[1:])  # at the start: the code that produces the result
    log_to_stderr("attnrl", logger.name)
    overrides = [f"seed={args.seed}", *TASKS[args.task], "rollout.progress=false", *args.set]
    config = resolve_config(preset="tiny", overrides=overrides)
    started = time.perf_counter()
    with workdir(args.keep, "attnrl-disruption-") as root:
        model = args.model or warmed_up(config, root)
        result = measure(config, model, root, args.problems, args.continuations)
    record = {**source, "task": args.task, "overrides": overrides,
              "model": "warmed-up initial policy" if args.model is None else str(args.model),
              "continuations": args.continuations, "wall_s": round(time.perf_counter() - started, 1), **result}
    out = args.out or RESULTS / f"disruption-{args.task}.json"
    write_json(record, out)
    plot_disruption(record, out.with_suffix(".png"), pyplot())


if __name__ == "__main__":
    main()
