"""Benchmark: peak memory of the scoring pass and of one update step, chunked vs full logits.

The model has the DeepSeek-R1-Distill vocabulary (151,936 tokens, untied head) on a small random
body, so the logits dominate as they do at the paper's scale (spec §12: responses up to 8,192
tokens). One sequence of ``length`` tokens (an eighth prompt, the rest response) per run.

Methods:

* ``chunked``: the trainer as it is (``PolicyTrainer`` over a ``ResponseScorer``): the LM head on
  ``train.logits_chunk_tokens`` response positions at a time, recomputed per chunk in the backward;
* ``full``: the computation the trainer did before: ``model(...).logits`` for every position, the
  response slice in fp32 divided by the temperature, then log-softmax/entropy over it (and the
  PPO loss and backward through it for the update).

Both run with gradient checkpointing in the update (the paper setting), so the difference is the
logits. Each (method, pass, length) runs in a fresh process (``memprobe``), after a warm-up on a
short input that also allocates the AdamW state; ``extra`` is the peak above the resting memory
(model, optimizer state, input). A full-logit run that needs more than the machine has left is
capped (``RLIMIT_AS``) and reported as ``out_of_memory`` with the cap: its extra memory is then
only bounded below. Requirement: at 8,192 tokens the chunked
scoring pass's extra memory is at most 1/8 of the full-logit pass's.

    .venv/bin/python benchmarks/memory.py --lengths 1024 2048 4096 8192 --threads 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from memprobe import MIB, available_bytes, current_bytes, memory_note, peak_bytes, reset_peak, run_worker

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 151_936  # DeepSeek-R1-Distill-Qwen (spec §2.1)
BODY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
TEMPERATURE = 1.0  # the training rollouts' (spec §12); the full path still divides, as the trainer did
REQUIRED = {"length": 8192, "pass": "score", "min_ratio": 8.0}
MEMORY_MARGIN = 2 * 1024 * MIB
WARMUP_LENGTH = 64


# ---------------------------------------------------------------------------------------------- worker


def _setup(args: argparse.Namespace):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from attnrl.config import resolve_config
    from attnrl.training.backend import build_backend
    from attnrl.training.trainer import PolicyTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, tie_word_embeddings=False,
                                         max_position_embeddings=max(args.length, WARMUP_LENGTH), **BODY))
    config = resolve_config(preset="tiny", overrides=[
        "algorithm.kl_coef=0", "train.gradient_checkpointing=true", "train.mini_batch_sequences=1",
        f"train.logits_chunk_tokens={args.chunk_tokens}", "train.packing=left_padded",
    ])
    backend = build_backend("torch", model, config.train)
    trainer = PolicyTrainer(model, backend, reference=None, pad_token_id=0, algorithm=config.algorithm,
                            train=config.train, temperature=TEMPERATURE)
    return trainer, config


def _sequence(length: int, seed: int):
    import torch

    from attnrl.training.trainer import TrainSequence

    generator = torch.Generator().manual_seed(seed + length)
    prompt_len = max(1, length // 8)
    ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
    noise = torch.randn(2, length - prompt_len, generator=generator)
    return TrainSequence(tuple(ids[:prompt_len]), tuple(ids[prompt_len:]), tuple((noise[0] - 12).tolist()),
                         tuple(noise[1].tolist()))


def _full_logits(trainer, sequence):
    """The pre-chunking path: every position's logits, the response slice in fp32 over the temperature."""
    import torch

    from attnrl.training.sequences import left_padded

    batch = left_padded([sequence.prompt_ids], [sequence.response_ids], 0)
    logits = trainer.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    response = logits[:, -len(sequence.response_ids) - 1:-1].float() / trainer.temperature
    return response[0], torch.tensor(sequence.response_ids)


def _full_score(trainer, sequence):
    import torch

    from attnrl.loss import entropy_from_logits, token_logprobs

    trainer.model.eval()
    with torch.no_grad():
        logits, targets = _full_logits(trainer, sequence)
        return token_logprobs(logits, targets).tolist(), entropy_from_logits(logits).tolist()


def _full_update(trainer, sequence):
    import torch

    from attnrl.loss import policy_objective, token_logprobs

    trainer.model.train()
    logits, targets = _full_logits(trainer, sequence)
    logprobs = token_logprobs(logits, targets)[None]
    loss, _ = policy_objective(logprobs, torch.tensor([sequence.old_logprobs]), None,
                               torch.tensor([sequence.advantages]), torch.ones_like(logprobs), None, trainer.algorithm)
    trainer.backend.backward(loss, boundary=True)
    trainer.backend.step()
    trainer.model.eval()


