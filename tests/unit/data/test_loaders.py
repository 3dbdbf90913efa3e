from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attnrl.config.schema import DataConfig, SourceSpec
from attnrl.data.loaders import LOADERS, load_jsonl, load_source, load_verl_parquet, write_problems
from attnrl.data.problem import make_problem
from attnrl.errors import DataError


def _row(index, answer, content="Compute 2+2."):
    return {
        "data_source": "toy",
        "prompt": [{"role": "user", "content": content}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"index": index, "split": "test"},
    }


def _write(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_eval_lists_and_train_strings_both_load(tmp_path):
    lists = load_verl_parquet(_write(tmp_path / "eval.parquet", [_row(0, ["4\n"]), _row(1, ["1", "1.0"])]))
    strings = load_verl_parquet(_write(tmp_path / "train.parquet", [_row(0, " 4 ")]))
    assert [p.answers for p in lists] == [("4",), ("1", "1.0")]
    assert strings[0].answers == ("4",) and strings[0].split == "test"


def test_missing_answer_column_is_named(tmp_path):
    rows = [{k: v for k, v in _row(0, ["4"]).items() if k != "reward_model"}]
    with pytest.raises(DataError, match=r"missing column\(s\) \['reward_model'\]") as info:
        load_verl_parquet(_write(tmp_path / "x.parquet", rows))
    assert "x.parquet" in str(info.value)


def test_empty_prompt_names_the_row(tmp_path):
    path = _write(tmp_path / "x.parquet", [_row(0, ["4"]), _row(1, ["4"], content="  ")])
    with pytest.raises(DataError, match=r"x.parquet row 1: field 'prompt' is empty"):
        load_verl_parquet(path)


def test_a_prompt_of_control_characters_names_the_file_and_row(tmp_path):
    path = _write(tmp_path / "x.parquet", [_row(0, ["4"]), _row(1, ["4"], content="\x00\x01\x02")])
    with pytest.raises(DataError, match=r"x.parquet row 1: field 'prompt' has no text, only control characters"):
        load_verl_parquet(path)


def test_non_string_answer_names_the_row(tmp_path):
    path = _write(tmp_path / "x.parquet", [_row(0, [4])])
    with pytest.raises(DataError, match=r"row 0: answer 0 must be a string, got int"):
        load_verl_parquet(path)


def test_skip_policy_drops_bad_rows_and_keeps_good_ones(tmp_path):
    path = _write(tmp_path / "x.parquet", [_row(0, ["4"]), _row(1, [""]), _row(2, ["5"])])
    assert [p.id for p in load_verl_parquet(path, on_invalid="skip")] == ["0", "2"]


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_verl_parquet(tmp_path / "absent.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable parquet"):
        load_verl_parquet(tmp_path / "junk.parquet")


def test_jsonl_loader_appends_the_suffix_and_names_bad_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n\n" + json.dumps({"prompt": "x", "answer": ["3", "3.0"], "id": "q7"}) + "\n")
    problems = load_jsonl(path, prompt_suffix=" Box it.", split="test")
    assert [p.question for p in problems] == ["1+1? Box it.", "x Box it."]
    assert [p.id for p in problems] == ["0", "q7"] and problems[1].answers == ("3", "3.0")
    assert problems[0].source == "p" and problems[0].split == "test"

    path.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"p.jsonl line 2: not valid JSON"):
        load_jsonl(path)
    path.write_text(json.dumps({"prompt": "1+1?"}) + "\n")
    with pytest.raises(DataError, match=r"line 1: field 'answer' is missing"):
        load_jsonl(path)


def test_write_then_read_round_trips(tmp_path):
    problems = [
        make_problem(id=i, prompt=f"q{i}", answers=[str(i)], source="toy", split="train", level=i, where="test")
        for i in range(3)
    ]
    path = write_problems(problems, tmp_path / "out" / "train.parquet")
    assert load_verl_parquet(path) == problems


def test_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    good = [make_problem(id=0, prompt="q", answers=["1"], source="t", split="train", where="test")]
    path = write_problems(good, tmp_path / "train.parquet")
    before = path.read_bytes()
    bad = [object()]  # not a Problem: the writer fails half-way
    with pytest.raises(AttributeError):
        write_problems(bad, path)  # type: ignore[list-item]
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["train.parquet"]


def test_load_source_uses_the_registry_and_renames(tmp_path):
    path = _write(tmp_path / "aime.parquet", [_row(0, ["4"])])
    data = DataConfig(train=[], eval=[])
    problems = load_source(SourceSpec(kind="verl_parquet", path=str(path), name="aime24"), data, split="test", seed=1)
    assert problems[0].source == "aime24"
    synthetic = load_source(SourceSpec(kind="synthetic", limit=3), data, split="test", seed=1)
    assert len(synthetic) == 3 and set(LOADERS) == {"synthetic", "verl_parquet", "jsonl", "hf"}
