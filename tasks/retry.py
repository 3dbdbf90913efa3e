"""When a failed task run is worth retrying: transient failures yes, deterministic ones no."""

from __future__ import annotations

from typing import Any

from attnrl.errors import DETERMINISTIC_ERRORS

# ModelLoadError is a FileNotFoundError (an OSError): it must be excluded before anything OS-like is retried.

RETRIES = 2
RETRY_DELAY_SECONDS = 2


def failure_exception(state: Any) -> BaseException | None:
    """The exception behind a Failed state (Prefect 3 hands ``retry_condition_fn`` a state, not the exception)."""
    data = getattr(state, "data", None)
    if isinstance(data, BaseException):
        return data
    try:
        result = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - an unreadable result is treated as retryable
        return None
    return result if isinstance(result, BaseException) else None


def retry_unless_deterministic(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn`` for stage tasks: retry anything except the ``DETERMINISTIC_ERRORS``."""
    return not isinstance(failure_exception(state), DETERMINISTIC_ERRORS)
