"""The Great Expectations gates with real bad data built from ../shared/benchmarks: each stops the flow
that would consume the data, names the failing expectation and row, writes Data Docs, runs nothing
downstream and overwrites no earlier output."""

from __future__ import annotations

import copy
import dataclasses
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import attnrl.training.tree_parts as tree_parts_module
from attnrl.errors import DataError
from flows.pipeline import pipeline
from flows.stages import prepare_flow, train_flow, warmup_flow
from infra import data_gates
from infra.data_gates import DataGateError
from tests.conftest import PROJECT_ROOT, require_benchmarks, small_overrides

CONFIG = str(PROJECT_ROOT / "params.yaml")
BAD_ROW = 3
# Real AIME prompts are long for the tiny model's character tokenizer: a limit that fits all of them.
LIMIT = ["data.max_prompt_tokens=4096"]


def _break(rows: list[dict], case: str) -> list[dict]:
    rows = copy.deepcopy(rows)
    bad = rows[BAD_ROW]
    if case == "missing answer":
        bad["reward_model"]["ground_truth"] = []
    elif case == "empty prompt":
        bad["prompt"][0]["content"] = "   "
    elif case == "control characters":
        bad["prompt"][0]["content"] = "\x00\x01\x02"
    elif case == "duplicate id":
        bad["extra_info"]["index"] = rows[0]["extra_info"]["index"]
    elif case == "overlong prompt":
        bad["prompt"][0]["content"] = bad["prompt"][0]["content"] * 40
    elif case == "unknown split":
        bad["extra_info"]["split"] = "holdout"
    else:
        raise ValueError(case)
    return rows


def _aime():
    return require_benchmarks() / "eval" / "aime24_1.parquet"


def _write_bad(path, case):
    table = pq.read_table(_aime())
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(_break(table.to_pylist(), case), schema=table.schema), path)
    return path


EXPECTATION = {
    "missing answer": "expect_column_values_to_be_between(answer_count)",
    "empty prompt": "expect_column_value_lengths_to_be_between(prompt)",
    "duplicate id": "expect_column_values_to_be_unique(id)",
    "overlong prompt": "expect_column_values_to_be_between(prompt_tokens)",
}


def test_bad_training_problems_stop_the_train_flow_naming_the_rows(prefect_api, tmp_path):
    """Training input that reached disk without passing 'prepare' (a pull, an edit) never trains: the train
    flow's wiring of the gate, with one bad value (each kind is in the next test)."""
    prepared = tmp_path / "data" / "prepared"
    _write_bad(prepared / "train.parquet", "duplicate id")
    earlier = {p: p.read_bytes() for p in prepared.rglob("*") if p.is_file()}
    state = train_flow(config_path=CONFIG, overrides=[*small_overrides(), *LIMIT], root=str(tmp_path),
                       return_state=True)
    assert state.is_failed()
    with pytest.raises(DataGateError) as error:
        state.result()
    message = str(error.value)
    assert "prepared_problems" in message and EXPECTATION["duplicate id"] in message, message
    assert f"row {BAD_ROW} (id aime24/" in message and "row 0 (id aime24/" in message  # both copies are named
    assert (tmp_path / "runs" / "data-checks" / "index.html").is_file()
    assert not (tmp_path / "runs" / "train").exists()  # nothing downstream ran
    assert {p: p.read_bytes() for p in prepared.rglob("*") if p.is_file()} == earlier


@pytest.mark.parametrize("case", list(EXPECTATION))
def test_the_prepared_problems_gate_names_each_kind_of_bad_row(tmp_path, case):
    from attnrl.config import resolve_config
    from attnrl.model.policy import policy_tokenizer
    from attnrl.rollout.prompts import encode_prompt

    config = resolve_config(path=CONFIG, overrides=LIMIT)
    tokenizer = policy_tokenizer(config)
    frame = data_gates.prepared_frame(_write_bad(tmp_path / "train.parquet", case),
                                      lambda messages: encode_prompt(tokenizer, messages))
    with pytest.raises(DataGateError) as error:
        data_gates.run_gate("prepared_problems", frame, config, target="train.parquet", docs_dir=None)
    message = str(error.value)
    assert f"{EXPECTATION[case]}: failing rows: row {BAD_ROW} (id aime24/" in message or (
        case == "duplicate id" and EXPECTATION[case] in message and f"row {BAD_ROW} (id aime24/" in message), message


