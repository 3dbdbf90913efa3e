"""The ``rollout`` section of the run configuration: sampling, the engines and where they run.

Part of the one schema (``attnrl.config.schema.RunConfig.rollout``); defaults are the paper's 1.5B
setting (spec §5.4, §12), the ``tiny`` preset a small delta.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from attnrl.config.section import Section


class SamplingConfig(Section):
    """Sampling parameters for one generation call."""

    n: int = Field(default=6, ge=1, description="Samples per prompt (G, spec §12).")
    temperature: float = Field(default=1.0, gt=0, description="Spec §12: 1.0 for training rollouts.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass (spec §12: 1.0).")
    max_new_tokens: int = Field(default=8192, ge=1, description="Response length limit (spec §12: 8192).")


class RayConfig(Section):
    """Rollout engines as Ray actors (``infra/ray_engine.py``), each holding its own copy of the policy.

    The 'hf' engine runs in-process unless ``enabled``; the 'vllm' engine always runs as Ray actors
    (in the worker environment, see ``rollout.vllm.python``). A call's requests are split by tokens
    with each question's requests on one engine (spec §5.4). 'hf' actors seed their share from the
    call seed and their index, so results depend on ``num_actors``; 'vllm' seeds every request from
    its position in the call, so they do not.
    """

    enabled: bool = Field(
        default=False,
        description="hf engine: generate through a pool of Ray actors instead of in-process. The vllm engine "
        "always uses the pool and ignores this switch.",
    )
    address: str | None = Field(
        default=None,
        description="Ray cluster address for ray.init (e.g. 'ray://head:10001' or 'auto'); None = RAY_ADDRESS if set, "
        "else a local Ray started by the pool.",
    )
    num_actors: int = Field(
        default=8, ge=1, description="Rollout engines, one Ray actor each (spec §12: 8, one per GPU)."
    )
    num_cpus_per_actor: float = Field(
        default=1.0, gt=0, description="CPUs Ray reserves per actor (may be fractional); also its torch threads."
    )
    num_gpus_per_actor: float = Field(
        default=1.0, ge=0,
        description="GPUs Ray reserves per actor: rollout.vllm.tensor_parallel_size on GPU hosts, 0 on CPU.",
    )
    object_store_mb: int = Field(
        default=8192,
        ge=64,
        description="Object store size (MiB) of a local Ray started by the pool; ignored with an address. It carries "
        "each weight push (a 1.5B policy in bf16 is ~3 GiB).",
    )
    max_actor_restarts: int = Field(
        default=3,
        ge=0,
        description="Dead actors replaced (their requests retried) per call before the call fails.",
    )
    call_timeout_s: float | None = Field(
        default=3600.0,
        gt=0,
        description="The longest an actor may take to answer one call (a generation share, a weight load); past "
        "it the actor counts as hung: it is replaced like a dead one and its share resent. null: no bound.",
    )


class VLLMConfig(Section):
    """The 'vllm' engine (``infra/vllm_engine.py``): one ``vllm.LLM`` per Ray actor, in the worker environment.

    vLLM cannot share an environment with Prefect (their fastapi pins conflict; stack-notes.md), so
    its actors run under another interpreter: vLLM's CPU build in ``.venv-vllm`` (``make vllm-env``)
    here, the GPU worker lock on GPU hosts (README, "Training on a GPU node").
    """

    python: str = Field(
        default=".venv-vllm/bin/python",
        description="Interpreter of the worker environment (vLLM, the same Ray version); relative to the working "
        "directory. `make vllm-env` creates the default one.",
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per engine (spec §12: TP 1).")
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        description="Longest prompt + response an engine accepts; null = data.max_prompt_tokens + the stage's "
        "response limit (training 1,024 + 8,192 = 9,216 as the script sets, spec §5.4). A value below a prompt plus "
        "the longest response limit (rollout.sampling.max_new_tokens, eval.max_new_tokens) is an error.",
    )
    gpu_memory_utilization: float = Field(
        default=0.85, gt=0, le=1, description="Share of each GPU vLLM may take (spec §5.4: 0.85)."
    )
    kv_cache_gib: float | None = Field(
        default=None, gt=0, description="KV-cache size per engine in GiB; null = vLLM sizes it from "
        "gpu_memory_utilization (on CPU from the memory it finds: set it there)."
    )
    max_num_seqs: int = Field(default=4096, ge=1, description="Sequences one engine runs at once (spec §5.4: 4096).")
    max_num_batched_tokens: int | None = Field(
        default=36864, ge=1, description="Tokens per scheduler step with chunked prefill (spec §5.4: 36,864)."
    )
    enable_chunked_prefill: bool = Field(
        default=True,
        description="Split long prefills across scheduler steps (spec §5.4: on). vLLM's CPU build cannot rewind a "
        "seeded request's generator when a prefill is split, so on CPU seeded_requests needs it off.",
    )
    enforce_eager: bool = Field(default=True, description="No CUDA graphs (spec §5.4: the script enforces eager).")
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse the KV blocks of shared prefixes: continuations share prompt and prefix (§5.4)."
    )
    block_size: int | None = Field(
        default=None, ge=1, description="Tokens per KV block, the unit the prefix cache shares; null = vLLM's default "
        "(16 on GPU, 128 on CPU, where it must be a multiple of 32). Prefixes shorter than a block are not cached."
    )
    seeded_requests: bool = Field(
        default=False,
        description="Seed every request (same call and seed => same samples, on CPU bit for bit). On GPU it costs "
        "throughput: per-request generators bypass the fused sampler, and vLLM on GPU is not batch-invariant anyway.",
    )
    weight_sync: Literal["object_store", "nccl", "ipc"] = Field(
        default="object_store",
        description="How new weights reach the engines after each update: 'object_store' (Ray's object store, then "
        "an in-place reload; any device), or vLLM's native transfer, 'nccl' (trainer and engines on different "
        "GPUs) or 'ipc' (colocated, CUDA IPC), which need CUDA and a trainer that runs in the worker environment.",
    )


class RolloutConfig(Section):
    """The rollout engine."""

    engine: Literal["hf", "vllm"] = Field(default="vllm", description="'hf' (transformers, CPU or GPU) or 'vllm'.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Training rollout sampling.")
    batch_size: int = Field(default=64, ge=1, description="hf engine: sequences per generate() call.")
    progress: bool = Field(default=True, description="Show a progress bar on long generation.")
    continuation_parts: int = Field(
        default=1,
        ge=1,
        description="One-step off-policy loop (spec §3.2): C's continuations go out in this many submissions of whole "
        "questions, so the trainer builds each part's trees (and, with distributed.overlap, trains on its full "
        "mini-batches) while the engines generate the rest. 1 = one submission: an engine that runs its calls in "
        "turn waits for each part's longest sequence, which with vLLM and long responses can cost more than it gains.",
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="Engines as Ray actors (always for 'vllm').")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="The 'vllm' engine.")
