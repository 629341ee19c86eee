"""Trainer behaviour: config validation, one OAPL update, lineage, guard, log-prob agreement."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.learner import prompt_items, reached_overall
from workers.inference.base import AdapterRef, SamplingParams
from workers.inference.local import LocalBackend
from workers.learner.adapters import AdapterIntegrityError, load_verified
from workers.learner.data import (
    GradedCompletion,
    TrainingGroup,
    flatten_groups,
    make_rollout_groups,
    micro_batches,
)
from workers.learner.trainer import (
    RegenerationSource,
    TrainerConfig,
    TrainerConfigError,
    load_policy,
    sequence_logprobs,
    train,
)

# Per-token tolerance between the sampler's behaviour log-probs (KV-cached, left-padded, batched)
# and the trainer's (a shared prompt pass, or one full forward, right-padded): fp32 noise only.
TOKEN_LOGPROB_TOL = 1e-4
SEQUENCE_LOGPROB_TOL = 1e-3


def test_invalid_config_lists_every_problem() -> None:
    with pytest.raises(TrainerConfigError) as err:
        TrainerConfig(lr=0.0, lora_rank=0, algorithm="ppo", device="tpu")  # type: ignore[arg-type]
    msg = str(err.value)
    assert "lr must be" in msg and "lora_rank" in msg and "algorithm" in msg
    assert "device must be 'auto', 'cpu' or 'cuda', got 'tpu'" in msg


def test_unknown_config_keys_are_rejected() -> None:
    with pytest.raises(TrainerConfigError, match="unknown trainer config keys"):
        TrainerConfig.from_dict({"lr": 1e-3, "learning_rate": 1e-3})
    assert TrainerConfig.from_dict({"target_modules": ["q_proj"]}).target_modules == ("q_proj",)


def test_bad_inputs_fail_before_any_model_is_loaded(tmp_path: Path) -> None:
    missing_model = tmp_path / "no-such-model"  # loading it would raise OSError, not this
    with pytest.raises(TrainerConfigError, match="no rollout groups"):
        train([], missing_model, None, TrainerConfig())
    with pytest.raises(TrainerConfigError, match="RegenerationSource"):
        train([], missing_model, None, TrainerConfig(sync_interval=2, groups_per_step=1))
    with pytest.raises(TrainerConfigError, match="heldout_eval"):
        train([], missing_model, None, TrainerConfig(eval_every=1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has the GPU asked for")
def test_a_gpu_asked_for_and_absent_is_refused_before_any_model_is_loaded(
    tmp_path: Path, make_groups: Callable[..., list[TrainingGroup]]
) -> None:
    groups = make_groups(n_prompts=1, group_size=2, seed=3)
    with pytest.raises(TrainerConfigError, match=r"^device 'cuda' was asked for, but torch sees "
                       r"no GPU on this machine$"):
        train(groups, tmp_path / "no-such-model", None, TrainerConfig(device="cuda"))


def weighted_mean_reward(model: torch.nn.Module, groups: list[TrainingGroup], tok) -> float:  # type: ignore[no-untyped-def]
    """Σ_i softmax_i(log πθ − log π_ref)·r_i per group: the policy's expected reward restricted to
    the group's completions (self-normalised importance weights), averaged over groups."""
    records = flatten_groups(groups, tok, "oapl")
    with torch.no_grad():
        logp = torch.cat([sequence_logprobs(model, mb)[0] for mb in micro_batches(records, 64, 0)])
    ref = torch.tensor([r.behaviour_logprob_sum for r in records])
    rewards = torch.tensor([r.reward for r in records])
    gid = torch.tensor([r.group_index for r in records])
    total = 0.0
    for g in gid.unique():
        m = gid == g
        w = torch.softmax((logp[m] - ref[m]).double(), 0)
        total += float((w * rewards[m]).sum())
    return total / len(gid.unique())


