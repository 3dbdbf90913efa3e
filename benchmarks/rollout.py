"""Rollout benchmark: generated tokens per second of raw ``vllm.LLM.generate``, of our vLLM engine and
of the hf engine, on the same mix of initial and continuation requests.

    python benchmarks/rollout.py [--model DIR] [--repeats 3] [--threads 1]

* ``raw_vllm``: ``vllm.LLM.generate`` called directly in a Ray actor of the worker environment
  (``.venv-vllm``), on ``TokensPrompt`` inputs with the same sampling settings our engine sends;
  the timer runs inside that process, so it includes nothing but vLLM.
* ``vllm_engine``: ``RayRolloutPool`` with one vLLM actor, as the training loop uses it; timed in
  the driver, so it includes the request split, Ray's transfer both ways, and the conversion to
  ``Completion`` objects with behaviour log-probs.
* ``hf_engine``: ``HFRolloutEngine`` in the driver process.

The mix is what one off-policy step sends (spec §3.2): G = 6 samples for each of 16 prompts, and
T = 2 continuations from 32 response prefixes of those samples. Every engine gets one warm-up call,
then the three run in turn, ``--repeats`` times, interleaved; each figure is reported per repeat
with its mean. Every request is seeded, so both vLLM variants generate the same tokens. The model
is the embedded default's architecture (random weights unless ``--model`` names a trained one).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnrl.config import resolve_config  # noqa: E402
from attnrl.data.synthetic import generate_problems  # noqa: E402
from attnrl.model.loading import load_policy, save_policy  # noqa: E402
from attnrl.model.policy import fresh_tiny_policy  # noqa: E402
from attnrl.rollout import GenerationRequest, SamplingParams, encode_prompt  # noqa: E402
from attnrl.rollout.factory import build_engine  # noqa: E402
from attnrl.rollout.hf_engine import HFRolloutEngine  # noqa: E402
from attnrl.utils.seeding import derive_seed  # noqa: E402
from infra.engine_specs import vllm_spec  # noqa: E402


class RawVLLM:
    """``vllm.LLM`` and nothing else, in the worker environment (pickled with this script)."""

    def __init__(self, settings: dict) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        # The configuration's LLM arguments, and the same logprobs mode as our engine.
        self.llm = LLM(skip_tokenizer_init=True, logprobs_mode="processed_logprobs", **settings["llm"])

    def timed_generate(self, requests: list[tuple[list[int], int, int, int]], temperature: float, eos: int) -> tuple[float, int]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids) for ids, _, _, _ in requests]
        params = [VLLMSamplingParams(n=n, temperature=temperature, top_p=1.0, top_k=0, max_tokens=limit, seed=seed,
                                     logprobs=0, detokenize=False, stop_token_ids=[eos])
                  for _, n, limit, seed in requests]
        started = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        return elapsed, sum(len(c.token_ids) for out in outputs for c in out.outputs)


def request_mix(tokenizer, hf: HFRolloutEngine, config, prompts: int, continuations: int) -> list[GenerationRequest]:
    """16 prompts × 6 samples, and 2 continuations from each of 32 prefixes of those samples."""
    problems = generate_problems(config.data.synthetic, split="train", seed=7)[:prompts]
    sampling = config.rollout.sampling
    initial = [GenerationRequest(tuple(encode_prompt(tokenizer, p.prompt)), n=sampling.n, group=p.uid) for p in problems]
    samples = hf.generate(initial, SamplingParams(max_new_tokens=sampling.max_new_tokens), seed=1)
    branches = []
    for k in range(continuations):
        q, s = k % len(initial), (k // len(initial)) % sampling.n
        tokens = samples[q][s].token_ids
        cut = max(1, len(tokens) // 2)
        branches.append(GenerationRequest(initial[q].prompt_ids + tokens[:cut], n=2,
                                          max_new_tokens=max(1, sampling.max_new_tokens - cut), group=initial[q].group))
    return initial + branches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a save_pretrained directory (default: random weights, tiny architecture)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of every engine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = resolve_config(preset="tiny", overrides=["rollout.engine=vllm", f"rollout.ray.num_cpus_per_actor={args.threads}"])
    with tempfile.TemporaryDirectory() as scratch:
        if args.model:
            policy = load_policy(args.model)
            model, tokenizer, model_dir = policy.model, policy.tokenizer, Path(args.model)
        else:
            model, tokenizer = fresh_tiny_policy(config)
            model_dir = save_policy(model, tokenizer, Path(scratch) / "policy")
        max_new = config.rollout.sampling.max_new_tokens
        hf = HFRolloutEngine(model.eval(), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             vocab_size=len(tokenizer), batch_size=config.rollout.batch_size)
        requests = request_mix(tokenizer, hf, config, prompts=16, continuations=32)
        params = SamplingParams(max_new_tokens=max_new)
        ray.init(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False, logging_level="WARNING")
        try:
            spec = vllm_spec(config, model_dir=model_dir, tokenizer=tokenizer, max_new_tokens=max_new)
            raw = ray.remote(RawVLLM).options(num_cpus=args.threads, runtime_env={
                "py_executable": spec.python, "env_vars": spec.env_vars}).remote(spec.options)
            engine = build_engine(config, model_dir=model_dir, tokenizer=tokenizer, max_new_tokens=max_new)
            # The seeds our engine gives each request (its position in the call), for the raw runs too.
            raw_requests = [(list(r.prompt_ids), r.n, r.max_new_tokens or max_new,
                             derive_seed(11, "request", i) % 2**62) for i, r in enumerate(requests)]

            def run_raw() -> tuple[float, int]:
                return ray.get(raw.timed_generate.remote(raw_requests, 1.0, tokenizer.eos_token_id))

            def run_timed(generate) -> tuple[float, int]:
                started = time.perf_counter()
                out = generate(requests, params, 11)
                return time.perf_counter() - started, sum(len(c.token_ids) for group in out for c in group)

            runs = {"raw_vllm": run_raw, "vllm_engine": lambda: run_timed(engine.generate),
                    "hf_engine": lambda: run_timed(hf.generate)}
            for run in runs.values():
                run()  # warm-up: kernels, allocator, prefix cache state
            results: dict[str, list[tuple[float, int]]] = {name: [] for name in runs}
            for _ in range(args.repeats):
                for name, run in runs.items():
                    results[name].append(run())
            engine.close()
        finally:
            ray.shutdown()
    report: dict[str, object] = {
        "threads_per_engine": args.threads,
        "requests": {"initial": 16, "continuations": 32, "samples": sum(r.n for r in requests)},
    }
    for name, rows in results.items():
        rates = [tokens / seconds for seconds, tokens in rows]
        report[name] = {"tokens_per_s": [round(r, 1) for r in rates], "mean_tokens_per_s": round(statistics.fmean(rates), 1),
                        "seconds": [round(s, 3) for s, _ in rows], "generated_tokens": [t for _, t in rows]}
    ratios = [ours[1] / ours[0] / (raw[1] / raw[0]) for ours, raw in zip(results["vllm_engine"], results["raw_vllm"])]
    report["engine_over_raw"] = {"per_repeat": [round(r, 3) for r in ratios], "mean": round(statistics.fmean(ratios), 3)}
    report["vllm_engine_over_hf"] = round(report["vllm_engine"]["mean_tokens_per_s"] / report["hf_engine"]["mean_tokens_per_s"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
