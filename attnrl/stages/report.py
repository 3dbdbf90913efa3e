"""Stage 'report': ``reports/report.html`` and PNGs, readable without any server.

* ``training_curves.png``: the per-step metrics of spec §15.4 (reward, accuracy, entropy,
  valid-token ratio, MC solve-all / solve-none ratios, prompt batch size, generated tokens);
* ``evaluation.png``: mean@K and pass@K per benchmark, before and after training when the
  warmed-up policy was evaluated too (spec §14);
* ``report.html``: both figures and the tables behind them.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnrl.config.schema import RunConfig
from attnrl.errors import DataError
from attnrl.stages.layout import Layout
from attnrl.utils.atomic import atomic_path

CURVES = (
    ("reward", "reward (initial samples)"),
    ("entropy", "entropy"),
    ("valid_token_ratio", "valid-token ratio"),
    ("solve_all_ratio_mc", "MC solve-all ratio"),
    ("solve_none_ratio_mc", "MC solve-none ratio"),
    ("valid_prompt_ratio", "valid-prompt ratio"),
    ("prompt_batch_size", "prompt batch size"),
    ("total_generated_tokens", "generated tokens (cumulative)"),
)


@dataclass(frozen=True)
class ReportResult:
    html_path: Path
    figures: tuple[Path, ...]


def build_report(config: RunConfig, root: str | Path = ".") -> ReportResult:
    layout = Layout.of(config, root)
    metrics_file = layout.train_dir / "metrics.jsonl"
    steps = _read_jsonl(metrics_file) if metrics_file.is_file() else []
    after = _read_json(layout.eval_dir / "metrics.json")
    before_file = layout.runs_dir / "eval-init" / "metrics.json"
    before = _read_json(before_file) if before_file.is_file() else None
    out = layout.reports_dir
    with atomic_path(out) as tmp:
        tmp.mkdir()
        figures = []
        if steps:
            figures.append(_plot_curves(steps, tmp / "training_curves.png"))
        figures.append(_plot_evaluation(after, before, tmp / "evaluation.png"))
        (tmp / "report.html").write_text(_html(config, steps, after, before, [f.name for f in figures]))
    return ReportResult(out / "report.html", tuple(out / f.name for f in figures))


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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _plot_curves(steps: list[dict[str, float]], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), constrained_layout=True)
    x = [row["step"] for row in steps]
    for ax, (key, title) in zip(axes.flat, CURVES, strict=True):
        ax.plot(x, [row.get(key, float("nan")) for row in steps], marker=".")
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plot_evaluation(after: dict[str, Any], before: dict[str, Any] | None, path: Path) -> Path:
    plt = _pyplot()
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


def _html(config: RunConfig, steps, after, before, figures: list[str]) -> str:
    esc = html.escape
    rows = []
    before_by_name = {b["benchmark"]: b for b in before["benchmarks"]} if before else {}
    for b in after["benchmarks"]:
        prior = before_by_name.get(b["benchmark"])
        rows.append(
            f"<tr><td>{esc(b['benchmark'])}</td><td>{b['problems']}</td><td>{b['k']}</td>"
            + (f"<td>{100 * prior['mean_at_k']:.1f}</td>" if before else "")
            + f"<td>{100 * b['mean_at_k']:.1f}</td><td>{100 * b['pass_at_k']:.1f}</td></tr>"
        )
    average = after["average"]
    rows.append(
        "<tr class=avg><td>average</td><td></td><td></td>"
        + (f"<td>{100 * before['average']['mean_at_k']:.1f}</td>" if before else "")
        + f"<td>{100 * average['mean_at_k']:.1f}</td><td>{100 * average['pass_at_k']:.1f}</td></tr>"
    )
    header = "<th>benchmark</th><th>problems</th><th>K</th>" + ("<th>mean@K before</th>" if before else "")
    header += "<th>mean@K</th><th>pass@K</th>"
    last = steps[-1] if steps else {}
    summary = (
        f"<p>{len(steps)} training steps, {int(last.get('total_generated_tokens', 0)):,} tokens generated, "
        f"method <b>{esc(config.algorithm.method)}</b>, model {esc(config.model.path or 'tiny default')}.</p>"
    )
    images = "".join(f'<p><img src="{esc(name)}" alt="{esc(name)}" style="max-width:100%"></p>' for name in figures)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>attnrl report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
tr.avg{{font-weight:bold}}</style></head>
<body><h1>attnrl report</h1>{summary}
<h2>Evaluation (spec §14)</h2><table><tr>{header}</tr>{''.join(rows)}</table>
<h2>Figures</h2>{images}
</body></html>
"""
