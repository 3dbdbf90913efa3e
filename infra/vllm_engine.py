"""``VLLMRolloutEngine``: the ``RolloutEngine`` protocol on ``vllm.LLM``.

It runs where vLLM is installed: the worker environment (``.venv-vllm`` with vLLM's CPU build
here; vLLM's own CUDA stack on a GPU host), inside a Ray actor of ``infra.ray_engine`` that
was started with that environment's interpreter. This module imports vLLM only inside the
engine, so the driver environment (which cannot install vLLM next to Prefect) can import it.

Generation (spec §5.4): token ids in and out (``TokensPrompt``, no tokenizer, no detokenisation);
``n`` samples and a new-token limit per request; the sampled token's log-prob under the sampling
distribution (``logprobs_mode="processed_logprobs"``: after temperature, as the trainer computes
it); EOS stops a sample and is kept; prefix caching on, so continuations reuse their prompt and
prefix. Each request samples with its own seed derived from the call seed and its position, so
a fixed call gives the same completions however it is batched.

Weights, object-store route (any device): the state dict arrives through Ray's object store and
``VLLMWorkerExtension.attnrl_load_weights`` (vLLM's ``worker_extension_cls``, reached with
``collective_rpc``) reloads it in place with ``reload_weights``; the prefix cache is then reset,
since every cached block was computed with the old weights. The engine returns its weight
fingerprint, which the pool checks against the trainer's. vLLM's native NCCL / CUDA-IPC transfer
is in ``infra.vllm_weight_transfer``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attnrl.rollout.engine import Completion, GenerationRequest, SamplingParams, cut_at_vocabulary
from attnrl.rollout.fingerprint import Fingerprint, fingerprint
from attnrl.utils.seeding import derive_seed

EXTENSION = "infra.vllm_engine.VLLMWorkerExtension"
_SEED_RANGE = 2**62  # request seeds; vLLM gives sample i of a request seed + i


@dataclass(frozen=True)
class VLLMSettings:
    """What an engine needs, as plain values (it crosses into the worker environment).

    ``llm`` holds the ``vllm.LLM`` keyword arguments that come from the configuration (model,
    dtype, lengths, memory, caching); the engine adds the ones its protocol depends on.
    """

    llm: dict[str, Any]
    eos_token_id: int
    vocab_size: int  # the tokenizer's; ids at or above it truncate a response (spec §5.4)
    seeded_requests: bool = True
    weight_transfer: str = "object_store"  # or vLLM's native "nccl" / "ipc" (CUDA only)
    sleep_mode: bool = False  # colocated with a trainer rank on a GPU: sleep while it works (CUDA only)


class VLLMWorkerExtension:
    """Methods vLLM mixes into its worker class (``worker_extension_cls``); ``self`` is the worker."""

    def attnrl_load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Reload checkpoint-format (Hugging Face named) weights in place."""
        self.reload_weights(weights_iterator=list(state_dict.items()), is_checkpoint_format=True)
        self._attnrl_refresh_tied_head()

    def _attnrl_refresh_tied_head(self) -> None:
        # A tied LM head loads nothing itself, so the layerwise reload skips its post-processing,
        # and on CPU that processing is where the head packs its own copy of the embedding for
        # the GEMM kernel: without this the head keeps computing logits from the old weights.
        model = self.model_runner.model
        head = getattr(model, "lm_head", None)
        if head is None or not getattr(model.config, "tie_word_embeddings", False):
            return
        method = getattr(head, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(head)

    def attnrl_fingerprint(self) -> Fingerprint:
        return fingerprint(self.model_runner.model.named_parameters())

    def attnrl_packed_modules(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in getattr(self.model_runner.model, "packed_modules_mapping", {}).items()}


def _check_cpu_limits(settings: VLLMSettings) -> None:
    """Two limits of vLLM's CPU build that fail only later, deep in a kernel: refuse them at start.

    Its attention supports a few head sizes. And a seeded request whose prefill is split across
    scheduler steps makes it rewind the request's generator, which CPU generators cannot do
    ("CPU Generator does not use offset"); the engine is then left unusable.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    if settings.seeded_requests and settings.llm.get("enable_chunked_prefill", True):
        raise ValueError("rollout.vllm.seeded_requests needs rollout.vllm.enable_chunked_prefill: false on vLLM's CPU "
                         "build (it cannot rewind a seeded request's generator when a prefill is split)")
    from transformers import AutoConfig
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    model_path = settings.llm["model"]
    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_size not in supported:
        raise ValueError(f"{model_path}: attention head size {head_size} is not supported by vLLM's CPU build "
                         f"(supported: {supported}); use the hf engine or a model with another head size")


class VLLMRolloutEngine:
    """``RolloutEngine`` on one ``vllm.LLM`` (tensor parallel inside, when configured)."""

    def __init__(self, settings: VLLMSettings) -> None:
        # The engine core runs in this process: collective_rpc then passes the state dict by
        # reference instead of serialising it to a separate engine process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.settings = settings
        _check_cpu_limits(settings)
        kwargs = dict(settings.llm)
        if settings.weight_transfer in ("nccl", "ipc"):
            from vllm.config import WeightTransferConfig

            kwargs["weight_transfer_config"] = WeightTransferConfig(backend=settings.weight_transfer)
        if settings.sleep_mode:
            kwargs["enable_sleep_mode"] = True
        if kwargs.get("tensor_parallel_size", 1) > 1:
            kwargs["distributed_executor_backend"] = "ray"  # the workers join this actor's Ray cluster
        self.llm = LLM(
            skip_tokenizer_init=True,  # token ids in and out
            logprobs_mode="processed_logprobs",  # the sampled token's log-prob after temperature
            worker_extension_cls=EXTENSION,
            use_tqdm_on_load=False,
            **kwargs,
        )
        self.packed_modules: dict[str, list[str]] = self.llm.collective_rpc("attnrl_packed_modules")[0]

    # -- generation

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        seed: int,
        request_keys: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """``request_keys[i]`` (default ``i``) seeds request ``i``: a pool passes each request's
        position in the whole call, so splitting a call across engines changes no sample."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        if not requests:
            return []
        keys = list(range(len(requests))) if request_keys is None else list(request_keys)
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        sampling = [
            VLLMSamplingParams(
                n=r.n,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=0,
                max_tokens=r.max_new_tokens or params.max_new_tokens,
                seed=derive_seed(seed, "request", key) % _SEED_RANGE if self.settings.seeded_requests else None,
                logprobs=0,
                detokenize=False,
                stop_token_ids=[self.settings.eos_token_id],
            )
            for key, r in zip(keys, requests, strict=True)
        ]
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        return [[self._completion(sample) for sample in sorted(out.outputs, key=lambda c: c.index)]
                for out in outputs]

    def _completion(self, sample: Any) -> Completion:
        tokens = list(sample.token_ids)
        logprobs = [step[token].logprob for step, token in zip(sample.logprobs, tokens, strict=True)]
        reason = "stop" if sample.finish_reason == "stop" else "length"
        ids, values, cut = cut_at_vocabulary(tokens, logprobs, self.settings.vocab_size)
        return Completion(token_ids=ids, logprobs=values, finish_reason="oov" if cut else reason)

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token | earlier tokens) for every token but the first of each sequence (temperature 1)."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(s)) for s in sequences],
            VLLMSamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False),
            use_tqdm=False,
        )
        return [[step[token].logprob for step, token in zip(out.prompt_logprobs[1:], seq[1:], strict=True)]
                for out, seq in zip(outputs, sequences, strict=True)]

    # -- weights

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> Fingerprint:
        """Reload ``state_dict`` in place, drop the prefix cache, return the new fingerprint."""
        self.llm.collective_rpc("attnrl_load_weights", args=(dict(state_dict),))
        return self.after_weight_update()

    def after_weight_update(self) -> Fingerprint:
        """What follows every transport: cached blocks hold old-weight keys and values."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")
        return self.fingerprint()

    def fingerprint(self) -> Fingerprint:
        return self.llm.collective_rpc("attnrl_fingerprint")[0]

    # -- colocated placement

    def sleep(self) -> None:
        """Free this GPU for the trainer rank beside it: level 1 moves the weights to host memory and
        drops the KV cache (its blocks would be stale after the weight push anyway)."""
        if self.settings.sleep_mode:
            self.llm.sleep(level=1)

    def wake(self) -> None:
        if self.settings.sleep_mode:
            self.llm.wake_up()

    # -- vLLM's native weight transfer (driven by infra.vllm_weight_transfer through the pool)

    def native_transfer(self, phase: str, payload: dict[str, Any] | None = None) -> None:
        """One phase of vLLM's four-phase protocol on every worker of this engine."""
        if phase not in ("init_weight_transfer_engine", "start_weight_update", "update_weights",
                         "finish_weight_update"):
            raise ValueError(f"unknown weight-transfer phase {phase!r}")
        self.llm.collective_rpc(phase, args=() if payload is None else (payload,))
