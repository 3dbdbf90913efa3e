"""Pipeline benchmark: wall time per training step of the one-step off-policy loop against the two-step
on-policy loop (spec §3.1, §3.2), with rollouts on Ray actors and in-process.

    python benchmarks/pipeline.py [--steps 8] [--actors 1] [--set key=value ...]

One warmed-up policy (embedded default) is trained ``--steps`` steps in each variant from the same
start. With Ray actors the one-step loop submits a step's generation round in the background: the
continuations of the current batch are still being generated while the trainer scores the next
batch (``attnrl.training.loop``). Prints one JSON object: per variant the mean and median step time
(steady state: the first step, which pays start-up costs, is left out), the total training wall time
over the training steps (the off-policy bootstrap call included), generation rounds and generated
tokens per step; and the ratios off-policy / on-policy.
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
from attnrl.stages.prepare import prepare
from attnrl.stages.train import train
from attnrl.stages.warmup import warmup

VARIANTS = {
    "one_step_off_policy_ray": ["algorithm.off_policy=true", "rollout.ray.enabled=true"],
    "two_step_on_policy_ray": ["algorithm.off_policy=false", "rollout.ray.enabled=true"],
    "one_step_off_policy_in_process": ["algorithm.off_policy=true", "rollout.ray.enabled=false"],
    "two_step_on_policy_in_process": ["algorithm.off_policy=false", "rollout.ray.enabled=false"],
}


def run_variant(name: str, base: list[str], root: Path, steps: int) -> dict[str, float]:
    config = resolve_config(path=Path(__file__).resolve().parents[1] / "params.yaml",
                            overrides=[*base, *VARIANTS[name], f"train.steps={steps}", f"train.save_every={steps}"])
    started = time.perf_counter()
    result = train(config, root, run_dir=root / "runs" / name)
    total = time.perf_counter() - started
    times = [row["step_time_s"] for row in result.metrics]
    steady = times[1:] or times
    tokens = [row["generated_tokens"] for row in result.metrics]
    return {
        "steps": len(times),
        "mean_step_s": round(statistics.fmean(steady), 3),
        "median_step_s": round(statistics.median(steady), 3),
        "train_wall_s": round(total, 1),
        "generated_tokens_per_step": round(statistics.fmean(tokens)),
        "generation_rounds_per_step": 1 if config.algorithm.off_policy else 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--actors", type=int, default=1, help="Ray rollout actors (1 CPU each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the trainer process")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = [f"rollout.ray.num_actors={args.actors}", "rollout.progress=false", "train.backend=torch", *args.set]
    workdir = Path(tempfile.mkdtemp(prefix="attnrl-pipeline-"))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON result alone
            config = resolve_config(path=Path(__file__).resolve().parents[1] / "params.yaml", overrides=base)
            prepare(config, workdir)
            warmup(config, workdir)
            results = {name: run_variant(name, base, workdir, args.steps) for name in args.variants}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratios = {}
    for where in ("ray", "in_process"):
        off, on = results.get(f"one_step_off_policy_{where}"), results.get(f"two_step_on_policy_{where}")
        if off and on:
            ratios[f"off_over_on_{where}"] = round(off["mean_step_s"] / on["mean_step_s"], 3)
    print(json.dumps({"cpus": os.cpu_count(), "actors": args.actors, "threads": args.threads,
                      "steps": args.steps, "overrides": args.set, "ratios": ratios, "variants": results}, indent=2))


if __name__ == "__main__":
    main()
