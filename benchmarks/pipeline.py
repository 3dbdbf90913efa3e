"""Pipeline benchmark: time per trained token of the one-step off-policy loop (spec §3.2) against the
two-step on-policy loop (spec §3.1), on the distributed runtime with split placement.

    python benchmarks/pipeline.py [--steps 6] [--repeats 3] [--set key=value ...]

One trainer rank (a Ray actor, DeepSpeed ZeRO-0) and one hf rollout actor, one thread each: on a
2-core machine each side has a core. Variants, run from the same warmed-up policy:

* ``one_step_overlap``: the engines score the next batch (log-probs, entropies, FCI with the weights
  that sampled it) while the trainer updates on the current one (``distributed.overlap``);
* ``one_step_serial``: the same loop with the trainer scoring between generation and update;
* ``two_step``: generate, score, generate continuations, update, all in turn.

Repeats are interleaved (every variant once, then again), so a slow period of the machine hits all
variants alike. A run's time is every generation round's, the off-policy bootstrap round included
(it is real work that the one-step loop pays), divided by the tokens it trained on. Prints one JSON
object: every run's figures, per-variant means, the ratios one-step / two-step, and whether the
one-step loop sampled the same tokens with and without overlap (per step: rewards, generated and
trained tokens; and the final weights, bit for bit).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from attnrl.config import resolve_config
from attnrl.stages.prepare import prepare
from attnrl.stages.train import train
from attnrl.stages.warmup import warmup

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
RUNTIME = [
    "distributed.enabled=true", "distributed.placement=split", "distributed.trainer_ranks=1",
    "distributed.num_cpus_per_rank=1", "rollout.ray.num_actors=1", "rollout.ray.num_cpus_per_actor=1",
    "rollout.progress=false", "checks.enabled=false",
]
VARIANTS = {
    "one_step_overlap": ["algorithm.off_policy=true", "distributed.overlap=true"],
    "one_step_serial": ["algorithm.off_policy=true", "distributed.overlap=false"],
    "two_step": ["algorithm.off_policy=false"],
}


def _weights_digest(final: Path) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(final / "model.safetensors")).items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def run_variant(name: str, base: list[str], root: Path, steps: int, repeat: int) -> dict:
    config = resolve_config(path=PARAMS, overrides=[*base, *VARIANTS[name], f"train.steps={steps}",
                                                    f"train.save_every={steps}"])
    rounds: list[tuple[str, float]] = []
    phases: dict[str, float] = {}

    def timed(phase: str, fn):
        started = time.perf_counter()
        try:
            return fn()
        finally:
            seconds = time.perf_counter() - started
            if phase.startswith("step-") or phase == "bootstrap":
                rounds.append((phase, seconds))
            else:  # the driver's wait in each phase of a round (generate, score, update, sync-weights)
                phases[phase] = phases.get(phase, 0.0) + seconds

    started = time.perf_counter()
    result = train(config, root, run_dir=root / "runs" / f"{name}-{repeat}", phases=timed)
    wall = time.perf_counter() - started
    loop_s = sum(seconds for _, seconds in rounds)
    tokens = sum(row["train_tokens"] for row in result.metrics)
    return {
        "variant": name, "repeat": repeat, "steps": len(result.metrics), "rounds": len(rounds),
        "bootstrap_s": round(sum(s for p, s in rounds if p == "bootstrap"), 2),
        "loop_s": round(loop_s, 2), "wall_s": round(wall, 1), "trained_tokens": int(tokens),
        "s_per_1k_trained_tokens": round(1000 * loop_s / tokens, 4),
        "s_per_step": round(loop_s / len(result.metrics), 3),
        "phase_s": {name: round(seconds, 2) for name, seconds in phases.items()},
        "samples": [(row["reward"], row["generated_tokens"], row["train_tokens"]) for row in result.metrics],
        "weights": _weights_digest(result.final_model),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the prepared data and warmed-up policy here and reuse them on the next run")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = [*RUNTIME, *args.set]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="attnrl-pipeline-"))
    runs = []
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON result alone
            config = resolve_config(path=PARAMS, overrides=base)
            if not (workdir / config.paths.models_dir / "init").is_dir():
                prepare(config, workdir)
                warmup(config, workdir)
            shutil.rmtree(workdir / config.paths.runs_dir, ignore_errors=True)
            for repeat in range(args.repeats):
                for name in args.variants:
                    runs.append(run_variant(name, base, workdir, args.steps, repeat))
                    print(json.dumps({k: v for k, v in runs[-1].items() if k != "samples"}), file=sys.stderr)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    means = {}
    for name in args.variants:
        mine = [r for r in runs if r["variant"] == name]
        means[name] = {key: round(statistics.fmean(r[key] for r in mine), 4)
                       for key in ("s_per_1k_trained_tokens", "s_per_step", "loop_s", "bootstrap_s", "trained_tokens")}
    ratios = {}
    for one_step in ("one_step_overlap", "one_step_serial"):
        if one_step in means and "two_step" in means:
            per_repeat = [a["s_per_1k_trained_tokens"] / b["s_per_1k_trained_tokens"]
                          for a, b in zip([r for r in runs if r["variant"] == one_step],
                                          [r for r in runs if r["variant"] == "two_step"], strict=True)]
            ratios[f"{one_step}_over_two_step_per_token"] = {
                "mean_of_means": round(means[one_step]["s_per_1k_trained_tokens"]
                                       / means["two_step"]["s_per_1k_trained_tokens"], 3),
                "per_repeat": [round(x, 3) for x in per_repeat]}
    identical = None
    if "one_step_overlap" in means and "one_step_serial" in means:
        pairs = zip([r for r in runs if r["variant"] == "one_step_overlap"],
                    [r for r in runs if r["variant"] == "one_step_serial"], strict=True)
        identical = all(a["samples"] == b["samples"] and a["weights"] == b["weights"] for a, b in pairs)
    print(json.dumps({"cpus": os.cpu_count(), "steps": args.steps, "repeats": args.repeats, "overrides": args.set,
                      "ratios": ratios, "overlap_samples_identical": identical, "means": means,
                      "runs": [{k: v for k, v in r.items() if k != "samples"} for r in runs]}, indent=2))


if __name__ == "__main__":
    main()