def test_one_oapl_update_raises_mean_reward_on_its_training_groups(
    tiny_model_dir: Path, backend: LocalBackend, make_groups: Callable[..., list[TrainingGroup]]
) -> None:
    groups = make_groups(n_prompts=8, group_size=8, seed=1)
    before = sum(sum(g.rewards) for g in groups) / sum(len(g.completions) for g in groups)
    cfg = TrainerConfig(epochs=1, groups_per_step=8, lr=5e-3, beta2=0.05, seed=0)  # one full batch
    result = train(groups, tiny_model_dir, None, cfg, tokenizer=backend.tokenizer)
    assert result.status == "succeeded"
    assert result.metrics["groups_used"] > 0
    after = weighted_mean_reward(result.model, groups, backend.tokenizer)
    assert after > before + 0.3  # measured: 0.06 → 0.75
    # ``auto``: the GPU when torch sees one (benchmarks/learner_cuda.py checks that path)
    assert result.metrics["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_zero_variance_groups_are_dropped_and_counted(
    tiny_model_dir: Path, backend: LocalBackend, make_groups: Callable[..., list[TrainingGroup]]
) -> None:
    groups = make_groups(n_prompts=4, group_size=4, seed=2)
    flat = TrainingGroup(
        "flat",
        groups[0].prompt_messages,
        [
            GradedCompletion(c.token_ids, c.text, c.behaviour_logprob_sum, 0.5, True)
            for c in groups[0].completions
        ],
    )
    varied = [g for g in groups if len(set(g.rewards)) > 1]
    result = train(
        [*varied, flat], tiny_model_dir, None, TrainerConfig(epochs=1), tokenizer=backend.tokenizer
    )
    assert result.metrics["groups_dropped_zero_variance"] == 1
    assert result.metrics["groups_used"] == len(varied)
    with pytest.raises(ValueError, match="zero reward variance"):
        train([flat], tiny_model_dir, None, TrainerConfig(epochs=1), tokenizer=backend.tokenizer)


def test_zero_variance_groups_are_kept_as_anchors_when_asked(
    tiny_model_dir: Path, backend: LocalBackend, make_groups: Callable[..., list[TrainingGroup]]
) -> None:
    groups = make_groups(n_prompts=4, group_size=4, seed=2)
    flat = TrainingGroup(
        "flat",
        groups[0].prompt_messages,
        [
            GradedCompletion(c.token_ids, c.text, c.behaviour_logprob_sum, 0.5, True)
            for c in groups[0].completions
        ],
    )
    varied = [g for g in groups if len(set(g.rewards)) > 1]
    cfg = TrainerConfig(epochs=1, keep_zero_variance_groups=True)
    result = train([*varied, flat], tiny_model_dir, None, cfg, tokenizer=backend.tokenizer)
    assert result.metrics["groups_dropped_zero_variance"] == 0
    assert result.metrics["groups_used"] == len(varied) + 1
    # alone, a flat group is a pure anchor (OAPL Â = 0): a valid, if idle, round
    alone = train([flat], tiny_model_dir, None, cfg, tokenizer=backend.tokenizer)
    assert alone.status == "succeeded" and alone.metrics["groups_used"] == 1


def test_a_round_steps_through_shuffled_partitions_with_the_lr_schedule(
    tiny_model_dir: Path, backend: LocalBackend, make_groups: Callable[..., list[TrainingGroup]]
) -> None:
    groups = make_groups(n_prompts=5, group_size=2, seed=6, max_tokens=16)
    cfg = TrainerConfig(epochs=2, groups_per_step=2, lr=1e-2, lr_schedule="cosine",
                        keep_zero_variance_groups=True)
    result = train(groups, tiny_model_dir, None, cfg, tokenizer=backend.tokenizer)
    m = result.metrics
    assert (m["optimizer_steps"], m["epochs"], m["groups_used"]) == (6, 2, 5)  # 2 × ⌈5/2⌉
    assert [h["epoch"] for h in result.history] == [1, 1, 1, 2, 2, 2]
    assert [h["n_groups"] for h in result.history] == [2, 2, 1, 2, 2, 1]
    # cosine over S = 6: lr·½(1 + cos(π s / 6)) = 1e-2 at s = 0, 5e-3 at s = 3
    assert result.history[0]["lr"] == pytest.approx(1e-2)
    assert result.history[3]["lr"] == pytest.approx(5e-3)


class StopRound(Exception):
    pass


