"""Building the configured rollout engine, and checking it can start before any model loads.

* ``hf`` in-process: ``HFRolloutEngine`` over a model the caller loaded;
* ``hf`` with ``rollout.ray.enabled``, or ``vllm`` (always): a pool of Ray actors, the extension
  ``ray_pool`` (``attnrl.utils.registry.extension``), so the pure core never imports Ray or vLLM.

``preflight`` runs the checks that need no model (devices, the worker environment, lengths); every
stage that generates calls it first, so a run that can only fail for lack of a GPU or of the vLLM
environment fails in seconds, with a message that says what to do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attnrl.config.schema import RunConfig
from attnrl.errors import ConfigError
from attnrl.rollout.engine import RolloutEngine
from attnrl.model.loading import resolve_device
from attnrl.rollout.hf_engine import HFRolloutEngine
from attnrl.utils.registry import extension

# Extensions: ``ray_pool(config, model_dir=..., tokenizer=..., max_new_tokens=..., state_dict=...)`` and
# ``worker_environment_check(config)`` (vLLM engines only).


def uses_pool(config: RunConfig) -> bool:
    """True when generation runs on Ray actors (which load the model themselves)."""
    return config.rollout.engine == "vllm" or config.rollout.ray.enabled


def engine_batch_rows(config: RunConfig) -> int:
    """Sequences the configured engines generate at once: one engine's batch (vLLM's ``max_num_seqs``, the hf
    engine's ``batch_size``) times the engines of a pool. A call of more rows queues; of fewer, leaves engines idle."""
    rollout = config.rollout
    per_engine = rollout.vllm.max_num_seqs if rollout.engine == "vllm" else rollout.batch_size
    return per_engine * (rollout.ray.num_actors if uses_pool(config) else 1)


def engine_max_model_len(config: RunConfig, max_new_tokens: int) -> int:
    """The longest sequence a vLLM engine must accept: ``rollout.vllm.max_model_len``, else the prompt limit + the
    stage's response limit (the schema refuses a configured length below every stage's)."""
    configured = config.rollout.vllm.max_model_len
    return configured if configured is not None else config.data.max_prompt_tokens + max_new_tokens


def preflight(config: RunConfig, *, model_dir: str | Path | None, max_new_tokens: int) -> None:
    """Everything that can be checked before a model loads; raises ``ConfigError`` naming the field."""
    _check_device("model.device", config.model.device)
    if not uses_pool(config) and not config.distributed.enabled:
        return
    ray_config = config.rollout.ray
    if ray_config.num_gpus_per_actor > 0 and not torch.cuda.is_available() and ray_config.address is None:
        raise ConfigError(
            f"rollout.ray.num_gpus_per_actor: {ray_config.num_gpus_per_actor} asks for GPUs, and this machine has "
            "no CUDA device (set it to 0 to run the engines on CPU, or connect to a cluster with rollout.ray.address)"
        )
    if not config.distributed.enabled:  # else a placement group gives trainer ranks and engines their GPUs
        _check_local_gpu_layout(config)
    if config.rollout.engine != "vllm":
        return
    vllm = config.rollout.vllm
    if vllm.weight_sync != "object_store" and not torch.cuda.is_available():
        raise ConfigError(
            f"rollout.vllm.weight_sync: '{vllm.weight_sync}' is vLLM's CUDA transport and this machine has no CUDA "
            "device; use 'object_store'"
        )
    length = engine_max_model_len(config, max_new_tokens)
    if model_dir is not None:
        _check_model_positions(Path(model_dir), length)
    extension("worker_environment_check", "rollout.engine 'vllm'")(config)


def _check_local_gpu_layout(config: RunConfig) -> None:
    """A local Ray hands its engines GPUs 0..k-1; a trainer on one of them would be squeezed out."""
    ray_config = config.rollout.ray
    engine_gpus = ray_config.num_actors * ray_config.num_gpus_per_actor
    device = resolve_device(config.model.device)
    if ray_config.address is not None or engine_gpus == 0 or device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    available = torch.cuda.device_count()
    if index < engine_gpus or engine_gpus + 1 > available:
        raise ConfigError(
            f"model.device: {config.model.device} — a local Ray gives the {ray_config.num_actors} rollout engines "
            f"GPUs 0-{int(engine_gpus) - 1}, so the trainer needs another one: cuda:{int(engine_gpus)} "
            f"(this machine has {available} GPUs; lower rollout.ray.num_actors if that one is missing)"
        )


def _check_device(field: str, device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{field}: '{device}' needs a CUDA GPU and this machine has none (use 'cpu')")


def _check_model_positions(model_dir: Path, length: int) -> None:
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        return  # the loader names a missing model directory itself
    positions = json.loads(config_file.read_text()).get("max_position_embeddings")
    if isinstance(positions, int) and length > positions:
        raise ConfigError(
            f"rollout.vllm.max_model_len: engines need {length} tokens (prompt + response limit) but {model_dir} "
            f"supports {positions} positions (max_position_embeddings); lower the limits"
        )


def build_engine(
    config: RunConfig,
    *,
    model_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    model: PreTrainedModel | None = None,
) -> RolloutEngine:
    """The configured engine for a stage whose responses are at most ``max_new_tokens`` long.

    In-process ``hf`` generates with ``model`` (required). Pools load ``model_dir`` in every actor
    and, when ``model`` is given, then receive its weights, so a pool built for training starts
    from the trainer's weights, not the directory's.
    """
    preflight(config, model_dir=model_dir, max_new_tokens=max_new_tokens)
    if uses_pool(config):
        state: Mapping[str, torch.Tensor] | None = model.state_dict() if model is not None else None
        return extension("ray_pool", "rollout.ray.enabled")(config, model_dir=Path(model_dir), tokenizer=tokenizer,
                                                            max_new_tokens=max_new_tokens, state_dict=state)
    if model is None:
        raise ValueError("the in-process hf engine generates with a model the caller loaded; pass model=")
    return HFRolloutEngine(
        model,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        vocab_size=len(tokenizer),
        batch_size=config.rollout.batch_size,
        progress=config.rollout.progress,
    )


@contextmanager
def engine_session(engine: RolloutEngine) -> Iterator[RolloutEngine]:
    """Yield ``engine``; on exit call its ``close()`` if it has one (a Ray pool kills its actors)."""
    try:
        yield engine
    finally:
        close = getattr(engine, "close", None)
        if callable(close):
            close()
