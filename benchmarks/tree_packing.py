"""Benchmark: tree-packed against per-path training passes (``train.tree_packing``), side by side.

    .venv/bin/python benchmarks/tree_packing.py [--steps 3] [--repeats 3] [--keep DIR]

Two sets of batches:

* ``tiny-attnrl`` / ``tiny-treerl``: the tree batches of the embedded default (``make demo``'s preset):
  the training paths of the first ``--steps`` steps of each method from the warmed-up tiny policy, as the
  loop hands them to the update (``check_batch``);
* ``long-prefix``: the paper's shape scaled to a CPU: per question a prompt of 128 tokens and G = 6
  responses of 512 (spec §12: prompts up to 1 k, responses up to 8 k), each branched at N = 2 points around
  its middle (offsets 192 and 320) with T = 2 continuations that run to the response's length (spec §8),
  random tokens through a random model of the tiny preset's shape.

Passes, each on the same inputs with the trainer as the loop builds it (backend, budgets and kernel from
the preset; only ``train.tree_packing`` differs): ``behaviour`` (the continuations' tokens under the
current policy, their prefixes as prompts: tree_parts.py), ``reference`` (every path under the frozen
reference) and ``update`` (one PPO epoch over the paths in mini-batches, from the same weights each time).

Measured per (batches, pass, layout), repeats interleaved (per-path, packed, per-path, ...): seconds (the
minimum and every repeat), token slots through the decoder (the micro-batches' rows × widths, padding
included, as the trainer lays them out) and the largest micro-batch's, the distinct tokens of the pass (each micro-batch's prefix tree; the update's mini-batches separately, since the
weights change between them), and the peak resident memory above the resting one (VmHWM reset per pass;
the script runs itself again with ``MALLOC_MMAP_THRESHOLD_=65536``, as ``memprobe`` runs its workers, so
freed buffers leave the process and an earlier run's heap does not hide a later run's peak).
Prints the JSON and writes it to ``benchmarks/results/tree_packing.json`` (with ``--budget N``, the token
budget of every measured micro-batch, to ``tree_packing-budgetN.json``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from attnrl.config import resolve_config
from attnrl.config.schema import RunConfig
from attnrl.data.loaders import load_verl_parquet
from attnrl.model.loading import load_policy
from attnrl.rollout.prompts import encode_prompt
from attnrl.stages.train import train, training_problems_path
from attnrl.training.backend import autocast_dtype, build_backend
from attnrl.training.sequences import tree_tokens
from attnrl.training.trainer import PolicyTrainer, TrainSequence, mini_batches
from attnrl.tree import TrainingPath

from common import RESULTS, log_to_stderr, provenance, warmed_up, workdir, write_json  # benchmarks/common.py
from memprobe import MIB, current_bytes, peak_bytes, reset_peak  # benchmarks/memprobe.py

LAYOUTS = {"per_path": "false", "packed": "true"}
MMAP_THRESHOLD = "65536"
PASSES = ("behaviour", "reference", "update")
LONG = {"prompt": 128, "response": 512, "responses": 6, "offsets": (192, 320), "continuations": 2, "questions": 1}


def tiny_batches(method: str, steps: int, root: Path) -> tuple[RunConfig, Path, list[list[TrainSequence]]]:
    """The training paths of ``steps`` steps of ``method`` on the embedded default, per step, as sequences."""
    config = resolve_config(preset="tiny", method=method, overrides=[f"train.steps={steps}", "rollout.progress=false"])
    init = warmed_up(config, root)
    captured: list[list[TrainingPath]] = []
    run_dir = root / "runs" / f"capture-{method}"
    shutil.rmtree(run_dir, ignore_errors=True)  # from step 1, not resumed from a kept run's checkpoint
    train(config, root, run_dir=run_dir, check_batch=lambda step, paths: captured.append(list(paths)))
    tokenizer = load_policy(init).tokenizer
    prompts = {p.uid: tuple(encode_prompt(tokenizer, p.prompt)) for p in load_verl_parquet(training_problems_path(config, root))}
    batches = [[TrainSequence(prompts[p.question], p.token_ids, p.logprobs, p.advantages, p.logprobs) for p in paths]
               for paths in captured]
    return config, init, batches


def long_prefix_batch(seed: int) -> list[TrainSequence]:
    """One question's tree of the long-prefix shape (``LONG``), random tokens and values."""
    rng = random.Random(seed)
    out = []

    def tokens(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(10, 60) for _ in range(n))

    def sequence(prompt: tuple[int, ...], response: tuple[int, ...]) -> TrainSequence:
        values = tuple(-rng.random() for _ in response)
        return TrainSequence(prompt, response, values, tuple(rng.gauss(0, 1) for _ in response), values)

    for _ in range(LONG["questions"]):
        prompt = tokens(LONG["prompt"])
        for _ in range(LONG["responses"]):
            response = tokens(LONG["response"])
            out.append(sequence(prompt, response))
            for offset in LONG["offsets"]:
                for _ in range(LONG["continuations"]):
                    out.append(sequence(prompt, response[:offset] + tokens(LONG["response"] - offset)))
    return out


