"""Building the configured rollout engine behind a registry (architecture.md: registries)."""

from __future__ import annotations

from collections.abc import Callable

from attnrl.config.schema import RolloutConfig
from attnrl.errors import ConfigError
from attnrl.model.loading import PolicyBundle
from attnrl.rollout.engine import RolloutEngine
from attnrl.rollout.hf_engine import HFRolloutEngine
from attnrl.utils.registry import lookup


def _hf(policy: PolicyBundle, config: RolloutConfig) -> RolloutEngine:
    return HFRolloutEngine(
        policy.model,
        pad_token_id=policy.tokenizer.pad_token_id,
        eos_token_id=policy.tokenizer.eos_token_id,
        batch_size=config.batch_size,
        progress=config.progress,
    )


def _vllm(policy: PolicyBundle, config: RolloutConfig) -> RolloutEngine:
    raise ConfigError(
        "rollout.engine: 'vllm' needs the GPU extra (pip install 'attnrl[gpu]') and its adapter in infra/, "
        "which is not part of this release yet; use 'hf'"
    )


ENGINES: dict[str, Callable[[PolicyBundle, RolloutConfig], RolloutEngine]] = {"hf": _hf, "vllm": _vllm}


def build_engine(policy: PolicyBundle, config: RolloutConfig) -> RolloutEngine:
    return lookup(ENGINES, config.engine, "rollout.engine", ConfigError)(policy, config)
