"""Run the ``attnrl`` command's ``main`` several times in this process, each sent SIGTERM at a random moment.

    python tests/integration/stop_harness.py --runs N --seed S -- ARGV...

Runs 0 and 1 are not signalled: the second's length is the usual one (the first also pays for imports and
connections). Every further run gets SIGTERM after a uniform delay
in [0, 0.9 × usual); a signal that lands after ``main`` returned (the run ended first) does not count, and
another run takes its place, until N signals have landed during a run. Prints one JSON line: the usual
length, and per run the status ``main`` returned, the seconds from the signal to the return, and the
processes the run started that still run after it returned. (``tests/integration/test_stopping.py``)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flows.cli import main  # noqa: E402
from flows.stopping import OwnProcesses  # noqa: E402

late: list[float] = []


def _late(signum: int, frame: object) -> None:
    late.append(time.monotonic())


def run_once(argv: list[str], delay: float | None) -> dict:
    own = OwnProcesses.now()
    sent: list[float] = []

    def fire() -> None:
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Timer(delay, fire) if delay is not None else None
    late.clear()
    started = time.monotonic()
    if timer is not None:
        timer.start()
    status = main(argv)
    returned = time.monotonic()
    if timer is not None:
        timer.cancel()
        timer.join()
    time.sleep(0.05)  # a signal sent just before the return reaches the handler outside main here
    left = []
    for process in own.started():
        try:
            if process.status() != "zombie":
                left.append(" ".join(process.cmdline()[:6]))
        except Exception:  # noqa: BLE001 - it ended meanwhile
            pass
    return {"delay_s": delay, "status": status, "took_s": returned - started, "signalled": bool(sent) and not late,
            "stopped_after_s": returned - sent[0] if sent else None, "left": left}


def harness() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    signal.signal(signal.SIGTERM, _late)  # outside main: a signal that came after the run ended
    rng = random.Random(args.seed)
    unsignalled = [run_once(argv, None) for _ in range(2)]  # the first also pays for imports and connections
    if any(run["status"] != 0 for run in unsignalled):
        raise SystemExit(f"an unsignalled run failed: {unsignalled}")
    usual = unsignalled[-1]["took_s"]
    runs: list[dict] = []
    for _ in range(3 * args.runs):
        if len(runs) == args.runs:
            break
        run = run_once(argv, rng.uniform(0, 0.9 * usual))
        if run["signalled"]:
            runs.append(run)
    print(json.dumps({"usual_s": usual, "runs": runs}))


if __name__ == "__main__":
    harness()