def test_bad_source_data_stops_the_pipeline_at_prepare_naming_the_row(prefect_api, tmp_path):
    """The pipeline's wiring: a bad source row fails prepare, and no later stage runs (each kind: next test)."""
    source = _write_bad(tmp_path / "source" / "aime_bad.parquet", "control characters")
    root = tmp_path / "run"
    overrides = [*small_overrides(), *LIMIT, f"data.train=[{{kind: verl_parquet, path: {source}, name: aime}}]"]
    state = pipeline(config_path=CONFIG, overrides=overrides, root=str(root), return_state=True)
    assert state.is_failed()
    with pytest.raises(DataError) as error:
        state.result()
    assert f"row {BAD_ROW}" in str(error.value), str(error.value)
    assert not (root / "models").exists() and not (root / "runs" / "eval-init").exists()  # no later stage


@pytest.mark.parametrize("case", ["missing answer", "empty prompt", "control characters", "duplicate id",
                                  "overlong prompt"])
def test_the_prepare_stage_names_each_kind_of_bad_source_row(tmp_path, case):
    from attnrl.config import resolve_config
    from attnrl.stages.prepare import prepare

    source = _write_bad(tmp_path / "source" / "aime_bad.parquet", case)
    # Overlong prompts are dropped by default (spec §2.2); data that must arrive whole says 'error'.
    config = resolve_config(path=CONFIG, overrides=[*small_overrides(), *LIMIT, "data.overlong_prompts=error",
                                                    f"data.train=[{{kind: verl_parquet, path: {source}, name: aime}}]"])
    with pytest.raises(DataError) as error:
        prepare(config, tmp_path / "run")
    assert f"row {BAD_ROW}" in str(error.value), str(error.value)
    assert not (tmp_path / "run" / "data" / "prepared" / "train.parquet").exists()


def test_a_failing_prepare_gate_keeps_the_previous_prepared_data(prefect_api, tmp_path):
    """The gate sees the new output before it replaces the old: a bad prepare changes nothing on disk."""
    def overrides(source):
        return [*small_overrides(), *LIMIT, f"data.train=[{{kind: verl_parquet, path: {source}, name: aime}}]"]

    root = tmp_path / "run"
    passed = prepare_flow(config_path=CONFIG, overrides=overrides(_aime()), root=str(root), return_state=True)
    prepared = root / "data" / "prepared"
    before = {p: p.read_bytes() for p in prepared.rglob("*") if p.is_file()}
    bad = _write_bad(tmp_path / "source" / "aime_bad.parquet", "unknown split")  # the loader takes any split
    state = prepare_flow(config_path=CONFIG, overrides=overrides(bad), root=str(root), return_state=True)
    assert state.is_failed()
    with pytest.raises(DataGateError) as error:
        state.result()
    message = str(error.value)
    assert f"expect_column_values_to_be_in_set(split): failing rows: row {BAD_ROW} (id aime/" in message, message
    assert str(prepared / "train.parquet") in message  # named by its final path, not the temporary one
    assert {p: p.read_bytes() for p in prepared.rglob("*") if p.is_file()} == before
    assert not [p for p in prepared.parent.iterdir() if p.name.endswith(".tmp")]  # no half-written leftovers

    # Both runs' gates are in the project's one GX context, its Data Docs linked from each run.
    docs = root / "runs" / "data-checks"
    assert _validation_runs(docs, "prepared_problems", str(prepared / "train.parquet")) == 2
    assert data_gates.run_name(str(prepared / "train.parquet")) in (docs / "index.html").read_text()
    for state in (passed, state):
        [link] = _artifacts(prefect_api, state, "data-checks")
        assert link.type == "markdown" and link.data.endswith(f"]({(docs / 'index.html').resolve().as_uri()})")
    assert "FAILED" in _artifacts(prefect_api, state, "data-checks")[0].description


def _validation_runs(docs, suite: str, target: str) -> int:
    """Validation results of ``suite`` on ``target`` kept in the file-backed GX project in ``docs``."""
    import great_expectations as gx

    store = gx.get_context(mode="file", project_root_dir=str(docs)).validation_results_store
    return sum(1 for key in store.list_keys()
               if key.expectation_suite_identifier.name == suite and key.run_id.run_name == data_gates.run_name(target))


def _artifacts(client, state, key: str) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    return client.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))


