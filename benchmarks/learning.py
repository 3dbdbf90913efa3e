"""Learning benchmark: the Table 1-3 methods at one generated-token budget, over seeds, with intervals.

    python benchmarks/learning.py [--task chain|planted] [--seeds 1 2 3 4 5] [--budget 120000]
        [--eval-every 40000] [--methods ...] [--lrs 5e-5 1e-4 2e-4] [--tune-seed 100] [--tune-only]
        [--policy-seed N] [--set key=value ...]

Fairness:

* the generated-token budget (``train.max_generated_tokens``) is the only stop: ``train.steps`` is set out of
  reach, and the loop cuts each batch to what fits in the budget (attnrl/training/budget.py), so no method gets
  more than another by up to a step; what a run still generates past the budget is reported (``overshoot``);
* every method of a seed starts from the same warmed-up policy and draws prompts in the same seeded order;
  by default each seed prepares its own problems and warms up its own policy, so the intervals cover the task
  instance and the initial policy as well as RL's sampling; with ``--policy-seed N`` every seed starts from
  seed N's problems and policy (as the paper's runs all start from one base model) and the seeds vary RL
  alone: the intervals are then narrower in what they claim, and one warmup is paid instead of one per seed;
* learning rate: with ``--lrs``, every method is first run at each rate on ``--tune-seed`` (a seed not among
  ``--seeds``) and the rate with the best final held-out mean@K is used on every evaluation seed (recorded
  in ``chosen_lr``, the sweep in ``sweep``); without, the preset's ``train.lr`` for all. ``--tune-only`` runs
  the sweep alone and writes ``lr_sweep-<task>.json``: the report then shows whether a comparison run at
  one rate used each method's best.

Measures, per run: held-out mean@K (per level and on average) before RL and every ``--eval-every``
generated tokens (the policy at the end of the step that first reaches each mark, from its checkpoint; the
last point is the final policy), generated tokens and overshoot, trained and valid tokens, training steps,
optimizer steps, training and evaluation wall time, and the per-step diagnostics of Figs. 6-7 (spec §15.4,
the official metric names). Over seeds: mean and 95 % t interval of the final accuracy and of its
improvement, the paired difference to ``grpo`` per seed, the accuracy curve, the tokens each method needs
to reach GRPO's final accuracy, and the diagnostics' means.

Writes the JSON (command, commit, settings, every run) to ``--out`` (default
``benchmarks/results/learning-<task>.json``), which the report stage renders, and prints it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from attnrl.config import resolve_config
from attnrl.eval.comparison import curve_points, summarise_runs
from attnrl.eval.metrics import summarise
from attnrl.stages.evaluate import evaluate
from attnrl.stages.train import train
from attnrl.training.checkpoint import checkpoint_name

from common import RESULTS, TASKS, log_to_stderr, provenance, warmed_up, workdir, write_json  # benchmarks/common.py

logger = logging.getLogger("benchmarks.learning")


@dataclass(frozen=True)
class Variant:
    """A row of the paper's tables: a method preset and the settings that make the row."""

    method: str
    overrides: tuple[str, ...]
    label: str
    tables: tuple[str, ...]


# Each ablation row changes one thing from the row above it. TreeRL is two-step on-policy (spec §13.2); the
# ADS rows stay on-policy (our on-policy loop adapts the batch size, which the official one cannot: AMBIG-13)
# so that "AttnRL on-policy" vs "AttnRL" isolates the one-step off-policy pipeline (spec §3.2).
VARIANTS: dict[str, Variant] = {
    "grpo": Variant("grpo", (), "GRPO (n = 6)", ("table1", "table3")),
    "grpo-n16": Variant("grpo", ("rollout.sampling.n=16",), "GRPO (n = 16)", ("table1",)),
    "treerl": Variant("treerl", (), "TreeRL", ("table1", "table2", "table3")),
    "treerl-off-policy": Variant("treerl", ("algorithm.off_policy=true",), "TreeRL w/ one-step off-policy",
                                 ("table3",)),
    "atb": Variant("treerl", ("algorithm.branching=fci",), "+ ATB", ("table2",)),
    "atb-ads-no-filter": Variant("attnrl", ("algorithm.off_policy=false", "algorithm.easy_filter=off"),
                                 "+ ATB + ADS (w/o attention-based filtering)", ("table2",)),
    "atb-ads-no-expansion": Variant("attnrl", ("algorithm.off_policy=false", "algorithm.expansion=uniform"),
                                    "+ ATB + ADS (w/o difficulty-aware expansion)", ("table2",)),
    "attnrl-on-policy": Variant("attnrl", ("algorithm.off_policy=false",), "AttnRL on-policy (ATB + ADS)",
                                ("table2",)),
    "attnrl": Variant("attnrl", (), "AttnRL", ("table1", "table2", "table3")),
}
BASELINE = "grpo"
RESULT_FILE = "result.json"  # in each run's directory: with --keep, a restarted benchmark skips the runs it has
# Per-step diagnostics kept per run (spec §15.4, Figs. 6-7; the official names).
DIAGNOSTICS = ("solve_all_ratio_mc", "solve_none_ratio_mc", "valid_ratio_mc", "valid_ratio_all", "valid_ratio",
               "correct_once_twice_invalid_ratio", "incorrect_once_twice_invalid_ratio", "easy_filtered_ratio",
               "filtered_ratio_all", "valid_token_ratio", "valid_token_ratio_built", "prompt_batch_size", "reward",
               "entropy", "response_length")


