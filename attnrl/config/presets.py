"""Presets: small deltas over the schema defaults (which are the paper's 1.5B setting, spec §12).

``tiny`` is the embedded default (CPU, minutes). ``r1-distill-1.5b`` is the paper's setting for a
GPU cluster; it only names the data and model paths the schema cannot default.
"""

from __future__ import annotations

from typing import Any

_SIX_BENCHMARKS = [
    # Spec §14: K = 32 for AIME24/25 and AMC23, K = 4 for the rest.
    {"kind": "verl_parquet", "path": "data/eval/aime24_1.parquet", "name": "aime24", "k": 32},
    {"kind": "verl_parquet", "path": "data/eval/aime25_1.parquet", "name": "aime25", "k": 32},
    {"kind": "verl_parquet", "path": "data/eval/amc23_1.parquet", "name": "amc23", "k": 32},
    {"kind": "verl_parquet", "path": "data/eval/math500_1.parquet", "name": "math500", "k": 4},
    {"kind": "verl_parquet", "path": "data/eval/minerva_1.parquet", "name": "minerva", "k": 4},
    {"kind": "verl_parquet", "path": "data/eval/olympiad_1.parquet", "name": "olympiad", "k": 4},
]

TINY: dict[str, Any] = {
    "data": {
        "train": [{"kind": "synthetic", "name": "synthetic"}],
        "eval": [{"kind": "synthetic", "name": "synthetic", "k": 4}],
        # Addition only: a 1 M-parameter model learns its table within the warmup budget
        # (with '+-' it needs about twice the steps).
        "synthetic": {"operators": "+"},
        "max_prompt_tokens": 64,
    },
    "model": {"path": None, "dtype": "float32", "device": "cpu"},
    # 800 steps get past the point (~500) where the model learns the addition table; the
    # fallible teacher (25 % wrong steps) leaves the policy right on ~40 % of held-out problems at
    # temperature 1, from ~75 % on one operation to ~25 % on five: room for RL.
    "warmup": {"enabled": True, "steps": 800, "teacher_error_rate": 0.25, "log_every": 50},
    "rollout": {
        "engine": "hf",
        "sampling": {"n": 6, "max_new_tokens": 64},
        "batch_size": 256,
        # Short, even responses: four parts cost the hf engine little, and the trainer works on each
        # part (trees, reference pass, full mini-batches) while the next one generates (benchmarks/pipeline.py).
        "continuation_parts": 4,
        # The demo prints one line per training step instead of a bar per generation call.
        "progress": False,
        # On 2 CPU cores: one engine actor beside the trainer, no GPUs, a small object store.
        "ray": {"num_actors": 1, "num_gpus_per_actor": 0, "object_store_mb": 256},
        # vLLM's CPU build (rollout.engine=vllm): a small KV cache in blocks small enough for the
        # task's prefixes to be cached, and seeded requests, so a run and its resume sample the same
        # tokens (which on CPU rules out chunked prefill).
        "vllm": {"kv_cache_gib": 0.25, "max_num_seqs": 256, "max_num_batched_tokens": None, "block_size": 32,
                 "seeded_requests": True, "enable_chunked_prefill": False},
    },
    # Evaluate the sampling policy RL trains (temperature 1): at 0.6 sharpening alone hides most
    # of the teacher's errors.
    "eval": {"max_new_tokens": 64, "temperature": 1.0},
    "algorithm": {
        # Responses are tens of tokens, not thousands: scale the code's 512-token rules (§6.2)
        # and Δ (§5.2) to the task so branching has candidates to choose from.
        "fci_delta": 2,
        "min_branch_position": 8,
        "min_branch_spacing": 4,
        "prompt_batch_size": 16,
    },
    # Measured on 2 CPU cores: 15 steps (~90 s, ~230 k generated tokens) take held-out accuracy
    # from ~50 % to ~85 % (benchmarks/learning.py reports the averages over seeds).
    "train": {
        "steps": 15, "lr": 1e-4, "mini_batch_sequences": 64, "save_every": 5,
        # Sequences are at most 64 + 64 tokens: a whole 64-sequence mini-batch in one forward.
        "max_tokens_per_micro_batch": 8192,
        # A ~1 M-parameter model on one CPU process: nothing to shard or offload, and recomputing
        # activations would only cost time.
        "zero_stage": 0, "reference_offload": False, "gradient_checkpointing": False,
    },
    # distributed.enabled=true on this machine: two gloo ranks on CPU beside the one engine actor.
    # The rollout side scores the next batch during the update (hf engines hold a transformers copy).
    "distributed": {"trainer_ranks": 2, "placement": "split", "overlap": True, "num_cpus_per_rank": 1,
                    "num_gpus_per_rank": 0},
}

