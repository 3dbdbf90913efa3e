"""A pipeline stage as one cached task run, so a retry of the run continues after its last good stage.

Each stage of :mod:`flows.pipeline` (its subflow, the checks on its output and its DVC record) runs
inside the ``stage`` task, whose result is persisted under a cache key made of the flow run's id, the
stage and the run's configuration digest. A retry of the same flow run (Prefect's own flow retries, or
"Retry" in the UI, which reruns that flow run) finds the key of every stage that completed in an earlier
attempt and gets its result back without running it, with a log line saying so, unless the stage's
outputs changed on disk since it finished (their fingerprint is persisted with the result): then the
stage runs again. A new run, or the same run after a config change, has other keys and runs everything.

Results are persisted to Prefect's result storage (``PREFECT_LOCAL_STORAGE_PATH`` on one machine; set
``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`` to shared storage when workers run on several machines).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from prefect import get_run_logger, task
from prefect.context import TaskRunContext
from prefect.runtime import flow_run

T = TypeVar("T")


@dataclass(frozen=True)
class FinishedStage(Generic[T]):
    """What a stage returned, and the fingerprint of its outputs when it finished."""

    result: T
    outputs: str


def outputs_fingerprint(paths: Iterable[Path]) -> str:
    """A digest of every file under ``paths`` by name, size and modification time: cheap on a
    checkpoint of gigabytes, and changed by any rewrite of an output."""
    digest = hashlib.sha256()
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            try:
                stat = path.stat()
            except FileNotFoundError:
                digest.update(f"{path}\0missing\n".encode())
                continue
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _stage_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return f"attnrl-stage-{flow_run.get_id()}-{parameters['stage']}-{parameters['config_digest']}"


@task(name="stage", task_run_name="{stage}", cache_key_fn=_stage_key, persist_result=True)
def _stage_task(stage: str, config_digest: str, outputs: list[Path], run: Callable[[], T]) -> FinishedStage[T]:
    result = run()
    return FinishedStage(result, outputs_fingerprint(outputs))


def run_stage(stage: str, config_digest: str, outputs: list[Path], run: Callable[[], T]) -> T:
    """``run()`` as the pipeline's ``stage`` task, or its result from an earlier attempt of this flow run
    when that attempt completed it and ``outputs`` are unchanged since."""
    state = _stage_task(stage, config_digest, outputs, run, return_state=True)
    finished: FinishedStage[T] = state.result()
    if state.name != "Cached":
        return finished.result
    logger = get_run_logger()
    if finished.outputs == outputs_fingerprint(outputs):
        logger.info("skipping %s: an earlier attempt of this flow run completed it with this configuration "
                    "(sha256 %s) and its outputs (%s) are unchanged", stage, config_digest[:12],
                    ", ".join(map(str, outputs)))
        return finished.result
    logger.warning("rerunning %s: an earlier attempt of this flow run completed it, but its outputs (%s) "
                   "changed since", stage, ", ".join(map(str, outputs)))
    rerun = _stage_task.with_options(refresh_cache=True)(stage, config_digest, outputs, run, return_state=True)
    return rerun.result().result

