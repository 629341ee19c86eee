"""Policy losses: OAPL and the matched GRPO baseline, as small pure functions on tensors.

Conventions: a *group* is the G completions of one prompt. Sequence log-probs are sums over the
completion tokens only (no length normalisation). Advantages depend on rewards alone, so they are
computed once per group (``oapl_advantages`` / ``grpo_advantages``) and the per-sequence losses can
then be evaluated on any micro-batch of sequences; the trainer sums them and divides by the total
number of sequences, which equals the mean over the full batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def oapl_soft_value(rewards: Tensor, beta1: float) -> Tensor:
    """Soft value of a group: V̂(x) = β₁ · log( (1/G) Σ_i exp(r_i / β₁) ).

    ``rewards``: (..., G) → (...). Computed with logsumexp, so tiny β₁ (→ max_i r_i) and huge β₁
    (→ mean_i r_i) stay finite. Uses every reward of the group, including each sample's own, as in
    the paper and the authors' code.
    """
    if beta1 <= 0:
        raise ValueError(f"beta1 must be > 0, got {beta1}")
    g = rewards.shape[-1]
    return beta1 * (torch.logsumexp(rewards / beta1, dim=-1) - math.log(g))


def oapl_advantages(rewards: Tensor, beta1: float) -> Tensor:
    """Optimal-advantage estimate Â_i = r_i − V̂(x); ``rewards`` (..., G) → (..., G)."""
    return rewards - oapl_soft_value(rewards, beta1).unsqueeze(-1)


def oapl_sequence_losses(
    logp: Tensor, ref_logp: Tensor, advantages: Tensor, beta2: float
) -> Tensor:
    """Per-sequence OAPL residual²: ( β₂ · [log πθ(y|x) − log π_ref(y|x)] − Â )².

    All inputs (N,) sequence-level: ``logp`` carries the gradient, ``ref_logp`` is the lagged
    reference (the sampler's behaviour log-prob sum by default), ``advantages`` from
    ``oapl_advantages``. No importance weights, no clipping.
    """
    return (beta2 * (logp - ref_logp.detach()) - advantages.detach()) ** 2


def oapl_loss(
    logp: Tensor, ref_logp: Tensor, rewards: Tensor, beta1: float, beta2: float
) -> Tensor:
    """OAPL loss for a batch of whole groups, all (B, G):

    V̂(x)  = β₁ · log( (1/G) Σ_i exp(r_i / β₁) )
    Â_i   = r_i − V̂(x)
    loss  = mean_{x,i} ( β₂ · [log πθ(y_i|x) − log π_ref(y_i|x)] − Â_i )²
    """
    adv = oapl_advantages(rewards, beta1)
    return oapl_sequence_losses(logp, ref_logp, adv, beta2).mean()


def grpo_advantages(rewards: Tensor, eps: float = 1e-6, scale: bool = True) -> Tensor:
    """Group-normalised advantage Â_i = (r_i − mean(r)) / (std(r) + ε); (..., G) → (..., G).

    ``std`` is the population std (unbiased=False) so that G=1 gives Â=0 instead of NaN; with
    ``scale=False`` only the mean is subtracted (Dr. GRPO).
    """
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=-1, unbiased=False, keepdim=True) + eps)


def grpo_sequence_losses(
    token_logp: Tensor,
    behaviour_token_logp: Tensor,
    mask: Tensor,
    advantages: Tensor,
    clip_eps: float = 0.2,
    kl_coef: float = 0.0,
    ref_token_logp: Tensor | None = None,
) -> Tensor:
    """Per-sequence GRPO loss (to be minimised), token tensors (N, T), ``advantages`` (N,):

        ρ_t   = exp(log πθ(y_t) − log π_behaviour(y_t))
        ℓ_t   = −min(ρ_t Â, clip(ρ_t, 1−ε, 1+ε) Â) + κ · KL_t
        KL_t  = exp(log π_ref − log πθ) − (log π_ref − log πθ) − 1      (k3 estimator, ≥ 0)
        loss  = (1/|y|) Σ_t ℓ_t       (token mean within a sequence, as in the GRPO paper)

    The KL term needs ``ref_token_logp`` when ``kl_coef`` > 0.
    """
    mask = mask.to(token_logp.dtype)
    ratio = torch.exp(token_logp - behaviour_token_logp.detach())
    adv = advantages.detach().unsqueeze(-1)  # (N, 1) broadcast over tokens
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    per_token = -surrogate
    if kl_coef > 0:
        if ref_token_logp is None:
            raise ValueError("kl_coef > 0 needs ref_token_logp")
        d = ref_token_logp.detach() - token_logp
        per_token = per_token + kl_coef * (torch.exp(d) - d - 1)
    lengths = mask.sum(dim=-1).clamp(min=1.0)
    return (per_token * mask).sum(dim=-1) / lengths


def grpo_loss(
    token_logp: Tensor,
    behaviour_token_logp: Tensor,
    mask: Tensor,
    rewards: Tensor,
    clip_eps: float = 0.2,
    kl_coef: float = 0.0,
    ref_token_logp: Tensor | None = None,
) -> Tensor:
    """GRPO loss for whole groups: token tensors (B·G, T), ``rewards`` (B, G) in the same order."""
    adv = grpo_advantages(rewards).reshape(-1)
    return grpo_sequence_losses(
        token_logp, behaviour_token_logp, mask, adv, clip_eps, kl_coef, ref_token_logp
    ).mean()
