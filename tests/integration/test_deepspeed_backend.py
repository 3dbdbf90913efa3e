"""The DeepSpeed backend on CPU, ZeRO stages 0–3: starts without JIT-compiling ops, trains like plain AdamW
(tree-packed too), exports the full state dict (gathered under ZeRO-3), resumes exactly, skips non-finite
steps, and runs the reference model as a ZeRO-3 inference engine."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from attnrl.config import resolve_config
from attnrl.errors import CheckpointError
from attnrl.model.loading import load_policy
from attnrl.training.backend import build_backend
from attnrl.training.checkpoint import load_backend_state, save_checkpoint, trainer_state
from attnrl.training.loop import LoopState
from attnrl.training.trainer import PolicyTrainer, TrainSequence
from tests.conftest import tamper

LR = 1e-2
# Gradients agree with plain AdamW's to the last few ulps at every stage (stage 3 sums them through flat
# partitioned buffers, in another order; measured ≤ 1e-7 relative). Weights after one AdamW step agree
# less tightly at stage 3: the first step divides each element by its own magnitude (update ≈
# lr·g/(|g| + ε)), so elements whose true gradient is ~0 (the key biases: softmax ignores them) turn
# that float noise into updates up to ~1e-4·lr apart (measured 1.2e-6 at lr 1e-2). Stages 1–2 match
# stage 0 exactly here; every stage is held to 1e-3 of one step's size.
GRAD_ATOL = 1e-7
UPDATE_ATOL = 1e-3 * LR


def _config(stage: int, *extra: str):
    return resolve_config(preset="tiny", overrides=[
        f"train.lr={LR}", f"train.zero_stage={stage}", "train.mini_batch_sequences=4",
        "train.max_tokens_per_micro_batch=12", "train.gradient_checkpointing=true", "algorithm.kl_coef=0.01", *extra,
    ])


def _trainer(model, tokenizer, config, backend_name="deepspeed"):
    reference = copy.deepcopy(model)  # before ZeRO-3 partitions the model's parameters
    return PolicyTrainer(model, build_backend(backend_name, model, config.train), reference=reference,
                         pad_token_id=tokenizer.pad_token_id, algorithm=config.algorithm, train=config.train,
                         temperature=1.0)


def _sequences(trainer, advantage_scale=1.0):
    base = [
        TrainSequence((5, 6, 7), (8, 9, 10, 14), (-2.0, -1.5, -3.0, -0.5), (1.0, 1.0, -0.5, 0.3)),
        TrainSequence((5, 6), (9, 9), (-2.5, -2.0), (-1.0, -1.0)),
        TrainSequence((7,), (8, 8, 8), (-1.0, -1.0, -1.0), (0.5, 0.0, 0.5)),
        TrainSequence((7, 7), (11,), (-3.0,), (2.0,)),
    ]
    refs = trainer.logprobs([s.prompt_ids for s in base], [s.response_ids for s in base], reference=True)
    return [TrainSequence(s.prompt_ids, s.response_ids, s.old_logprobs,
                          tuple(a * advantage_scale for a in s.advantages), r) for s, r in zip(base, refs)]


def _snapshot(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.policy_state().items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _record_gradients(trainer, full_grad) -> list[dict[str, torch.Tensor]]:
    """Have the backend's optimizer step first record every parameter's accumulated gradient."""
    steps: list[dict[str, torch.Tensor]] = []
    backend, step = trainer.backend, trainer.backend.step

    def recording_step() -> float:
        steps.append({n: full_grad(p).clone() for n, p in trainer.model.named_parameters()})
        return step()

    backend.step = recording_step
    return steps


@pytest.fixture(scope="module")
def plain_adamw(tiny_policy):
    """The same update with plain torch AdamW: weights before and after, its gradients and stats."""
    model, tokenizer = tiny_policy
    trainer = _trainer(copy.deepcopy(model), tokenizer, _config(0), backend_name="torch")
    before = _snapshot(trainer)
    grads = _record_gradients(trainer, lambda p: p.grad)
    stats = trainer.update(_sequences(trainer))
    return before, _snapshot(trainer), grads, stats


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_trains_like_adamw_and_resumes_exactly(tiny_policy, plain_adamw, stage, tmp_path):
    from deepspeed.utils import safe_get_full_grad  # the gradient of a parameter, gathered from its partitions

    model, tokenizer = tiny_policy
    before, after, plain_grads, plain_stats = plain_adamw
    config = _config(stage)
    trainer = _trainer(copy.deepcopy(model), tokenizer, config)
    # The export is the full state dict under its Hugging Face names at every stage (gathered under ZeRO-3).
    assert _max_diff(_snapshot(trainer), before) == 0.0
    sequences = _sequences(trainer)

    grads = _record_gradients(trainer, safe_get_full_grad)
    stats = trainer.update(sequences)
    assert stats["optimizer_steps"] == plain_stats["optimizer_steps"] == len(grads) == 1
    assert _max_diff(grads[0], plain_grads[0]) <= GRAD_ATOL
    assert stats["grad_norm"] == pytest.approx(plain_stats["grad_norm"], rel=1e-6)
    assert _max_diff(_snapshot(trainer), after) <= UPDATE_ATOL
    trainer.backend.step = type(trainer.backend).step.__get__(trainer.backend)

    # save → load into a fresh process-like setup → continue, against continuing without interruption.
    checkpoint = save_checkpoint(tmp_path, step=1, state=trainer_state(trainer.model, trainer.policy_state(), tokenizer,
                                 trainer.backend), loop_state=LoopState(), keep=1)
    trainer.update(sequences)
    uninterrupted = _snapshot(trainer)
    resumed_model = load_policy(checkpoint / "model", dtype="float32").model
    resumed = _trainer(resumed_model, tokenizer, config)
    load_backend_state(checkpoint, resumed.backend)
    resumed.update(sequences)
    assert _max_diff(_snapshot(resumed), uninterrupted) == 0.0

    # A non-finite gradient skips the step (spec §11) and the next finite one still applies.
    held = _snapshot(resumed)
    skipped = resumed.update(_sequences(resumed, advantage_scale=float("nan")))
    assert not math.isfinite(skipped["grad_norm"])
    assert _max_diff(_snapshot(resumed), held) == 0.0
    resumed.update(sequences)
    assert _max_diff(_snapshot(resumed), held) > 0.0


@pytest.mark.parametrize("stage", [0, 3])
def test_tree_packed_updates_equal_per_path_adamw(tiny_policy, plain_adamw, stage):
    # The sequences share prefixes ((5, 6) and 7): with train.tree_packing each shared token runs once, under
    # gradient checkpointing and ZeRO's partitions, and the gradient is still the per-path one.
    from deepspeed.utils import safe_get_full_grad

    model, tokenizer = tiny_policy
    _, _, plain_grads, plain_stats = plain_adamw
    trainer = _trainer(copy.deepcopy(model), tokenizer, _config(stage, "train.tree_packing=true"))
    grads = _record_gradients(trainer, safe_get_full_grad)
    stats = trainer.update(_sequences(trainer))
    assert stats["optimizer_steps"] == len(grads) == 1
    assert _max_diff(grads[0], plain_grads[0]) <= GRAD_ATOL
    for key in ("loss", "pg_loss", "kl", "grad_norm"):
        assert stats[key] == pytest.approx(plain_stats[key], rel=1e-6), key


def test_reference_model_runs_as_an_offloaded_zero3_inference_engine(tiny_policy):
    model, tokenizer = tiny_policy
    prompts, responses = [(5, 6, 7), (7,)], [(8, 9, 10), (8, 8, 8, 8)]
    plain = _trainer(copy.deepcopy(model), tokenizer, _config(0), backend_name="torch")
    offloaded = _trainer(copy.deepcopy(model), tokenizer, _config(3, "train.reference_offload=true"))
    reference = offloaded.reference.lm
    assert all(hasattr(p, "ds_id") for p in reference.parameters())  # partitioned, fetched per layer
    assert offloaded.logprobs(prompts, responses, reference=True) == plain.logprobs(prompts, responses, reference=True)


def test_bf16_config_where_the_device_has_it():
    from infra.deepspeed_backend import deepspeed_config, reference_config

    bf16 = deepspeed_config(_config(2, "train.precision=bf16").train, torch.device("cpu"))
    assert bf16["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert bf16["data_types"] == {"grad_accum_dtype": "fp32"}  # fp32 gradient accumulation
    assert bf16["zero_optimization"] == {"stage": 2}
    # Stage 0 cannot accumulate bf16 gradients in fp32 in DeepSpeed: the trainer's autocast does bf16 there.
    assert "bf16" not in deepspeed_config(_config(0, "train.precision=bf16").train, torch.device("cpu"))
    # 'auto' on a CPU: plain fp32, as the tests run.
    assert "bf16" not in deepspeed_config(_config(2).train, torch.device("cpu"))
    assert reference_config(offload=True, bf16=False)["zero_optimization"]["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_keeps_fp32_master_weights_across_a_resume(tiny_policy, stage, tmp_path):
    # DeepSpeed bf16 runs on CPU too. The exported weights are bf16; a resume that restored only them
    # would continue from rounded weights, so an exact continuation shows the fp32 masters came back.
    model, tokenizer = tiny_policy
    config = _config(stage, "train.precision=bf16")
    trainer = _trainer(copy.deepcopy(model), tokenizer, config)
    sequences = _sequences(trainer)
    trainer.update(sequences)
    assert next(iter(trainer.policy_state().values())).dtype is torch.bfloat16
    checkpoint = save_checkpoint(tmp_path, step=1, state=trainer_state(trainer.model, trainer.policy_state(), tokenizer,
                                 trainer.backend), loop_state=LoopState(), keep=1)
    for _ in range(2):
        trainer.update(sequences)
    resumed = _trainer(load_policy(checkpoint / "model", dtype="float32").model, tokenizer, config)
    load_backend_state(checkpoint, resumed.backend)
    for _ in range(2):
        resumed.update(sequences)
    assert _max_diff(_snapshot(resumed), _snapshot(trainer)) == 0.0
    held = _snapshot(resumed)
    assert not math.isfinite(resumed.update(_sequences(resumed, advantage_scale=float("nan")))["grad_norm"])
    assert _max_diff(_snapshot(resumed), held) == 0.0


def test_a_tampered_zero_partition_is_refused_before_its_payload_runs(tiny_policy, tmp_path):
    # DeepSpeed's own engine would unpickle anything; ours reads its files weights-only (WeightsOnlyLoads).
    model, tokenizer = tiny_policy
    config = _config(2)
    trainer = _trainer(copy.deepcopy(model), tokenizer, config)
    trainer.update(_sequences(trainer))
    checkpoint = save_checkpoint(tmp_path, step=1, state=trainer_state(trainer.model, trainer.policy_state(), tokenizer,
                                 trainer.backend), loop_state=LoopState(), keep=1)
    resumed = _trainer(load_policy(checkpoint / "model", dtype="float32").model, tokenizer, config)
    load_backend_state(checkpoint, resumed.backend)  # untouched, it loads (its DeepSpeed classes allowed)
    (partition,) = (checkpoint / "optimizer").rglob("*optim_states.pt")
    marker = tmp_path / "payload-ran"
    tamper(partition, {}, marker)
    with pytest.raises(CheckpointError, match=f"{partition}: refused.*posix.mkdir"):
        load_backend_state(checkpoint, resumed.backend)
    assert not marker.exists()
