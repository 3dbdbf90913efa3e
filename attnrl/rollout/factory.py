"""Building the configured rollout engine behind a registry (architecture.md: registries)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from attnrl.config.schema import RolloutConfig
from attnrl.errors import ConfigError
from attnrl.model.loading import PolicyBundle
from attnrl.rollout.engine import RolloutEngine
from attnrl.rollout.hf_engine import HFRolloutEngine
from attnrl.utils.registry import load_object, lookup


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


# Distributed engines, by import path so the pure core never imports Ray: ``from_policy(policy,
# config)`` builds one whose workers load ``policy.path`` and then get ``policy.model``'s weights.
RAY_ENGINE = "infra.ray_engine:RayRolloutPool"


def build_engine(policy: PolicyBundle, config: RolloutConfig) -> RolloutEngine:
    """The configured engine: a Ray actor pool when ``rollout.ray.enabled``, else ``ENGINES[rollout.engine]``."""
    if config.ray.enabled:
        if config.engine != "hf":
            raise ConfigError("rollout.ray.enabled needs rollout.engine: 'hf' (each Ray actor runs the hf engine)")
        return load_object(RAY_ENGINE, "rollout.ray").from_policy(policy, config)
    return lookup(ENGINES, config.engine, "rollout.engine", ConfigError)(policy, config)


@contextmanager
def engine_session(engine: RolloutEngine) -> Iterator[RolloutEngine]:
    """Yield ``engine``; on exit call its ``close()`` if it has one (a Ray pool kills its actors)."""
    try:
        yield engine
    finally:
        close = getattr(engine, "close", None)
        if callable(close):
            close()
