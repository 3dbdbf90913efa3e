"""GPU check at the paper's scale: DeepSeek-R1-Distill-Qwen-1.5B shapes, 1 k prompt + 8 k response tokens.

A random-init Qwen2 with the exact R1-Distill-1.5B numbers below (nothing downloads), trained the
way the trainer trains it (spec §11, §12): bf16 autocast over fp32 master weights (the torch
backend; DeepSpeed is not needed), gradient checkpointing, the chunked LM head, token-budget
micro-batches of 36,864 tokens. Three passes over the same sequences, one GPU:

1. ``score``: the scoring forward with FCI (behaviour log-probs, entropies, FCI per step);
2. ``reference``: reference log-probs (a frozen bf16 copy);
3. ``update``: one PPO update (one optimizer step over all sequences).

Prints one JSON object: per pass the peak memory above what was resident before it
(``torch.cuda.max_memory_allocated``), the absolute peak, and seconds per sequence. Needs only
torch, transformers and this repository's pure core (no pydantic: the settings are spelled out
below, equal to the schema's defaults; a test checks that).

    python benchmarks/gpu_scale_check.py              # on the GPU
    python benchmarks/gpu_scale_check.py --small      # a small model on CPU, end to end in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# DeepSeek-R1-Distill-Qwen-1.5B (its public config.json; spec §2.1, stack-notes.md).
R1_DISTILL_1_5B = {
    "vocab_size": 151_936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "use_sliding_window": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0},
}
# --small: the same vocabulary and head (the memory problem) on a tiny body.
SMALL_BODY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 1024}

# Spec §12, equal to attnrl.config.schema's TrainConfig / AlgorithmConfig defaults (tests check it).
TRAIN = {
    "lr": 1e-6, "weight_decay": 0.01, "grad_clip": 1.0, "mini_batch_sequences": 192,
    "max_tokens_per_micro_batch": 36_864, "logits_chunk_tokens": 1024, "gradient_checkpointing": True,
    "packing": "auto",
}
ALGORITHM = {
    "clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0, "kl_coef": 0.001, "entropy_coef": 0.0,
    "loss_aggregation": "token_mean", "fci_delta": 4, "step_attention": "mean_mean",
    "fci_mask_first_step": True, "fci_mask_after_think": True,
}
TEMPERATURE = 1.0  # training rollouts (spec §12)


def _shape(small: bool) -> dict[str, Any]:
    if small:
        return {"prompt": 32, "response": 96, "sequences": 3, "step_every": 16, "token_budget": 256,
                "device": "cpu", "precision": "fp32"}
    return {"prompt": 1024, "response": 8192, "sequences": 8, "step_every": 64,
            "token_budget": TRAIN["max_tokens_per_micro_batch"], "device": "cuda", "precision": "bf16"}


def _model(small: bool, dtype):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    numbers = {**R1_DISTILL_1_5B, **SMALL_BODY} if small else R1_DISTILL_1_5B
    config = Qwen2Config(**numbers, attn_implementation="sdpa")
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(dtype=dtype)


def _sequences(shape: dict[str, Any], vocab: int):
    """Random prompt ⧺ response token ids with a step every ``step_every`` tokens, their segmentations, and
    training sequences with plausible behaviour log-probs and advantages."""
    import torch

    from attnrl.steps import StepSegmentation
    from attnrl.training.trainer import TrainSequence

    generator = torch.Generator().manual_seed(1)
    prompts, responses, segmentations, train = [], [], [], []
    p, r = shape["prompt"], shape["response"]
    for _ in range(shape["sequences"]):
        ids = torch.randint(0, vocab, (p + r,), generator=generator).tolist()
        prompts.append(tuple(ids[:p]))
        responses.append(tuple(ids[p:]))
        segmentations.append(StepSegmentation((0, *range(p, p + r, shape["step_every"]), p + r)))
        advantage = float(torch.randn((), generator=generator))
        train.append(TrainSequence(prompts[-1], responses[-1], tuple([-11.9] * r), tuple([advantage] * r)))
    return prompts, responses, segmentations, train


def run(small: bool) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    from attnrl.training.backend import build_backend
    from attnrl.training.trainer import PolicyTrainer, TrainSequence

    shape = _shape(small)
    device = torch.device(shape["device"])
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --small on CPU")
    train = SimpleNamespace(**{**TRAIN, "max_tokens_per_micro_batch": shape["token_budget"]})
    algorithm = SimpleNamespace(**ALGORITHM)
    bf16 = shape["precision"] == "bf16"
    policy = _model(small, torch.float32).to(device)  # fp32 master weights; bf16 compute under autocast
    reference = _model(small, torch.bfloat16 if bf16 else torch.float32).to(device).eval()
    trainer = PolicyTrainer(policy, build_backend("torch", policy, train), reference=reference, pad_token_id=0,
                            algorithm=algorithm, train=train, temperature=TEMPERATURE,
                            autocast=torch.bfloat16 if bf16 else None)
    prompts, responses, segmentations, sequences = _sequences(shape, policy.config.vocab_size)

    def measure(name: str, fn) -> tuple[dict[str, Any], Any]:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        start = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        out: dict[str, Any] = {"seconds_per_sequence": round(seconds / len(prompts), 3), "seconds": round(seconds, 2)}
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            out |= {"peak_gib": round(peak / 2**30, 2), "peak_over_resident_gib": round((peak - before) / 2**30, 2)}
        return out, result

    passes: dict[str, Any] = {}
    passes["score"], scored = measure("score", lambda: trainer.score(prompts, responses, segmentations))
    passes["reference"], refs = measure("reference", lambda: trainer.logprobs(prompts, responses, reference=True))
    sequences = [TrainSequence(s.prompt_ids, s.response_ids, sc.logprobs, s.advantages, ref)
                 for s, sc, ref in zip(sequences, scored, refs)]
    passes["update"], stats = measure("update", lambda: trainer.update(sequences))
    finite = all(torch.isfinite(torch.tensor(s.logprobs + s.entropies + s.fci)).all() for s in scored)
    micro = trainer._micro_batches(prompts, responses, policy.config._attn_implementation)
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "model": "R1-Distill-Qwen-1.5B shapes" if not small else "small body, R1-Distill vocabulary",
        "parameters": sum(p.numel() for p in policy.parameters()),
        "precision": "bf16 autocast over fp32 master weights" if bf16 else "fp32",
        "sequences": len(prompts), "prompt_tokens": shape["prompt"], "response_tokens": shape["response"],
        "steps_per_response": segmentations[0].num_steps,
        "token_budget": shape["token_budget"], "micro_batches_per_pass": len(micro),
        "gradient_checkpointing": TRAIN["gradient_checkpointing"], "logits_chunk_tokens": TRAIN["logits_chunk_tokens"],
        "passes": passes,
        "update": {k: stats[k] for k in ("optimizer_steps", "grad_norm", "loss")},
        "all_scores_finite": bool(finite),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small model on CPU (checks the script end to end)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.small), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
