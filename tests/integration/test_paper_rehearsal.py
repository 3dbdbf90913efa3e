"""A dress rehearsal of the paper's preset (``r1-distill-1.5b``) on CPU: the preset as it resolves, with the
small delta ``rehearsal_overrides`` below, through the pipeline's stage flows (all but the evaluation before
training). What stays the paper's: the R1-Distill tokenizer and chat template (every id as published), the
151,936-row LM head over its 151,665 tokens, the six benchmarks' files where ../shared/benchmarks has them
with their K, the colocated layout (a DeepSpeed ZeRO-3 rank beside a vLLM engine per bundle), the algorithm
and the trainer settings. The model is the ``r1-distill-qwen-small`` fixture (`make fixtures`): that
tokenizer on a 2-layer body with random weights."""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest

from attnrl.config import dump_config, resolve_config
from attnrl.model.loading import load_tokenizer
from attnrl.reward.verifier import Verifier
from attnrl.rollout import encode_prompt
from attnrl.steps import SeparatorVocab, segment_response
from flows.stages import difficulty_flow, evaluate_flow, prepare_flow, report_flow, train_flow, warmup_flow
from scripts.fixtures import R1_SMALL, fixture_dir
from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.integration

SHARED = PROJECT_ROOT.parent / "shared" / "benchmarks"
MAX_NEW_TOKENS = 48
# DeepSeek-R1-Distill-Qwen-1.5B's tokenizer as published (tokenizer.json, tokenizer_config.json).
PUBLISHED_IDS = {"<｜end▁of▁sentence｜>": 151_643, "<｜User｜>": 151_644, "<｜Assistant｜>": 151_645,
                 "<｜begin▁of▁sentence｜>": 151_646, "<think>": 151_648, "</think>": 151_649, ".\n\n": 382, "\n": 198}
R1_RESPONSE = ("Okay, so I need to find 2+3.\n\nFirst, 2+3 is 5.\n\nWait, let me check: 5-3=2. Yes.\n</think>\n\n"
               "The sum is \\boxed{5}.")


def _benchmarks() -> list[str]:
    """The preset's benchmarks whose files are in ../shared/benchmarks, at their K, one problem each."""
    specs = resolve_config(preset="r1-distill-1.5b").data.eval
    present = [spec for spec in specs if (SHARED / "eval" / spec.path.split("/")[-1]).is_file()]
    assert {spec.name for spec in present} >= {"aime24", "amc23", "math500", "minerva"}
    return [f"{{kind: verl_parquet, path: {SHARED / 'eval' / spec.path.split('/')[-1]}, name: {spec.name}, "
            f"k: {spec.k}, limit: 1}}" for spec in present]


def rehearsal_overrides() -> list[str]:
    """The delta over ``r1-distill-1.5b``, each entry scaled from the preset for 2 CPU cores."""
    vllm_python = PROJECT_ROOT / ".venv-vllm" / "bin" / "python"
    return [
        f"model.path={fixture_dir(R1_SMALL)}", "model.device=cpu",
        f"data.train=[{{kind: verl_parquet, path: {SHARED / 'train' / 'dapo+math_train.parquet'}, name: dapo-math, "
        "limit: 64}]",
        f"data.eval=[{', '.join(_benchmarks())}]",
        # Lengths: 8,192-token responses and 512-token branching rules become 48 and 8 tokens.
        f"rollout.sampling.max_new_tokens={MAX_NEW_TOKENS}", f"eval.max_new_tokens={MAX_NEW_TOKENS}",
        "algorithm.min_branch_position=8", "algorithm.min_branch_spacing=4",
        "algorithm.prompt_batch_size=1", "train.steps=2",
        # Random weights never earn a reward, so every question would be filtered out (spec §7.6) and the run
        # would stop as stalled: here the all-wrong questions are trained on (zero advantages, the KL term).
        "algorithm.zero_advantage_filter=false",
        # The layout, 8 GPUs scaled to 2 CPU bundles: a rank and an engine in each, in the driver and vLLM CPU
        # environments; vLLM's CUDA IPC transfer becomes the object store (the engines cannot sleep on CPU).
        "distributed.trainer_ranks=2", "distributed.num_gpus_per_rank=0", "distributed.num_cpus_per_rank=1",
        "distributed.python=null",
        "rollout.ray.num_actors=2", "rollout.ray.num_gpus_per_actor=0", "rollout.ray.num_cpus_per_actor=1",
        "rollout.ray.object_store_mb=512",
        f"rollout.vllm.python={vllm_python}", "rollout.vllm.weight_sync=object_store", "rollout.vllm.kv_cache_gib=0.25",
        "rollout.vllm.block_size=32",
        "reward.workers=2", "report.trace_problems=0",
    ]


