"""Every file in ../shared/benchmarks loads through the verl parquet loader (spec §2.3)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from attnrl.data.loaders import load_verl_parquet
from attnrl.errors import DataError
from tests.conftest import require_benchmarks

EXPECTED_ROWS = {"aime24_1": 30, "amc23_1": 40, "math500_1": 500, "minerva_1": 272}


def test_every_eval_file_loads_with_answer_lists():
    files = sorted((require_benchmarks() / "eval").glob("*.parquet"))
    assert {f.stem for f in files} >= set(EXPECTED_ROWS)
    for path in files:
        problems = load_verl_parquet(path)
        if path.stem in EXPECTED_ROWS:
            assert len(problems) == EXPECTED_ROWS[path.stem], path
        assert len({p.id for p in problems}) == len(problems), f"{path}: duplicate ids"
        for problem in problems:
            assert problem.split == "test" and problem.answers
            assert all(a == a.strip() and a for a in problem.answers)  # Minerva's '9.6\n' is stripped
            assert problem.question.endswith("within \\boxed{}.")


def test_minerva_keeps_several_accepted_answers():
    problems = load_verl_parquet(require_benchmarks() / "eval" / "minerva_1.parquet")
    counts = sorted(len(p.answers) for p in problems)
    assert counts.count(2) == 71 and counts.count(3) == 4  # spec §2.3


def test_train_file_has_string_answers_and_two_ungradeable_rows():
    path = require_benchmarks() / "train" / "dapo+math_train.parquet"
    with pytest.raises(DataError, match=r"dapo\+math_train.parquet row 22739: answer 0 is empty"):
        load_verl_parquet(path)
    problems = load_verl_parquet(path, on_invalid="skip")
    assert len(problems) == 24_898 - 2
    assert {"22739", "22741"}.isdisjoint(p.id for p in problems)
    assert {p.source for p in problems} == {"dapo_math", "xDAN2099/lighteval-MATH"}


def test_real_file_without_its_answer_column_is_rejected(tmp_path):
    table = pq.read_table(require_benchmarks() / "eval" / "aime24_1.parquet").drop_columns(["reward_model"])
    pq.write_table(table, tmp_path / "aime24_no_answers.parquet")
    with pytest.raises(DataError, match=r"aime24_no_answers.parquet: missing column\(s\) \['reward_model'\]"):
        load_verl_parquet(tmp_path / "aime24_no_answers.parquet")


def test_hf_loader_reads_a_local_dataset_directory(tmp_path):
    """The 'hf' kind goes through datasets.load_dataset; a local directory needs no network."""
    from attnrl.config.schema import DataConfig, SourceSpec
    from attnrl.data.loaders import load_source

    source = pq.read_table(require_benchmarks() / "eval" / "amc23_1.parquet").to_pylist()[:5]
    rows = [{"problem": r["prompt"][0]["content"], "answer": r["reward_model"]["ground_truth"][0]} for r in source]
    (tmp_path / "ds").mkdir()
    import json

    (tmp_path / "ds" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = SourceSpec(kind="hf", path=str(tmp_path / "ds"), split="test", name="amc-local")
    problems = load_source(spec, DataConfig(train=[], eval=[], prompt_suffix=""), split="test", seed=1)
    assert [p.answers[0] for p in problems] == [r["answer"] for r in rows]
    assert problems[0].source == "amc-local"

    missing = SourceSpec(kind="hf", path=str(tmp_path / "ds"), split="test", answer_field="solution")
    with pytest.raises(DataError, match="column 'solution' not found"):
        load_source(missing, DataConfig(train=[], eval=[]), split="test", seed=1)
