"""Building the configured engine, and the checks that fail a run before any model loads."""

from __future__ import annotations

import pytest

from attnrl.config import resolve_config
from attnrl.errors import ConfigError
from attnrl.model.loading import save_policy
from attnrl.rollout import RolloutEngine
from attnrl.rollout.factory import build_engine, engine_batch_rows, engine_max_model_len, preflight, uses_pool


def test_hf_engine_is_built_from_the_config(tiny_policy, tmp_path):
    model, tokenizer = tiny_policy
    config = resolve_config(preset="tiny", overrides=["rollout.batch_size=7"])
    engine = build_engine(config, model_dir=tmp_path, tokenizer=tokenizer, max_new_tokens=8, model=model)
    assert isinstance(engine, RolloutEngine) and engine.batch_size == 7 and engine.vocab_size == len(tokenizer)
    assert not uses_pool(config) and uses_pool(resolve_config(preset="tiny", overrides=["rollout.engine=vllm"]))


@pytest.mark.parametrize(("overrides", "rows"), [
    (["rollout.batch_size=24"], 24),  # one in-process hf engine
    (["rollout.batch_size=24", "rollout.ray.enabled=true", "rollout.ray.num_actors=3"], 72),  # a pool of hf actors
    (["rollout.engine=vllm", "rollout.vllm.max_num_seqs=100", "rollout.ray.num_actors=2"], 200),
])
def test_engine_batch_rows_is_what_the_engines_run_at_once(overrides, rows):
    assert engine_batch_rows(resolve_config(preset="tiny", overrides=overrides)) == rows


def test_the_in_process_engine_needs_a_model(tiny_policy, tmp_path):
    with pytest.raises(ValueError, match="pass model="):
        build_engine(resolve_config(preset="tiny"), model_dir=tmp_path, tokenizer=tiny_policy[1], max_new_tokens=8)


def test_max_model_len_defaults_to_prompt_plus_the_stages_response_limit():
    config = resolve_config(preset="tiny")
    assert engine_max_model_len(config, 64) == config.data.max_prompt_tokens + 64
    assert engine_max_model_len(resolve_config(preset="tiny", overrides=["rollout.vllm.max_model_len=300"]), 64) == 300


@pytest.mark.parametrize("overrides,message", [
    (["rollout.vllm.max_model_len=100"], r"100 is below data.max_prompt_tokens \+ rollout.sampling.max_new_tokens "
                                         r"\(64 \+ 64 = 128\)"),
    (["rollout.vllm.max_model_len=128", "eval.max_new_tokens=65"], r"128 is below data.max_prompt_tokens \+ "
                                                                   r"eval.max_new_tokens \(64 \+ 65 = 129\)"),
])
def test_a_max_model_len_below_a_stages_limit_fails_when_the_config_resolves(overrides, message):
    with pytest.raises(ConfigError, match=r"rollout.vllm.max_model_len: " + message):
        resolve_config(preset="tiny", overrides=["rollout.engine=vllm", *overrides])
    resolve_config(preset="tiny", overrides=["rollout.engine=hf", *overrides])  # another engine's setting: unread


def test_engines_longer_than_the_model_supports_fail_before_it_loads(tiny_policy, tmp_path):
    model, tokenizer = tiny_policy  # 256 positions
    save_policy(model, tokenizer, tmp_path / "m")
    config = resolve_config(preset="tiny", overrides=["rollout.engine=vllm", "data.max_prompt_tokens=200"])
    with pytest.raises(ConfigError, match="supports 256 positions"):
        preflight(config, model_dir=tmp_path / "m", max_new_tokens=100)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.device=cuda"], "model.device: 'cuda' needs a CUDA GPU"),
        (["rollout.engine=vllm", "rollout.ray.num_gpus_per_actor=1"], "rollout.ray.num_gpus_per_actor: 1.0 asks for GPUs"),
        (["rollout.engine=vllm", "rollout.ray.num_gpus_per_actor=2", "rollout.vllm.tensor_parallel_size=2"],
         "rollout.ray.num_gpus_per_actor: 2.0 asks for GPUs"),
    ],
)
def test_gpu_only_settings_fail_on_a_cpu_machine_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        preflight(resolve_config(preset="tiny", overrides=overrides), model_dir=None, max_new_tokens=8)


def test_the_paper_preset_resolves_to_a_gpu_layout_and_says_why_it_cannot_run_here():
    config = resolve_config(preset="r1-distill-1.5b")
    assert config.rollout.engine == "vllm" and config.rollout.ray.num_gpus_per_actor == 1
    assert engine_max_model_len(config, config.rollout.sampling.max_new_tokens) == 1024 + 8192
    with pytest.raises(ConfigError, match="rollout.ray.num_gpus_per_actor: 1.0 asks for GPUs"):
        preflight(config, model_dir=None, max_new_tokens=config.rollout.sampling.max_new_tokens)
