from __future__ import annotations

import math

import pytest
import torch

from attnrl.config.schema import AlgorithmConfig
from attnrl.loss import (
    LossSettings,
    Normaliser,
    aggregate,
    entropy_from_logits,
    k3_kl,
    k3_kl_per_token,
    policy_objective,
    ppo_clip_loss,
    token_logprobs,
)

CLIP = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)


def _t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _single(ratio: float, advantage: float, **overrides) -> tuple[float, float]:
    """(loss, d loss / d logp) for one token with the given ratio and advantage."""
    logp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    loss, _ = ppo_clip_loss(
        logp, _t([0.0]), _t([advantage]), _t([1.0]), aggregation="token_mean", **{**CLIP, **overrides}
    )
    loss.backward()
    return loss.item(), logp.grad[0, 0].item()


# --- PPO clip-higher + dual clip (spec §11) ------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "advantage", "loss", "grad"),
    [
        # A > 0: clipped above 1 + 0.28 only; below 1 − 0.2 the unclipped term is the max.
        (0.5, 1.0, -0.5, -0.5),
        (1.1, 1.0, -1.1, -1.1),
        (1.5, 1.0, -1.28, 0.0),
        (4.0, 2.0, -2.56, 0.0),  # no dual clip for A > 0
        # A < 0: clipped below 1 − 0.2; above 1 + 0.28 the unclipped term wins until the dual clip at 3.
        (0.5, -1.0, 0.8, 0.0),
        (1.5, -1.0, 1.5, 1.5),
        (2.9, -1.0, 2.9, 2.9),
        (3.5, -1.0, 3.0, 0.0),
        (10.0, -0.5, 1.5, 0.0),
    ],
)
def test_clip_and_dual_clip_by_hand(ratio, advantage, loss, grad):
    got_loss, got_grad = _single(ratio, advantage)
    assert got_loss == pytest.approx(loss, rel=1e-12)
    # d(−A·r)/d logp = −A·r where the unclipped term is active, 0 where a clip is active.
    assert got_grad == pytest.approx(grad, rel=1e-12, abs=1e-15)


def test_dual_clip_value_is_configurable():
    assert _single(3.5, -1.0, dual_clip=5.0)[0] == pytest.approx(3.5)
    assert _single(6.0, -1.0, dual_clip=5.0) == (pytest.approx(5.0), 0.0)


def test_batch_stats_gradients_and_padding():
    ratios = [0.5, 1.1, 1.5, 0.5, 1.5, 4.0, 4.0]
    advs = [1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 2.0]
    logp_values = [math.log(r) for r in ratios] + [float("nan")]  # a padded NaN must not leak
    logp = torch.tensor([logp_values], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 8, dtype=torch.float64)
    adv = _t(advs + [5.0])
    mask = _t([1.0] * 7 + [0.0])

    loss, stats = ppo_clip_loss(logp, old, adv, mask, aggregation="token_mean", **CLIP)
    per_token = [-0.5, -1.1, -1.28, 0.8, 1.5, 3.0, -2.56]
    assert loss.item() == pytest.approx(sum(per_token) / 7, rel=1e-12)
    loss.backward()
    grads = [-0.5, -1.1, 0.0, 0.0, 1.5, 0.0, 0.0]
    assert logp.grad[0, :7].tolist() == pytest.approx([g / 7 for g in grads], abs=1e-15)
    assert float(logp.grad[0, 7]) == 0.0

    assert stats["clip_fraction"] == pytest.approx(3 / 7)  # tokens 2, 3 and 6
    assert stats["dual_clip_fraction"] == pytest.approx(1 / 7)  # token 5 only
    assert stats["ratio_mean"] == pytest.approx(sum(ratios) / 7)
    assert stats["approx_kl"] == pytest.approx(-sum(math.log(r) for r in ratios) / 7)


def test_log_ratio_is_clamped_to_20():
    loss, stats = ppo_clip_loss(_t([50.0]), _t([0.0]), _t([-1.0]), _t([1.0]), aggregation="token_mean", **CLIP)
    assert stats["ratio_mean"] == pytest.approx(math.exp(20.0))
    assert stats["approx_kl"] == pytest.approx(-20.0)
    assert float(loss) == pytest.approx(3.0)  # finite, dual-clipped
    _, stats = ppo_clip_loss(_t([-50.0]), _t([0.0]), _t([1.0]), _t([1.0]), aggregation="token_mean", **CLIP)
    assert stats["ratio_mean"] == pytest.approx(math.exp(-20.0))