# The worker environment of README "Training on a GPU node": vLLM, DeepSpeed, torch and the driver's Ray.
_WORKER_PYTHON = ".venv-worker/bin/python"

R1_DISTILL_1_5B: dict[str, Any] = {
    "data": {
        "train": [{"kind": "verl_parquet", "path": "data/train/deepscaler_train.parquet", "name": "deepscaler"}],
        "eval": _SIX_BENCHMARKS,
    },
    "model": {"path": "models/DeepSeek-R1-Distill-Qwen-1.5B"},
    # One 8-GPU node, colocated as verl's and OpenRLHF's hybrid engines are (docs/scaling.md, "The paper's
    # node"): on every GPU one DeepSpeed rank (ZeRO-3, bf16) and one vLLM engine (TP 1), the engine asleep
    # while the ranks score, take the reference pass and update; the weights go rank to engine by CUDA IPC.
    "distributed": {"enabled": True, "trainer_ranks": 8, "placement": "colocated", "overlap": False,
                    "num_gpus_per_rank": 1, "num_cpus_per_rank": 8, "python": _WORKER_PYTHON},
    "rollout": {
        "ray": {"num_actors": 8, "num_gpus_per_actor": 1, "num_cpus_per_actor": 4},
        # 0.6 of 79.2 GiB, with the rank's resident ZeRO-3 state (~5 GiB) beside it: a 40 GiB KV cache, 1.5 M
        # tokens, room for every sequence of a step at once (docs/scaling.md, "Memory per GPU").
        "vllm": {"python": _WORKER_PYTHON, "gpu_memory_utilization": 0.6, "weight_sync": "ipc"},
    },
    # ZeRO-3 over 8 ranks leaves the frozen reference 0.44 GB per GPU: kept on the device, no host streaming.
    "train": {"zero_stage": 3, "reference_offload": False},
    # ~1,000 Math-Verify gradings per step (spec §8), on the CPUs the 16 actors leave free.
    "reward": {"workers": 16},
}

PRESETS: dict[str, dict[str, Any]] = {"tiny": TINY, "r1-distill-1.5b": R1_DISTILL_1_5B}


# Methods (spec §13): deltas over the algorithm section, applied after a
# preset, so `--method treerl` compares methods at otherwise identical settings.
METHODS: dict[str, dict[str, Any]] = {
    # FCI branching + ADS + one-step off-policy pipeline (spec §1, §12).
    "attnrl": {
        "algorithm": {
            "method": "attnrl", "advantage": "tree", "branching": "fci", "expansion": "adaptive",
            "easy_filter": "all_correct", "zero_advantage_filter": True, "adaptive_batch": True, "off_policy": True,
        }
    },
    # TreeRL as reproduced in the AttnRL codebase (spec §13.2): entropy branching, every response
    # expanded, two-step on-policy. Dynamic batching off: the on-policy trainer cannot use it
    # (AMBIG-13). The zero-advantage filter stays on (AMBIG-7: unstated).
    "treerl": {
        "algorithm": {
            "method": "treerl", "advantage": "tree", "branching": "entropy", "expansion": "uniform",
            "easy_filter": "off", "zero_advantage_filter": True, "adaptive_batch": False, "off_policy": False,
        }
    },
    # GRPO (spec §13.1): group-normalised outcome advantages, no branching, no filtering.
    "grpo": {
        "algorithm": {
            "method": "grpo", "advantage": "grpo", "branching": "none", "expansion": "uniform",
            "easy_filter": "off", "zero_advantage_filter": False, "adaptive_batch": False, "off_policy": False,
        }
    },
}
