"""A published checkpoint through attnrl on CPU: SmolLM2-135M-Instruct (`make fixtures`) on real MATH problems.

    python benchmarks/real_model.py throughput   # evaluation tokens/s, hf and vLLM: the old 10-call split vs
                                                 # calls sized to the engines' batch, side by side (~6 min)
    python benchmarks/real_model.py pipeline     # prepare → evaluate → 2 AttnRL steps on vLLM → evaluate →
                                                 # report, timed (~3 min; tests/integration/test_real_model_pipeline.py)

One JSON object on stdout. The problems come from ../shared/benchmarks (verl parquet): ``TRAIN_IDS`` are
MATH-train problems SmolLM2 solved in 1 to 3 of 4 samples (128 tokens, temperature 1, the hf engine, seed 0),
so a training batch has rewards to learn from; the evaluation set is the shortest MATH-500 problems.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "benchmarks"
MATH_TRAIN = SHARED / "train" / "dapo+math_train.parquet"
MATH500 = SHARED / "eval" / "math500_1.parquet"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"  # vLLM's CPU build (`make vllm-env`)
TRAIN_IDS = (17550, 17700, 17914, 18372, 18566, 18682, 18687, 19853, 20223, 20650, 23443, 23491, 23549, 24126)
EVAL_PROBLEMS = 4
EVAL_K = 4
MAX_NEW_TOKENS = 64


def write_problems(directory: Path, *, eval_problems: int = EVAL_PROBLEMS) -> tuple[Path, Path]:
    """``train.parquet`` (the ``TRAIN_IDS`` rows of MATH train) and ``eval.parquet`` (the ``eval_problems``
    shortest MATH-500 prompts) in ``directory``, in the shared files' own layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for source in (MATH_TRAIN, MATH500):
        if not source.is_file():
            raise FileNotFoundError(f"{source}: the real benchmark data is expected beside the project "
                                    "(../shared/benchmarks, verl parquet layout)")
    train = pq.read_table(MATH_TRAIN)
    rows = [row for row in train.to_pylist()
            if row["data_source"] == "xDAN2099/lighteval-MATH" and row["extra_info"]["index"] in TRAIN_IDS]
    if len(rows) != len(TRAIN_IDS):
        raise ValueError(f"{MATH_TRAIN}: found {len(rows)} of the {len(TRAIN_IDS)} MATH problems in TRAIN_IDS")
    evaluation = pq.read_table(MATH500)
    shortest = sorted(evaluation.to_pylist(), key=lambda row: len(row["prompt"][0]["content"]))[:eval_problems]
    directory.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = directory / "train.parquet", directory / "eval.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=train.schema), train_path)
    pq.write_table(pa.Table.from_pylist(shortest, schema=evaluation.schema), eval_path)
    return train_path, eval_path


def pipeline_overrides(model_dir: Path, train_path: Path, eval_path: Path) -> list[str]:
    """The tiny preset (params.yaml) turned into a SmolLM2 run: the model instead of the warmed-up tiny one,
    real problems, vLLM's CPU engine, and batches small enough for 2 AttnRL steps in about a minute each."""
    return [
        f"model.path={model_dir}", "warmup.enabled=false",
        f"data.train=[{{kind: verl_parquet, path: {train_path}, name: math-train}}]",
        f"data.eval=[{{kind: verl_parquet, path: {eval_path}, name: math500, k: {EVAL_K}}}]",
        "data.max_prompt_tokens=128",  # the longest templated prompt here is ~80 tokens (SmolLM2 adds a system turn)
        "rollout.engine=vllm", f"rollout.vllm.python={VLLM_PYTHON}",
        "rollout.continuation_parts=1",
        "rollout.sampling.n=4", f"rollout.sampling.max_new_tokens={MAX_NEW_TOKENS}", f"eval.max_new_tokens={MAX_NEW_TOKENS}",
        # 2 prompts of 4 samples, one branch point and one continuation per expanded response: 16 sequences a step.
        "algorithm.prompt_batch_size=2", "algorithm.num_branch_points=1", "algorithm.continuations_per_branch=1",
        "train.steps=2", "train.mini_batch_sequences=32", "train.lr=1e-6",
        "report.trace_problems=0",  # the report's method trace would generate and score again (tested on its own)
    ]


