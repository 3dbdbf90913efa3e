"""A stop that a signal asked for reaches the run, even where its handler's exception was lost.

A signal's Python handler runs in the main thread between two bytecodes and raises there
(``KeyboardInterrupt`` for Ctrl-C, Prefect's ``TerminationSignal`` for SIGTERM inside a flow run).
Raised inside a garbage-collection callback or a ``__del__``, the exception is printed as "Exception
ignored" and dropped, and the run goes on as if nothing had happened. So the process that runs a
stage records every stop signal where no handler can drop it (``flows.stopping``), and the long
loops call :func:`checkpoint` between units of work (a warmup step, an evaluation call, a training
phase, a micro-batch): a recorded signal is raised again there, through whatever handler is
installed at that moment, in a frame that lets its exception through.

Nothing here installs a handler or records a signal by itself: in a process without a recorder (a
library call, a unit test) :func:`checkpoint` costs one comparison.
"""

from __future__ import annotations

import signal

_recorded: int | None = None
_redeliveries: dict[int, int] = {}  # deliveries of a recorded signal still to reach its handler, by signal


def record(signum: int) -> None:
    """Note that ``signum`` asked this process to stop (called by the recorder, any thread)."""
    global _recorded
    _recorded = signum


def recorded() -> int | None:
    """The stop signal this process received, if any."""
    return _recorded


def clear() -> None:
    """Forget the recorded signal (the command that received it has stopped)."""
    global _recorded
    _recorded = None
    _redeliveries.clear()


def expect_redelivery(signum: int) -> None:
    """The next call of ``signum``'s handler is a delivery again of a recorded signal, not a new one."""
    _redeliveries[signum] = _redeliveries.get(signum, 0) + 1


def take_redelivery(signum: int) -> bool:
    """Called by a handler: whether this call is a delivery again (see :func:`expect_redelivery`), not a
    new signal (a second Ctrl-C)."""
    pending = _redeliveries.get(signum, 0)
    if pending:
        _redeliveries[signum] = pending - 1
    return pending > 0


def checkpoint() -> None:
    """A safe point between two units of work: deliver a recorded stop signal again, here."""
    signum = _recorded
    if signum is None:
        return
    expect_redelivery(signum)
    signal.raise_signal(signum)  # its handler runs before this returns, and raises from this frame
