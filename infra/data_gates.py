"""Great Expectations gates between stages (GX 1.x): one named suite per kind of stage output.

* ``prepared_problems``: the verl parquet files of stage 'prepare' (and the training input of
  stage 'train'): required columns, an id on every row and no id twice, a non-empty prompt, at
  least one non-empty answer, the templated prompt within ``data.max_prompt_tokens``, a known split.
* ``difficulty_table``: ``difficulty.parquet``: pass rates in [0, 1], 1 <= samples, 0 <= correct
  <= samples and ``correct / samples == pass_rate``, unique problems.
* ``rollout_batch``: the paths one training step is about to train on: token counts that agree
  (response, log-probs, advantages), rewards in {0, 1}, finite advantages, a non-zero-advantage
  ratio of at least ``checks.min_nonzero_advantage_ratio``.
* ``eval_results``: ``samples.parquet`` (one row per benchmark, problem and sample, rewards in
  {0, 1}) and ``metrics.json`` (mean@K and pass@K in [0, 1], pass@K >= mean@K).

A gate validates a pandas frame built from the files (not through the loaders, so it checks what
is on disk) in one file-backed GX project in ``checks.data_docs_dir`` (its validation results
and Data Docs HTML keep every gate run's history) and, on failure, raises
``DataGateError`` naming the suite, the file, each failing expectation and example rows. The
pure core never imports this module; ``tasks/checks.py`` runs the gates from the stage flows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from attnrl.config.schema import RunConfig
from attnrl.errors import DataError
from attnrl.utils.registry import lookup

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no network

logger = logging.getLogger(__name__)

KNOWN_SPLITS = ("train", "validation", "test")
ID_COLUMNS = ("row", "id")  # every frame carries them: failing rows are reported by file row and id
EXAMPLES = 5
SITE = "attnrl"
_GX_PROJECT = threading.Lock()


class DataGateError(DataError):
    """A gate failed: the message names the suite, the data, each failing expectation and example rows."""

    def __init__(self, suite: str, target: str, failures: list[GateFailure], docs: Path | None) -> None:
        self.suite, self.target, self.failures, self.docs = suite, target, failures, docs
        lines = [f"data check '{suite}' failed on {target}:"]
        lines += [f"  - {failure}" for failure in failures]
        if docs is not None:
            lines.append(f"  report: {docs}")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class GateFailure:
    expectation: str
    column: str | None
    unexpected: int | None
    examples: tuple[str, ...]
    observed: Any = None

    def __str__(self) -> str:
        what = f"{self.expectation}({self.column})" if self.column else self.expectation
        if self.examples:
            more = f" of {self.unexpected}" if self.unexpected and self.unexpected > len(self.examples) else ""
            return f"{what}: failing rows{more}: {', '.join(self.examples)}"
        return f"{what}: observed {self.observed!r}"


@dataclass(frozen=True)
class GateReport:
    suite: str
    target: str
    rows: int
    expectations: int
    docs: Path | None


# -- suites ---------------------------------------------------------------------------------------


def _prepared_problems(config: RunConfig) -> list[Any]:
    import great_expectations.expectations as gxe

    columns = ["row", "id", "prompt", "answer_count", "split", "prompt_tokens"]
    return [
        *[gxe.ExpectColumnToExist(column=c) for c in columns],
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToNotBeNull(column="id"),
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="prompt", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="answer_count", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="prompt_tokens", min_value=1,
                                          max_value=config.data.max_prompt_tokens),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(KNOWN_SPLITS)),
    ]


def _difficulty_table(config: RunConfig) -> list[Any]:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeUnique(column="id"),  # source/problem_id
        gxe.ExpectColumnValuesToBeBetween(column="pass_rate", min_value=0, max_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="samples", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="correct", min_value=0),
        gxe.ExpectColumnValuesToBeInSet(column="counts_consistent", value_set=[True]),
    ]


def _rollout_batch(config: RunConfig) -> list[Any]:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeBetween(column="response_tokens", min_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="token_counts_match", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="reward", value_set=[0.0, 1.0]),
        gxe.ExpectColumnValuesToBeInSet(column="advantages_finite", value_set=[True]),
        gxe.ExpectColumnMeanToBeBetween(column="nonzero_advantage",
                                        min_value=config.checks.min_nonzero_advantage_ratio, max_value=1),
    ]


def _eval_results(config: RunConfig) -> list[Any]:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["benchmark", "problem_id", "sample"]),
        gxe.ExpectColumnValuesToBeInSet(column="reward", value_set=[0.0, 1.0]),
        gxe.ExpectColumnValuesToBeBetween(column="response_tokens", min_value=0),
    ]


def _eval_metrics(config: RunConfig) -> list[Any]:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="mean_at_k", min_value=0, max_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="pass_at_k", min_value=0, max_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="pass_at_least_mean", value_set=[True]),
    ]


SUITES: dict[str, Callable[[RunConfig], list[Any]]] = {
    "prepared_problems": _prepared_problems,
    "difficulty_table": _difficulty_table,
    "rollout_batch": _rollout_batch,
    "eval_results": _eval_results,
    "eval_metrics": _eval_metrics,
}


# -- frames: what a gate sees, built from the files -----------------------------------------------


def prepared_frame(path: Path, encode: Callable[[list[dict[str, str]]], Sequence[int]]) -> pd.DataFrame:
    """One row per problem of a verl parquet file; ``encode`` templates and tokenizes a prompt."""
    rows = []
    for i, record in enumerate(pq.read_table(path).to_pylist()):
        extra = record.get("extra_info") or {}
        truth = (record.get("reward_model") or {}).get("ground_truth")
        answers = [truth] if isinstance(truth, str) else list(truth or [])
        messages = [m for m in record.get("prompt") or [] if isinstance(m, dict)]
        prompt = "\n".join(str(m.get("content") or "") for m in messages).strip()
        index = extra.get("index")
        rows.append({
            "row": i,
            "id": None if index is None or str(index).strip() == "" else f"{record.get('data_source')}/{index}",
            "prompt": prompt,
            "answer_count": sum(1 for a in answers if a is not None and str(a).strip()),
            "split": extra.get("split"),
            "prompt_tokens": len(encode(messages)) if prompt else 0,
        })
    return pd.DataFrame(rows, columns=["row", "id", "prompt", "answer_count", "split", "prompt_tokens"])


def difficulty_frame(path: Path) -> pd.DataFrame:
    frame = pq.read_table(path).to_pandas()
    frame.insert(0, "row", range(len(frame)))
    frame["id"] = frame["source"].astype(str) + "/" + frame["problem_id"].astype(str)
    frame["counts_consistent"] = [
        s >= 1 and 0 <= c <= s and math.isclose(c / s, p, abs_tol=1e-9)
        for c, s, p in zip(frame["correct"], frame["samples"], frame["pass_rate"], strict=True)
    ]
    return frame


def rollout_frame(paths: Sequence[Any]) -> pd.DataFrame:
    """One row per training path (``attnrl.tree.TrainingPath``) of a step."""
    rows = [{
        "row": i,
        "id": f"{p.question}#{p.response_index}",
        "response_tokens": len(p.token_ids),
        "token_counts_match": len(p.token_ids) == len(p.logprobs) == len(p.advantages),
        "reward": float(p.reward),
        "advantages_finite": all(math.isfinite(a) for a in p.advantages),
        "nonzero_advantage": float(any(a != 0 for a in p.advantages)),
    } for i, p in enumerate(paths)]
    return pd.DataFrame(rows, columns=["row", "id", "response_tokens", "token_counts_match", "reward",
                                       "advantages_finite", "nonzero_advantage"])


def eval_frames(samples_path: Path, metrics_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    samples = pq.read_table(samples_path).to_pandas()
    samples.insert(0, "row", range(len(samples)))
    samples.insert(1, "id", samples["benchmark"].astype(str) + "/" + samples["problem_id"].astype(str)
                   + "#" + samples["sample"].astype(str))
    benchmarks = json.loads(metrics_path.read_text())["benchmarks"]
    metrics = pd.DataFrame([{"row": i, "id": b["benchmark"], "mean_at_k": b["mean_at_k"], "pass_at_k": b["pass_at_k"],
                             "pass_at_least_mean": b["pass_at_k"] >= b["mean_at_k"] - 1e-12}
                            for i, b in enumerate(benchmarks)], columns=["row", "id", "mean_at_k", "pass_at_k",
                                                                          "pass_at_least_mean"])
    return samples, metrics


# -- running a gate -------------------------------------------------------------------------------


def run_gate(suite: str, frame: pd.DataFrame, config: RunConfig, *, target: str,
             docs_dir: Path | None) -> GateReport:
    """Validate ``frame`` with ``suite``. With ``docs_dir``, in the file-backed GX project there
    (``docs_dir/gx``), which keeps every validation result, and with its Data Docs at
    ``docs_dir/index.html`` listing every gate run by target and time; None: an ephemeral
    context, no report. Raises ``DataGateError`` on failure."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core.run_identifier import RunIdentifier

    expectations = lookup(SUITES, suite, "data check suite", DataError)(config)
    # GX keeps the context a validation stores its result in process-global (get_context sets it): gates
    # that two threads run at once, on two roots, must not swap contexts between set-up and run.
    with _GX_PROJECT:
        context = _context(docs_dir)
        batch = _batch_definition(context, suite)
        gx_suite = context.suites.add_or_update(gx.ExpectationSuite(name=suite, expectations=expectations))
        validation = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=suite, data=batch, suite=gx_suite))
        actions = [UpdateDataDocsAction(name="data-docs", site_names=[SITE])] if docs_dir is not None else []
        checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
            name=f"{suite}-gate", validation_definitions=[validation], actions=actions,
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": list(ID_COLUMNS),
                           "partial_unexpected_count": EXAMPLES},
        ))
        # The run name is what Data Docs list a result by: the file or training step it checked.
        result = checkpoint.run(batch_parameters={"dataframe": frame},
                                run_id=RunIdentifier(run_name=run_name(target)))
    docs = Path(docs_dir).resolve() / "index.html" if docs_dir is not None else None
    if not result.success:
        failures = [_failure(r) for run in result.run_results.values() for r in run.results if not r.success]
        raise DataGateError(suite, target, failures, docs)
    logger.info("data check %s passed on %s (%d rows, %d expectations)", suite, target, len(frame), len(expectations))
    return GateReport(suite, target, len(frame), len(expectations), docs)