def _throughput(args: argparse.Namespace) -> dict:
    import torch

    from attnrl.config import resolve_config
    from attnrl.data.loaders import load_verl_parquet
    from attnrl.model.loading import load_policy, load_tokenizer
    from attnrl.reward.verifier import Verifier
    from attnrl.rollout.factory import build_engine, engine_batch_rows, engine_session
    from attnrl.stages.evaluate import evaluate_problems
    from scripts.fixtures import SMOLLM2, fixture_dir

    torch.set_num_threads(2)
    model_dir = fixture_dir(SMOLLM2)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        _, eval_path = write_problems(Path(scratch), eval_problems=args.problems)
        problems = load_verl_parquet(eval_path)
        for engine_name in args.engines:
            overrides = ["data.max_prompt_tokens=128", f"eval.max_new_tokens={args.max_new_tokens}",
                         f"rollout.engine={engine_name}", f"rollout.vllm.python={VLLM_PYTHON}"]
            config = resolve_config(preset="tiny", overrides=overrides)
            # vLLM's actors load the model themselves; only the in-process hf engine needs it here.
            model = None if engine_name == "vllm" else load_policy(model_dir).model
            tokenizer = load_tokenizer(model_dir)
            engine = build_engine(config, model_dir=model_dir, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens,
                                  model=model)
            splits = {"ten_calls": math.ceil(len(problems) / 10) * args.k, "engine_batch": engine_batch_rows(config)}
            rows = {}
            with engine_session(engine), Verifier(timeout_s=5, workers=1) as verifier:
                for label, call_rows in splits.items():
                    start = time.perf_counter()
                    graded = evaluate_problems(problems, args.k, engine, tokenizer, verifier, config, "math500",
                                               call_rows=call_rows)
                    seconds = time.perf_counter() - start
                    tokens = sum(int(row["response_tokens"]) for row in graded)
                    rows[label] = {"call_rows": call_rows, "calls": math.ceil(len(problems) / max(1, call_rows // args.k)),
                                   "seconds": round(seconds, 1), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
                                   "mean_at_k": round(sum(float(row["reward"]) for row in graded) / len(graded), 4)}
            rows["speedup"] = round(rows["engine_batch"]["tokens_per_s"] / rows["ten_calls"]["tokens_per_s"], 2)
            results[engine_name] = rows
    return {"problems": args.problems, "k": args.k, "max_new_tokens": args.max_new_tokens, "engines": results}


def _pipeline(args: argparse.Namespace) -> dict:
    from flows.pipeline import pipeline
    from scripts.fixtures import SMOLLM2, fixture_dir

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        train_path, eval_path = write_problems(root / "problems")
        start = time.perf_counter()
        state = pipeline(config_path=str(ROOT / "params.yaml"), root=str(root), return_state=True,
                         overrides=pipeline_overrides(fixture_dir(SMOLLM2), train_path, eval_path))
        seconds = time.perf_counter() - start
        if not state.is_completed():
            raise RuntimeError(f"the pipeline ended {state.type}: {state.message}")
        return summarise_run(root) | {"pipeline_seconds": round(seconds, 1)}


def summarise_run(root: Path) -> dict:
    """Accuracy before and after, and each training step's reward and wall time, of a finished run in ``root``."""
    runs = root / "runs"
    before = json.loads((runs / "eval-init" / "metrics.json").read_text())["average"]
    after = json.loads((runs / "eval" / "metrics.json").read_text())["average"]
    steps = [json.loads(line) for line in (runs / "train" / "metrics.jsonl").read_text().splitlines()]
    return {"mean_at_k_before": before["mean_at_k"], "mean_at_k_after": after["mean_at_k"],
            "pass_at_k_before": before["pass_at_k"], "pass_at_k_after": after["pass_at_k"],
            "steps": [{"step": int(s["step"]), "reward": s["reward"], "seconds": round(s["step_time_s"], 1),
                       "train_sequences": int(s["train_sequences"]), "generated_tokens": int(s["generated_tokens"])}
                      for s in steps]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="section", required=True)
    throughput = sub.add_parser("throughput", help="evaluation tokens/s per engine, old split vs engine-sized calls")
    throughput.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    throughput.add_argument("--problems", type=int, default=16)
    throughput.add_argument("--k", type=int, default=4)
    throughput.add_argument("--max-new-tokens", type=int, default=128)
    sub.add_parser("pipeline", help="the SmolLM2 pipeline run of the integration test, timed")
    args = parser.parse_args(argv)
    result = _throughput(args) if args.section == "throughput" else _pipeline(args)
    json.dump({"benchmark": f"real_model {args.section}", **result}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
