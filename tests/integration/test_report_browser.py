"""The report as a person sees it: rendered by headless Chromium from disk, no server.

A small run (prepare, warmup, evaluate, two training steps, evaluate) and one data check with its
Data Docs, then the report: its figures load, its tables hold the numbers of the run's files, every
traced problem shows FCI-shaded steps, both criteria's branch marks and a tree with a box per node,
and the data-check link opens the Data Docs.
"""

from __future__ import annotations

import json

import pytest

from attnrl.config import resolve_config
from attnrl.stages.evaluate import evaluate
from attnrl.stages.layout import Layout
from attnrl.stages.prepare import prepare
from attnrl.stages.report import build_report
from attnrl.stages.train import train
from attnrl.stages.warmup import warmup
from infra import data_gates
from tests.browser import full_page_screenshot, headless_chromium
from tests.conftest import small_overrides

OVERRIDES = ["warmup.steps=150", "warmup.batch_size=16", "rollout.sampling.max_new_tokens=32",
             "report.trace_problems=2"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    config = resolve_config(preset="tiny", overrides=small_overrides() + OVERRIDES)
    layout = Layout.of(config, root)
    prepare(config, root)
    warmup(config, root)
    evaluate(config, root, out_dir=layout.runs_dir / "eval-init")
    trained = train(config, root)
    evaluate(config, root, model_dir=trained.final_model)
    _, metrics = data_gates.eval_frames(layout.eval_dir / "samples.parquet", layout.eval_dir / "metrics.json")
    data_gates.run_gate("eval_metrics", metrics, config, target="runs/eval/metrics.json",
                        docs_dir=layout.data_docs(config))
    return config, root, build_report(config, root)


def test_the_report_renders_in_chromium_with_its_figures_tables_and_traces(report, tmp_path):
    config, root, result = report
    traces = json.loads((result.html_path.parent / "traces.json").read_text())
    after = json.loads((Layout.of(config, root).eval_dir / "metrics.json").read_text())
    with headless_chromium() as browser:
        browser.get(result.html_path.resolve().as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
        assert images == [["training_curves.png", True], ["evaluation.png", True]]
        rows = browser.execute_script(
            "return Array.from(document.querySelectorAll('#evaluation tr')).slice(1)"
            ".map(r => Array.from(r.cells).map(c => c.textContent))")
        assert [r[0] for r in rows] == [b["benchmark"] for b in after["benchmarks"]] + ["average"]
        assert [r[-2] for r in rows[:-1]] == [f"{100 * b['mean_at_k']:.1f}" for b in after["benchmarks"]]

        sections = browser.execute_script("""return Array.from(document.querySelectorAll('section.trace')).map(s => ({
            problem: s.dataset.problem,
            shaded: Array.from(s.querySelectorAll('.step, .tok')).filter(d => {
                const rgba = getComputedStyle(d).backgroundColor.match(/[0-9.]+/g);
                return rgba.length === 3 || parseFloat(rgba[3]) > 0; }).length,
            fci: s.querySelectorAll('.mark.fci').length,
            entropy: s.querySelectorAll('.mark.entropy').length,
            boxes: s.querySelectorAll('svg.tree rect').length,
            treeWidth: s.querySelector('svg.tree').getBoundingClientRect().width,
            nodes: s.querySelectorAll('table.segments tr').length - 1}))""")
        assert [s["problem"] for s in sections] == [t["problem_id"] for t in traces] and len(sections) == 2
        for section, trace in zip(sections, traces, strict=True):
            top = max(step["fci"] for step in trace["steps"])  # shading: 0.75 * FCI / the response's top FCI
            assert section["shaded"] == sum(round(0.75 * step["fci"] / top, 2) > 0 for step in trace["steps"]) > 0
            assert section["fci"] == len(set(trace["fci_offsets"])) and section["entropy"] == len(set(trace["entropy_offsets"]))
            assert section["boxes"] == len(trace["segments"]) + 1 and section["nodes"] == len(trace["segments"])
            assert section["treeWidth"] > 0

        assert "lineage.json" in browser.find_element("id", "lineage").find_element("xpath", "following-sibling::p").text
        full_page_screenshot(browser, tmp_path / "report.png")
        assert (tmp_path / "report.png").stat().st_size > 50_000

        browser.find_element("id", "data-checks").click()
        assert browser.current_url.endswith("/runs/data-checks/index.html")
        assert "eval_metrics" in browser.page_source  # the gate run, listed by its suite
