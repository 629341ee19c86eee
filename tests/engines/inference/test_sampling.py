"""The sampler's categorical draw: the distribution it draws from, and nothing outside it."""

from __future__ import annotations

import torch

from workers.inference.local import gumbel_max


def test_gumbel_max_draws_each_token_at_its_probability_and_never_an_impossible_one() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logp = torch.log(probs).expand(40_000, -1)  # the last token: log 0 = −inf
    gen = torch.Generator().manual_seed(0)
    draws = gumbel_max(logp, gen)
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    # 40 000 draws: a share's standard error is at most 0.0025; 4 of them is the tolerance
    assert float((freq - probs.double()).abs().max()) < 0.01
    assert int(freq[4] * len(draws)) == 0


def test_gumbel_max_is_seeded_by_its_generator() -> None:
    logp = torch.log_softmax(torch.randn(64, 100, generator=torch.Generator().manual_seed(1)), -1)
    a = gumbel_max(logp, torch.Generator().manual_seed(7))
    b = gumbel_max(logp, torch.Generator().manual_seed(7))
    c = gumbel_max(logp, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