def continuation_pass(sequences: list[TrainSequence]) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """The behaviour pass's inputs: each path that repeats an earlier path's prefix, as (prompt + prefix, rest)."""
    prompts, responses, seen = [], [], []
    for s in sequences:
        shared = max((_common(s.response_ids, r) for p, r in seen if p == s.prompt_ids), default=0)
        if 0 < shared < len(s.response_ids):
            prompts.append(s.prompt_ids + s.response_ids[:shared])
            responses.append(s.response_ids[shared:])
        seen.append((s.prompt_ids, s.response_ids))
    return prompts, responses


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def build_trainer(config: RunConfig, model: torch.nn.Module, packing: str, budget: int | None) -> PolicyTrainer:
    update: dict[str, Any] = {"tree_packing": packing == "true"}
    if budget is not None:
        update["max_tokens_per_micro_batch"] = budget
    config = config.model_copy(update={"train": config.train.model_copy(update=update)})
    model = copy.deepcopy(model)
    return PolicyTrainer(model, build_backend(config.train.backend, model, config.train), reference=copy.deepcopy(model),
                         pad_token_id=0, algorithm=config.algorithm, train=config.train,
                         temperature=config.rollout.sampling.temperature, autocast=autocast_dtype(config.train, model.device))


def distinct_tokens(pass_name: str, config: RunConfig, prompts, responses, sequences) -> int:
    if pass_name != "update":
        return tree_tokens(prompts, responses)
    return sum(tree_tokens([s.prompt_ids for s in b.sequences], [s.response_ids for s in b.sequences])
               for b in mini_batches(sequences, config.train.mini_batch_sequences))


def processed_tokens(trainer: PolicyTrainer, pass_name: str, inputs, batches: list[list[TrainSequence]]) -> list[int]:
    """Token slots of each micro-batch the pass runs through the decoder (rows × width, as the trainer lays them out)."""
    kernel = trainer.model.config._attn_implementation
    calls = []
    for (prompts, responses), batch in zip(inputs, batches, strict=True):
        if pass_name != "update":
            calls.append((prompts, responses))
        else:
            calls += [([s.prompt_ids for s in b.sequences], [s.response_ids for s in b.sequences])
                      for b in mini_batches(batch, trainer.train_config.mini_batch_sequences)]
    return [layout.input_ids.numel() for prompts, responses in calls if prompts
            for _, layout, _ in trainer._micro_batches(prompts, responses, kernel)]