def scores(summary: dict) -> dict[str, float]:
    """Held-out mean@K in % per benchmark (difficulty level) and on average, from an evaluation's metrics.json."""
    out = {b["benchmark"]: round(100 * b["mean_at_k"], 2) for b in summary["benchmarks"]}
    out["average"] = round(100 * summary["average"]["mean_at_k"], 2)
    return out


class Benchmark:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args, self.root = args, root
        self.task = [*TASKS[args.task], "rollout.progress=false"]

    def overrides(self, seed: int, *extra: str) -> list[str]:
        return [f"seed={seed}", *self.task, f"train.max_generated_tokens={self.args.budget}",
                # The budget alone stops training; a checkpoint per step gives the curve's policies.
                "train.steps=100000", "train.save_every=1", "train.keep_checkpoints=100000", *extra, *self.args.set]

    def policy(self, seed: int) -> tuple[Path, dict[str, float]]:
        """The directory of the problems and warmed-up policy a seed starts from (shared by every method; by
        every seed with ``--policy-seed``), and the policy's held-out scores."""
        seed = seed if self.args.policy_seed is None else self.args.policy_seed
        root = self.root / f"seed{seed}"
        config = resolve_config(preset="tiny", overrides=self.overrides(seed))
        before = root / "runs" / "eval-init"
        warmed_up(config, root)
        if not (before / "metrics.json").is_file():
            evaluate(config, root, out_dir=before)
        return root, scores(json.loads((before / "metrics.json").read_text()))

    def run(self, seed: int, name: str, lr: float) -> dict:
        """One method on one seed at one learning rate: train to the budget, evaluate along the way."""
        variant = VARIANTS[name]
        root, before = self.policy(seed)
        config = resolve_config(preset="tiny", method=variant.method,
                                overrides=self.overrides(seed, *variant.overrides, f"train.lr={lr}"))
        run_dir = root / "runs" / f"{name}-seed{seed}-lr{lr:g}"
        if (done := run_dir / RESULT_FILE).is_file():  # a benchmark restarted with the same --keep
            logger.info("%s seed %d lr %g: the result in %s", name, seed, lr, done)
            return json.loads(done.read_text())
        shutil.rmtree(run_dir, ignore_errors=True)
        started = time.perf_counter()
        trained = train(config, root, run_dir=run_dir)
        train_s = time.perf_counter() - started
        rows = trained.metrics
        started = time.perf_counter()
        curve = [{"mark": 0, "tokens": 0, "step": 0, **before}]
        for mark, step in curve_points(rows, self.args.budget, self.args.eval_every):
            model = run_dir / "checkpoints" / checkpoint_name(step) / "model"
            after = scores(summarise(evaluate(config, root, model_dir=model, out_dir=run_dir / f"eval-{step}").scores))
            curve.append({"mark": mark, "tokens": int(rows[step - 1]["total_generated_tokens"]), "step": step, **after})
        final = scores(summarise(evaluate(config, root, model_dir=trained.final_model, out_dir=run_dir / "eval-final").scores))
        curve.append({"mark": self.args.budget, "tokens": trained.generated_tokens, "step": len(rows), **final})
        eval_s = time.perf_counter() - started
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a checkpoint per step: hundreds of MB
        result = {
            "seed": seed, "method": name, "lr": lr,
            "before": before["average"], "final": final["average"],
            "improvement": round(final["average"] - before["average"], 2),
            "final_per_level": final, "curve": curve,
            "generated_tokens": trained.generated_tokens,
            "overshoot": trained.generated_tokens - self.args.budget,
            "trained_tokens": int(sum(r["train_tokens"] for r in rows)),
            "valid_tokens": int(sum(r["valid_tokens"] for r in rows)),
            "steps": len(rows),
            "optimizer_steps": int(sum(r["update/optimizer_steps"] for r in rows)),
            "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
            "diagnostics": {key: [round(r[key], 4) for r in rows] for key in DIAGNOSTICS},
            "step_tokens": [int(r["total_generated_tokens"]) for r in rows],
        }
        (run_dir / RESULT_FILE).write_text(json.dumps(result))
        logger.info("%s seed %d lr %g: %.1f%% -> %.1f%% in %d steps, %d tokens (overshoot %+d), %.0f s + %.0f s eval",
                    name, seed, lr, before["average"], final["average"], len(rows), trained.generated_tokens,
                    result["overshoot"], train_s, eval_s)
        return result


