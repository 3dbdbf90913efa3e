"""Stopping a command or a flow run: Ctrl-C, SIGTERM and the UI's Cancel always stop it, and nothing is left behind.

* :func:`signals_recorded` (every flow run, and the command line): every SIGINT and SIGTERM the process
  receives is recorded (``attnrl.utils.stopping``) by a thread that reads the signal wakeup fd, which
  the interpreter writes for every signal whatever Python handler runs; the stages' checkpoints raise a
  recorded signal again where its first exception was lost. A stop exception dropped as unraisable (a
  garbage-collection callback, a ``__del__``) is delivered again at once (``_thread.interrupt_main``
  from another thread a moment later, once the main thread is out of the callback).
* :func:`stop_on_signals` (the command line): Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM raises
  :class:`Stopped` wherever the main thread is. Inside a flow run Prefect's own SIGTERM handler raises
  its ``TerminationSignal`` instead, marks the run, and sends SIGTERM again to the handler here. A
  second Ctrl-C ends the command at once: the processes it started are killed and it exits with 130.
* :class:`OwnProcesses`: the processes a command started (the temporary Prefect API, a local Ray and its
  actors, grader processes); whatever is still running when the command ends is terminated.
* :func:`stage_running` and :func:`stop_line`: which stage a stopped command was in and what it kept.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from attnrl.utils import stopping

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REDELIVER_AFTER_S = 0.05  # a stop lost as unraisable is delivered again this much later, out of the callback
END_GRACE_S = 5.0  # what a process the command started gets between SIGTERM and SIGKILL
RESOURCE_TRACKER = "multiprocessing.resource_tracker"  # ignores SIGTERM; ends with its parent anyway


class Stopped(BaseException):
    """The command was asked to stop by ``signum``; it exits with ``128 + signum``, as a shell reports it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_signal(exc: BaseException) -> int | None:
    """The signal a stop exception stands for (``Stopped``, ``KeyboardInterrupt``, Prefect's
    ``TerminationSignal``); None for any other exception."""
    if isinstance(exc, Stopped):
        return exc.signum
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    from prefect.exceptions import TerminationSignal

    return exc.signal if isinstance(exc, TerminationSignal) else None


# -- recording every signal --------------------------------------------------------------------------

_recording = False  # the command line and each flow run enter it; the outermost records


def _read_signals(reader: socket.socket) -> None:
    while data := reader.recv(64):  # one byte per signal; empty once the writer is closed
        for signum in data:
            if signum in STOP_SIGNALS:
                stopping.record(signum)


def _redeliver_unraisable(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    def hook(unraisable: Any) -> None:
        signum = stop_signal(unraisable.exc_value) if unraisable.exc_value is not None else None
        if signum is None:
            previous(unraisable)
            return
        stopping.record(signum)
        stopping.expect_redelivery(signum)
        # Shortly, from another thread: called here, the handler would run again at once, inside this hook.
        again = threading.Timer(REDELIVER_AFTER_S, _thread.interrupt_main, args=(signum,))
        again.daemon = True
        again.start()

    return hook


@contextlib.contextmanager
def signals_recorded() -> Iterator[None]:
    """Record every stop signal while the body runs (main thread only: signals reach no other)."""
    global _recording
    if _recording or threading.current_thread() is not threading.main_thread():
        yield  # already recorded by an outer run (a subflow), or not the main thread: signals reach no other
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _redeliver_unraisable(previous_hook)
    thread = threading.Thread(target=_read_signals, args=(reader,), name="attnrl-signals", daemon=True)
    thread.start()
    _recording = True
    try:
        yield
    finally:
        _recording = False
        signal.set_wakeup_fd(previous_fd)
        sys.unraisablehook = previous_hook
        writer.close()
        thread.join(timeout=1)
        reader.close()


# -- the processes a command started ------------------------------------------------------------------

def _key(process: psutil.Process) -> tuple[int, float]:
    return process.pid, process.create_time()


@dataclass
class OwnProcesses:
    """The descendants this process had when the command started, to tell them from those it started."""

    before: set[tuple[int, float]] = field(default_factory=set)

    @classmethod
    def now(cls) -> OwnProcesses:
        return cls({_key(p) for p in _descendants()})

    def started(self) -> list[psutil.Process]:
        """Descendants started since (a reparented grandchild is no longer seen: its parent ends it)."""
        return [p for p in _descendants() if _key(p) not in self.before]

    def end(self, grace_s: float = END_GRACE_S) -> list[str]:
        """SIGTERM every process started since, SIGKILL what is left after ``grace_s``; the command lines of those
        that were left running (multiprocessing's resource tracker, which ignores SIGTERM and ends with this
        process anyway, is killed and not reported)."""
        processes, left = [], []
        for process in self.started():
            with contextlib.suppress(psutil.Error):
                command = " ".join(process.cmdline()[:4])
                if RESOURCE_TRACKER in command:
                    process.kill()
                    continue
                left.append(command)
                process.terminate()
                processes.append(process)
        _, alive = psutil.wait_procs(processes, timeout=grace_s)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=grace_s)
        return left


def _descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


# -- the command line's handlers --------------------------------------------------------------------

@contextlib.contextmanager
def stop_on_signals(own: OwnProcesses, say: Callable[[str], None]) -> Iterator[None]:
    """Ctrl-C and SIGTERM stop the command (see the module's docstring); a second Ctrl-C ends it at once,
    after ``say`` told the person so."""
    interrupted = False

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        if interrupted and not stopping.take_redelivery(signum):
            say("second Ctrl-C: stopping at once, without cleaning up the run")
            own.end(grace_s=0)
            os._exit(128 + signum)
        interrupted = True
        raise KeyboardInterrupt

    def on_terminate(signum: int, frame: FrameType | None) -> None:
        stopping.take_redelivery(signum)
        raise Stopped(signum)

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, on_interrupt),
                signal.SIGTERM: signal.signal(signal.SIGTERM, on_terminate)}
    try:
        with signals_recorded():
            yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# -- what a stopped command says ----------------------------------------------------------------------

@dataclass
class RunRecord:
    """The command's stages so far: the one running, those completed, the train stage's checkpoints."""

    current: str | None = None
    completed: list[str] = field(default_factory=list)
    checkpoints: Path | None = None


_record = RunRecord()


def reset_record() -> None:
    global _record
    _record = RunRecord()


@contextlib.contextmanager
def stage_running(name: str, checkpoints: Path | None = None) -> Iterator[None]:
    """Note that stage ``name`` runs (``checkpoints``: where it saves them); completed if the body returns."""
    _record.current = name
    if checkpoints is not None:
        _record.checkpoints = checkpoints
    yield
    _record.completed.append(name)
    _record.current = None


def stop_line(signum: int) -> str:
    """``stopped by SIGTERM during train; kept: prepare, warmup completed; newest checkpoint …``."""
    from attnrl.training.checkpoint import latest_checkpoint

    where = f" during {_record.current}" if _record.current else ""
    kept = [f"{', '.join(_record.completed)} completed"] if _record.completed else []
    if _record.checkpoints is not None:
        newest = latest_checkpoint(_record.checkpoints)
        kept.append(f"newest checkpoint {newest} (the same command resumes from it)" if newest is not None
                    else f"no checkpoint yet in {_record.checkpoints}")
    return (f"stopped by {signal.Signals(signum).name}{where}; kept: "
            f"{'; '.join(kept) if kept else 'the outputs as they were before this command'}")
