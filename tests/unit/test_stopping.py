"""flows.stopping: a stop that a handler raised where Python drops it (a garbage-collection callback, a library's
bare except) still stops the run; the line a stopped command prints; the processes a command started end with it."""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
import time
import weakref

import psutil
import pytest

from attnrl.training.checkpoint import LATEST
from attnrl.utils import stopping
from flows.stopping import OwnProcesses, Stopped, reset_record, stage_running, stop_line, stop_on_signals


class Garbage:
    pass


@pytest.fixture(autouse=True)
def forget_the_signal():
    """A test that failed half-way must not leave its recorded signal to the next."""
    yield
    stopping.clear()


def _loop_with_checkpoints(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        stopping.checkpoint()


def test_sigterm_raised_inside_a_garbage_collection_callback_still_stops_the_run():
    said: list[str] = []
    with pytest.raises(Stopped) as stopped, stop_on_signals(OwnProcesses.now(), said.append):
        garbage = Garbage()
        # The handler runs inside the callback; Python prints "Exception ignored" and drops what it raised.
        ref = weakref.ref(garbage, lambda _: signal.raise_signal(signal.SIGTERM))
        del garbage
        gc.collect()
        assert ref() is None
        time.sleep(1.0)  # no checkpoint here: the stop must arrive by itself
    assert stopped.value.signum == signal.SIGTERM
    assert stopping.recorded() == signal.SIGTERM  # what the command's exit status will say


def test_a_stop_swallowed_by_a_bare_except_is_raised_again_at_the_next_checkpoint():
    with pytest.raises(KeyboardInterrupt), stop_on_signals(OwnProcesses.now(), print):
        try:
            signal.raise_signal(signal.SIGINT)
        except BaseException:  # noqa: BLE001 - a library that swallows everything
            pass
        deadline = time.monotonic() + 2
        while stopping.recorded() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the recorder thread reads the signal's byte
        _loop_with_checkpoints(5.0)


def test_the_stop_line_names_the_stage_and_what_is_kept(tmp_path):
    reset_record()
    checkpoints = tmp_path / "runs" / "train" / "checkpoints"
    (checkpoints / "step_000003").mkdir(parents=True)
    (checkpoints / LATEST).write_text("step_000003\n")
    with stage_running("prepare"):
        pass
    with pytest.raises(Stopped), stage_running("train", checkpoints):
        raise Stopped(signal.SIGTERM)
    line = stop_line(signal.SIGTERM)
    assert line.startswith("stopped by SIGTERM during train; kept: prepare completed; newest checkpoint "), line
    reset_record()
    assert stop_line(signal.SIGINT) == "stopped by SIGINT; kept: the outputs as they were before this command"


def test_the_processes_a_command_started_end_with_it_and_no_others():
    before = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        own = OwnProcesses.now()
        started = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                    "signal.SIG_IGN); time.sleep(60)"])  # needs SIGKILL
        ended = own.end(grace_s=0.5)
        assert len(ended) == 1 and "time.sleep(60)" in ended[0]
        started.wait(timeout=5)  # it ignored SIGTERM: SIGKILL ended it (psutil reaped it, so no status here)
        assert before.poll() is None and psutil.pid_exists(before.pid)
    finally:
        before.kill()
        before.wait()