def test_a_non_finite_advantage_stops_training_before_the_update(prefect_api, tmp_path, monkeypatch):
    common = {"config_path": CONFIG, "overrides": small_overrides(), "root": str(tmp_path)}
    prepare_flow(**common)
    warmup_flow(**common)
    init = (tmp_path / "models" / "init" / "model.safetensors").read_bytes()
    real = tree_parts_module.trainable_trees

    corrupted = []

    def with_a_nan(built, algorithm):  # a real batch with its first trained advantage corrupted
        trees, dropped = real(built, algorithm)
        if corrupted or not trees:  # a part of the batch may be filtered out entirely
            return trees, dropped
        corrupted.append(True)
        tree = trees[0]
        path = tree.paths[0]
        broken = dataclasses.replace(path, advantages=(math.nan, *path.advantages[1:]))
        trees[0] = dataclasses.replace(tree, paths=(broken, *tree.paths[1:]))
        return trees, dropped

    monkeypatch.setattr(tree_parts_module, "trainable_trees", with_a_nan)  # where the loop builds its trees
    state = train_flow(**common, return_state=True)
    assert state.is_failed()
    with pytest.raises(DataGateError) as error:
        state.result()
    message = str(error.value)
    assert "rollout_batch" in message and "training step 1" in message
    assert "expect_column_values_to_be_in_set(advantages_finite): failing rows: row 0" in message, message
    assert not (tmp_path / "runs" / "train" / "checkpoints").exists() and not (tmp_path / "runs" / "train" / "final").exists()
    assert (tmp_path / "models" / "init" / "model.safetensors").read_bytes() == init


def test_difficulty_and_evaluation_gates_name_the_bad_rows(tmp_path):
    from attnrl.config import resolve_config

    config = resolve_config(path=CONFIG)
    table = pa.Table.from_pylist([
        {"source": "aime24", "problem_id": "0", "samples": 4, "correct": 2, "pass_rate": 0.5, "mean_fci": 0.1, "kept": True},
        {"source": "aime24", "problem_id": "1", "samples": 4, "correct": 3, "pass_rate": 0.5, "mean_fci": 0.1, "kept": True},
        {"source": "aime24", "problem_id": "2", "samples": 4, "correct": 6, "pass_rate": 1.5, "mean_fci": 0.1, "kept": False},
    ])
    pq.write_table(table, tmp_path / "difficulty.parquet")
    with pytest.raises(DataGateError) as error:
        data_gates.run_gate("difficulty_table", data_gates.difficulty_frame(tmp_path / "difficulty.parquet"), config,
                            target="difficulty.parquet", docs_dir=None)
    message = str(error.value)
    assert "expect_column_values_to_be_between(pass_rate): failing rows: row 2 (id aime24/2)" in message
    assert "expect_column_values_to_be_in_set(counts_consistent): failing rows: row 1 (id aime24/1), row 2" in message

    sample = {"benchmark": "aime24", "problem_id": "7", "sample": 0, "level": None, "response": "x", "reward": 1.0,
              "finish_reason": "stop", "response_tokens": 3}
    pq.write_table(pa.Table.from_pylist([sample, dict(sample), {**sample, "sample": 1, "reward": 0.5}]),
                   tmp_path / "samples.parquet")
    (tmp_path / "metrics.json").write_text(
        '{"benchmarks": [{"benchmark": "aime24", "problems": 1, "k": 2, "mean_at_k": 0.75, "pass_at_k": 0.5}]}')
    samples, metrics = data_gates.eval_frames(tmp_path / "samples.parquet", tmp_path / "metrics.json")
    with pytest.raises(DataGateError, match=r"row 0 \(id aime24/7#0\), row 1 \(id aime24/7#0\)"):
        data_gates.run_gate("eval_results", samples, config, target="samples.parquet", docs_dir=None)
    with pytest.raises(DataGateError, match=r"pass_at_least_mean\): failing rows: row 0 \(id aime24\)"):
        data_gates.run_gate("eval_metrics", metrics, config, target="metrics.json", docs_dir=None)


def test_real_benchmark_files_pass_the_prepared_problems_gate(tmp_path):
    from attnrl.config import resolve_config
    from attnrl.model.policy import policy_tokenizer
    from attnrl.rollout.prompts import encode_prompt

    config = resolve_config(path=CONFIG, overrides=LIMIT)
    tokenizer = policy_tokenizer(config)
    frame = data_gates.prepared_frame(_aime(), lambda messages: encode_prompt(tokenizer, messages))
    report = data_gates.run_gate("prepared_problems", frame, config, target="aime24_1.parquet", docs_dir=tmp_path / "docs")
    assert report.rows == 30 and (tmp_path / "docs" / "index.html").is_file()
    assert frame["prompt_tokens"].min() > 0 and frame["answer_count"].min() >= 1