def _run_pass(method: str, step: str, trainer, sequence) -> None:
    if method == "full":
        (_full_score if step == "score" else _full_update)(trainer, sequence)
    elif step == "score":
        trainer.score([sequence.prompt_ids], [sequence.response_ids])
    else:
        trainer.update([sequence])


def worker(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    trainer, _ = _setup(args)
    # Every code path once on a short input: lazily loaded code and the AdamW state are resting memory.
    _run_pass(args.worker, args.pass_name, trainer, _sequence(WARMUP_LENGTH, args.seed))
    sequence = _sequence(args.length, args.seed)
    gc.collect()
    resting = current_bytes("cpu")
    reset_peak("cpu")
    start = time.perf_counter()
    _run_pass(args.worker, args.pass_name, trainer, sequence)
    seconds = time.perf_counter() - start
    return {"resting_bytes": resting, "peak_bytes": peak_bytes("cpu"), "time_s": seconds,
            "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------- driver


def _measure(method: str, step: str, length: int, args: argparse.Namespace) -> dict[str, Any]:
    arguments = ["--worker", method, "--pass", step, "--length", str(length), "--threads", str(args.threads),
                 "--seed", str(args.seed), "--chunk-tokens", str(args.chunk_tokens)]
    run = run_worker(Path(__file__).resolve(), arguments, threads=args.threads,
                     memory_cap=available_bytes() - MEMORY_MARGIN)
    if run.get("out_of_memory"):
        return {"out_of_memory": True, "memory_cap_mib": round(run["memory_cap_bytes"] / MIB)}
    return {"extra_mib": round((run["peak_bytes"] - run["resting_bytes"]) / MIB, 1),
            "resting_mib": round(run["resting_bytes"] / MIB, 1), "time_s": round(run["time_s"], 3),
            "threads": run["threads"]}


def _entry(length: int, step: str, chunked: dict[str, Any], full: dict[str, Any], chunk: int) -> dict[str, Any]:
    positions = length - max(1, length // 8)
    entry = {
        "length": length, "pass": step, "chunked": chunked, "full": full,
        # One fp32 [positions, vocabulary] tensor, what the full path holds several of at once.
        "analytic_full_logits_mib": round(length * VOCAB * 4 / MIB, 1),
        "analytic_chunk_logits_mib": round(min(chunk, positions) * VOCAB * 4 / MIB, 1),
    }
    if "extra_mib" in full:
        entry["ratio_full_over_chunked"] = round(full["extra_mib"] / max(chunked["extra_mib"], 0.1), 2)
    else:  # the full path needed more than the cap left above its resting memory
        entry["ratio_full_over_chunked_at_least"] = round(
            (full["memory_cap_mib"] - chunked["resting_mib"]) / max(chunked["extra_mib"], 0.1), 2)
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--passes", nargs="+", choices=["score", "update"], default=["score", "update"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk-tokens", type=int, default=1024, help="train.logits_chunk_tokens (its default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=["chunked", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--pass", dest="pass_name", choices=["score", "update"], help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    results = []
    for length in args.lengths:
        for step in args.passes:
            chunked, full = (_measure(method, step, length, args) for method in ("chunked", "full"))
            results.append(_entry(length, step, chunked, full, args.chunk_tokens))
    report: dict[str, Any] = {
        "device": "cpu",
        "threads": args.threads,
        "model": {"vocab": VOCAB, "tied": False, **BODY},
        "logits_chunk_tokens": args.chunk_tokens,
        "gradient_checkpointing": True,
        "memory": memory_note("cpu"),
        "results": results,
    }
    at = next((r for r in results if r["length"] == REQUIRED["length"] and r["pass"] == REQUIRED["pass"]), None)
    if at is not None:
        ratio = at.get("ratio_full_over_chunked", at.get("ratio_full_over_chunked_at_least"))
        report["requirement"] = {**REQUIRED, "ratio": ratio, "lower_bound": "ratio_full_over_chunked" not in at,
                                 "met": ratio >= REQUIRED["min_ratio"]}
    print(json.dumps(report, indent=2))
    return 0 if at is None or report["requirement"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