def test_clip_arguments_are_validated():
    args = (_t([0.0]), _t([0.0]), _t([1.0]), _t([1.0]))
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_clip_loss(*args, clip_low=0.2, clip_high=0.28, dual_clip=1.0, aggregation="token_mean")
    with pytest.raises(ValueError, match="shape mismatch"):
        ppo_clip_loss(_t([0.0, 0.0]), *args[1:], aggregation="token_mean", **CLIP)


# --- k3 KL (spec §11) ----------------------------------------------------------------------------


def test_k3_is_zero_when_equal_and_positive_otherwise():
    torch.manual_seed(0)
    logp = torch.randn(3, 5, dtype=torch.float64)
    assert torch.equal(k3_kl_per_token(logp, logp.clone()), torch.zeros_like(logp))
    other = logp + torch.randn(3, 5, dtype=torch.float64)
    assert bool((k3_kl_per_token(logp, other) > 0).all())


def test_k3_hand_values_and_clamps():
    logp = _t([0.0, 0.0, 0.0, 0.0])
    ref = _t([1.0, -1.0, 30.0, -50.0])
    got = k3_kl_per_token(logp, ref)[0].tolist()
    # d = 1: e − 2; d = −1: 1/e; d = 30 -> clamp 20 -> e^20 − 21 -> clamp 10; d = −50 -> clamp −20 -> 19 -> 10
    assert got == pytest.approx([math.e - 2, math.exp(-1), 10.0, 10.0], rel=1e-12)
    mask = _t([1.0, 1.0, 0.0, 0.0])
    assert float(k3_kl(logp, ref, mask, "token_mean")) == pytest.approx((math.e - 2 + math.exp(-1)) / 2)


# --- aggregation (spec §11, AMBIG-11) ------------------------------------------------------------


def test_aggregation_modes_by_hand():
    values = _t([1.0, 2.0, 3.0, float("nan")], [10.0, 0.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0])
    mask = _t([1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    assert float(aggregate(values, mask, "token_mean")) == pytest.approx(16 / 4)
    # per-sequence means 2 and 10; the all-padding row is left out
    assert float(aggregate(values, mask, "seq_mean_token_mean")) == pytest.approx(6.0)
    assert float(aggregate(values, mask.bool(), "token_mean")) == pytest.approx(4.0)


def test_aggregation_empty_mask_and_unknown_mode():
    values = torch.ones(2, 3, requires_grad=True)
    for mode in ("token_mean", "seq_mean_token_mean"):
        out = aggregate(values, torch.zeros(2, 3), mode)
        assert out.item() == 0.0
        out.backward()
    assert torch.equal(values.grad, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="unknown loss aggregation 'sum'; known: token_mean, seq_mean_token_mean"):
        aggregate(values, torch.ones(2, 3), "sum")


# --- entropy and log-probs -----------------------------------------------------------------------


def test_entropy_of_uniform_is_log_vocab():
    for vocab in (2, 17, 1000):
        entropy = entropy_from_logits(torch.zeros(2, 3, vocab))
        assert entropy.shape == (2, 3)
        assert torch.allclose(entropy, torch.full((2, 3), math.log(vocab)), atol=1e-5)


def test_entropy_matches_categorical_and_is_stable():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 50, dtype=torch.float64) * 3
    want = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.allclose(entropy_from_logits(logits), want, atol=1e-12)
    assert torch.allclose(entropy_from_logits(logits + 1e4), want, atol=1e-9)  # shift-invariant, no overflow


def test_entropy_with_banned_tokens_has_finite_value_and_gradient():
    logits = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]], requires_grad=True)
    entropy = entropy_from_logits(logits)
    assert entropy.item() == pytest.approx(math.log(2))
    entropy.sum().backward()
    assert bool(torch.isfinite(logits.grad).all())


def test_entropy_upcasts_half_precision():
    assert entropy_from_logits(torch.zeros(3, 8, dtype=torch.bfloat16)).dtype == torch.float32


def test_token_logprobs_match_log_softmax():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 5))
    want = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, targets), want, atol=1e-12)
    with pytest.raises(ValueError, match="do not match targets"):
        token_logprobs(logits, targets[:, :3])


# --- the full objective --------------------------------------------------------------------------