def tune(bench: Benchmark, methods: list[str], lrs: list[float], seed: int) -> tuple[dict, dict]:
    """Each method at each rate on the tuning seed; the rate with the best final mean@K (ties: the smaller)."""
    sweep = {name: {f"{lr:g}": bench.run(seed, name, lr)["final"] for lr in lrs} for name in methods}
    chosen = {name: float(max(sorted(runs, key=float), key=lambda lr: runs[lr])) for name, runs in sweep.items()}
    return sweep, chosen


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="chain")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--budget", type=int, default=120_000, help="generated tokens per method and seed")
    parser.add_argument("--eval-every", type=int, default=40_000, help="generated tokens between evaluations")
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="learning rates to sweep on --tune-seed (default: the preset's train.lr, no sweep)")
    parser.add_argument("--tune-seed", type=int, default=100)
    parser.add_argument("--tune-only", action="store_true",
                        help="only the --lrs sweep on --tune-seed, written to lr_sweep-<task>.json (no comparison)")
    parser.add_argument("--policy-seed", type=int, default=None,
                        help="every seed starts from this seed's problems and warmed-up policy (default: its own)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/learning-<task>.json")
    parser.add_argument("--summarise", type=Path, default=None, metavar="RESULTS",
                        help="only recompute the summary of an existing results file from its runs (with this code)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the run directories here; a later run with the same --keep reuses the warmed-up policies")
    return parser


def summary_of(runs: list[dict], methods: list[str]) -> dict:
    return summarise_runs(runs, {name: VARIANTS[name].label for name in methods}, BASELINE, DIAGNOSTICS)


def resummarise(path: Path, source: dict) -> None:
    """Recompute a results file's summary from its runs, recording the commit that did."""
    record = json.loads(path.read_text())
    record["summary"] = summary_of(record["runs"], record["settings"]["methods"])
    record["summarised_at"] = source
    write_json(record, path)


def sweep_record(args: argparse.Namespace, source: dict, sweep: dict, chosen: dict, wall_s: float) -> dict:
    """A sweep on its own: each method's final held-out mean@K per rate on the tuning seed, and the best rate
    (with a later comparison run, ``--lrs`` reuses these runs from ``--keep`` and uses the chosen rates)."""
    return {"benchmark": "lr_sweep", "task": args.task, **source,
            "settings": {"budget": args.budget, "methods": args.methods, "lrs": args.lrs, "tune_seed": args.tune_seed,
                         "policy_seed": args.policy_seed, "threads": args.threads,
                         "overrides": [*TASKS[args.task], *args.set]},
            "labels": {name: VARIANTS[name].label for name in args.methods},
            "sweep": sweep, "chosen_lr": chosen, "wall_s": round(wall_s, 1)}


def main() -> None:
    args = parser().parse_args()
    source = provenance("learning.py", sys.argv[1:])  # at the start: the code that produces the result
    if args.summarise is not None:
        resummarise(args.summarise, source)
        return
    if args.lrs and args.tune_seed in args.seeds:
        raise SystemExit(f"--tune-seed {args.tune_seed} is one of --seeds: tune on a seed the comparison does not use")
    if args.tune_only and not args.lrs:
        raise SystemExit("--tune-only sweeps the learning rates of --lrs: give them")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log_to_stderr(logger.name)
    if len(args.seeds) < 2 and not args.tune_only:
        logger.warning("one seed: no intervals")
    started = time.perf_counter()
    with workdir(args.keep, "attnrl-learning-") as root:
        bench = Benchmark(args, root)
        sweep, chosen = tune(bench, args.methods, args.lrs, args.tune_seed) if args.lrs else ({}, {})
        default_lr = resolve_config(preset="tiny").train.lr
        runs = [] if args.tune_only else [bench.run(seed, name, chosen.get(name, default_lr))
                                          for seed in args.seeds for name in args.methods]
    if args.tune_only:
        write_json(sweep_record(args, source, sweep, chosen, time.perf_counter() - started),
                   args.out or RESULTS / f"lr_sweep-{args.task}.json")
        return
    record = {
        "benchmark": "learning", "task": args.task, **source,
        "settings": {"budget": args.budget, "eval_every": args.eval_every, "seeds": args.seeds,
                     "methods": args.methods, "lrs": args.lrs, "tune_seed": args.tune_seed if args.lrs else None,
                     "policy_seed": args.policy_seed,
                     "threads": args.threads, "overrides": [*bench.task, *args.set]},
        "labels": {name: VARIANTS[name].label for name in args.methods},
        "tables": {name: list(VARIANTS[name].tables) for name in args.methods},
        "chosen_lr": chosen, "sweep": sweep,
        "wall_s": round(time.perf_counter() - started, 1),
        "summary": summary_of(runs, args.methods),
        "runs": runs,
    }
    write_json(record, args.out or RESULTS / f"learning-{args.task}.json")


if __name__ == "__main__":
    main()
