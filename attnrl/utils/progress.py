"""Progress of a long loop (warmup steps, evaluation samples, training steps), for the person watching
and for the run's logs.

On a terminal a tqdm bar on stderr follows every update. Whether or not there is one, a log line goes
out every ``every_s`` seconds and at the end, so logs that outlive the terminal (the Prefect run's, a
CI console) show the progress too. While a bar is on screen its log lines carry ``on_bar=True``: the
console's handlers (``flows.console``) leave them to the bar and the run's logs keep them.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from tqdm.auto import tqdm

ON_BAR = "on_bar"


def duration(seconds: float) -> str:
    """``12s``, ``86s``, ``2m10s``: whole seconds, minutes from 90 s on."""
    whole = max(0, round(seconds))
    return f"{whole}s" if whole < 90 else f"{whole // 60}m{whole % 60:02d}s"


def _value(value: float | int | str) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """``with Progress(logger, "warmup", 800, "steps") as p: ... p.update(loss=0.52)``.

    ``every_s=0`` logs every update (a training step is worth a line); ``bar=None`` shows a bar when
    stderr is a terminal. The log line reads ``warmup: 250/800 steps (31%)  loss 0.52  1m05s left``.
    """

    def __init__(self, logger: logging.Logger, label: str, total: int, unit: str, *, every_s: float = 10.0,
                 start: int = 0, bar: bool | None = None) -> None:
        """``start``: units already done before this run (a resumed training run's restored steps)."""
        if not 0 <= start <= total:
            raise ValueError(f"progress {label!r}: need 0 <= start <= total, got start {start}, total {total}")
        self.logger, self.label, self.total, self.unit, self.every_s = logger, label, total, unit, every_s
        self.first = self.done = start
        self.closed = False
        self.fields: dict[str, float | int | str] = {}
        self.started_at = self.logged_at = time.monotonic()
        show = sys.stderr.isatty() if bar is None else bar
        self.bar = tqdm(total=total, initial=start, desc=label, unit=unit.rstrip("s") or unit, file=sys.stderr,
                        leave=False, dynamic_ncols=True) if show else None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close(log=kind is None)

    def update(self, n: int = 1, **fields: float | int | str) -> None:
        self.done += n
        self.fields.update(fields)
        if self.bar is not None:
            self.bar.set_postfix({k: _value(v) for k, v in self.fields.items()}, refresh=False)
            self.bar.update(n)
        now = time.monotonic()
        if now - self.logged_at >= self.every_s and self.done < self.total:
            self.logged_at = now
            self._log()

    def close(self, *, log: bool = True) -> None:
        """Remove the bar; ``log``: the last count's line (not after an error: the count means little)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.closed = True
        if log:
            self._log()

    def line(self) -> str:
        elapsed = time.monotonic() - self.started_at
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        fields = "".join(f"  {k} {_value(v)}" for k, v in self.fields.items())
        if self.done >= self.total:
            timing = f"  in {duration(elapsed)}"
        elif self.closed:  # ended early (a token budget, a stop): no estimate of what will not run
            timing = f"  stopped after {duration(elapsed)}"
        elif self.done > self.first:
            timing = f"  {duration(elapsed / (self.done - self.first) * (self.total - self.done))} left"
        else:
            timing = ""
        return f"{self.label}: {self.done}/{self.total} {self.unit}{share}{fields}{timing}"

    def _log(self) -> None:
        self.logger.info(self.line(), extra={ON_BAR: self.bar is not None})
