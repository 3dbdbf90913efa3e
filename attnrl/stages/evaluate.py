"""Stage 'evaluate': sample K responses per benchmark problem, grade them, score mean@K / pass@K.

Writes ``runs/eval/samples.parquet`` (one row per sample) and ``runs/eval/metrics.json``
(per-benchmark and average scores, spec §14), both atomically. Benchmarks are grouped by the
problems' ``source``, so the synthetic task reports one row per difficulty level.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from attnrl.config.schema import RunConfig
from attnrl.data.loaders import load_verl_parquet
from attnrl.data.problem import Problem
from attnrl.eval.metrics import SampleResult, benchmark_scores, summarise
from attnrl.model.loading import load_policy, load_tokenizer
from attnrl.reward.verifier import Verifier
from attnrl.rollout.engine import Completion, GenerationRequest, RolloutEngine, SamplingParams
from attnrl.rollout.factory import build_engine, engine_batch_rows, engine_session, preflight, uses_pool
from attnrl.rollout.prompts import decode_response, encode_prompt
from attnrl.stages.layout import Layout, OutputCheck
from attnrl.stages.prepare import benchmark_name
from attnrl.stages.results import EvaluationResult
from attnrl.stages.warmup import initial_policy_path
from attnrl.lineage import lineage, write_lineage
from attnrl.utils.atomic import atomic_path
from attnrl.utils import stopping
from attnrl.utils.progress import Progress
from attnrl.utils.seeding import derive_seed

logger = logging.getLogger(__name__)


def evaluate(config: RunConfig, root: str | Path = ".", *, model_dir: str | Path | None = None,
             out_dir: str | Path | None = None, check: OutputCheck | None = None) -> EvaluationResult:
    """Evaluate ``model_dir`` (default: the initial policy) on every configured benchmark; ``check``
    sees the complete new output directory before it replaces the old one."""
    layout = Layout.of(config, root)
    model_path = Path(model_dir or initial_policy_path(config, root))
    preflight(config, model_dir=model_path, max_new_tokens=config.eval.max_new_tokens)  # before any model loads
    inputs = [model_path] + [layout.prepared_eval(benchmark_name(spec)) for spec in config.data.eval]
    # Spec §14 samples with the training engine; pool actors load the model themselves.
    if uses_pool(config):
        tokenizer, model = load_tokenizer(model_path), None
    else:
        policy = load_policy(model_path, dtype=config.model.dtype, device=config.model.device)
        tokenizer, model = policy.tokenizer, policy.model
    engine = build_engine(config, model_dir=model_path, tokenizer=tokenizer, max_new_tokens=config.eval.max_new_tokens,
                          model=model)
    rows: list[dict[str, object]] = []
    with engine_session(engine), Verifier(timeout_s=config.reward.timeout_s, workers=config.reward.workers) as verifier:
        for spec in config.data.eval:
            name = benchmark_name(spec)
            problems = load_verl_parquet(layout.prepared_eval(name))
            graded = evaluate_problems(problems, spec.k, engine, tokenizer, verifier, config, name,
                                       call_rows=engine_batch_rows(config))
            logger.info("evaluate %s: %d of %d responses correct", name, sum(r["reward"] for r in graded), len(graded))
            rows.extend(graded)
    scores = benchmark_scores(
        SampleResult(str(r["benchmark"]), str(r["problem_id"]), float(r["reward"])) for r in rows
    )
    out = Path(out_dir) if out_dir is not None else layout.eval_dir
    with atomic_path(out, validate=check) as tmp:
        tmp.mkdir()
        write_lineage(tmp, lineage(config, inputs, root))
        pq.write_table(pa.Table.from_pylist(rows), tmp / "samples.parquet")
        (tmp / "metrics.json").write_text(json.dumps(summarise(scores), indent=2))
    return EvaluationResult(scores, out / "metrics.json", out / "samples.parquet")


def evaluate_problems(problems: list[Problem], k: int, engine: RolloutEngine, tokenizer, verifier: Verifier,
                      config: RunConfig, benchmark: str, *, call_rows: int) -> list[dict[str, object]]:
    """Sample and grade ``k`` responses for each problem; one result row per sample.

    Generation calls hold up to ``call_rows`` samples (``engine_batch_rows``: what the engines run at once, so
    no engine waits on a small call) and each is seeded by its index; the progress moves once per call.
    """
    params = SamplingParams(
        temperature=config.eval.temperature, top_p=config.eval.top_p, max_new_tokens=config.eval.max_new_tokens
    )
    requests = [GenerationRequest(tuple(encode_prompt(tokenizer, p.prompt)), n=k) for p in problems]
    size = max(1, call_rows // k)
    completions: list[list[Completion]] = []
    with Progress(logger, f"evaluate {benchmark}", len(requests) * k, "samples") as progress:
        for index, first in enumerate(range(0, len(requests), size)):
            stopping.checkpoint()
            part = requests[first : first + size]
            completions.extend(engine.generate(part, params, seed=derive_seed(config.seed, "eval", benchmark, index)))
            progress.update(len(part) * k)
    texts = [[decode_response(tokenizer, c.token_ids) for c in group] for group in completions]
    rewards = verifier.score_batch([(text, p.answers) for p, group in zip(problems, texts) for text in group])
    rows, position = [], 0
    for problem, group, group_texts in zip(problems, completions, texts, strict=True):
        for sample, (completion, text) in enumerate(zip(group, group_texts, strict=True)):
            rows.append({
                "benchmark": problem.source,
                "problem_id": problem.id,
                "sample": sample,
                "level": problem.level,
                "response": text,
                "reward": rewards[position],
                "finish_reason": completion.finish_reason,
                "response_tokens": len(completion.token_ids),
            })
            position += 1
    return rows