def test_policy_objective_combines_terms():
    torch.manual_seed(2)
    logp = torch.randn(2, 4, dtype=torch.float64) * 0.1 - 1
    old = logp + torch.randn(2, 4, dtype=torch.float64) * 0.1
    ref = logp + torch.randn(2, 4, dtype=torch.float64) * 0.3
    adv = torch.randn(2, 4, dtype=torch.float64)
    mask = _t([1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0])
    entropy = torch.rand(2, 4, dtype=torch.float64)
    settings = LossSettings(kl_coef=0.5, entropy_coef=0.1, loss_aggregation="seq_mean_token_mean")

    total, stats = policy_objective(logp, old, ref, adv, mask, entropy, settings)
    pg, _ = ppo_clip_loss(logp, old, adv, mask, aggregation="seq_mean_token_mean", **CLIP)
    kl = k3_kl(logp, ref, mask, "seq_mean_token_mean")
    ent = aggregate(entropy, mask, "seq_mean_token_mean")
    assert float(total) == pytest.approx(float(pg - 0.1 * ent + 0.5 * kl), rel=1e-12)
    assert stats["pg_loss"] == pytest.approx(float(pg))
    assert stats["kl"] == pytest.approx(float(kl))
    assert stats["entropy"] == pytest.approx(float(ent))
    assert stats["loss"] == pytest.approx(float(total))
    assert {"clip_fraction", "dual_clip_fraction", "approx_kl", "ratio_mean"} <= set(stats)


def test_policy_objective_accepts_algorithm_config_and_checks_inputs():
    config = AlgorithmConfig()
    # The standalone defaults are the schema defaults (spec §12).
    for name in ("clip_low", "clip_high", "dual_clip", "kl_coef", "entropy_coef", "loss_aggregation"):
        assert getattr(LossSettings(), name) == getattr(config, name)
    logp = _t([-1.0, -2.0])
    total, stats = policy_objective(logp, logp, logp, _t([1.0, -1.0]), _t([1.0, 1.0]), None, config)
    assert float(total) == pytest.approx(0.0)  # ratio 1, advantages cancel, KL 0
    assert stats["kl"] == 0.0 and "entropy" not in stats
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_objective(logp, logp, None, logp, _t([1.0, 1.0]), None, config)
    with pytest.raises(ValueError, match="needs entropy"):
        policy_objective(logp, logp, logp, logp, _t([1.0, 1.0]), None, LossSettings(entropy_coef=0.1))
    no_kl = LossSettings(kl_coef=0.0)
    total, stats = policy_objective(logp, logp, None, _t([1.0, 1.0]), _t([1.0, 1.0]), None, no_kl)
    assert float(total) == pytest.approx(-1.0) and "kl" not in stats


# --- exact mini-batch aggregation over micro-batches (spec §11, AMBIG-11) ------------------------


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_micro_batch_shares_add_up_to_the_mini_batch_loss_and_gradient(mode):
    torch.manual_seed(0)
    lengths = [5, 1, 3, 4]  # valid response tokens per sequence, right-aligned in width 5
    mask = torch.stack([torch.arange(5) >= 5 - n for n in lengths]).to(torch.float64)
    logp = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    old, adv, ref = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5)
    settings = LossSettings(loss_aggregation=mode, kl_coef=0.1, entropy_coef=0.01)
    # Entropy: any per-token function of logp will do (a fresh graph for every call).
    whole, whole_stats = policy_objective(logp, old, ref.double(), adv, mask, logp.exp(), settings)
    (grad_whole,) = torch.autograd.grad(whole, logp)

    normaliser = Normaliser.of(lengths)
    assert normaliser == Normaliser(tokens=13.0, sequences=4.0)
    parts, stats = [], {}
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):  # uneven micro-batches, as a token budget makes them
        part, part_stats = policy_objective(logp[rows], old[rows], ref.double()[rows], adv[rows], mask[rows],
                                            logp[rows].exp(), settings, normaliser)
        parts.append(part)
        for key, value in part_stats.items():
            stats[key] = stats.get(key, 0.0) + value
    (grad_parts,) = torch.autograd.grad(sum(parts), logp)
    assert sum(parts).item() == pytest.approx(whole.item(), abs=1e-12)
    torch.testing.assert_close(grad_parts, grad_whole, atol=1e-12, rtol=0)
    for key, value in whole_stats.items():
        assert stats[key] == pytest.approx(value, abs=1e-6), key
    # Without the normaliser each micro-batch is its own mean, and the pieces no longer add up.
    local = sum(policy_objective(logp[r], old[r], ref.double()[r], adv[r], mask[r], logp[r].exp(), settings)[0]
                for r in (slice(0, 1), slice(1, 3), slice(3, 4)))
    assert abs(local.item() - whole.item()) > 1e-3


def test_normaliser_counts_tokens_and_non_empty_sequences():
    assert Normaliser.of([3, 0, 2]) == Normaliser(tokens=5.0, sequences=2.0)
    with pytest.raises(ValueError, match="lengths"):
        Normaliser.of([-1])
