"""``attnrl``: run a stage, or the demo, from the command line.

    attnrl demo          prepare → warmup → evaluate → train → evaluate → report (embedded default)
    attnrl prepare|warmup|difficulty|train|evaluate|report   one stage
    attnrl config --preset NAME          print a complete params.yaml for a preset

Every stage reads ``--config`` (default ``params.yaml``) plus ``--set key.path=value`` overrides.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from attnrl.config import METHODS, PRESETS, dump_config, resolve_config
from attnrl.config.schema import RunConfig
from attnrl.errors import AttnRLError
from attnrl.eval.metrics import format_table


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub at run time
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars on every save/load drown the stage output
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "config":
            config = resolve_config(preset=args.preset, overrides=args.set)
            sys.stdout.write(dump_config(config))
            return 0
        config = resolve_config(path=args.config, method=args.method, overrides=args.set)
        return COMMANDS[args.command](config, args)
    except AttnRLError as exc:
        print(f"attnrl {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _prepare(config: RunConfig, args: argparse.Namespace) -> int:
    from attnrl.stages.prepare import prepare

    result = prepare(config, args.root)
    print(f"prepared {result.train_count} training problems -> {result.train_path}")
    for name, path in result.eval_paths.items():
        print(f"prepared {result.eval_counts[name]} evaluation problems ({name}) -> {path}")
    return 0


def _warmup(config: RunConfig, args: argparse.Namespace) -> int:
    from attnrl.stages.warmup import warmup

    started = time.perf_counter()
    result = warmup(config, args.root)
    if result.history:
        print(f"warmup: {config.warmup.steps} steps, final loss {result.history[-1]['loss']:.4f}, "
              f"{time.perf_counter() - started:.0f}s -> {result.model_dir}")
    else:
        print(f"warmup: initial policy recorded -> {result.model_dir}")
    return 0


def _evaluate(config: RunConfig, args: argparse.Namespace) -> int:
    from attnrl.stages.evaluate import evaluate

    started = time.perf_counter()
    result = evaluate(config, args.root, model_dir=args.model)
    print(format_table(result.scores))
    print(f"evaluate: {time.perf_counter() - started:.0f}s -> {result.metrics_path}")
    return 0


def _difficulty(config: RunConfig, args: argparse.Namespace) -> int:
    from attnrl.stages.difficulty import estimate_difficulty

    started = time.perf_counter()
    result = estimate_difficulty(config, args.root)
    print(f"difficulty: kept {result.kept} of {result.estimated} problems; ADS easy mean "
          f"{result.easy_mean.mean:.4f} over {result.easy_mean.count} always-solved; "
          f"{time.perf_counter() - started:.0f}s -> {result.table_path}")
    return 0


def _train(config: RunConfig, args: argparse.Namespace) -> int:
    from attnrl.stages.train import train

    started = time.perf_counter()

    def report(stats: dict[str, float]) -> None:
        print(f"  step {int(stats['step'])}/{config.train.steps}  reward {stats['reward']:.3f}  "
              f"mc reward {stats['mc_reward']:.3f}  sequences {int(stats['train_sequences'])}  "
              f"prompts {int(stats['prompt_batch_size'])}  tokens {int(stats['generated_tokens'])}  "
              f"{stats['step_time_s']:.1f}s", flush=True)

    result = train(config, args.root, on_step=report)
    if result.resumed_from is not None:
        print(f"train: resumed from {result.resumed_from}")
    last = result.metrics[-1] if result.metrics else {}
    print(f"train: {len(result.metrics)} steps, last reward {last.get('reward', float('nan')):.3f}, "
          f"{int(last.get('total_generated_tokens', 0))} tokens generated, "
          f"{time.perf_counter() - started:.0f}s -> {result.final_model}")
    return 0


def _report(config: RunConfig, args: argparse.Namespace) -> int:
    from attnrl.stages.report import build_report

    result = build_report(config, args.root)
    print(f"report: {result.html_path} ({', '.join(p.name for p in result.figures)})")
    return 0


def _demo(config: RunConfig, args: argparse.Namespace) -> int:
    """Warm up, evaluate, train with RL, evaluate the trained policy: accuracy before and after."""
    from attnrl.stages.evaluate import evaluate
    from attnrl.stages.layout import Layout

    layout = Layout.of(config, args.root)
    timings: dict[str, float] = {}

    def timed(name, fn):
        print(f"== {name} ==", flush=True)
        started = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - started, 1)
        return result

    timed("prepare", lambda: _prepare(config, args))
    timed("warmup", lambda: _warmup(config, args))
    if config.difficulty.enabled:
        timed("difficulty", lambda: _difficulty(config, args))
    before = timed("evaluate warmed-up policy", lambda: evaluate(config, args.root, out_dir=layout.runs_dir / "eval-init"))
    print(format_table(before.scores))
    timed("train (RL)", lambda: _train(config, args))
    after = timed("evaluate trained policy", lambda: evaluate(config, args.root, model_dir=layout.train_dir / "final"))
    print(format_table(after.scores))
    print(_before_after(before.scores, after.scores))
    timed("report", lambda: _report(config, args))
    print("stage seconds:", json.dumps(timings))
    return 0


def _before_after(before, after) -> str:
    lines = [f"{'benchmark':<24} {'before':>8} {'after':>8} {'change':>8}   (mean@K)"]
    for b, a in zip(before, after, strict=True):
        lines.append(f"{b.benchmark:<24} {100 * b.mean_at_k:>7.1f}% {100 * a.mean_at_k:>7.1f}% {100 * (a.mean_at_k - b.mean_at_k):>+7.1f}")
    mean_b = sum(s.mean_at_k for s in before) / len(before)
    mean_a = sum(s.mean_at_k for s in after) / len(after)
    lines.append(f"{'average':<24} {100 * mean_b:>7.1f}% {100 * mean_a:>7.1f}% {100 * (mean_a - mean_b):>+7.1f}")
    return "\n".join(lines)


COMMANDS = {"prepare": _prepare, "warmup": _warmup, "difficulty": _difficulty, "evaluate": _evaluate,
            "train": _train, "report": _report, "demo": _demo}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnrl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        cmd = sub.add_parser(name)
        cmd.add_argument("--config", default="params.yaml", help="run configuration (default: params.yaml)")
        cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        cmd.add_argument("--root", default=".", help="directory the config's relative paths start from")
        cmd.add_argument("--method", default=None, choices=sorted(METHODS), help="apply a method preset")
        if name == "evaluate":
            cmd.add_argument("--model", default=None, help="model directory (default: the initial policy)")
        if name == "demo":
            cmd.set_defaults(model=None)
    config_cmd = sub.add_parser("config", help="print a complete configuration for a preset")
    config_cmd.add_argument("--preset", required=True, choices=sorted(PRESETS))
    config_cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
