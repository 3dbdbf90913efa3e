"""A published checkpoint through the whole pipeline (the Prefect ``pipeline`` flow): SmolLM2-135M-Instruct
(`make fixtures`) on real MATH problems it sometimes solves, evaluated, trained 2 steps with AttnRL on vLLM's
CPU engine (the weights pushed to it and proven after every update), evaluated again and reported
(benchmarks/real_model.py runs the same and prints its figures)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from benchmarks.real_model import EVAL_K, EVAL_PROBLEMS, MAX_NEW_TOKENS, pipeline_overrides, write_problems
from flows.pipeline import pipeline
from scripts.fixtures import SMOLLM2, fixture_dir
from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.integration


def test_smollm2_runs_the_pipeline_on_real_problems(prefect_api, tmp_path):
    model_dir = fixture_dir(SMOLLM2)
    train_path, eval_path = write_problems(tmp_path / "problems")
    state = pipeline(config_path=str(PROJECT_ROOT / "params.yaml"), root=str(tmp_path), return_state=True,
                     overrides=pipeline_overrides(model_dir, train_path, eval_path))
    assert state.is_completed(), state.message
    runs = tmp_path / "runs"

    steps = [json.loads(line) for line in (runs / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [int(s["step"]) for s in steps] == [1, 2]
    assert all(s["update/optimizer_steps"] >= 1 and s["train_sequences"] > 0 for s in steps)
    assert any(0 < s["reward"] < 1 for s in steps)  # problems it sometimes solves: something to learn from

    for run in ("eval-init", "eval"):
        samples = pq.read_table(runs / run / "samples.parquet").to_pylist()
        assert len(samples) == EVAL_PROBLEMS * EVAL_K
        assert all(0 < s["response_tokens"] <= MAX_NEW_TOKENS for s in samples)
        # A response that stopped ended at <|im_end|>, which decoding drops: no chat markup leaks into the text.
        assert all("<|im_end|>" not in s["response"] and "<|im_start|>" not in s["response"] for s in samples)
        assert any(s["finish_reason"] == "stop" for s in samples)
        assert json.loads((runs / run / "metrics.json").read_text())["average"]["mean_at_k"] >= 0

    # Tied embeddings survive training and export: one matrix, trained, written once.
    initial = load_file(str(model_dir / "model.safetensors"))
    final = load_file(str(runs / "train" / "final" / "model.safetensors"))
    assert "lm_head.weight" not in final and final.keys() == initial.keys()
    assert not torch.equal(final["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    assert json.loads((runs / "train" / "final" / "config.json").read_text())["tie_word_embeddings"] is True
    report = (tmp_path / "reports" / "report.html").read_text()
    assert "math500" in report and "smollm2-135m-instruct" in report
