from __future__ import annotations

import torch

from attnrl.rollout.fingerprint import checksum, engine_name, fingerprint, mismatches

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _checkpoint(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 4, generator=g),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(2, 4, generator=g),
        "model.layers.0.self_attn.v_proj.weight": torch.randn(2, 4, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(4, 6, generator=g),
        "model.embed_tokens.weight": torch.randn(5, 4, generator=g),
    }


def _as_engine(state):
    """What a vLLM engine holds: fused q/k/v, a zero-padded vocabulary, a repacked (empty) down_proj."""
    fused = torch.cat([state[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    padded = torch.cat([state["model.embed_tokens.weight"], torch.zeros(3, 4)])
    return [("model.layers.0.self_attn.qkv_proj.weight", fused), ("model.layers.0.mlp.down_proj.weight", torch.empty(0)),
            ("model.embed_tokens.weight", padded)]


def test_names_map_to_the_fused_tensor():
    assert engine_name("model.layers.3.mlp.up_proj.weight", PACKED) == "model.layers.3.mlp.gate_up_proj.weight"
    assert engine_name("model.norm.weight", PACKED) == "model.norm.weight"


def test_a_faithful_engine_matches_the_trainer_despite_fusing_and_padding():
    state = _checkpoint()
    assert mismatches(fingerprint(state.items(), packed=PACKED), fingerprint(_as_engine(state))) == []


def test_an_engine_that_kept_old_weights_is_caught_and_named():
    new = _checkpoint()
    old = {k: v.clone() for k, v in new.items()}
    new["model.layers.0.self_attn.k_proj.weight"][0, 0] += 1e-3  # one small change, in one shard
    bad = mismatches(fingerprint(new.items(), packed=PACKED), fingerprint(_as_engine(old)))
    assert len(bad) == 1 and bad[0].startswith("model.layers.0.self_attn.qkv_proj.weight")


def test_a_bf16_engine_is_compared_after_the_same_cast():
    state = _checkpoint()
    engine = [(n, t.to(torch.bfloat16)) for n, t in _as_engine(state)]
    assert mismatches(fingerprint(state.items(), packed=PACKED, dtype=torch.bfloat16), fingerprint(engine)) == []
    assert mismatches(fingerprint(state.items(), packed=PACKED), fingerprint(engine)) != []


def test_tied_tensors_count_once_and_unknown_engine_tensors_fail():
    shared = torch.ones(2, 2)
    assert fingerprint([("a.weight", shared), ("b.weight", shared)]) == {"a.weight": checksum(shared)}
    assert mismatches({}, {"x": (1, 1.0, 1.0)}) == ["x: not among the trainer's weights"]
