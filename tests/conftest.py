"""Shared fixtures: the benchmarks folder, a tiny model, small configurations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from attnrl.data.problem import Problem

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = PROJECT_ROOT.parent / "shared" / "benchmarks"


# `make test` runs two pytest-xdist workers with --dist loadfile --no-loadscope-reorder: whole files, handed out
# in collection order to whichever worker is free. Collected longest first, the files balance like the
# longest-processing-time rule, and the two workers finish together instead of one running the longest file
# alone at the end (by default xdist orders files by their number of tests, which puts the long integration
# files, with few tests each, last). The order is what `pytest --durations=0` measured per file, longest
# first; files not listed follow in their usual order.
LONGEST_FIRST = tuple(f"integration/test_{name}.py" for name in (
    "dvc_pipeline", "deployments", "stopping", "real_model_pipeline", "paper_rehearsal", "trainer_group", "flows",
    "readme_commands", "distributed_training", "real_model_engines", "cli", "ray_engine", "vllm_engine",
    "data_gates", "train_resume", "gpu_scale_check", "verifier_benchmarks", "vllm_preflight",
))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    tests = Path(__file__).parent

    def order(item: pytest.Item) -> int:
        inside = item.path.is_relative_to(tests)
        return rank.get(item.path.relative_to(tests).as_posix(), len(rank)) if inside else len(rank)

    items.sort(key=order)  # stable: a file's tests keep their order


def require_benchmarks() -> Path:
    """The real benchmark folder; skipped with a reason when absent, but never under CI."""
    if not BENCHMARKS.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{BENCHMARKS} is missing, and CI must run the real-data tests")
        pytest.skip(f"real benchmark data not found at {BENCHMARKS} (../shared/benchmarks)")
    return BENCHMARKS


def small_tiny_model(extra_vocab_rows: int = 0, *, hidden_size: int = 32, num_heads: int = 4, num_kv_heads: int = 2):
    """A small randomly initialised tiny Qwen2 and its tokenizer; ``extra_vocab_rows`` LM-head rows
    beyond the tokenizer's vocabulary, like Qwen's padded 151,936 rows. (vLLM's CPU attention
    needs a head size of at least 32: hidden_size / num_heads.)"""
    from transformers import Qwen2ForCausalLM

    from attnrl.config.schema import TinyModelConfig
    from attnrl.model.tiny import build_tiny_model
    from attnrl.model.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config = TinyModelConfig(hidden_size=hidden_size, num_layers=2, num_heads=num_heads, num_kv_heads=num_kv_heads,
                             intermediate_size=64)
    model = build_tiny_model(config, tokenizer, seed=0)
    if extra_vocab_rows:
        padded = model.config
        padded.vocab_size = len(tokenizer) + extra_vocab_rows
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(padded)
    return model, tokenizer


class _Payload:
    """Unpickling this calls ``os.mkdir``: what a tampered checkpoint could do with any function."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def tamper(path: Path, state: dict, marker: Path) -> None:
    """Rewrite the torch file ``path`` as ``state`` plus an object whose unpickling creates ``marker``."""
    torch.save({**state, "payload": _Payload(marker)}, path)


@pytest.fixture(scope="session")
def tiny_policy():
    """A small randomly initialised tiny model and its tokenizer (fast to run)."""
    return small_tiny_model()


def not_synthetic_problems() -> list[Problem]:
    """A prepared problem without a level: not the synthetic task, so no reference solution for SFT warmup."""
    return [Problem(id="0", prompt=({"role": "user", "content": "What is 2 + 3?"},), answers=("5",),
                    source="gsm-like", split="train")]


def small_overrides() -> list[str]:
    """Overrides that make the tiny preset run end to end in seconds."""
    return [
        "data.synthetic.levels=[1, 2]",
        "data.synthetic.train_per_level=40",
        "data.synthetic.eval_per_level=6",
        "model.tiny.hidden_size=32",
        "model.tiny.num_layers=2",
        "model.tiny.intermediate_size=64",
        "warmup.steps=5",
        "warmup.batch_size=4",
        "warmup.threads=1",
        "warmup.log_every=5",
        "rollout.progress=false",
        "eval.max_new_tokens=16",
        "train.steps=2",
        "train.mini_batch_sequences=16",
        "algorithm.prompt_batch_size=4",
        "rollout.sampling.n=4",
        "rollout.sampling.max_new_tokens=16",
    ]


def locked_project(root: Path) -> Path:
    """``root`` made a DVC project (so runs take its workspace lock: ``flows/workspace.py``) with the small
    configuration as its params.yaml, its problems prepared and its policy warmed up, by the stage functions."""
    from attnrl.config import dump_config, resolve_config
    from attnrl.stages.prepare import prepare
    from attnrl.stages.warmup import warmup

    config = resolve_config(path=PROJECT_ROOT / "params.yaml", overrides=small_overrides())
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(dump_config(config))
    (root / ".dvc").mkdir()
    (root / "dvc.yaml").write_text("stages: {}\n")
    prepare(config, root)
    warmup(config, root)
    return root
