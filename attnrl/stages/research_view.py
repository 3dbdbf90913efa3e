"""The report's research section: the benchmarks' results (``benchmarks/results/*.json``) as the paper's tables
and figures (spec §15).

* ``learning-<task>.json`` (benchmarks/learning.py): a Table 1-style comparison (mean@K per level and on
  average, with 95 % intervals over seeds and the paired difference to GRPO), the Table 2 ablation ladder
  (paired differences to TreeRL), Table 3's cost columns, accuracy against generated tokens, and the
  diagnostics of Figs. 6-7 per method;
* ``disruption-<task>.json`` (benchmarks/disruption.py): the accuracy drop per bin of Fig. 3;
* ``branch_points-planted.json`` (benchmarks/branch_points.py): branch-point precision and recall.

Each table says the command and commit that produced it. Nothing here runs a model.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from attnrl.errors import DataError
from attnrl.eval.comparison import paired_final_difference

esc = html.escape
ABLATION_BASE = "treerl"
# Diagnostics plotted per method (Figs. 6-7, the official names), in panels.
DIAGNOSTIC_PANELS = (
    ("MC solve-all ratio (Fig. 6)", "solve_all_ratio_mc"),
    ("MC solve-none ratio (Fig. 6)", "solve_none_ratio_mc"),
    ("valid-prompt ratio, MC (Fig. 6)", "valid_ratio_mc"),
    ("valid-prompt ratio, all (Fig. 6)", "valid_ratio_all"),
    ("valid-token ratio (Fig. 7b)", "valid_token_ratio"),
    ("prompt batch size (Fig. 7d)", "prompt_batch_size"),
)


def load_results(directory: Path) -> dict[str, dict[str, Any]]:
    """Every results file by its stem; a file that is not JSON is named in the error."""
    out = {}
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            out[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"report: {path} is not valid JSON: {exc}") from None
    return out


def research_section(results: dict[str, dict[str, Any]], out: Path, plt) -> tuple[str, list[Path]]:
    """The section's HTML and the figures it wrote into ``out``."""
    parts, figures = [], []
    for name, result in results.items():
        if name.startswith("learning-"):
            figures += [_plot_curves(result, out / f"{name}-curves.png", plt),
                        _plot_diagnostics(result, out / f"{name}-diagnostics.png", plt)]
            parts.append(_learning_html(name, result, figures[-2].name, figures[-1].name))
        elif name.startswith("disruption-"):
            figures.append(plot_disruption(result, out / f"{name}.png", plt))
            parts.append(_disruption_html(result, figures[-1].name))
        elif name.startswith("branch_points-"):
            parts.append(_branch_points_html(result))
        elif name.startswith("lr_sweep-"):
            parts.append(_lr_sweep_html(result, results.get(f"learning-{result['task']}")))
    if not parts:
        return "<p>No benchmark results yet (<code>benchmarks/results/</code>); see docs/research.md.</p>", []
    return "".join(parts), figures


def _source(result: dict[str, Any]) -> str:
    commit = (result.get("commit") or "no commit")[:12]
    dirty = " with uncommitted changes" if result.get("uncommitted_changes") else ""
    return f"<p class=source><code>{esc(result['command'])}</code> at <code>{esc(commit)}</code>{dirty}.</p>"


def _ci(value: dict[str, Any] | None, signed: bool = False) -> str:
    if value is None:
        return ""
    mean = f"{value['mean']:+.1f}" if signed else f"{value['mean']:.1f}"
    low_high = value["ci95"]
    return mean if low_high is None else f"{mean} <small>[{low_high[0]:.1f}, {low_high[1]:.1f}]</small>"