def measure(config: RunConfig, model: torch.nn.Module, batches: list[list[TrainSequence]], repeats: int,
            budget: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"sequences": sum(len(b) for b in batches)}
    for pass_name in PASSES:
        record: dict[str, Any] = {layout: {"seconds": []} for layout in LAYOUTS}
        inputs = []
        for batch in batches:
            if pass_name == "behaviour":
                inputs.append(continuation_pass(batch))
            else:
                inputs.append(([s.prompt_ids for s in batch], [s.response_ids for s in batch]))
        record["per_path_tokens"] = sum(len(p) + len(r) for ps, rs in inputs for p, r in zip(ps, rs, strict=True))
        record["distinct_tokens"] = sum(distinct_tokens(pass_name, config, ps, rs, batch)
                                        for (ps, rs), batch in zip(inputs, batches, strict=True))
        for _ in range(repeats):
            for layout, packing in LAYOUTS.items():
                trainer = None
                gc.collect()
                trainer = build_trainer(config, model, packing, budget)  # the same weights and optimizer state each time
                rest = current_bytes("cpu")
                reset_peak("cpu")
                started = time.perf_counter()
                for (prompts, responses), batch in zip(inputs, batches, strict=True):
                    if pass_name == "update":
                        trainer.update(batch)
                    elif prompts:
                        trainer.logprobs(prompts, responses, reference=pass_name == "reference")
                seconds = time.perf_counter() - started
                entry = record[layout]
                entry["seconds"].append(round(seconds, 3))
                slots = processed_tokens(trainer, pass_name, inputs, batches)
                entry["tokens"], entry["largest_micro_batch"] = sum(slots), max(slots, default=0)
                entry["extra_peak_mib"] = max(entry.get("extra_peak_mib", 0), round((peak_bytes("cpu") - rest) / MIB, 1))
        for layout in LAYOUTS:
            entry = record[layout]
            entry["min_seconds"] = min(entry["seconds"])
            entry["tokens_over_distinct"] = round(entry["tokens"] / max(1, record["distinct_tokens"]), 3)
        packed = record["packed"]["min_seconds"]
        record["speedup"] = round(record["per_path"]["min_seconds"] / packed, 2) if packed else None  # None: no inputs
        out[pass_name] = record
    return out


def long_prefix_model(config: RunConfig) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tiny = config.model.tiny
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=64, hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers, num_attention_heads=tiny.num_heads, num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=2 * (LONG["prompt"] + LONG["response"]), tie_word_embeddings=True))
    model.set_attn_implementation("sdpa")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps of each tiny method whose batches are used")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="keep the warmed-up workspace here (and reuse it)")
    parser.add_argument("--budget", type=int, default=None,
                        help="train.max_tokens_per_micro_batch of every measured pass (default: the preset's); the "
                             "results go to tree_packing-budget<N>.json")
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:  # glibc reads it at start-up only
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD})
    log_to_stderr("benchmarks")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    preset = resolve_config(preset="tiny")
    record: dict[str, Any] = {**provenance("tree_packing.py", sys.argv[1:]), "threads": args.threads,
                              "memory": "RSS above resting (VmHWM reset via clear_refs), MALLOC_MMAP_THRESHOLD_=65536",
                              "repeats": args.repeats, "long_prefix_shape": LONG,
                              "max_tokens_per_micro_batch": args.budget or preset.train.max_tokens_per_micro_batch,
                              "batches": {}}
    with workdir(args.keep, "tree-packing-") as root:
        for method in ("attnrl", "treerl"):
            config, init, batches = tiny_batches(method, args.steps, root)
            model = load_policy(init, dtype="float32", attn_implementation=config.model.attn_implementation).model
            record["batches"][f"tiny-{method}"] = measure(config, model, batches, args.repeats, args.budget)
        record["batches"]["long-prefix"] = measure(preset, long_prefix_model(preset), [long_prefix_batch(0)],
                                                   args.repeats, args.budget)
    record["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(record, RESULTS / ("tree_packing.json" if args.budget is None else f"tree_packing-budget{args.budget}.json"))


if __name__ == "__main__":
    main()
