"""Hard per-response timeouts for symbolic grading (spec §8, ``reward_timeout=5`` s).

Math-Verify calls into sympy, which can run for minutes or forever on adversarial answers
(huge powers, nested radicals). Its own timeouts use ``signal.alarm`` and therefore only
work in the main thread of the main interpreter, and cannot interrupt C code at all. The
only timeout that always holds is a separate process that can be killed, so grading runs in
persistent child processes:

* started with the ``spawn`` context (a forked copy of a trainer holding CUDA contexts and
  threads is unsafe), lazily on first need, and reused across batches;
* one job in flight per child; the parent waits on the pipe until that job's deadline and,
  past it, kills the child, scores the response 0 and starts a fresh child for the next job.

The grading function is named by a ``"module:function"`` import path rather than passed as
an object, because under ``spawn`` the child imports it afresh. If the named module defines
a ``warm_up()`` function, the child runs it once before reporting ready, so slow imports
(sympy) are not charged to the first response's timeout.

Under ``spawn`` a child normally re-imports the parent's ``__main__`` script; the grader hides
it while starting children (``_main_module_hidden``), so scripts without an
``if __name__ == "__main__":`` guard, and ``python -`` sessions, can grade too.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from typing import Any

from attnrl.errors import AttnRLError, ConfigError
from attnrl.utils.registry import load_object

logger = logging.getLogger(__name__)

# (solution, boxed prediction or None, cleaned ground truths): what a grading function receives.
GradeJob = tuple[str, str | None, list[str]]

# SIGTERM is enough for a pure-Python loop; the grace period only matters for a child stuck
# in C code, which then gets SIGKILL.
_TERM_GRACE_S = 1.0
_READY = "ready"
_FAILED = "failed"


def resolve_grade_fn(path: str) -> Callable[..., Any]:
    """Import and return the function named by ``"module:function"`` (spec §8 verifier plumbing).

    Raises ``ConfigError`` when the path is malformed, the module does not import, or the
    attribute is missing or not callable. The parent calls this at construction so a typo
    fails at once rather than inside a child.
    """
    fn = load_object(path, "grade_fn")
    if not callable(fn):
        raise ConfigError(f"grade_fn {path!r} is not callable")
    return fn


def _child_main(conn: Connection, grade_fn: str) -> None:
    # Ctrl-C reaches the whole process group; the parent decides when children stop, and a
    # traceback from every child would only bury the parent's.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        fn = resolve_grade_fn(grade_fn)
        warm_up = getattr(importlib.import_module(grade_fn.partition(":")[0]), "warm_up", None)
        if callable(warm_up):
            warm_up()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        conn.send((_FAILED, f"{type(exc).__name__}: {exc}"))
        return
    conn.send((_READY, ""))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone; nothing left to grade for
        if job is None:
            return
        solution, pred, answers = job
        try:
            correct = bool(fn(solution, pred, answers))
        except Exception:  # noqa: BLE001 - spec §8: an error while grading means "not correct"
            correct = False
        conn.send(correct)


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start children without re-running the parent's ``__main__``.

    A spawned child normally re-imports the parent's main script, which re-runs a script without
    an ``if __name__ == "__main__"`` guard (or fails for ``python - <<EOF``). The grader needs
    nothing from ``__main__``: it imports its function by path. So the main module's file and
    spec are hidden from multiprocessing while the child starts.
    """
    main = sys.modules.get("__main__")
    saved_file, saved_spec = getattr(main, "__file__", None), getattr(main, "__spec__", None)
    try:
        if saved_file is not None:
            del main.__file__
        main.__spec__ = None  # multiprocessing reads it unconditionally
        yield
    finally:
        main.__spec__ = saved_spec
        if saved_file is not None:
            main.__file__ = saved_file


