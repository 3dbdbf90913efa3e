"""What a person sees on the console of an ``attnrl`` command: the stages, their results, and no engine chatter.

``attnrl_logs_in_runs`` files attnrl's own progress lines in the Prefect run they happen in; ``headline``
and ``duration`` make the pipeline's line at the end of each stage.

Prefect logs every run's life on its console handler ("Created task run ...", "Beginning subflow run ...",
"Finished in state Completed()", a "View at" link per subflow): a line or more per task, which buries the
lines a person reads. ``quiet_console`` drops those from the console handler only, so the Prefect run's
logs (its API handler) keep every line; ``--verbose`` leaves the console as Prefect configures it. It
also drops the progress lines of a loop whose bar is on the terminal (``attnrl.utils.progress``).
"""

from __future__ import annotations

import logging

from attnrl.stages.results import (
    DifficultyResult,
    EvaluationResult,
    PreparedData,
    ReportResult,
    TrainResult,
    WarmupResult,
)
from attnrl.utils.progress import ON_BAR

RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
RUN_LIFE_LINES = ("Created task run ", "Beginning flow run ", "Beginning subflow run ", "Finished in state ",
                  "View at ", "Created subflow run ", "Executing ")
TEMPORARY_API = "Starting temporary server on "
# Libraries that log routine INFO lines through the root handler.
CHATTY_LIBRARIES = ("great_expectations", "dvclive", "httpx", "ray")


class ConsoleFilter(logging.Filter):
    """Drops Prefect's run-life lines (see ``RUN_LIFE_LINES``) and progress lines a bar already shows,
    and keeps the first line of the temporary API's notice (its second is a link to Prefect's docs);
    everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if record.name == "prefect" and message.startswith(TEMPORARY_API):
            record.msg = message.split("\n", 1)[0]
        run_life = record.name.startswith(RUN_LOGGERS) and message.startswith(RUN_LIFE_LINES)
        return not (run_life or getattr(record, ON_BAR, False))


def quiet_console() -> None:
    """Filter the console handlers (Prefect's, or the root's stream handler when logging was configured
    first) and keep the libraries' INFO lines off the console. Prefect's API handler is no stream handler:
    the run's logs keep every line."""
    handlers = {h for name in ("", "prefect", *RUN_LOGGERS) for h in logging.getLogger(name).handlers}
    for handler in handlers:
        filtered = any(isinstance(f, ConsoleFilter) for f in handler.filters)
        if isinstance(handler, logging.StreamHandler) and not filtered:
            handler.addFilter(ConsoleFilter())
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


class InRun(logging.Filter):
    """Passes records logged inside a Prefect flow or task run: the only ones the API can file."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.context import FlowRunContext, TaskRunContext

        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def attnrl_logs_in_runs() -> None:
    """attnrl's own INFO lines (warmup loss, evaluation progress, resumes) into the logs of the Prefect run
    they happen in, as Prefect does for ``PREFECT_LOGGING_EXTRA_LOGGERS``, whoever imported Prefect first
    (the CLI, a worker's subprocess, a test), and without Prefect's warning for lines logged outside a run."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("attnrl")
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        handler = APILogHandler()
        handler.addFilter(InRun())
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def headline(result: object) -> str:
    """A stage result's one-line summary for the person watching: counts, loss, accuracy, steps, paths."""
    if isinstance(result, PreparedData):
        return f"{result.train_count} training problems, {sum(result.eval_counts.values())} held out for evaluation"
    if isinstance(result, WarmupResult):
        loss = f"final loss {result.history[-1]['loss']:.3f}" if result.history else "initial policy recorded"
        return f"{loss} -> {result.model_dir}"
    if isinstance(result, DifficultyResult):
        if not result.estimated:
            return f"off (difficulty.enabled: false): the {result.kept} training problems passed through"
        return f"kept {result.kept} of {result.estimated} problems"
    if isinstance(result, EvaluationResult):
        scores = result.scores
        mean = sum(s.mean_at_k for s in scores) / len(scores)
        best = sum(s.pass_at_k for s in scores) / len(scores)
        return f"mean@K {100 * mean:.1f}%, pass@K {100 * best:.1f}% over {len(scores)} benchmarks"
    if isinstance(result, TrainResult):
        rows = result.metrics
        resumed = f", resumed from {result.resumed_from.name}" if result.resumed_from else ""
        reward = f", reward {rows[0]['reward']:.3f} -> {rows[-1]['reward']:.3f}" if rows else ""
        return f"{len(rows)} steps{reward}{resumed}"
    if isinstance(result, ReportResult):
        return str(result.html_path)
    return type(result).__name__

