from __future__ import annotations

import pytest

from attnrl.config import resolve_config
from attnrl.errors import ConfigError
from attnrl.model.loading import PolicyBundle
from attnrl.rollout import RolloutEngine
from attnrl.rollout.factory import build_engine


def test_hf_engine_is_built_from_the_config(tiny_policy, tmp_path):
    model, tokenizer = tiny_policy
    config = resolve_config(preset="tiny", overrides=["rollout.batch_size=7"]).rollout
    engine = build_engine(PolicyBundle(model, tokenizer, tmp_path), config)
    assert isinstance(engine, RolloutEngine) and engine.batch_size == 7


def test_vllm_without_its_adapter_is_a_clear_config_error(tiny_policy, tmp_path):
    model, tokenizer = tiny_policy
    config = resolve_config(preset="tiny", overrides=["rollout.engine=vllm"]).rollout
    with pytest.raises(ConfigError, match="rollout.engine: 'vllm' needs the GPU extra"):
        build_engine(PolicyBundle(model, tokenizer, tmp_path), config)
