"""Loss math against hand-computed values (see the docstrings of workers.learner.losses)."""

from __future__ import annotations

import math

import pytest
import torch

from workers.learner.losses import (
    grpo_advantages,
    grpo_loss,
    grpo_sequence_losses,
    oapl_advantages,
    oapl_loss,
    oapl_sequence_losses,
    oapl_soft_value,
)


def t(x: list[float] | list[list[float]]) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def test_soft_value_matches_hand_computation() -> None:
    # β₁=1, r=(1,0,−1): V̂ = log((e + 1 + e⁻¹)/3) = log(4.08616/3) = 0.308994
    assert oapl_soft_value(t([1.0, 0.0, -1.0]), 1.0).item() == pytest.approx(0.3089937, abs=1e-6)
    # β₁=0.5, r=(1,0): V̂ = 0.5·log((e² + 1)/2) = 0.5·log(4.19453) = 0.716890
    assert oapl_soft_value(t([1.0, 0.0]), 0.5).item() == pytest.approx(0.7168904, abs=1e-6)


def test_advantages_are_reward_minus_soft_value() -> None:
    adv = oapl_advantages(t([[1.0, 0.0, -1.0]]), 1.0)
    assert adv.tolist()[0] == pytest.approx([0.6910063, -0.3089937, -1.3089937], abs=1e-6)


def test_oapl_loss_matches_hand_computation() -> None:
    # r=(1,0), β₁=0.5 → Â=(0.283110, −0.716890); β₂=0.1,
    # residuals: 0.1·(−2.0+2.5) − 0.283110 = −0.233110 ; 0.1·(−3.0+2.0) + 0.716890 = 0.616890
    # loss = (0.054340 + 0.380553)/2 = 0.217447
    loss = oapl_loss(t([[-2.0, -3.0]]), t([[-2.5, -2.0]]), t([[1.0, 0.0]]), beta1=0.5, beta2=0.1)
    assert loss.item() == pytest.approx(0.2174469, abs=1e-6)


def test_equal_rewards_give_zero_advantage_and_pure_kl_anchor() -> None:
    rewards = t([[1.0, 1.0, 1.0, 1.0]])
    assert oapl_advantages(rewards, 1.0).abs().max().item() == pytest.approx(0.0, abs=1e-12)
    logp = t([[-1.0, -2.0, -3.0, -4.0]])
    ref = t([[-1.5, -2.0, -2.0, -4.0]])
    # Â=0 → loss = mean((β₂Δ)²) = mean((0.5·(0.5, 0, −1, 0))²) = (0.0625 + 0.25)/4 = 0.078125
    loss = oapl_loss(logp, ref, rewards, beta1=1.0, beta2=0.5)
    assert loss.item() == pytest.approx(0.078125, abs=1e-12)
    assert grpo_advantages(rewards).abs().max().item() == 0.0


def test_group_of_one_has_zero_advantage() -> None:
    assert oapl_advantages(t([[0.7]]), 0.3).item() == pytest.approx(0.0, abs=1e-12)
    assert grpo_advantages(t([[0.7]])).item() == 0.0


def test_tiny_beta1_makes_value_the_group_max_without_overflow() -> None:
    v = oapl_soft_value(t([1.0, 0.0, -1.0]), 1e-4)
    assert math.isfinite(v.item())
    # β₁→0: V̂ → max r + β₁·log(1/G)
    assert v.item() == pytest.approx(1.0 + 1e-4 * math.log(1 / 3), abs=1e-9)


def test_huge_beta1_makes_value_the_group_mean() -> None:
    assert oapl_soft_value(t([1.0, 0.0, -1.0, 1.0]), 1e6).item() == pytest.approx(0.25, abs=1e-5)


def test_nonpositive_beta1_is_rejected() -> None:
    with pytest.raises(ValueError, match="beta1"):
        oapl_soft_value(t([1.0]), 0.0)


def test_oapl_gradient_pushes_logp_toward_advantage_over_beta2() -> None:
    # d/dlogp (β₂Δ − Â)² = 2β₂(β₂Δ − Â); at Δ=0 with Â=0.5, β₂=0.1 → −0.1: raises logp.
    logp = t([-1.0]).requires_grad_()
    oapl_sequence_losses(logp, t([-1.0]), t([0.5]), beta2=0.1).sum().backward()
    assert logp.grad is not None
    assert logp.grad.item() == pytest.approx(-0.1, abs=1e-12)


def test_zero_beta2_leaves_no_gradient() -> None:
    logp = t([-1.0, -2.0]).requires_grad_()
    loss = oapl_sequence_losses(logp, t([-1.0, -1.0]), t([0.5, -0.5]), beta2=0.0).mean()
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    assert logp.grad is not None
    assert logp.grad.abs().max().item() == 0.0


def test_grpo_advantages_hand_values() -> None:
    # r=(1,0,0,1): mean .5, population std .5 → (1,−1,−1,1)
    adv = grpo_advantages(t([[1.0, 0.0, 0.0, 1.0]]), eps=0.0)
    assert adv.tolist() == [[1.0, -1.0, -1.0, 1.0]]
    assert grpo_advantages(t([[1.0, 0.0]]), scale=False).tolist() == [[0.5, -0.5]]


def test_grpo_loss_on_policy_is_minus_mean_advantage_weighted_ratio() -> None:
    # on-policy (ratio 1): loss_i = −Â_i, so the batch mean over a group is −mean(Â) = 0
    tok = t([[-1.0, -1.0], [-2.0, -0.5]])
    mask = t([[1.0, 1.0], [1.0, 0.0]])
    loss = grpo_loss(tok, tok, mask, t([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(0.0, abs=1e-9)


def test_grpo_clipping_caps_the_ratio_for_positive_advantage() -> None:
    # one token, ratio = e^{0.5} = 1.6487 > 1.2 → clipped surrogate 1.2·Â, Â=2 → loss −2.4
    per_seq = grpo_sequence_losses(t([[-0.5]]), t([[-1.0]]), t([[1.0]]), t([2.0]), clip_eps=0.2)
    assert per_seq.item() == pytest.approx(-2.4, abs=1e-12)
    # negative advantage: min(ρÂ, clip(ρ)Â) picks the unclipped −3.297 → loss +3.2974
    per_seq = grpo_sequence_losses(t([[-0.5]]), t([[-1.0]]), t([[1.0]]), t([-2.0]), clip_eps=0.2)
    assert per_seq.item() == pytest.approx(2 * math.exp(0.5), abs=1e-12)


def test_grpo_kl_term_is_k3_and_needs_reference() -> None:
    # Â=0, d = ref − logp = −0.5 → k3 = e^{−0.5} + 0.5 − 1 = 0.106531; κ=2 → 0.213061
    per_seq = grpo_sequence_losses(
        t([[-1.0]]), t([[-1.0]]), t([[1.0]]), t([0.0]), kl_coef=2.0, ref_token_logp=t([[-1.5]])
    )
    assert per_seq.item() == pytest.approx(2 * (math.exp(-0.5) - 0.5), abs=1e-12)
    with pytest.raises(ValueError, match="ref_token_logp"):
        grpo_sequence_losses(t([[-1.0]]), t([[-1.0]]), t([[1.0]]), t([0.0]), kl_coef=1.0)
