"""The report's research section renders the benchmarks' results as the paper's tables and figures."""

from __future__ import annotations

import json
import re

import pytest

from attnrl.errors import DataError
from attnrl.eval.comparison import summarise_runs
from attnrl.stages.report import pyplot
from attnrl.stages.research_view import load_results, research_section

LABELS = {"grpo": "GRPO (n = 6)", "treerl": "TreeRL", "atb": "+ ATB"}
TABLES = {"grpo": ["table1"], "treerl": ["table1", "table2"], "atb": ["table2"]}
FINALS = {"grpo": [60.0, 70.0, 80.0], "treerl": [62.0, 71.0, 83.0], "atb": [65.0, 75.0, 84.0]}


def _run(method: str, seed: int, final: float) -> dict:
    return {"method": method, "seed": seed, "lr": 1e-4, "final": final, "improvement": final - 50.0,
            "final_per_level": {"L1": final + 5, "L2": final - 5, "average": final},
            "curve": [{"mark": 0, "tokens": 0, "average": 50.0}, {"mark": 100, "tokens": 100, "average": final}],
            "generated_tokens": 100, "overshoot": 0, "trained_tokens": 90, "valid_tokens": 80, "steps": 4,
            "optimizer_steps": 8, "train_s": 30.0, "diagnostics": {"valid_token_ratio": [1.0],
                                                                 "solve_all_ratio_mc": [0.1],
                                                                 "solve_none_ratio_mc": [0.2], "valid_ratio_mc": [0.7],
                                                                 "valid_ratio_all": [0.8], "prompt_batch_size": [16.0]}}


def _learning() -> dict:
    runs = [_run(m, s, f) for m, finals in FINALS.items() for s, f in zip((1, 2, 3), finals)]
    summary = summarise_runs(runs, LABELS, "grpo", list(runs[0]["diagnostics"]))
    return {"benchmark": "learning", "task": "chain", "command": "python benchmarks/learning.py", "commit": "abc" * 14,
            "uncommitted_changes": False, "labels": LABELS, "tables": TABLES, "runs": runs, "summary": summary,
            "chosen_lr": {}, "sweep": {},
            "settings": {"budget": 100, "eval_every": 50, "seeds": [1, 2, 3], "lrs": None, "tune_seed": None}}


def _disruption() -> dict:
    drop = {"value": 4.0, "ci95": [1.0, 7.0], "n": 10}
    group = {"drop": drop, "control": 50.0, "disrupted": 46.0, "draws": 10}
    return {"command": "python benchmarks/disruption.py", "commit": None, "task": "chain", "problems": 5,
            "responses_drawn": 10, "continuations": 2, "fci_and_entropy_top_step_agree": 0.5,
            "bins": {"fci_top20": group, "uniform": group}, "by_position": {"0.0-0.2": group}}


def test_the_tables_and_figures_come_from_the_results(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "learning-chain.json").write_text(json.dumps(_learning()))
    (results / "disruption-chain.json").write_text(json.dumps(_disruption()))
    out = tmp_path / "report"
    out.mkdir()
    page, figures = research_section(load_results(results), out, pyplot())
    assert sorted(f.name for f in figures) == ["disruption-chain.png", "learning-chain-curves.png",
                                               "learning-chain-diagnostics.png"]
    assert all(f.stat().st_size > 1000 for f in figures)
    # Table 1: the per-level means and the paired difference to GRPO (treerl − grpo per seed: 2, 1, 3).
    treerl = re.search(r"<tr class=avg><td>TreeRL</td>(.*?)</tr>", page).group(1)
    assert "<td>77.0</td><td>67.0</td>" in treerl and "+2.0 <small>[" in treerl
    # Table 2: + ATB against TreeRL per seed (3, 4, 1): +2.7.
    assert re.search(r"<tr><td>\+ ATB</td><td>[^<]*<small>[^<]*</small></td><td>\+2\.7 <small>", page)
    assert "abcabcabcabc" in page and "python benchmarks/disruption.py" in page
    assert "+4.00 <small>[+1.00, +7.00]</small>" in page


@pytest.mark.parametrize(("policy_seed", "start"), [
    (None, "each seed from its own problems and warmed-up policy"),
    (1, "every seed from seed 1&#x27;s problems and warmed-up policy"),
])
def test_the_page_says_which_policy_each_seed_started_from(tmp_path, policy_seed, start):
    result = _learning()
    result["settings"]["policy_seed"] = policy_seed
    (tmp_path / "learning-planted.json").write_text(json.dumps(result))
    page, _ = research_section(load_results(tmp_path), tmp_path, pyplot())
    assert start in page
    assert '<h3 id="learning-planted">Learning benchmark, chain task</h3>' in page  # the file's stem: ids stay unique


def test_the_sweep_shows_each_methods_best_rate_beside_the_one_the_comparison_used(tmp_path):
    sweep = {"benchmark": "lr_sweep", "task": "chain", "command": "python benchmarks/learning.py --tune-only",
             "commit": None, "labels": LABELS,
             "settings": {"budget": 100, "lrs": [5e-5, 1e-4], "tune_seed": 100},
             "sweep": {"grpo": {"5e-05": 61.0, "0.0001": 70.0}, "treerl": {"5e-05": 72.0, "0.0001": 66.0}},
             "chosen_lr": {"grpo": 1e-4, "treerl": 5e-5}}
    (tmp_path / "lr_sweep-chain.json").write_text(json.dumps(sweep))
    (tmp_path / "learning-chain.json").write_text(json.dumps(_learning()))
    page, _ = research_section(load_results(tmp_path), tmp_path, pyplot())
    assert "<tr><td>GRPO (n = 6)</td><td>61.0</td><td><b>70.0</b></td><td>0.0001</td><td>0.0001</td></tr>" in page
    assert "<tr><td>TreeRL</td><td><b>72.0</b></td><td>66.0</td><td>5e-05</td><td>0.0001</td></tr>" in page


def test_a_comparison_that_tuned_its_rates_shows_its_sweep(tmp_path):
    result = _learning()
    result["settings"].update(lrs=[1e-4, 2e-4], tune_seed=100)
    result["sweep"] = {"grpo": {"0.0001": 70.0, "0.0002": 55.0}, "treerl": {"0.0001": 66.0, "0.0002": 68.5}}
    result["chosen_lr"] = {"grpo": 1e-4, "treerl": 2e-4}
    (tmp_path / "learning-chain.json").write_text(json.dumps(result))
    page, _ = research_section(load_results(tmp_path), tmp_path, pyplot())
    assert "Learning-rate sweep on seed 100" in page
    # The runs in the fixture all ran at 1e-4: the table says so beside TreeRL's best, 2e-4.
    assert "<tr><td>TreeRL</td><td>66.0</td><td><b>68.5</b></td><td>0.0002</td><td>0.0001</td></tr>" in page


def test_no_results_say_so_and_a_broken_file_is_named(tmp_path):
    page, figures = research_section(load_results(tmp_path / "absent"), tmp_path, pyplot())
    assert figures == [] and "No benchmark results yet" in page
    (tmp_path / "learning-chain.json").write_text("{")
    with pytest.raises(DataError, match="learning-chain.json"):
        load_results(tmp_path)