def run_name(target: str) -> str:
    """``target`` as a GX run name: its file store keeps runs in folders, so no path separators."""
    return target.replace("/", "|").replace("\\", "|")


def _context(docs_dir: Path | None) -> Any:
    """The GX project of ``docs_dir`` (created on first use, its Data Docs site registered), or an
    ephemeral context when there is no ``docs_dir``."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    if docs_dir is None:
        context = gx.get_context(mode="ephemeral")
    else:
        Path(docs_dir).mkdir(parents=True, exist_ok=True)
        context = gx.get_context(mode="file", project_root_dir=str(Path(docs_dir).resolve()))
        if SITE not in (context.get_config().data_docs_sites or {}):
            # Relative to the context's root (docs_dir/gx): the project can move without a stale path.
            context.add_data_docs_site(site_name=SITE, site_config={
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": ".."},
            })
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _batch_definition(context: Any, suite: str) -> Any:
    """A whole-dataframe batch of the ``attnrl`` pandas source's asset named after ``suite``: one asset
    per suite, so the project's configuration does not grow with every file or step checked."""
    source = (context.data_sources.get(SITE) if SITE in context.data_sources.all()
              else context.data_sources.add_pandas(SITE))
    try:
        asset = source.get_asset(suite)
    except LookupError:
        asset = source.add_dataframe_asset(suite)
    try:
        return asset.get_batch_definition("all")
    except LookupError:
        return asset.add_batch_definition_whole_dataframe("all")


def _failure(result: Any) -> GateFailure:
    config = result.expectation_config
    details = result.result or {}
    examples = []
    for entry in (details.get("unexpected_index_list") or [])[:EXAMPLES]:
        if isinstance(entry, dict):
            examples.append(f"row {entry.get('row')} (id {entry.get('id')})")
        else:
            examples.append(f"row {entry}")
    if result.exception_info and result.exception_info.get("raised_exception"):
        observed: Any = result.exception_info.get("exception_message")
    else:
        observed = details.get("observed_value")
    column = config.kwargs.get("column") or ",".join(config.kwargs.get("column_list") or []) or None
    return GateFailure(config.type, column, details.get("unexpected_count"), tuple(examples), observed)
