"""The TrainerGroup on CPU: 2 gloo ranks as Ray actors train like the single-process trainer at ZeRO 0, 2
and 3 (the batch split over the ranks by tokens, lockstep micro-batches, spec §11 padding; tree-packed at
0 and 3) and score like it. A rank that dies mid-run: tests/integration/test_distributed_training.py."""

from __future__ import annotations

import os
import time

import pytest
import ray
import torch

from attnrl.config import resolve_config
from attnrl.model.loading import load_policy, load_tokenizer, save_policy
from attnrl.rollout.fingerprint import fingerprint, mismatches
from attnrl.steps import SeparatorVocab, segment_response
from attnrl.training.backend import build_backend
from attnrl.training.sharding import pad_to_world
from attnrl.training.trainer import PolicyTrainer, TrainSequence
from infra.engine_specs import build_pool
from infra.placement import place
from infra.trainer_group import TrainerGroup, TrainerRank, TrainerRankFailed

LR = 1e-2
# The single process and the group sum the same per-token terms in other orders (micro-batches split
# differently, gloo's all-reduce, ZeRO-3's flat partitions): gradients agree to float noise, which the
# pre-clip gradient norms show (rel 1e-5; they scale with the loss, so a normalisation error shows there).
# AdamW divides each element by its own running magnitude (+ eps 1e-8), so an element whose true gradient
# is ~0 turns that noise into an update of up to ~1e-2·lr, and which element does depends on the CPU's
# kernels: element-wise bounds are flaky across machines. Whole tensors are not: the difference of the
# two runs' updates, relative to the update's size, is at most 2e-4 in any tensor after the two steps
# here (measured at ZeRO-0). A lost or doubled shard changes the gradient of every tensor by O(10 %).
UPDATE_RTOL = 1e-3
SCORE_ATOL = 1e-5  # forwards of the same weights over other micro-batch layouts


def _config(stage: int, *extra: str):
    return resolve_config(preset="tiny", overrides=[
        "distributed.enabled=true", "distributed.trainer_ranks=2", "rollout.ray.num_actors=1",
        "train.backend=deepspeed", f"train.zero_stage={stage}", f"train.lr={LR}", "train.mini_batch_sequences=4",
        # Micro-batches of 12 tokens and head chunks of 2: the ranks' shares need different numbers of
        # forwards and of LM-head calls, which ZeRO-3 (the reference model's engine at every stage) gathers in.
        "train.max_tokens_per_micro_batch=12", "train.logits_chunk_tokens=2", "algorithm.kl_coef=0.01", *extra,
    ])


BASE = [
    TrainSequence((5, 6, 7), (8, 9, 10, 14), (-2.0, -1.5, -3.0, -0.5), (1.0, 1.0, -0.5, 0.3)),
    TrainSequence((5, 6), (9, 9), (-2.5, -2.0), (-1.0, -1.0)),
    TrainSequence((7,), (8, 8, 8), (-1.0, -1.0, -1.0), (0.5, 0.0, 0.5)),
    # A continuation of the first path after 2 tokens (two of its own, so a hidden state past the branch
    # predicts one): its shared tokens carry other old log-probs.
    TrainSequence((5, 6, 7), (8, 9, 11, 12), (-2.2, -1.1, -3.0, -1.0), (2.0, 2.0, 1.0, 1.0)),
    TrainSequence((6, 5, 7, 7), (9, 8, 10), (-1.2, -0.7, -2.2), (-0.4, 0.8, 0.8)),
]


