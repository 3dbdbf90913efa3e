"""Stage 'report': ``reports/report.html`` and PNGs, readable without any server.

* ``training_curves.png``: the per-step metrics of spec §15.4 (``CURVES``: reward, entropy, length,
  tokens, and the diagnostics of Figs. 6 and 7 with the official definitions, ``training.metrics``);
* ``evaluation.png``: mean@K and pass@K per benchmark, before and after training when the
  warmed-up policy was evaluated too (spec §14);
* ``traces.json`` and the "method at work" section: on ``report.trace_problems`` held-out problems,
  the trained policy's steps shaded by FCI, its branch points beside entropy's, and the tree with
  values and advantages (``method_trace``, ``trace_view``);
* the research section: the benchmarks' results in ``report.results_dir`` as the paper's tables and
  figures (``research_view``);
* ``report.html``: all of it with the tables behind the figures, the run's lineage (commits, input
  hashes, configuration) and a link to the data checks' Data Docs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from markupsafe import Markup

from attnrl.config.schema import RunConfig
from attnrl.data.loaders import load_verl_parquet
from attnrl.data.problem import Problem
from attnrl.errors import DataError
from attnrl.lineage import LINEAGE_FILE
from attnrl.stages.layout import Layout
from attnrl.stages.method_trace import trace_problems
from attnrl.stages.rendering import render
from attnrl.stages.research_view import load_results, research_section
from attnrl.stages.prepare import benchmark_name
from attnrl.stages.results import ReportResult
from attnrl.stages.trace_view import STYLE, traces_html
from attnrl.stages.warmup import initial_policy_path
from attnrl.utils.atomic import atomic_path

# (panel title, the per-step metrics it plots): spec §15.4's curves, Figs. 6 and 7 with the official names.
CURVES = (
    ("reward", ("reward", "mc_reward")),
    ("entropy", ("entropy",)),
    ("response length (tokens)", ("response_length",)),
    ("generated tokens (cumulative)", ("total_generated_tokens",)),
    ("MC solve-all / solve-none ratio (Fig. 6)", ("solve_all_ratio_mc", "solve_none_ratio_mc")),
    ("valid-prompt ratio (Fig. 6)", ("valid_ratio_mc", "valid_ratio_all")),
    ("invalid once, invalid twice (Fig. 7a)", ("correct_once_twice_invalid_ratio", "incorrect_once_twice_invalid_ratio")),
    ("invalid once, easy-filtered", ("correct_once_filtered_ratio", "incorrect_once_filtered_ratio")),
    ("filtered ratio (Fig. 7c)", ("filtered_ratio_all", "easy_filtered_ratio")),
    ("valid-token ratio (Fig. 7b)", ("valid_token_ratio", "valid_token_ratio_built")),
    ("prompt batch size (Fig. 7d)", ("prompt_batch_size",)),
    ("training sequences", ("train_sequences",)),
)


def build_report(config: RunConfig, root: str | Path = ".") -> ReportResult:
    layout = Layout.of(config, root)
    metrics_file = layout.train_dir / "metrics.jsonl"
    steps = _read_jsonl(metrics_file) if metrics_file.is_file() else []
    after = _read_json(layout.eval_dir / "metrics.json")
    before_file = layout.runs_dir / "eval-init" / "metrics.json"
    before = _read_json(before_file) if before_file.is_file() else None
    trained = layout.train_dir / "final"
    policy = trained if trained.is_dir() else initial_policy_path(config, root)
    traces = trace_problems(config, policy, trace_candidates(config, root), config.report.trace_problems)
    lineage_file = next((d / LINEAGE_FILE for d in (layout.train_dir, layout.eval_dir) if (d / LINEAGE_FILE).is_file()), None)
    record = _read_json(lineage_file) if lineage_file is not None else None
    out = layout.reports_dir
    docs = layout.data_docs(config) / "index.html"
    results = load_results(Path(root) / config.report.results_dir)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        figures = []
        if steps:
            figures.append(_plot_curves(steps, tmp / "training_curves.png"))
        figures.append(_plot_evaluation(after, before, tmp / "evaluation.png"))
        (tmp / "traces.json").write_text(json.dumps([t.to_json() for t in traces], indent=1))
        research, research_figures = research_section(results, tmp, pyplot())
        page = render(
            "report.html", trace_style=Markup(STYLE), steps=len(steps),
            generated_tokens=int(steps[-1].get("total_generated_tokens", 0)) if steps else 0,
            method=config.algorithm.method, model=config.model.path or "tiny default",
            after=after, before=before, before_by_name={b["benchmark"]: b for b in before["benchmarks"]} if before else {},
            figures=[f.name for f in figures], policy=os.path.relpath(policy, root),
            method_section=Markup(traces_html(traces)), research_section=Markup(research),
            lineage=record, lineage_source=os.path.relpath(lineage_file, root) if lineage_file else None,
            lineage_config=json.dumps(record["config"], indent=1) if record else None,
            checks_enabled=config.checks.enabled, data_docs_path=str(docs),
            data_docs=os.path.relpath(docs, out) if docs.is_file() else None)
        (tmp / "report.html").write_text(page)
    return ReportResult(out / "report.html", tuple(out / f.name for f in [*figures, *research_figures]))


# Candidates sampled per traced problem: enough that some have samples that disagree.
CANDIDATES_PER_TRACE = 4


def trace_candidates(config: RunConfig, root: str | Path = ".") -> list[Problem]:
    """The problems ``method_trace`` picks from: of the first benchmark, highest level first (the longest
    chains of the synthetic task: the most steps to branch), in file order within a level."""
    problems = load_verl_parquet(Layout.of(config, root).prepared_eval(benchmark_name(config.data.eval[0])))
    ranked = sorted(problems, key=lambda p: -(p.level or 0))
    return ranked[: CANDIDATES_PER_TRACE * config.report.trace_problems]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"report: {path} is missing; run the evaluate stage first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"report: {path} is not valid JSON: {exc}") from None


def _read_jsonl(path: Path) -> list[dict[str, float]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"report: {path} line {number} is not valid JSON: {exc}") from None
    return rows


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _plot_curves(steps: list[dict[str, float]], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(3, 4, figsize=(17, 10), constrained_layout=True)
    x = [row["step"] for row in steps]
    for ax, (title, keys) in zip(axes.flat, CURVES, strict=True):
        for key in keys:  # a metric a run did not log (an older run, another method) plots as a gap
            ax.plot(x, [row.get(key, float("nan")) for row in steps], marker=".", label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plot_evaluation(after: dict[str, Any], before: dict[str, Any] | None, path: Path) -> Path:
    plt = pyplot()
    names = [b["benchmark"] for b in after["benchmarks"]] + ["average"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), constrained_layout=True)
    for ax, key, title in ((axes[0], "mean_at_k", "mean@K"), (axes[1], "pass_at_k", "pass@K")):
        series = [("after", after)] if before is None else [("before", before), ("after", after)]
        width = 0.8 / len(series)
        for i, (label, summary) in enumerate(series):
            values = [100 * b[key] for b in summary["benchmarks"]] + [100 * summary["average"][key]]
            ax.bar([j + i * width for j in range(len(names))], values, width=width, label=label)
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(names))], names, rotation=30, ha="right")
        ax.set_ylim(0, 100)
        ax.set_ylabel("%")
        ax.set_title(title)
        ax.legend(loc="lower right")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