def _learning_html(stem: str, result: dict[str, Any], curves: str, diagnostics: str) -> str:
    summary, settings = result["summary"], result["settings"]
    baseline = summary[next(iter(summary))]["baseline"]
    levels = sorted({k for r in result["runs"] for k in r["final_per_level"] if k != "average"})
    table1 = [n for n in summary if "table1" in result["tables"][n]]
    header = ("<tr><th>method</th><th>lr</th>" + "".join(f"<th>{esc(level)}</th>" for level in levels)
              + f"<th>average mean@K [95 % CI]</th><th>Δ vs {esc(baseline)} (paired)</th><th>improvement</th></tr>")
    rows = []
    for name in summary:
        s = summary[name]
        per_level = [sum(r["final_per_level"][lv] for r in result["runs"] if r["method"] == name)
                     / max(1, sum(1 for r in result["runs"] if r["method"] == name)) for lv in levels]
        rows.append(f"<tr{' class=avg' if name in table1 else ''}><td>{esc(s['label'])}</td><td>{s['lr']:g}</td>"
                    + "".join(f"<td>{v:.1f}</td>" for v in per_level)
                    + f"<td>{_ci(s['final'])}</td><td>{_ci(s['vs_baseline'], True)}</td><td>{_ci(s['improvement'], True)}</td></tr>")
    ablation = [n for n in summary if "table2" in result["tables"][n]]
    ladder = "".join(
        f"<tr><td>{esc(summary[n]['label'])}</td><td>{_ci(summary[n]['final'])}</td>"
        f"<td>{_ci(paired_final_difference(result['runs'], n, ABLATION_BASE), True)}</td></tr>" for n in ablation)
    cost = "".join(
        f"<tr><td>{esc(summary[n]['label'])}</td><td>{summary[n]['steps']['mean']:.1f}</td>"
        f"<td>{summary[n]['optimizer_steps']['mean']:.1f}</td><td>{summary[n]['train_s']['mean']:.0f}</td>"
        f"<td>{summary[n]['generated_tokens']['mean']:,.0f}</td><td>{summary[n]['overshoot']['mean']:+,.0f} "
        f"(max {summary[n]['max_overshoot']:+,})</td><td>{summary[n]['trained_tokens']['mean']:,.0f}</td>"
        f"<td>{summary[n]['valid_tokens']['mean']:,.0f}</td>"
        f"<td>{'—' if summary[n]['tokens_to_baseline_final'] is None else format(summary[n]['tokens_to_baseline_final'], ',')}</td>"
        f"<td>{_ci(summary[n]['final'])}</td></tr>" for n in summary)
    lr = (f"learning rate chosen per method on seed {settings['tune_seed']} from {settings['lrs']}"
          if settings["lrs"] else "one learning rate for every method (no sweep)")
    # Files from before --policy-seed existed lack the key: each seed warmed up its own policy then.
    policy_seed = settings.get("policy_seed")
    start = ("each seed from its own problems and warmed-up policy" if policy_seed is None
             else f"every seed from seed {policy_seed}'s problems and warmed-up policy (the seeds vary RL alone)")
    tuned = ", learning rates tuned per method" if settings["lrs"] else ""
    return (f"<h3 id=\"{esc(stem)}\">Learning benchmark, {esc(result['task'])} task{tuned}</h3>"
            f"{_source(result)}<p>{settings['budget']:,} generated tokens per run, seeds {settings['seeds']} ({esc(start)}), "
            f"an evaluation every {settings['eval_every']:,} tokens; {esc(lr)}. Held-out mean@K in %, mean over seeds "
            "with the 95 % t interval; differences are paired by seed.</p>"
            f"<h4>Comparison (Table 1)</h4><table class=research>{header}{''.join(rows)}</table>"
            f"<h4>Ablation (Table 2): each row against TreeRL</h4><table class=research><tr><th>variant</th>"
            f"<th>mean@K</th><th>Δ vs TreeRL (paired)</th></tr>{ladder}</table>"
            "<h4>Cost (Table 3)</h4><table class=research><tr><th>method</th><th>steps</th><th>optimizer steps</th>"
            "<th>train s</th><th>generated tokens</th><th>overshoot</th><th>trained tokens</th><th>valid tokens</th>"
            f"<th>tokens to {esc(baseline)}'s final mean@K</th><th>mean@K</th></tr>{cost}</table>"
            f'<p><img src="{esc(curves)}" alt="accuracy against generated tokens" style="max-width:100%"></p>'
            f'<p><img src="{esc(diagnostics)}" alt="diagnostics per method" style="max-width:100%"></p>'
            + (f"<h4>Learning-rate sweep on seed {settings['tune_seed']} (final mean@K in %, one run per rate)</h4>"
               + _sweep_table(result, result) if result["sweep"] else ""))


