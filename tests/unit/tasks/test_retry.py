"""Stage tasks retry transient failures only: a deterministic error fails the same way every time."""

from __future__ import annotations

from attnrl.errors import CheckpointError, ConfigError, DataError, ModelLoadError, TrainingStalled
from tasks.retry import RETRIES, retry_unless_deterministic
from tasks.stages import evaluate_task, train_task, warmup_task


class _Failed:
    """A Failed state as Prefect hands ``retry_condition_fn`` one: the exception in ``data``."""

    def __init__(self, error: BaseException) -> None:
        self.data = error


def test_stage_tasks_retry_only_transient_failures():
    for stage_task in (warmup_task, train_task, evaluate_task):
        assert stage_task.retries == RETRIES == 2
        assert stage_task.retry_condition_fn is retry_unless_deterministic
    for error in (ConfigError("x"), DataError("x"), ModelLoadError("x"), TrainingStalled("x"), CheckpointError("x")):
        assert not retry_unless_deterministic(None, None, _Failed(error)), error
    for error in (TimeoutError("x"), OSError("x"), RuntimeError("x"), FileNotFoundError("x")):
        assert retry_unless_deterministic(None, None, _Failed(error)), error