def test_a_progress_hook_that_stops_the_round_leaves_no_work_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, backend: LocalBackend,
    make_groups: Callable[..., list[TrainingGroup]],
) -> None:
    """Callers stop a round by raising from ``progress`` (the time-to-target benchmark does); the
    round's work folder (eval and sync snapshots) must not outlive it."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    seen: list[Path] = []

    def stop_at_two(step: int, total: int, metrics: dict[str, float]) -> None:
        seen.extend(scratch.glob("tracelearn-train-*"))
        if step == 2:
            raise StopRound

    groups = make_groups(n_prompts=4, group_size=2, seed=6, max_tokens=16)
    cfg = TrainerConfig(epochs=3, groups_per_step=2, keep_zero_variance_groups=True)
    with pytest.raises(StopRound):
        train(groups, tiny_model_dir, None, cfg, tokenizer=backend.tokenizer, progress=stop_at_two)
    assert seen, "the round made no work folder under the patched temp dir: the test saw nothing"
    assert list(scratch.iterdir()) == []


def test_adapter_is_written_with_lineage_and_continues_from_parent(
    tmp_path: Path,
    tiny_model_dir: Path,
    backend: LocalBackend,
    make_groups: Callable[..., list[TrainingGroup]],
) -> None:
    groups = make_groups(n_prompts=4, group_size=4, seed=3)
    cfg = TrainerConfig(epochs=2, lr=1e-2)
    first = train(groups, tiny_model_dir, tmp_path / "v1", cfg, tokenizer=backend.tokenizer)
    m1 = load_verified(tmp_path / "v1")
    assert m1["parent"] is None and m1["n_groups"] == first.metrics["groups_used"]
    assert m1["config"]["lr"] == 1e-2 and len(m1["base_model_digest"]) == 64
    assert m1["metrics"]["optimizer_steps"] == 2 and m1["metrics"]["epochs"] == 2
    assert m1["metrics"]["groups_used"] == first.metrics["groups_used"]
    second = train(
        groups,
        tiny_model_dir,
        tmp_path / "v2",
        cfg,
        parent=tmp_path / "v1",
        tokenizer=backend.tokenizer,
    )
    m2 = load_verified(tmp_path / "v2")
    assert m2["parent"]["weights_sha256"] == m1["weights_sha256"]
    assert m2["weights_sha256"] != m1["weights_sha256"]
    assert second.status == "succeeded"
    # the parent's LoRA weights were the starting point: its log-probs are unchanged at step 0
    with pytest.raises(FileExistsError):
        train(groups, tiny_model_dir, tmp_path / "v2", cfg, tokenizer=backend.tokenizer)


def test_tampered_parent_or_serving_adapter_is_refused(
    tmp_path: Path,
    tiny_model_dir: Path,
    backend: LocalBackend,
    make_groups: Callable[..., list[TrainingGroup]],
) -> None:
    groups = make_groups(n_prompts=4, group_size=4, seed=4)
    cfg = TrainerConfig(epochs=1)
    train(groups, tiny_model_dir, tmp_path / "v1", cfg, tokenizer=backend.tokenizer)
    weights = tmp_path / "v1" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterIntegrityError):
        train(
            groups,
            tiny_model_dir,
            tmp_path / "v2",
            cfg,
            parent=tmp_path / "v1",
            tokenizer=backend.tokenizer,
        )
    with pytest.raises(AdapterIntegrityError):
        backend.generate(
            [groups[0].prompt_messages],
            1,
            SamplingParams(8),
            AdapterRef("tampered", str(tmp_path / "v1")),
        )


def test_collapse_guard_stops_the_run_and_marks_it_failed(
    tmp_path: Path,
    tiny_model_dir: Path,
    backend: LocalBackend,
    make_groups: Callable[..., list[TrainingGroup]],
) -> None:
    parse_rates = iter([0.8, 0.9, 0.2, 0.9])

    def heldout(adapter: AdapterRef | None) -> dict[str, float]:
        return {"parse_rate": next(parse_rates), "mean_length": 30.0}

    groups = make_groups(n_prompts=4, group_size=4, seed=5)
    cfg = TrainerConfig(epochs=5, eval_every=1, guard_parse_drop=0.3)  # one step per epoch
    result = train(
        groups,
        tiny_model_dir,
        tmp_path / "out",
        cfg,
        tokenizer=backend.tokenizer,
        heldout_eval=heldout,
    )
    assert result.status == "failed"
    assert result.failure_reason is not None and "step 2" in result.failure_reason
    assert result.metrics["optimizer_steps"] == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("lengths", "stopped_at", "reason"),
    [
        ([30.0, 28.0, 10.0, 30.0], 2, "fell from 30.0 to 10.0"),
        ([30.0, 50.0, 58.0, 64.0], 3, "ran into the 64-token cap"),
        ([30.0, 45.0, 55.0, 60.0, 58.0, 59.0], None, None),
    ],
    ids=["length-drop", "runaway-to-cap", "growth-is-fine"],
)
def test_collapse_guard_on_length_stops_drops_and_runaways_but_not_growth(
    tmp_path: Path,
    tiny_model_dir: Path,
    backend: LocalBackend,
    make_groups: Callable[..., list[TrainingGroup]],
    lengths: list[float],
    stopped_at: int | None,
    reason: str | None,
) -> None:
    it = iter(lengths)

    def heldout(adapter: AdapterRef | None) -> dict[str, float]:
        return {"parse_rate": 0.9, "mean_length": next(it)}

    cfg = TrainerConfig(epochs=len(lengths) - 1, eval_every=1, max_new_tokens=64,
                        guard_length_ratio=0.4)
    result = train(make_groups(n_prompts=4, group_size=4, seed=5), tiny_model_dir, None, cfg,
                   tokenizer=backend.tokenizer, heldout_eval=heldout)
    if stopped_at is None:
        assert result.status == "succeeded", result.failure_reason
        assert result.metrics["optimizer_steps"] == len(lengths) - 1
    else:
        assert result.status == "failed"
        assert result.failure_reason is not None
        assert f"step {stopped_at}" in result.failure_reason and reason in result.failure_reason
        assert result.metrics["optimizer_steps"] == stopped_at


def test_sync_interval_regenerates_groups_with_the_current_policy(
    tiny_model_dir: Path, backend: LocalBackend
) -> None:
    source = RegenerationSource(backend, prompt_items(6, 4), reached_overall)
    cfg = TrainerConfig(
        epochs=2,  # 2 epochs × 4 prompts / 2 per step = 4 steps, π_ref refreshed every 2
        sync_interval=2,
        groups_per_step=2,
        group_size=4,
        max_new_tokens=40,
        lr=1e-2,
        keep_zero_variance_groups=True,
    )
    result = train([], tiny_model_dir, None, cfg, tokenizer=backend.tokenizer, regenerate=source)
    synced = [int(h["step"]) for h in result.history if h.get("synced")]
    assert synced == [1, 3]
    assert result.metrics["groups_used"] == 8
    assert result.metrics["optimizer_steps"] == 4 and result.metrics["epochs"] == 2


def test_window_passes_sample_once_and_train_each_window_several_times(
    tiny_model_dir: Path, backend: LocalBackend
) -> None:
    source = RegenerationSource(backend, prompt_items(6, 4), reached_overall)
    sampled: list[int] = []
    generate = backend.generate

    def counting(prompts, *args, **kwargs):  # type: ignore[no-untyped-def]
        sampled.append(len(prompts))
        return generate(prompts, *args, **kwargs)

    backend.generate = counting  # type: ignore[method-assign]
    try:
        cfg = TrainerConfig(
            epochs=1,  # 4 prompts / 2 per step = 2 chunks; one chunk per window of L=2 steps
            sync_interval=2, window_passes=2, groups_per_step=2, group_size=4,
            max_new_tokens=40, lr=1e-2, keep_zero_variance_groups=True,
        )
        result = train([], tiny_model_dir, None, cfg, tokenizer=backend.tokenizer,
                       regenerate=source)
    finally:
        del backend.generate
    synced = [int(h["step"]) for h in result.history if h.get("synced")]
    assert synced == [1, 3]
    assert sampled == [2, 2]  # each window samples its 2 prompts once for its 2 steps
    assert result.metrics["optimizer_steps"] == 4 and result.metrics["epochs"] == 1
    assert result.metrics["groups_used"] == 4


def test_sampler_and_trainer_logprobs_agree(
    tmp_path: Path,
    tiny_model_dir: Path,
    backend: LocalBackend,
    make_groups: Callable[..., list[TrainingGroup]],
) -> None:
    groups = make_groups(n_prompts=5, group_size=3, seed=7)
    # move the LoRA away from zero so the adapter path (merged in the sampler, unmerged in the
    # trainer) is exercised too
    trained = train(
        groups,
        tiny_model_dir,
        tmp_path / "a",
        TrainerConfig(epochs=2, lr=5e-2),
        tokenizer=backend.tokenizer,
    )
    for adapter, model in [
        (None, backend.base),
        (AdapterRef("agree-a", str(tmp_path / "a")), trained.model),
    ]:
        sampled = backend.generate(
            [g.prompt_messages for g in groups], 3, SamplingParams(48, seed=11), adapter
        )
        regraded = [
            TrainingGroup(
                f"g{i}",
                g.prompt_messages,
                [
                    GradedCompletion(c.token_ids, c.text, c.logprob_sum, 0.0, False, c.logprobs)
                    for c in comps
                ],
            )
            for i, (g, comps) in enumerate(zip(groups, sampled, strict=True))
        ]
        records = flatten_groups(regraded, backend.tokenizer, "oapl")
        worst_tok, worst_seq = 0.0, 0.0
        with torch.no_grad():
            for mb in micro_batches(records, 4, backend.tokenizer.pad_token_id):
                seq, tok = sequence_logprobs(model, mb)
                mask = mb.target_mask.bool()
                worst_tok = max(worst_tok, float((tok - mb.behaviour_token_logp)[mask].abs().max()))
                worst_seq = max(worst_seq, float((seq - mb.ref_logp).abs().max()))
        assert math.isfinite(worst_tok)
        assert worst_tok < TOKEN_LOGPROB_TOL, (adapter, worst_tok)
        assert worst_seq < SEQUENCE_LOGPROB_TOL, (adapter, worst_seq)


def test_rows_sharing_a_prompt_score_and_train_as_if_each_ran_alone(
    tiny_model_dir: Path,
    backend: LocalBackend,
    make_groups: Callable[..., list[TrainingGroup]],
) -> None:
    # a batch of whole groups runs each prompt once; a batch of one row runs it in one pass
    records = flatten_groups(make_groups(n_prompts=3, group_size=4, seed=5), backend.tokenizer,
                             "oapl")
    policy = load_policy(tiny_model_dir, TrainerConfig(), None)
    with torch.no_grad():  # move LoRA B off zero so the prompt's gradient is not trivially 0
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    params = [p for p in policy.parameters() if p.requires_grad]
    pad = backend.tokenizer.pad_token_id

    def score(batches: list[Any]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        for p in params:
            p.grad = None
        out = [sequence_logprobs(policy, mb) for mb in batches]
        seq = torch.cat([s for s, _ in out])
        # each row's completion-token log-probs in order, whatever the batch's width
        tok = torch.cat([t[m.bool()] for mb, (_, tt) in zip(batches, out, strict=True)
                         for t, m in zip(tt, mb.target_mask, strict=True)])
        (seq * torch.linspace(-1, 1, len(seq))).sum().backward()
        return seq.detach(), tok.detach(), [p.grad.clone() for p in params if p.grad is not None]

    (shared,) = micro_batches(records, len(records), pad)
    assert len(shared.prompts) == 3 and len(shared) == len(records)
    seq_shared, tok_shared, grad_shared = score([shared])
    seq_alone, tok_alone, grad_alone = score(micro_batches(records, 1, pad))
    assert float((seq_shared - seq_alone).abs().max()) < SEQUENCE_LOGPROB_TOL
    assert tok_shared.shape == tok_alone.shape
    assert float((tok_shared - tok_alone).abs().max()) < TOKEN_LOGPROB_TOL
    assert len(grad_shared) == len(grad_alone) == len(params)
    for a, b in zip(grad_shared, grad_alone, strict=True):
        assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(b.abs().max()))


# At θ = θ_ref the trainer's log πθ must equal the sampler's log π_ref up to fp32 noise.
ZERO_LOG_RATIO_TOL = 1e-4


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_log_ratio_is_zero_at_the_reference_for_any_sampling_temperature(
    tiny_model_dir: Path, backend: LocalBackend, temperature: float
) -> None:
    groups = make_rollout_groups(
        backend,
        prompt_items(12, 4),
        4,
        SamplingParams(max_tokens=32, temperature=temperature, seed=13),
        reached_overall,
    )
    assert {g.temperature for g in groups} == {temperature}
    fresh = load_policy(tiny_model_dir, TrainerConfig(), None)  # LoRA B = 0: θ = θ_ref
    records = flatten_groups(groups, backend.tokenizer, "oapl")
    with torch.no_grad():
        ratios = torch.cat([
            sequence_logprobs(fresh, mb)[0] - mb.ref_logp
            for mb in micro_batches(records, 8, backend.tokenizer.pad_token_id)
        ])
    assert float(ratios.abs().max()) < ZERO_LOG_RATIO_TOL
    if temperature != 1.0:
        # scored at T = 1 (the old bug), the same completions are far from the reference
        at_one = [dataclasses.replace(g, temperature=1.0) for g in groups]
        records = flatten_groups(at_one, backend.tokenizer, "oapl")
        with torch.no_grad():
            wrong = torch.cat([
                sequence_logprobs(fresh, mb)[0] - mb.ref_logp
                for mb in micro_batches(records, 8, backend.tokenizer.pad_token_id)
            ])
        assert float(wrong.abs().mean()) > 100 * ZERO_LOG_RATIO_TOL