def _plot_curves(result: dict[str, Any], path: Path, plt) -> Path:
    fig, ax = plt.subplots(figsize=(10, 5), constrained_layout=True)
    for name, s in result["summary"].items():
        x = [p["tokens"] for p in s["curve"]]
        y = [p["accuracy"]["mean"] for p in s["curve"]]
        ax.plot(x, y, marker="o", label=s["label"])
        bands = [p["accuracy"]["ci95"] for p in s["curve"]]
        if all(b is not None for b in bands):
            ax.fill_between(x, [b[0] for b in bands], [b[1] for b in bands], alpha=0.12)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("held-out mean@K (%)")
    ax.set_title(f"{result['task']} task: accuracy against generated tokens (mean over seeds, 95 % t band)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plot_diagnostics(result: dict[str, Any], path: Path, plt) -> Path:
    summary = result["summary"]
    names = list(summary)
    fig, axes = plt.subplots(2, 3, figsize=(16, 7.5), constrained_layout=True)
    for ax, (title, key) in zip(axes.flat, DIAGNOSTIC_PANELS, strict=True):
        values = [summary[n]["diagnostics"][key] for n in names]
        means = [v["mean"] for v in values]
        errors = [[m - (v["ci95"] or [m, m])[0] for m, v in zip(means, values)],
                  [(v["ci95"] or [m, m])[1] - m for m, v in zip(means, values)]]
        ax.bar(range(len(names)), means, yerr=errors, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{title}, mean over steps", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_disruption(result: dict[str, Any], path: Path, plt) -> Path:
    """Fig. 3's bars: the accuracy drop per bin and, for uniformly drawn steps, per position, with intervals."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    for ax, (title, groups) in zip(axes, (("by how the step was drawn", result["bins"]),
                                          ("uniformly drawn steps, by position", result["by_position"]))):
        names = list(groups)
        values = [groups[n]["drop"]["value"] for n in names]
        errors = [[v - groups[n]["drop"]["ci95"][0] for n, v in zip(names, values)],
                  [groups[n]["drop"]["ci95"][1] - v for n, v in zip(names, values)]]
        ax.bar(range(len(names)), values, yerr=errors, capsize=4)
        ax.set_xticks(range(len(names)), names, rotation=15)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("accuracy drop (points)")
    fig.suptitle(f"Disrupting one step's attention, {result['task']} task (95 % bootstrap intervals over problems)",
                 fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _disruption_html(result: dict[str, Any], figure: str) -> str:
    def rows(groups: dict[str, Any]) -> str:
        return "".join(f"<tr><td>{esc(n)}</td><td>{g['draws']}</td><td>{g['control']:.1f}</td><td>{g['disrupted']:.1f}</td>"
                       f"<td>{g['drop']['value']:+.2f} <small>[{g['drop']['ci95'][0]:+.2f}, {g['drop']['ci95'][1]:+.2f}]"
                       "</small></td></tr>" for n, g in groups.items())
    header = "<tr><th>steps drawn</th><th>draws</th><th>control %</th><th>disrupted %</th><th>drop [95 % CI]</th></tr>"
    return (f"<h3 id=\"disruption-{esc(result['task'])}\">Disruption analysis (Fig. 3), {esc(result['task'])} task</h3>"
            f"{_source(result)}<p>{result['problems']} problems, {result['responses_drawn']} responses with a step "
            f"drawn per bin, {result['continuations']} continuations per draw and condition; the FCI and entropy "
            f"top-20 % draws were the same step in {100 * result['fci_and_entropy_top_step_agree']:.0f} % of "
            f"responses.</p><table class=research>{header}{rows(result['bins'])}</table>"
            f"<table class=research>{header}{rows(result['by_position'])}</table>"
            f'<p><img src="{esc(figure)}" alt="accuracy drop per bin" style="max-width:100%"></p>')


def _branch_points_html(result: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{esc(name)}</td><td>{p['value']:.3f} <small>{p['ci95']}</small></td>"
        f"<td>{result['recall'][name]['value']:.3f} <small>{result['recall'][name]['ci95']}</small></td></tr>"
        for name, p in result["precision"].items())
    return ("<h3 id=\"branch-points\">Branch points against planted critical steps</h3>"
            f"{_source(result)}<table class=research><tr><th>criterion</th><th>precision [95 % CI]</th>"
            f"<th>recall [95 % CI]</th></tr>{rows}</table>")


def _lr_sweep_html(result: dict[str, Any], comparison: dict[str, Any] | None) -> str:
    """A sweep run on its own (``--tune-only``), beside the rate the task's comparison used: a comparison at
    one rate for all is fair only where that rate is each method's best (or near it)."""
    settings = result["settings"]
    return (f"<h3 id=\"lr-sweep-{esc(result['task'])}\">Learning-rate sweep, {esc(result['task'])} task</h3>"
            f"{_source(result)}<p>Final held-out mean@K in % after {settings['budget']:,} generated tokens on the "
            f"tuning seed {settings['tune_seed']} (one run per rate; not a seed of the comparison).</p>"
            + _sweep_table(result, comparison))


def _sweep_table(result: dict[str, Any], comparison: dict[str, Any] | None) -> str:
    """Each method's final mean@K per rate on the tuning seed (the best in bold), its best rate, and the rate
    ``comparison`` ran it at."""
    lrs = [f"{lr:g}" for lr in result["settings"]["lrs"]]
    used = {} if comparison is None else {name: f"{s['lr']:g}" for name, s in comparison["summary"].items()}
    rows = []
    for name, finals in result["sweep"].items():
        best = f"{result['chosen_lr'][name]:g}"
        cells = "".join(f"<td>{'<b>' if lr == best else ''}{finals[lr]:.1f}{'</b>' if lr == best else ''}</td>"
                        for lr in lrs)
        rows.append(f"<tr><td>{esc(result['labels'][name])}</td>{cells}<td>{esc(best)}</td>"
                    f"<td>{esc(used.get(name, '—'))}</td></tr>")
    return ("<table class=research><tr><th>method</th>" + "".join(f"<th>lr {lr}</th>" for lr in lrs)
            + f"<th>best</th><th>used by the comparison</th></tr>{''.join(rows)}</table>")