class _Child:
    """One spawned grading process and the parent's end of its pipe."""

    def __init__(self, ctx: Any, grade_fn: str) -> None:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        # daemon: the interpreter's exit handler terminates it even if close() is never called.
        self.process = ctx.Process(
            target=_child_main, args=(child_conn, grade_fn), name="attnrl-grader", daemon=True
        )
        with _main_module_hidden():
            self.process.start()
        # Dropping our copy of the child's end lets recv() see EOF if the child dies.
        child_conn.close()
        self.conn: Connection = parent_conn

    def wait_ready(self, timeout_s: float) -> None:
        if not self.conn.poll(timeout_s):
            raise AttnRLError(f"grader process did not start within {timeout_s:.0f} s")
        try:
            status, detail = self.conn.recv()
        except (EOFError, OSError) as exc:
            raise AttnRLError("grader process exited during start-up") from exc
        if status != _READY:
            raise AttnRLError(f"grader process failed to start: {detail}")

    def stop(self) -> None:
        """Ask the child to exit, then make sure it has."""
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass  # already dead or closed; kill() below still reaps it
        self.process.join(_TERM_GRACE_S)
        self.kill()

    def kill(self) -> None:
        """Terminate, then SIGKILL if needed, and reap the child."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(_TERM_GRACE_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class GraderPool:
    """``size`` lazily started grading children with a hard deadline per job (spec §8).

    Not thread-safe: one ``grade`` call at a time.
    """

    def __init__(self, grade_fn: str, size: int, timeout_s: float, startup_timeout_s: float) -> None:
        resolve_grade_fn(grade_fn)
        self._grade_fn = grade_fn
        self._timeout_s = timeout_s
        self._startup_timeout_s = startup_timeout_s
        self._ctx = multiprocessing.get_context("spawn")
        self._slots: list[_Child | None] = [None] * size
        self.children_started = 0

    def grade(self, jobs: Sequence[tuple[int, GradeJob]]) -> dict[int, bool]:
        """Grade ``(index, job)`` pairs; return ``{index: correct}``.

        A job still running ``timeout_s`` after it was handed to a ready child, or whose child
        died, is ``False``; a warning names its ``index`` and the child is replaced.
        """
        results: dict[int, bool] = {}
        queue = deque(jobs)
        busy: dict[int, tuple[int, float]] = {}  # slot -> (index, deadline)
        try:
            while queue or busy:
                self._dispatch(queue, busy, results)
                if busy:
                    self._collect(busy, results)
        except BaseException:
            # An interrupted batch leaves answers in flight that would be read as the next
            # batch's results; killing those children keeps the pipes in step.
            for slot in busy:
                self._discard(slot)
            raise
        return results

    def close(self) -> None:
        """Stop every child. Safe to call more than once."""
        for slot, child in enumerate(self._slots):
            if child is not None:
                self._slots[slot] = None
                child.stop()

    def _dispatch(
        self, queue: deque[tuple[int, GradeJob]], busy: dict[int, tuple[int, float]], results: dict[int, bool]
    ) -> None:
        idle = [slot for slot in range(len(self._slots)) if slot not in busy]
        slots = idle[: len(queue)]
        self._ensure_running(slots)
        for slot in slots:
            index, job = queue.popleft()
            child = self._slots[slot]
            assert child is not None
            try:
                child.conn.send(job)
            except (OSError, ValueError):
                logger.warning("response %d: grader process died before grading; scored 0.0 (spec §8)", index)
                results[index] = False
                self._discard(slot)
                continue
            # The clock starts only now, after start-up, so a cold start never costs a response.
            busy[slot] = (index, time.monotonic() + self._timeout_s)

    def _collect(self, busy: dict[int, tuple[int, float]], results: dict[int, bool]) -> None:
        conns = {self._slots[slot].conn: slot for slot in busy}  # type: ignore[union-attr]
        nearest = min(deadline for _, deadline in busy.values())
        ready = wait_any(list(conns), timeout=max(0.0, nearest - time.monotonic()))
        for conn in ready:
            slot = conns[conn]
            index, _ = busy.pop(slot)
            try:
                results[index] = bool(conn.recv())
            except (EOFError, OSError):
                logger.warning("response %d: grader process crashed; scored 0.0 and restarted (spec §8)", index)
                results[index] = False
                self._discard(slot)
        now = time.monotonic()
        for slot, (index, deadline) in list(busy.items()):
            if now >= deadline:
                logger.warning(
                    "response %d: grading exceeded the hard timeout of %.1f s; scored 0.0 and the "
                    "grader process was restarted (spec §8)",
                    index,
                    self._timeout_s,
                )
                results[index] = False
                del busy[slot]
                self._discard(slot)

    def _ensure_running(self, slots: Sequence[int]) -> None:
        fresh = []
        for slot in slots:
            child = self._slots[slot]
            if child is not None and child.process.is_alive():
                continue
            if child is not None:
                child.kill()
            self._slots[slot] = _Child(self._ctx, self._grade_fn)
            self.children_started += 1
            fresh.append(slot)
        # Start every needed child before waiting on any, so their imports overlap.
        for slot in fresh:
            child = self._slots[slot]
            assert child is not None
            try:
                child.wait_ready(self._startup_timeout_s)
            except BaseException:
                self._discard(slot)
                raise

    def _discard(self, slot: int) -> None:
        child = self._slots[slot]
        self._slots[slot] = None
        if child is not None:
            child.kill()
