"""Run a ``pip install`` and show its progress in a few lines instead of pip's hundreds, or nothing.

    python3 scripts/pip_progress.py LABEL -- PYTHON -m pip install -r requirements.lock

pip with ``--quiet`` prints nothing for the minutes a fresh install takes; without it, a line per
package and download. This prints one line per phase (collecting, installing) and, while a phase
lasts, its count every ``EVERY_S`` seconds: whole lines, so two installs that ``make -j2`` runs side by
side stay readable, on a terminal or in a CI log. Warnings about
pip's configured find-links directories that do not exist are dropped; any other warning or error is
printed as pip wrote it, and a failed install prints pip's last lines and exits with pip's status.
Standard library only: it runs before any environment exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import deque

EVERY_S = 10.0
COLLECTING = ("Collecting ", "Obtaining ", "Requirement already satisfied: ")
INSTALLING = "Installing collected packages: "
NOISE = "is ignored: it is neither a file nor a directory"
TAIL_LINES = 60


class Status:
    """The phase and count, printed when they change phase and every ``EVERY_S`` seconds."""

    def __init__(self, label: str, expected: int | None) -> None:
        self.label, self.expected = label, expected
        self.start = time.monotonic()
        self.phase, self.count = "starting pip", 0
        self.lock = threading.Lock()

    def line(self) -> str:
        count = ""
        if self.phase == "collecting":
            count = f" {self.count}" + (f"/{self.expected}" if self.expected else "") + " packages"
        return f"install {self.label}: {self.phase}{count} ({time.monotonic() - self.start:.0f}s)"

    def show(self) -> None:
        self.say(self.line())

    def say(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)


def expected_packages(command: list[str]) -> int | None:
    """The number of pinned lines in the ``-r`` file, when there is one: the collecting phase's total."""
    if "-r" not in command:
        return None
    path = command[command.index("-r") + 1]
    with open(path, encoding="utf-8") as handle:
        return sum(1 for line in handle if "==" in line and not line.lstrip().startswith("#"))


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    label, command = argv[0], [*argv[2:], "--progress-bar", "off"]
    status = Status(label, expected_packages(command))
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(EVERY_S):
            status.show()

    threading.Thread(target=tick, daemon=True).start()
    status.show()
    # Unbuffered: pip writes to a pipe here, and block buffering would deliver its lines in bursts.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert process.stdout is not None
    for raw in process.stdout:
        line = raw.rstrip()
        if NOISE in line:
            continue
        if line.startswith(COLLECTING):
            status.phase, status.count = "collecting", status.count + 1
        elif line.startswith(INSTALLING):
            status.phase = f"installing {len(line[len(INSTALLING):].split(', '))} packages"
            status.show()
        elif line.startswith(("WARNING", "ERROR")):
            status.say(line)
            continue
        tail.append(line)
    code = process.wait()
    done.set()
    if code != 0:
        status.say(f"pip failed (exit {code}); its other last lines:")
        for line in tail:
            status.say(f"  {line}")
        return code
    status.phase = "done"
    status.show()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
