"""Learning benchmark: warmup, then the attnrl, treerl and grpo methods on the embedded default
with the same generation budget, over several seeds; held-out accuracy before and after.

    python benchmarks/learning.py --seeds 1 2 3 --budget 400000 [--set key=value ...]

Prints one JSON object: per seed and method, held-out mean@K per difficulty level and on
average before and after RL, generated tokens, training steps and wall time; and the mean
improvement per method over seeds. Each seed gets its own warmed-up model, shared by the three
methods, so the comparison starts from the same policy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from attnrl.config import resolve_config
from attnrl.eval.metrics import summarise
from attnrl.stages.evaluate import evaluate
from attnrl.stages.prepare import prepare
from attnrl.stages.train import train
from attnrl.stages.warmup import warmup

METHODS = ("attnrl", "treerl", "grpo")


def _scores(result) -> dict[str, float]:
    summary = summarise(result.scores)
    out = {b["benchmark"]: round(100 * b["mean_at_k"], 2) for b in summary["benchmarks"]}
    out["average"] = round(100 * summary["average"]["mean_at_k"], 2)
    return out


def run_seed(seed: int, budget: int, methods: list[str], overrides: list[str], workdir: Path) -> dict:
    base = [f"seed={seed}", f"train.max_generated_tokens={budget}", "rollout.progress=false", *overrides]
    root = workdir / f"seed{seed}"
    config = resolve_config(preset="tiny", overrides=base)
    started = time.perf_counter()
    prepare(config, root)
    warmup(config, root)
    before = _scores(evaluate(config, root, out_dir=root / "runs" / "eval-init"))
    result = {"warmup_s": round(time.perf_counter() - started, 1), "before": before, "methods": {}}
    for method in methods:
        method_config = resolve_config(preset="tiny", method=method, overrides=base)
        started = time.perf_counter()
        trained = train(method_config, root, run_dir=root / "runs" / method)
        train_s = time.perf_counter() - started
        after = _scores(evaluate(method_config, root, model_dir=trained.final_model, out_dir=root / "runs" / f"eval-{method}"))
        result["methods"][method] = {
            "after": after,
            "improvement": round(after["average"] - before["average"], 2),
            "steps": len(trained.metrics),
            "generated_tokens": int(trained.metrics[-1]["total_generated_tokens"]) if trained.metrics else 0,
            "train_s": round(train_s, 1),
        }
        print(json.dumps({"seed": seed, "method": method, **result["methods"][method]}), file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--budget", type=int, default=400_000, help="generated tokens per method and seed")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--keep", type=Path, default=None, help="keep run directories here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="attnrl-learning-"))
    try:
        # Libraries print progress on stdout; keep stdout for the JSON result alone.
        with contextlib.redirect_stdout(sys.stderr):
            seeds = {seed: run_seed(seed, args.budget, args.methods, args.set, workdir) for seed in args.seeds}
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = {
        method: {
            "mean_improvement": round(statistics.fmean(s["methods"][method]["improvement"] for s in seeds.values()), 2),
            "mean_after": round(statistics.fmean(s["methods"][method]["after"]["average"] for s in seeds.values()), 2),
            "mean_generated_tokens": round(statistics.fmean(s["methods"][method]["generated_tokens"] for s in seeds.values())),
        }
        for method in args.methods
    }
    print(json.dumps({
        "threads": args.threads,
        "budget_tokens": args.budget,
        "mean_before": round(statistics.fmean(s["before"]["average"] for s in seeds.values()), 2),
        "summary": summary,
        "seeds": seeds,
        "overrides": args.set,
    }, indent=2))


if __name__ == "__main__":
    main()
