"""From the run configuration to a pool of rollout actors, and the worker-environment check.

The pure core (``attnrl.rollout.factory``) reaches these by import path. ``check_worker_environment``
runs before any model loads: the vLLM actors' interpreter exists, has vLLM, and has the driver's Ray
version (Ray refuses workers of another version, after a long wait).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import ray
import torch
from transformers import PreTrainedTokenizerBase

from attnrl.config.schema import RunConfig
from attnrl.errors import ConfigError
from attnrl.rollout.factory import engine_max_model_len
from attnrl.rollout.scoring import ScoringSpec
from infra.ray_engine import EngineSpec, RayRolloutPool
from infra.vllm_engine import VLLMSettings

MAKE_TARGET = "make vllm-env"
_PROBE = (
    "import importlib.metadata as m, importlib.util as u, json, sys\n"
    "def version(name):\n"
    "    try:\n"
    "        return m.version(name)\n"
    "    except m.PackageNotFoundError:\n"
    "        return None\n"
    "print(json.dumps({'vllm': u.find_spec('vllm') is not None, 'attnrl': u.find_spec('infra.vllm_engine') is not None,"
    " 'ray': version('ray'), 'python': '%d.%d' % sys.version_info[:2]}))\n"
)


def worker_python(config: RunConfig) -> Path:
    return Path(config.rollout.vllm.python).expanduser().absolute()


def _actor_threads(config: RunConfig) -> int:
    """An actor's torch/OpenMP threads: the CPUs Ray reserves for it."""
    return max(1, int(config.rollout.ray.num_cpus_per_actor))


@functools.lru_cache(maxsize=None)
def _probe(python: str) -> dict[str, Any]:
    """What the interpreter has, asked once per process (every stage's preflight and engine build ask)."""
    probe = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(probe.stdout)


def check_worker_environment(config: RunConfig) -> None:
    """Fail with the command that fixes it when the vLLM actors could not start."""
    python = worker_python(config)
    where = f"rollout.vllm.python: {python}"
    if not python.is_file():
        raise ConfigError(
            f"{where} does not exist: the vLLM worker environment is missing. Create it with `{MAKE_TARGET}` "
            "(vLLM's CPU build), or on a GPU host as README.md 'Training on a GPU node' shows"
        )
    try:
        found = _probe(str(python))
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where} cannot run: {exc}") from exc
    problems = []
    if not found["vllm"]:
        problems.append("vLLM is not installed there")
    if not found["attnrl"]:
        problems.append("attnrl is not installed there (pip install --no-deps -e .)")
    if found["ray"] != ray.__version__:
        problems.append(f"its Ray is {found['ray']}, the driver's {ray.__version__} (they must be equal)")
    driver = "%d.%d" % sys.version_info[:2]
    if found["python"] != driver:
        problems.append(f"its Python is {found['python']}, the driver's {driver} (Ray needs them equal)")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems) + f". Recreate it with `{MAKE_TARGET}`")


def vllm_spec(config: RunConfig, *, model_dir: Path, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> EngineSpec:
    vllm = config.rollout.vllm
    llm = {
        "model": str(model_dir.absolute()),
        "dtype": config.model.dtype,
        "seed": config.seed,
        "max_model_len": engine_max_model_len(config, max_new_tokens),
        "tensor_parallel_size": vllm.tensor_parallel_size,
        "gpu_memory_utilization": vllm.gpu_memory_utilization,
        "kv_cache_memory_bytes": None if vllm.kv_cache_gib is None else int(vllm.kv_cache_gib * 2**30),
        "max_num_seqs": vllm.max_num_seqs,
        "max_num_batched_tokens": vllm.max_num_batched_tokens,
        "enable_chunked_prefill": vllm.enable_chunked_prefill,
        "enforce_eager": vllm.enforce_eager,
        "enable_prefix_caching": vllm.enable_prefix_caching,
    }
    if vllm.block_size is not None:
        llm["block_size"] = vllm.block_size
    # Colocated with trainer ranks on GPUs, the engines sleep while the trainer works (vLLM's sleep mode
    # is CUDA-only: CPU engines keep their memory).
    sleep_mode = (config.distributed.enabled and config.distributed.placement == "colocated"
                  and config.rollout.ray.num_gpus_per_actor > 0)
    settings = VLLMSettings(llm=llm, eos_token_id=tokenizer.eos_token_id, vocab_size=len(tokenizer),
                            seeded_requests=vllm.seeded_requests, weight_transfer=vllm.weight_sync,
                            sleep_mode=sleep_mode)
    env_vars = {
        # The engine core in the actor's own process (state dicts reach the worker by reference).
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        # CPU: no core pinning (the trainer shares the cores) and the actor's thread budget.
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(_actor_threads(config)),
        "VLLM_LOGGING_LEVEL": "ERROR",  # its warnings are about CPU tuning and a chat-template warm-up we skip
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return EngineSpec("vllm", asdict(settings), dtype=config.model.dtype, python=str(worker_python(config)),
                      env_vars=env_vars)


def hf_spec(config: RunConfig, *, model_dir: Path) -> EngineSpec:
    """hf engine actors generate on the GPU Ray gives each (its device 0) when ``rollout.ray.num_gpus_per_actor``
    asks for one, else on CPU."""
    device = "cuda" if config.rollout.ray.num_gpus_per_actor > 0 else "cpu"
    options = {"model_path": str(model_dir.absolute()), "dtype": config.model.dtype, "device": device,
               "batch_size": config.rollout.batch_size, "threads": _actor_threads(config)}
    return EngineSpec("hf", options, dtype=config.model.dtype)


def build_pool(
    config: RunConfig,
    *,
    model_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    state_dict: Mapping[str, torch.Tensor] | None,
    placement: Callable[[int], dict[str, Any]] | None = None,
    scoring: ScoringSpec | None = None,
) -> RayRolloutPool:
    """The pool for ``rollout.engine`` (vllm) or the hf actors of ``rollout.ray.enabled``; ``placement``
    gives engine i its bundle (the distributed runtime), ``scoring`` lets the engines score (overlap)."""
    if config.rollout.engine == "vllm":
        spec = vllm_spec(config, model_dir=model_dir, tokenizer=tokenizer, max_new_tokens=max_new_tokens)
    else:
        spec = hf_spec(config, model_dir=model_dir)
    spec = replace(spec, scoring=scoring)
    ray_config = config.rollout.ray
    options: dict[str, Any] = {
        "num_actors": ray_config.num_actors,
        "num_cpus_per_actor": ray_config.num_cpus_per_actor,
        "num_gpus_per_actor": ray_config.num_gpus_per_actor,
        "max_actor_restarts": ray_config.max_actor_restarts,
        "call_timeout_s": ray_config.call_timeout_s,
        "address": ray_config.address,
        "object_store_mb": ray_config.object_store_mb,
        "initial_state_dict": state_dict,
        "placement": placement,
    }
    return RayRolloutPool(spec, **options)
