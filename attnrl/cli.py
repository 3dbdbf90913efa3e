"""``attnrl``: run a stage, or the demo, from the command line.

    attnrl demo                          prepare → warmup → evaluate on the embedded default
    attnrl prepare|warmup|evaluate       one stage
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

from attnrl.config import PRESETS, dump_config, resolve_config
from attnrl.config.schema import RunConfig
from attnrl.errors import AttnRLError
from attnrl.eval.metrics import format_table


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub at run time
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "config":
            config = resolve_config(preset=args.preset, overrides=args.set)
            sys.stdout.write(dump_config(config))
            return 0
        config = resolve_config(path=args.config, overrides=args.set)
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


def _demo(config: RunConfig, args: argparse.Namespace) -> int:
    timings = {}
    for name, stage in (("prepare", _prepare), ("warmup", _warmup), ("evaluate", _evaluate)):
        print(f"== {name} ==", flush=True)
        started = time.perf_counter()
        if stage(config, args):
            return 1
        timings[name] = round(time.perf_counter() - started, 1)
    print("stage seconds:", json.dumps(timings))
    return 0


COMMANDS = {"prepare": _prepare, "warmup": _warmup, "evaluate": _evaluate, "demo": _demo}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnrl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        cmd = sub.add_parser(name)
        cmd.add_argument("--config", default="params.yaml", help="run configuration (default: params.yaml)")
        cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        cmd.add_argument("--root", default=".", help="directory the config's relative paths start from")
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
