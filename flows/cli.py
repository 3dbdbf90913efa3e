"""``attnrl``: run a stage's flow, the whole pipeline, or the demo from the command line.

    attnrl prepare|warmup|difficulty|train|evaluate|report   one stage (its Prefect flow)
    attnrl pipeline      every stage in order, a check between stages (the ``pipeline`` flow)
    attnrl demo          the pipeline, then accuracy before and after RL per benchmark
    attnrl config --preset NAME          print a complete params.yaml for a preset
    attnrl alerts --webhook URL          alert URL when a deployment run fails (``flows/alerts.py``)
    attnrl remote        make $ATTNRL_DVC_REMOTE (and $ATTNRL_DVC_REMOTE_ENDPOINT) the DVC default remote

Every command runs the same flows as the deployments (one implementation per stage): with
``PREFECT_API_URL`` set (environment or profile), runs are recorded on that server and visible in
its UI; without it, on the server ``make server`` started for the project in the current directory
if it answers (``flows/prefect_api.py``); else the command starts a temporary local API for the run.
Ctrl-C and SIGTERM stop every command within seconds, with the status 130 or 143 and a line saying what
was stopped and what is kept; nothing it started is left running (``flows/stopping.py``).
Every stage reads ``--config`` (default ``params.yaml``) plus ``--set key.path=value`` overrides.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnrl.config import METHODS, PRESETS, dump_config, resolve_config
from attnrl.errors import AttnRLError
from attnrl.eval.metrics import BenchmarkScore, format_table
from attnrl.utils import stopping
from flows.stopping import OwnProcesses, reset_record, stop_line, stop_on_signals, stop_signal

if TYPE_CHECKING:
    from flows.prefect_api import PrefectAPI

STAGES = ("prepare", "warmup", "difficulty", "train", "evaluate", "report")
_exit_status: int | None = None  # main's, once it returned (console)


def console() -> int:
    """The ``attnrl`` program (``[project.scripts]``): :func:`main`, whose status the process exits with as soon
    as the interpreter has run every exit handler that the command's libraries registered (Prefect's last logs,
    Ray's shutdown), without the teardown that clears every loaded module one by one: 3–4 s on 2 cores with
    torch, transformers, Ray and Great Expectations loaded, spent after a stopped run said it stopped."""
    global _exit_status
    atexit.register(_exit_at_once)  # registered before the command imports them: runs after their handlers
    _exit_status = main()
    return _exit_status


def _exit_at_once() -> None:
    if _exit_status is None:  # main raised: the interpreter reports it and exits as usual
        return
    logging.shutdown()  # its own exit handler was registered earlier, when logging was imported
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub at run time
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network from a temporary API
    args = _parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:  # libraries at WARNING; attnrl's own lines and the flows' run logs at INFO, as a person reads them
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s  %(message)s", datefmt="%H:%M:%S")
        logging.getLogger("attnrl").setLevel(logging.INFO)

    def say(line: str) -> None:
        print(f"attnrl {args.command}: {line}", file=sys.stderr, flush=True)

    own = OwnProcesses.now()
    reset_record()
    try:
        with stop_on_signals(own, say):
            return _command(args)
    except BaseException as exc:  # Ctrl-C, SIGTERM (Prefect's TerminationSignal inside a flow run)
        # A signal that landed in a library's own error handling can come out as another error (Prefect's
        # "Task run is not set"): the recorded signal says how the command ended.
        signum = stop_signal(exc) or stopping.recorded()
        if signum is None:
            raise
        say(stop_line(signum))
        return 128 + signum
    finally:
        if left := own.end():
            say(f"ended {len(left)} processes it had started and left running: {'; '.join(left)}")
        stopping.clear()  # for a next command in this process


def _command(args: argparse.Namespace) -> int:
    try:
        if args.command == "config":
            sys.stdout.write(dump_config(resolve_config(preset=args.preset, overrides=args.set)))
            return 0
        if args.command == "alerts":
            return _alerts(args)
        if args.command == "remote":
            return _remote(args)
        # A bad --set or config fails here, in one line, before a Prefect API starts; the flow resolves it
        # again inside its run (the run's record of what it was given).
        resolve_config(path=args.config, method=args.method, overrides=args.set)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-shard bars on every save/load drown the stage output
        from flows.console import quiet_console
        from flows.prefect_api import project_prefect_api

        if not args.verbose:
            quiet_console()

        started = time.perf_counter()
        with project_prefect_api(Path.cwd()) as api:
            if api.note:
                print(f"attnrl {args.command}: {api.note}", file=sys.stderr)
            COMMANDS[args.command](args, api)
        print(f"attnrl {args.command}: done in {time.perf_counter() - started:.0f}s")
        return 0
    except AttnRLError as exc:
        print(f"attnrl {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _alerts(args: argparse.Namespace) -> int:
    """Needs a Prefect server (``PREFECT_API_URL``, or the project's ``make server``): a temporary API
    would forget the automation when the command exits."""
    from flows.alerts import deployment_names, ensure_failure_alert
    from flows.prefect_api import project_prefect_api

    with project_prefect_api(Path.cwd(), start_temporary=False) as api:
        if api.note:
            print(f"attnrl alerts: {api.note}", file=sys.stderr)
        if not _has_api_url():
            raise AttnRLError("attnrl alerts needs a Prefect server: set PREFECT_API_URL or run `make server`")
        deployments = deployment_names(Path(args.prefect_yaml))
        automation = ensure_failure_alert(args.webhook, deployments)
    print(f"attnrl alerts: automation {automation} posts to {args.webhook} when a run of "
          f"{', '.join(deployments)} fails or crashes")
    return 0


def _remote(args: argparse.Namespace) -> int:
    from infra import dvc_store

    name = dvc_store.remote_from_env(args.root)
    if name is None:
        raise AttnRLError(f"${dvc_store.REMOTE_URL_ENV} is not set: export it (s3://bucket/prefix), with "
                          f"${dvc_store.REMOTE_ENDPOINT_ENV} for an S3-compatible store and AWS_* credentials")
    print(f"attnrl remote: DVC default remote {name!r} is {os.environ[dvc_store.REMOTE_URL_ENV]} (.dvc/config.local)")
    return 0


def _has_api_url() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def _flow_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"config_path": args.config, "overrides": args.set, "root": args.root, "method": args.method}


def _stage(name: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace, api: PrefectAPI) -> None:
        import flows.stages as stage_flows

        stage_flows.import_stage_code()
        flow = getattr(stage_flows, f"{name}_flow")
        extra = {"model_dir": args.model, "out_dir": args.out} if name == "evaluate" else {}
        result = flow(**_flow_args(args), **extra)
        _print_result(name, result)

    return run


def _print_result(stage: str, result: Any) -> None:
    if stage == "prepare":
        print(f"prepared {result.train_count} training problems -> {result.train_path}")
        for name, path in result.eval_paths.items():
            print(f"prepared {result.eval_counts[name]} evaluation problems ({name}) -> {path}")
    elif stage == "warmup":
        loss = f"final SFT loss {result.history[-1]['loss']:.4f}" if result.history else "initial policy recorded"
        print(f"warmup: {loss} -> {result.model_dir}")
    elif stage == "difficulty":
        print(f"difficulty: kept {result.kept} of {result.estimated} problems; ADS easy mean "
              f"{result.easy_mean.mean:.4f} over {result.easy_mean.count} always-solved -> {result.table_path}")
    elif stage == "train":
        last = result.metrics[-1] if result.metrics else {}
        resumed = f" (resumed from {result.resumed_from})" if result.resumed_from else ""
        print(f"train: {len(result.metrics)} steps{resumed}, last reward {last.get('reward', float('nan')):.3f}, "
              f"{int(last.get('total_generated_tokens', 0))} tokens generated -> {result.final_model}")
    elif stage == "evaluate":
        print(format_table(result.scores))
        print(f"evaluate -> {result.metrics_path}")
    elif stage == "report":
        print(f"report: {result.html_path} ({', '.join(p.name for p in result.figures)})")


def _pipeline(args: argparse.Namespace, api: PrefectAPI) -> None:
    from flows.pipeline import pipeline

    result, run = _with_run(pipeline, api.temporary, **_flow_args(args), experiment=args.experiment)
    print(format_table(result.after.scores))
    print(f"report: {Path(result.report.html_path).resolve()}")
    print(run)


def _demo(args: argparse.Namespace, api: PrefectAPI) -> None:
    """The pipeline on the embedded default, then mean@K before and after RL, per benchmark."""
    from flows.console import headline
    from flows.pipeline import pipeline

    result, run = _with_run(pipeline, api.temporary, **_flow_args(args))
    print("\n== accuracy of the warmed-up policy ==")
    print(format_table(result.before.scores))
    print("\n== accuracy after RL ==")
    print(format_table(result.after.scores))
    print()
    print(before_after(result.before.scores, result.after.scores))
    print(f"\ntraining: {headline(result.train)}")
    print(f"report: {Path(result.report.html_path).resolve()}")
    print(run)


def _with_run(flow: Any, temporary_api: bool, **parameters: Any) -> tuple[Any, str]:
    """Run ``flow``; its result and a line naming its Prefect run (the UI's link where a UI serves it)."""
    from prefect.utilities.urls import url_for

    state = flow(**parameters, return_state=True)
    result = state.result()  # a failed run raises its error here
    run_id = state.state_details.flow_run_id
    if temporary_api:
        return result, (f"Prefect run: {run_id}, on a temporary API that ended with this command "
                        "(`make server` keeps runs)")
    return result, f"Prefect run: {url_for('flow-run', obj_id=run_id) or run_id} (logs: prefect flow-run logs {run_id})"


def before_after(before: list[BenchmarkScore], after: list[BenchmarkScore]) -> str:
    lines = [f"{'benchmark':<24} {'before':>8} {'after':>8} {'change':>8}   (mean@K)"]
    for b, a in zip(before, after, strict=True):
        lines.append(f"{b.benchmark:<24} {100 * b.mean_at_k:>7.1f}% {100 * a.mean_at_k:>7.1f}% "
                     f"{100 * (a.mean_at_k - b.mean_at_k):>+7.1f}")
    mean_b = sum(s.mean_at_k for s in before) / len(before)
    mean_a = sum(s.mean_at_k for s in after) / len(after)
    lines.append(f"{'average':<24} {100 * mean_b:>7.1f}% {100 * mean_a:>7.1f}% {100 * (mean_a - mean_b):>+7.1f}")
    return "\n".join(lines)


COMMANDS: dict[str, Callable[[argparse.Namespace, PrefectAPI], None]] = {
    **{name: _stage(name) for name in STAGES}, "pipeline": _pipeline, "demo": _demo,
}


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
        if name == "pipeline":
            cmd.add_argument("--experiment", default=None, metavar="NAME",
                             help="save the run as DVC experiment NAME-<date> and push it (flows/pipeline.py)")
        if name == "evaluate":
            cmd.add_argument("--model", default=None, help="model directory (default: the initial policy)")
            cmd.add_argument("--out", default=None, help="output directory (default: runs/eval)")
    alerts = sub.add_parser("alerts", help="post to a webhook when a deployment run fails or crashes")
    alerts.add_argument("--webhook", required=True, metavar="URL", help="receiver of the JSON POST")
    alerts.add_argument("--prefect-yaml", default="prefect.yaml", help="the deployments to watch")
    remote = sub.add_parser("remote", help="the DVC default remote from $ATTNRL_DVC_REMOTE")
    remote.add_argument("--root", default=".", help="the DVC project (default: the current directory)")
    config_cmd = sub.add_parser("config", help="print a complete configuration for a preset")
    config_cmd.add_argument("--preset", required=True, choices=sorted(PRESETS))
    config_cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser


if __name__ == "__main__":
    raise SystemExit(console())
