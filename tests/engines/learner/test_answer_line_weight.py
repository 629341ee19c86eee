"""The warm-start's answer-line weight: the weighted loss against hand-computed values and
against the model's own loss, where a demonstration's final line starts, and a cache key that
leaves the models built before the knob as they were."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from workers.learner import bootstrap
from workers.learner.bootstrap import BootstrapConfig
from workers.learner.recipe import SIZES


def test_weighted_lm_loss_counts_a_weighted_token_that_many_times() -> None:
    # Position 0 predicts label 0 from logits (0, 0): CE = ln 2. Position 1 predicts label 1 from
    # logits (0, ln 3): p = 3/4, CE = −ln(3/4). The first label is the prompt's (ignored).
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)], [5.0, -5.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    weights = torch.tensor([[7.0, 1.0, 3.0]])
    got = bootstrap.weighted_lm_loss(logits, labels, weights)
    assert got.item() == pytest.approx((math.log(2) + 3 * -math.log(0.75)) / 2, rel=1e-6)


def test_weighted_lm_loss_with_unit_weights_is_the_models_own_loss() -> None:
    tok = bootstrap.train_tokenizer(
        bootstrap.demonstrations(BootstrapConfig(size="test", n_demos=50)), 384)
    model = bootstrap.build_model(SIZES["test"], tok, seed=0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (3, 12), generator=gen)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[2, 9:] = -100  # a shorter row, padded
    attn = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=attn, labels=labels)
    ours = bootstrap.weighted_lm_loss(out.logits, labels, torch.ones(ids.shape))
    assert ours.item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_answer_line_start_is_where_the_final_line_begins() -> None:
    demos = bootstrap.demonstrations(BootstrapConfig(size="test", n_demos=60))
    tok = bootstrap.train_tokenizer(demos, 384)
    with_line = without = 0
    for _, response in demos:
        completion = tok(response, add_special_tokens=False)["input_ids"]
        start = bootstrap.answer_line_start(tok, response, completion)
        if response.count("\n") == 2:
            with_line += 1
            assert tok.decode(completion[start:]) == response.split("\n")[-1]
            assert tok.decode(completion[:start]).endswith("\n")
        else:  # stops after the reasoning: nothing to weight
            without += 1
            assert start == len(completion)
    assert with_line > 0 and without > 0


def test_the_knob_at_its_old_value_keeps_the_old_key_and_any_other_value_changes_it() -> None:
    # At 1.0 the knob stays out of the key, so the model shipped before it existed (6,000
    # demonstrations, call noise 0.15; results/quality.json before 2026-12 names it) keeps the
    # key it is cached under, as does the 6,000-demonstration build shipped before 82050f9.
    old = BootstrapConfig(n_demos=6000, call_noise=0.15, answer_line_weight=1.0)
    assert old.cache_key() == "3551c40d07abb6e0"
    assert BootstrapConfig(n_demos=6000).cache_key() == "f97593514a110a7d"
    default = BootstrapConfig()
    assert (default.call_noise, default.answer_line_weight) == (0.0, 2.0)
    assert BootstrapConfig(answer_line_weight=1.0).cache_key() != default.cache_key()
    assert BootstrapConfig(answer_line_weight=4.0).cache_key() != default.cache_key()
    with pytest.raises(ValueError, match="invalid bootstrap config"):
        BootstrapConfig(answer_line_weight=0.0)
    with pytest.raises(ValueError, match="invalid bootstrap config"):
        BootstrapConfig(call_noise=1.5)


def test_a_weighted_build_differs_from_the_plain_one(tmp_path: Path) -> None:
    plain = BootstrapConfig(size="test", n_demos=80, sft_steps=6, batch_size=4)
    weighted = BootstrapConfig(size="test", n_demos=80, sft_steps=6, batch_size=4,
                               answer_line_weight=5.0)
    a = bootstrap.bootstrap_model(config=plain, cache_dir=tmp_path)
    b = bootstrap.bootstrap_model(config=weighted, cache_dir=tmp_path)
    assert a != b
    info_a, info_b = bootstrap.bootstrap_info(a), bootstrap.bootstrap_info(b)
    assert info_b["config"]["answer_line_weight"] == 5.0
    # Same demonstrations, same batches: only the loss differs.
    assert info_a["sft_loss_first"] != info_b["sft_loss_first"]