def test_the_tokenizer_is_the_published_r1_distill_one():
    tokenizer = load_tokenizer(fixture_dir(R1_SMALL))
    for text, token_id in PUBLISHED_IDS.items():
        assert tokenizer.encode(text, add_special_tokens=False) == [token_id], text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (151_646, 151_643, 151_643)
    assert len(tokenizer) == 151_665  # the 151,936-row head's last 271 rows are out of the vocabulary
    problem = "What is $2+3$? Let's think step by step and output the final answer within \\boxed{}."
    ids = encode_prompt(tokenizer, [{"role": "user", "content": problem}])
    # The paper's prompt (spec §2.4): one bos, the user turn, the assistant turn opened inside <think>.
    assert tokenizer.decode(ids) == f"<｜begin▁of▁sentence｜><｜User｜>{problem}<｜Assistant｜><think>\n"
    assert ids[0] == 151_646 and ids.count(151_646) == 1 and ids[-3:] == [151_645, 151_648, 198]


def test_a_real_r1_response_splits_into_steps_at_its_separator_tokens():
    tokenizer = load_tokenizer(fixture_dir(R1_SMALL))
    response = tokenizer.encode(R1_RESPONSE, add_special_tokens=False) + [tokenizer.eos_token_id]
    vocab = SeparatorVocab.from_tokenizer(tokenizer)
    assert vocab.think_end_id == 151_649 and 382 in vocab.double
    seg = segment_response(response, 10, vocab)
    steps = [tokenizer.decode(response[a:b]) for a, b in zip(seg.response_step_offsets, seg.response_step_ends)]
    assert steps == ["Okay, so I need to find 2+3.\n\n", "First, 2+3 is 5.\n\n",
                     "Wait, let me check: 5-3=2. Yes.\n</think>\n\n", "The sum is \\boxed{5}.<｜end▁of▁sentence｜>"]
    assert seg.think_step == 3  # the range holding </think> (range 0 is the prompt)
    with Verifier(timeout_s=5, workers=1) as verifier:  # graded on the text after the last </think> (spec §8)
        text = tokenizer.decode(response, skip_special_tokens=True)
        assert verifier.score(text, ["5"]) == 1.0
        assert verifier.score("so \\boxed{4}.\n</think>\n\nThe sum is \\boxed{5}.", ["5"]) == 1.0
        assert verifier.score("so \\boxed{5}.\n</think>\n\nThe sum is \\boxed{4}.", ["5"]) == 0.0


def test_the_papers_preset_rehearses_end_to_end_on_cpu(prefect_api, tmp_path):
    config_path = tmp_path / "params.yaml"
    config_path.write_text(dump_config(resolve_config(preset="r1-distill-1.5b")))
    overrides = rehearsal_overrides()
    resolved = resolve_config(path=config_path, overrides=overrides)
    assert (resolved.distributed.placement, resolved.train.zero_stage, resolved.algorithm.method) == ("colocated", 3,
                                                                                                    "attnrl")
    # The stages in the pipeline's order, each its own flow, without the evaluation before training (the test's
    # budget: it would start two more engines for random weights' zero accuracy).
    for stage in (prepare_flow, warmup_flow, difficulty_flow, train_flow, evaluate_flow, report_flow):
        started = time.perf_counter()
        stage(config_path=str(config_path), overrides=overrides, root=str(tmp_path))
        print(f"rehearsal: {stage.name} took {time.perf_counter() - started:.1f}s")

    runs = tmp_path / "runs"
    steps = [json.loads(line) for line in (runs / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [int(s["step"]) for s in steps] == [1, 2] and all(s["engines_replaced"] == 0 for s in steps)
    samples = pq.read_table(runs / "eval" / "samples.parquet").to_pylist()
    assert {s["benchmark"] for s in samples} >= {"aime24", "amc23", "math500", "minerva"}
    assert all(0 < s["response_tokens"] <= MAX_NEW_TOKENS or s["finish_reason"] == "oov" for s in samples)
    # A random head samples its 271 padded rows now and then: each such response was cut before the id.
    assert any(s["finish_reason"] == "oov" for s in samples)
    scores = {b["benchmark"]: b["k"] for b in json.loads((runs / "eval" / "metrics.json").read_text())["benchmarks"]}
    assert scores["aime24"] == 32 and scores["math500"] == 4
    assert (tmp_path / "reports" / "report.html").is_file()
