"""Bad setups of the vLLM engine fail with a message that says what to do: before any model loads
when the worker environment is missing or wrong, and at engine start when the engine cannot run."""

from __future__ import annotations

import sys

import pytest

from attnrl.config import resolve_config
from attnrl.errors import ConfigError
from attnrl.model.loading import save_policy
from attnrl.rollout.factory import build_engine, preflight
from attnrl.stages.train import train
from infra.ray_engine import RolloutPoolError
from tests.conftest import small_tiny_model

pytestmark = pytest.mark.integration


def _config(*overrides):
    return resolve_config(preset="tiny", overrides=["rollout.engine=vllm", *overrides])


def test_a_missing_worker_environment_names_the_command_that_creates_it(tmp_path):
    config = _config(f"rollout.vllm.python={tmp_path / 'nowhere' / 'python'}")
    with pytest.raises(ConfigError, match="the vLLM worker environment is missing. Create it with `make vllm-env`"):
        preflight(config, model_dir=None, max_new_tokens=8)


def test_an_environment_without_vllm_is_refused_before_any_model_loads(tmp_path):
    # The driver's own interpreter has Ray and attnrl but no vLLM. The train stage must stop at
    # its preflight: the (absent) initial model is never looked at.
    config = _config(f"rollout.vllm.python={sys.executable}", f"paths.models_dir={tmp_path / 'no-models'}")
    with pytest.raises(ConfigError, match=r"rollout.vllm.python: .*: vLLM is not installed there.*`make vllm-env`"):
        train(config, tmp_path)


def test_the_single_process_trainer_refuses_native_weight_transfer():
    # The trainer side of vLLM's transfer imports vLLM: only the ranks in the worker environment can send.
    with pytest.raises(ConfigError, match=r"weight_sync \('nccl'\) is sent by the trainer ranks: it needs "
                                          "distributed.enabled"):
        _config("rollout.vllm.weight_sync=nccl")


def test_an_engine_that_cannot_start_says_why(local_ray, tmp_path):
    # Head size 8 (hidden 32, 4 heads): vLLM's CPU attention has no kernel for it.
    model, tokenizer = small_tiny_model()
    model_dir = save_policy(model, tokenizer, tmp_path / "policy")
    with pytest.raises(RolloutPoolError, match="vllm rollout engine could not start.*head size 8 is not supported"):
        build_engine(_config(), model_dir=model_dir, tokenizer=tokenizer, max_new_tokens=8)
