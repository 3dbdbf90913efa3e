"""The prepare → warmup → evaluate stages on a very small embedded default."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from attnrl.config import resolve_config
from attnrl.data.loaders import load_verl_parquet, write_problems
from attnrl.errors import ConfigError, DataError
from attnrl.stages.evaluate import evaluate
from attnrl.stages.layout import Layout
from attnrl.stages.prepare import prepare
from attnrl.stages.warmup import initial_policy_path, warmup
from tests.conftest import not_synthetic_problems, small_overrides


@pytest.fixture()
def config():
    return resolve_config(preset="tiny", overrides=small_overrides())


def test_prepare_writes_train_and_one_file_per_benchmark(tmp_path, config):
    result = prepare(config, tmp_path)
    layout = Layout.of(config, tmp_path)
    assert result.train_path == layout.prepared_train and result.train_count == 80
    assert result.eval_paths == {"synthetic": layout.prepared_eval("synthetic")}
    table = pq.read_table(layout.prepared_eval("synthetic")).to_pylist()
    assert {row["data_source"] for row in table} == {"synthetic-L1", "synthetic-L2"}


def test_prepare_drops_overlong_prompts(tmp_path):
    config = resolve_config(preset="tiny", overrides=[*small_overrides(), "data.max_prompt_tokens=5"])
    # "<|user|>a+b<|assistant|>" is 5 tokens, level 2 prompts are 7.
    result = prepare(config, tmp_path)
    assert result.train_count == 40 and result.dropped_overlong == 40 + 6


def test_prepare_rejects_duplicate_benchmark_names(tmp_path):
    config = resolve_config(
        preset="tiny", overrides=[*small_overrides(), 'data.eval=[{"kind": "synthetic"}, {"kind": "synthetic"}]']
    )
    with pytest.raises(DataError, match="two evaluation benchmarks are named 'synthetic'"):
        prepare(config, tmp_path)


def test_warmup_then_evaluate_writes_scores_per_level(tmp_path, config):
    prepare(config, tmp_path)
    result = warmup(config, tmp_path)
    assert [row["step"] for row in result.history] == [5]
    assert (result.model_dir / "config.json").is_file()
    evaluation = evaluate(config, tmp_path)
    assert [s.benchmark for s in evaluation.scores] == ["synthetic-L1", "synthetic-L2"]
    assert all(s.k == 4 for s in evaluation.scores)
    samples = pq.read_table(evaluation.samples_path).to_pylist()
    assert len(samples) == 4 * sum(s.problems for s in evaluation.scores)
    assert {r["reward"] for r in samples} <= {0.0, 1.0}
    metrics = json.loads(evaluation.metrics_path.read_text())
    assert set(metrics) == {"benchmarks", "average"}


def test_warmup_records_a_real_checkpoint_without_copying_it(tmp_path, config, tiny_policy):
    from attnrl.model.loading import save_policy

    model, tokenizer = tiny_policy
    save_policy(model, tokenizer, tmp_path / "base")
    real = resolve_config(preset="tiny", overrides=[f"model.path={tmp_path / 'base'}", "warmup.enabled=false"])
    result = warmup(real, tmp_path)
    assert not (result.model_dir / "config.json").exists()
    assert initial_policy_path(real, tmp_path) == (tmp_path / "base").resolve()


def test_warmup_sft_is_for_the_tiny_model_not_a_real_checkpoint(tmp_path):
    real = resolve_config(preset="tiny", overrides=["model.path=/some/model"])
    with pytest.raises(ConfigError, match="warmup.enabled: SFT warmup is for the tiny default model"):
        warmup(real, tmp_path)


def test_warmup_sft_needs_the_synthetic_task(tmp_path, config):
    write_problems(not_synthetic_problems(), Layout.of(config, tmp_path).prepared_train)
    with pytest.raises(ConfigError, match=r"warmup.enabled: SFT needs reference solutions.*\['gsm-like'\]"):
        warmup(config, tmp_path)
    assert not Layout.of(config, tmp_path).init_model.exists()


def test_difficulty_off_passes_every_problem_through_with_an_empty_table_and_seed(tmp_path, config):
    from attnrl.stages.difficulty import TABLE_SCHEMA, ads_seed, estimate_difficulty

    assert not config.difficulty.enabled
    prepare(config, tmp_path)  # no policy needed: nothing is sampled
    result = estimate_difficulty(config, tmp_path)
    prepared = load_verl_parquet(Layout.of(config, tmp_path).prepared_train)
    assert load_verl_parquet(result.train_path) == prepared and result.kept == len(prepared) == 80
    table = pq.read_table(result.table_path)
    assert table.num_rows == result.estimated == 0 and table.schema.equals(TABLE_SCHEMA)
    assert result.easy_mean.count == 0 and ads_seed(config, tmp_path).count == 0
    seed = json.loads((tmp_path / "data" / "difficulty" / "ads_seed.json").read_text())
    assert seed["easy_mean"]["count"] == 0


def test_difficulty_refuses_to_leave_nothing_to_train_on(tmp_path, config):
    from attnrl.stages.difficulty import ads_seed, estimate_difficulty

    config = resolve_config(preset="tiny", overrides=[*small_overrides(), "difficulty.enabled=true",
                                                      "difficulty.max_problems=6", "difficulty.samples_per_problem=2",
                                                      "rollout.sampling.max_new_tokens=8"])
    prepare(config, tmp_path)
    warmup(config, tmp_path)
    # Five warmup steps solve nothing: every problem is never-solved and dropped.
    with pytest.raises(DataError, match=r"no problem has a pass rate in \(0.0, 1.0\)"):
        estimate_difficulty(config, tmp_path)
    assert not (tmp_path / "data" / "difficulty").exists()
    with pytest.raises(DataError, match="run the difficulty stage first"):
        ads_seed(config, tmp_path)


def test_difficulty_table_and_ads_seed_from_a_policy_that_solves_some(tmp_path, config):
    """A policy warmed up on the exact answers of level 1 solves some problems and not others."""
    from attnrl.stages.difficulty import ads_seed, estimate_difficulty

    overrides = [*small_overrides(), "difficulty.enabled=true", "difficulty.samples_per_problem=4",
                 "data.synthetic.levels=[1]", "data.synthetic.train_per_level=90", "warmup.steps=400",
                 "warmup.batch_size=16", "warmup.lr=3e-3", "rollout.sampling.max_new_tokens=12"]
    config = resolve_config(preset="tiny", overrides=overrides)
    prepare(config, tmp_path)
    warmup(config, tmp_path)
    result = estimate_difficulty(config, tmp_path)
    table = pq.read_table(result.table_path).to_pylist()
    assert len(table) == result.estimated == len(load_verl_parquet(Layout.of(config, tmp_path).prepared_train))
    assert all(0.0 <= row["pass_rate"] <= 1.0 and row["correct"] <= row["samples"] == 4 for row in table)
    kept = [row for row in table if row["kept"]]
    assert len(kept) == result.kept and all(0.0 < row["pass_rate"] < 1.0 for row in kept)
    assert ads_seed(config, tmp_path).count == sum(row["pass_rate"] == 1.0 for row in table)


def test_report_needs_an_evaluation_and_names_the_missing_file(tmp_path, config):
    from attnrl.stages.report import build_report

    with pytest.raises(DataError, match=r"runs/eval/metrics.json is missing"):
        build_report(config, tmp_path)
    assert not (tmp_path / "reports").exists()


def test_report_without_training_shows_the_evaluation(tmp_path, config):
    from attnrl.stages.report import build_report

    prepare(config, tmp_path)
    warmup(config, tmp_path)
    evaluate(config, tmp_path)
    result = build_report(config, tmp_path)
    assert [p.name for p in result.figures] == ["evaluation.png"]
    assert "synthetic-L1" in result.html_path.read_text()