@pytest.fixture(scope="module")
def cluster():
    # Both bundle kinds of a split layout (2 ranks + 1 engine) must fit; actors do not need real cores.
    ray.init(num_cpus=4, object_store_memory=128 * 2**20, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def policy_dir(tiny_policy, tmp_path_factory):
    model, tokenizer = tiny_policy
    return save_policy(model, tokenizer, tmp_path_factory.mktemp("policy") / "init")


@pytest.fixture(scope="module")
def single(policy_dir):
    """The single-process trainer (plain AdamW) through the same two updates: 4 sequences, then 5 (which the
    group pads to 6 with a zero-advantage copy of the last, so the single process trains on that copy too)."""
    config = _config(0, "train.backend=torch", "distributed.enabled=false")
    policy = load_policy(policy_dir, dtype="float32")
    reference = load_policy(policy_dir, dtype="float32").model
    trainer = PolicyTrainer(policy.model, build_backend("torch", policy.model, config.train), reference=reference,
                            pad_token_id=policy.tokenizer.pad_token_id, algorithm=config.algorithm,
                            train=config.train, temperature=1.0)
    start = {k: v.clone() for k, v in trainer.policy_state().items()}
    refs = trainer.logprobs([s.prompt_ids for s in BASE], [s.response_ids for s in BASE], reference=True)
    sequences = [TrainSequence(s.prompt_ids, s.response_ids, s.old_logprobs, s.advantages, r) for s, r in zip(BASE, refs)]
    vocab = SeparatorVocab.from_tokenizer(policy.tokenizer)
    segmentations = [segment_response(s.response_ids, len(s.prompt_ids), vocab) for s in sequences]
    scores = trainer.score([s.prompt_ids for s in sequences], [s.response_ids for s in sequences], segmentations)
    first = trainer.update(sequences[:4])
    after_first = {k: v.clone() for k, v in trainer.policy_state().items()}
    padded = pad_to_world(sequences, 2)
    assert len(padded) == 6 and padded[-1].advantages == (0.0, 0.0, 0.0)
    second = trainer.update(padded)
    return {"sequences": sequences, "segmentations": segmentations, "scores": scores, "refs": refs,
            "stats": (first, second), "weights": (start, after_first, trainer.policy_state())}


def _update_gap(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """The largest, over tensors, of |mine − theirs| / |theirs − start| (L2): how far two updates from
    ``start`` disagree, relative to the update."""
    assert mine.keys() == theirs.keys() == start.keys()
    return max(float((mine[k].float() - theirs[k].float()).norm() / (theirs[k].float() - start[k].float()).norm())
               for k in mine)


def _weights(group: TrainerGroup, directory) -> dict[str, torch.Tensor]:
    return load_policy(group.save_final(directory), dtype="float32").model.state_dict()


# ZeRO 0 and 3 tree-packed (train.tree_packing: each rank packs its share's prefix trees; a prompt's
# sequences stay on one rank), ZeRO 2 per path; the single process trains per path.
@pytest.mark.parametrize("stage, tree", [(0, True), (2, False), (3, True)], ids=["0-tree", "2", "3-tree"])
def test_two_ranks_train_like_one_process(cluster, policy_dir, single, stage, tree, tmp_path):
    config = _config(stage, f"train.tree_packing={str(tree).lower()}")
    placement = place(config)
    group = TrainerGroup(config, placement, model_dir=policy_dir, resume=None)
    try:
        assert [r["rank"] for r in group.ranks] == [0, 1] and {r["backend"] for r in group.ranks} == {"gloo"}
        assert len({r["pid"] for r in group.ranks}) == 2 and os.getpid() not in {r["pid"] for r in group.ranks}
        sequences = single["sequences"]
        prompts, responses = [s.prompt_ids for s in sequences], [s.response_ids for s in sequences]
        # Scoring is split over the ranks (ZeRO-3: every forward gathers the layers in lockstep).
        scores = group.score(prompts, responses, single["segmentations"])
        for mine, theirs in zip(scores, single["scores"], strict=True):
            assert mine.logprobs == pytest.approx(theirs.logprobs, abs=SCORE_ATOL)
            assert mine.entropies == pytest.approx(theirs.entropies, abs=SCORE_ATOL)
            assert mine.fci == pytest.approx(theirs.fci, abs=SCORE_ATOL)
        refs = group.logprobs(prompts, responses, reference=True)
        assert [r for ref in refs for r in ref] == pytest.approx([r for ref in single["refs"] for r in ref], abs=SCORE_ATOL)

        first = group.update(sequences[:4])
        assert first["optimizer_steps"] == single["stats"][0]["optimizer_steps"] == 1
        assert first["grad_norm"] == pytest.approx(single["stats"][0]["grad_norm"], rel=1e-5)
        start, after_first, after_second = single["weights"]
        assert _update_gap(_weights(group, tmp_path / "first"), after_first, start) <= UPDATE_RTOL
        # 5 sequences: padded to 6 with a zero-advantage copy, mini-batches of 4 and 2 split over the ranks.
        second = group.update(sequences)
        assert second["optimizer_steps"] == 2
        for key in ("grad_norm", "kl", "pg_loss"):
            assert second[key] == pytest.approx(single["stats"][1][key], rel=1e-5), key
        assert _update_gap(_weights(group, tmp_path / "second"), after_second, start) <= UPDATE_RTOL
    finally:
        group.close()
        placement.remove()



def test_ranks_that_stop_answering_fail_the_call_at_the_timeout_naming_them(cluster, policy_dir, single):
    class Rank1Hangs(TrainerRank):  # rank 1 never finishes an update; rank 0 then waits in the all-reduce
        def update(self, batches):
            if self.rank == 1:
                time.sleep(600)
            return super().update(batches)

    class Group(TrainerGroup):
        rank_class = Rank1Hangs

    config = _config(0, "distributed.call_timeout_s=10", "algorithm.kl_coef=0")
    placement = place(config)
    group = Group(config, placement, model_dir=policy_dir, resume=None)
    try:
        # Without a KL term the ranks hold no reference model: the group says so before asking any rank.
        prompts, responses = [s.prompt_ids for s in BASE], [s.response_ids for s in BASE]
        with pytest.raises(ValueError, match="no reference model: algorithm.kl_coef is 0") as refused:
            group.logprobs(prompts, responses, reference=True)
        assert refused.type is ValueError
        started = time.monotonic()
        with pytest.raises(TrainerRankFailed, match=r"trainer rank\(s\) 0, 1 of 2 did not answer during update "
                                                   r"within 10 s \(distributed.call_timeout_s\)"):
            group.update(single["sequences"][:4])
        assert time.monotonic() - started < 300  # bounded by the call timeout, not by the 600 s hang
        assert not group.actors  # the group was stopped
    finally:
        group.close()
        placement.remove()


@pytest.mark.parametrize(("overrides", "field"), [
    (["distributed.num_gpus_per_rank=1"], "distributed.num_gpus_per_rank: 1 asks for GPUs"),
    (["distributed.python=/nonexistent/python"], "distributed.python: /nonexistent/python does not exist"),
])
def test_layouts_this_machine_cannot_run_are_refused_naming_the_field(overrides, field):
    """What needs the machine; what does not fails when the configuration resolves (tests/unit/config/test_layout.py)."""
    from attnrl.errors import ConfigError
    from infra.distributed import preflight

    if torch.cuda.is_available() and "num_gpus_per_rank=1" in overrides[0]:
        pytest.skip("this machine has CUDA: GPU ranks are allowed")
    preflight(_config(0))  # the test layout itself is fine
    with pytest.raises(ConfigError, match=field.replace("(", r"\(")):
        preflight(_config(0, *overrides))


class StreamingRank(TrainerRank):
    """Reads the weight stream that vLLM's native transfer sends (every rank iterates it: each gather is a collective)."""

    def stream(self, dtype: str) -> dict:
        stream = self.trainer.backend.weight_stream(getattr(torch, dtype))
        return {"meta": [(m.name, m.dtype, m.shape) for m in stream.metadata()],
                "tensors": [(name, tensor.cpu()) for name, tensor in stream],
                "held": {name: tuple(p.shape) for name, p in self.trainer.model.named_parameters()}}

    def export(self) -> dict:
        return self.trainer.policy_state()


class StreamingGroup(TrainerGroup):
    rank_class = StreamingRank


def test_zero3_ranks_stream_full_tensors_equal_to_the_zero0_export_and_the_engine_holds_them(cluster, policy_dir,
                                                                                            single):
    def started(stage):
        config = _config(stage)
        placement = place(config)
        return config, placement, StreamingGroup(config, placement, model_dir=policy_dir, resume=None)

    config, placement, group = started(0)
    try:
        zero0 = ray.get(group.actors[0].export.remote())
    finally:
        group.close()
        placement.remove()
    config, placement, group = started(3)
    pool = None
    try:
        streams = ray.get([a.stream.remote("float32") for a in group.actors])
        for stream in streams:
            assert all(shape == (0,) for shape in stream["held"].values())  # each rank holds only partitions
            assert [(name, torch.float32, tuple(t.shape)) for name, t in stream["tensors"]] == stream["meta"]
            for name, tensor in stream["tensors"]:
                assert tensor.shape == zero0[name].shape and torch.equal(tensor, zero0[name]), name
        # Every parameter is streamed (a tied head under the embedding's name only).
        assert {name for name, _ in streams[0]["tensors"]} == {
            name for name, _ in load_policy(policy_dir).model.named_parameters()}

        # After an update, the engine holds what the stream sends, by its fingerprint.
        group.update(single["sequences"][:4])
        pool = build_pool(config, model_dir=policy_dir, tokenizer=load_tokenizer(policy_dir), max_new_tokens=8,
                          state_dict=None, placement=placement.engine_options)
        before = pool.weights_fingerprints()[0]
        group.push_weights(pool)
        [after] = pool.weights_fingerprints()
        sent = fingerprint(ray.get([a.stream.remote("float32") for a in group.actors])[0]["tensors"],
                           packed=pool.packed)
        assert mismatches(sent, after) == [] and set(after) == set(sent)
        assert mismatches(sent, before)  # the update changed the weights, and the sync carried them
    finally:
        if pool is not None:
            pool.close()
        group.close()
        placement.remove()
