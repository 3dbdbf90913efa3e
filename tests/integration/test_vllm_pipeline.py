"""The embedded default end to end on the vLLM engine (vLLM's CPU build, ``.venv-vllm``), through
the Prefect pipeline flow: prepare, warmup, both evaluations and training all generate with
vLLM actors, and the trainer's weights reach them after every update."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from flows.pipeline import pipeline
from tests.conftest import PROJECT_ROOT, small_overrides

pytestmark = pytest.mark.integration


def test_the_pipeline_runs_on_the_vllm_engine(prefect_api, tmp_path):
    overrides = [*small_overrides(), "rollout.engine=vllm",
                 # vLLM's CPU attention needs heads of >= 32 dimensions (hidden 32, one head).
                 "model.tiny.num_heads=1", "model.tiny.num_kv_heads=1"]
    state = pipeline(config_path=str(PROJECT_ROOT / "params.yaml"), overrides=overrides, root=str(tmp_path),
                     return_state=True)
    assert state.is_completed(), state.message
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["generated_tokens"] > 0 for m in metrics)
    for run in ("eval-init", "eval"):
        samples = pq.read_table(tmp_path / "runs" / run / "samples.parquet").to_pylist()
        assert samples and {s["finish_reason"] for s in samples} <= {"stop", "length", "oov"}
        assert all(0 < s["response_tokens"] <= 16 for s in samples)  # eval.max_new_tokens in small_overrides
    assert json.loads((tmp_path / "runs" / "eval" / "metrics.json").read_text())["average"]
