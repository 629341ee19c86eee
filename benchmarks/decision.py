"""Can a lagged OAPL run learn the decision, or only the format? A probe of the learner.

    python -m benchmarks.decision [--reward outcome|bayes] [--steps 200] [--groups-per-step 4]
                                  [--lr 5e-4] [--beta2 0.1] [--sync-interval 10]
                                  [--keep-zero-variance-groups]
                                  [--prompts 300] [--samples 2] [--eval-every 50]
                                  [--bootstrap KEY=VALUE ...] [--label NAME]

One lagged run as table 2 of the quality benchmark runs it (π_ref regenerates every
``--sync-interval`` steps, ``--groups-per-step`` groups of ``--group-size`` a step), evaluated every
``--eval-every`` steps on validation prompts (``--samples`` answers each at T=1). Beside
correctness, parse rate and accuracy among parsed answers, it reports how often a parsed answer
takes the **Bayes side** (the sign of the case's hidden logit): the share a policy that reads the
case raises, and one that only learned the contract leaves at chance (~0.5).

``--reward bayes`` grades against the Bayes side instead of the trace's drawn outcome: the reward
no longer carries the outcome's noise (the Bayes rule is right only ~77% of the time), so a run
that does not raise the agreement even then is limited by the learner and the model, not by
the reward. Every run is stored under its label in ``benchmarks/results/decision.json`` and drawn
in ``decision.png`` (2–6 min a run on two cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from benchmarks._common import (
    add_bootstrap_flag,
    bootstrap_flag_overrides,
    machine,
    results_dir,
    write_json,
)
from benchmarks.quality import LAG, MAX_TOKENS, answers, grade, items
from benchmarks.quality_stats import answer_summary, majority_rate, parsed_accuracy_ci95
from workers.clinical import task
from workers.inference.base import AdapterRef
from workers.inference.local import LocalBackend
from workers.learner.bootstrap import BootstrapConfig, bootstrap_model
from workers.learner.data import PromptItem
from workers.learner.trainer import RegenerationSource, TrainerConfig, train

VALIDATION_SEED = 7
"""Evaluation prompts: ``task.generate(VALIDATION_SEED, n, "validation")`` (never the held-out
split the quality figures are measured on)."""
TRAIN_SEED = 1000
"""Regenerated prompts: the same stream table 2 of the quality benchmark trains on."""

Reward = Literal["outcome", "bayes"]
Log = Callable[[str], None]


@dataclass(frozen=True)
class DecisionConfig:
    reward: Reward = "outcome"
    """What a completion is graded against: the trace's drawn outcome, or the Bayes side."""
    steps: int = 200
    groups_per_step: int = 4
    group_size: int = 8
    sync_interval: int = 10
    lr: float = LAG["lr"]
    beta2: float = LAG["beta2"]
    keep_zero_variance_groups: bool = False
    """Train on groups whose rewards are all equal too (OAPL's Â = 0 anchor); table 2 drops them."""
    prompts: int = 300
    """Validation prompts of each evaluation."""
    samples: int = 2
    """Answers per validation prompt at T=1."""
    eval_every: int = 50
    size: str = "tiny"
    bootstrap_overrides: tuple[tuple[str, Any], ...] = ()
    cache_dir: str | None = None
    max_tokens: int = MAX_TOKENS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.reward not in ("outcome", "bayes"):
            raise ValueError(f"reward must be 'outcome' or 'bayes', not {self.reward!r}")
        if min(self.steps, self.groups_per_step, self.group_size, self.sync_interval,
               self.prompts, self.samples, self.eval_every) < 1:
            raise ValueError(f"every count must be at least 1: {self}")


def bayes_side(case: task.Case) -> bool:
    """The answer of the Bayes rule: YES when the case's hidden logit is positive."""
    return task.true_logit(case) > 0


def bayes_rate(sides: Sequence[bool], outcomes: Sequence[bool]) -> float:
    """How often the Bayes side is the drawn outcome on these cases (~0.77 over the task)."""
    return sum(s == y for s, y in zip(sides, outcomes, strict=True)) / len(outcomes)


def prompt_items(seed: int, n: int, split: str, reward: Reward) -> list[PromptItem]:
    """``n`` prompts of ``split``, each with the value its completions are graded against."""
    if reward == "outcome":
        return items(seed, n, split)
    out = []
    for e in task.generate(seed, n, split):
        outcome = {"name": task.OUTCOME_NAME, "value": bayes_side(e.case)}
        out.append(PromptItem(e.external_id, e.messages, outcome))
    return out


def decision_summary(
    parsed: Sequence[Sequence[bool | None]], outcomes: Sequence[bool], sides: Sequence[bool]
) -> dict[str, Any]:
    """Format and decision of k answers per prompt: ``answer_summary`` against the outcomes, plus
    ``bayes_agreement`` (parsed answers on the Bayes side) with a 95% CI by bootstrap over
    prompts (a prompt's k answers are one cluster)."""
    s = answer_summary(parsed, outcomes)
    return {key: s[key] for key in ("correct", "parse_rate", "parsed_accuracy", "yes_share",
                                    "n_parsed")} | {
        "bayes_agreement": answer_summary(parsed, sides)["parsed_accuracy"],
        "bayes_agreement_ci95": parsed_accuracy_ci95(parsed, sides),
    }


def run_probe(dc: DecisionConfig, log: Log = print) -> dict[str, Any]:
    """One lagged run from the recipe's warm-start, evaluated at step 0 and every ``eval_every``
    steps (a run the collapse guard stops ends at its last evaluation)."""
    t0 = time.perf_counter()
    recipe = BootstrapConfig(size=dc.size, **dict(dc.bootstrap_overrides))
    model_dir = bootstrap_model(config=recipe, cache_dir=dc.cache_dir)
    backend = LocalBackend(model_dir)
    examples = task.generate(VALIDATION_SEED, dc.prompts, "validation")
    evaluation = items(VALIDATION_SEED, dc.prompts, "validation")
    outcomes = [e.outcome for e in examples]
    sides = [bayes_side(e.case) for e in examples]
    history: list[dict[str, Any]] = []

    def evaluate(adapter: AdapterRef | None) -> dict[str, float]:
        seed = 20_000 + len(history)  # new draws at every evaluation
        parsed, length = answers(backend, evaluation, dc.samples, 1.0, seed, adapter,
                                 dc.max_tokens)
        point = decision_summary(parsed, outcomes, sides)
        history.append(point)
        log(f"eval {len(history) - 1}: correct {point['correct']:.3f} parse "
            f"{point['parse_rate']:.3f} acc|parsed {point['parsed_accuracy']} Bayes side "
            f"{point['bayes_agreement']}")
        # what the collapse guard reads, as the quality benchmark's curves give it
        return {"correct": point["correct"], "parse_rate": point["parse_rate"],
                "mean_length": length}

    source = RegenerationSource(
        backend, prompt_items(TRAIN_SEED, dc.steps * dc.groups_per_step, "train", dc.reward), grade)
    cfg = TrainerConfig(
        epochs=1, sync_interval=dc.sync_interval, groups_per_step=dc.groups_per_step,
        group_size=dc.group_size, max_new_tokens=dc.max_tokens, eval_every=dc.eval_every,
        keep_zero_variance_groups=dc.keep_zero_variance_groups, seed=dc.seed,
        **(LAG | {"lr": dc.lr, "beta2": dc.beta2}),
    )
    res = train([], model_dir, None, cfg, tokenizer=backend.tokenizer, regenerate=source,
                heldout_eval=evaluate)
    # the trainer evaluates at step 0 (the warm-start) and every ``eval_every`` steps
    steps = [int(h["step"]) for h in res.history if "heldout_correct" in h]
    return {
        "config": dataclasses.asdict(dc), "status": res.status,
        "failure_reason": res.failure_reason, "optimizer_steps": res.metrics["optimizer_steps"],
        "majority_rate": majority_rate(outcomes),
        "bayes_rate": bayes_rate(sides, outcomes),
        "history": [h | {"step": s} for s, h in zip(steps, history, strict=True)],
        "seconds": time.perf_counter() - t0,
    }


def plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for label, run in runs.items():
        steps = [h["step"] for h in run["history"]]
        for ax, key in zip(axes, ("bayes_agreement", "parsed_accuracy"), strict=True):
            # nothing parsed: no point (NaN), not a fall to 0
            ax.plot(steps, [math.nan if h[key] is None else h[key] for h in run["history"]],
                    marker="o", label=label)
    first = next(iter(runs.values()))
    axes[0].axhline(0.5, color="gray", ls="--", lw=1, label="chance")
    axes[1].axhline(first["majority_rate"], color="gray", ls="--", lw=1, label="majority rate")
    axes[1].axhline(first["majority_rate"] + 0.10, color="black", ls=":", lw=1,
                    label="majority + 0.10")
    axes[0].set_title("parsed answers on the Bayes side (T=1)", fontsize=10)
    axes[1].set_title("accuracy among parsed answers (T=1)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.set_ylim(0.3, 1.0)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Does a lagged run learn the decision? ({first['config']['prompts']} validation "
                 f"prompts × {first['config']['samples']} answers)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    d = DecisionConfig()
    ap.add_argument("--reward", choices=("outcome", "bayes"), default=d.reward)
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--groups-per-step", type=int, default=d.groups_per_step)
    ap.add_argument("--group-size", type=int, default=d.group_size)
    ap.add_argument("--sync-interval", type=int, default=d.sync_interval)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--beta2", type=float, default=d.beta2)
    ap.add_argument("--keep-zero-variance-groups", action="store_true",
                    help="train on groups whose rewards are all equal too (dropped by default)")
    ap.add_argument("--prompts", type=int, default=d.prompts)
    ap.add_argument("--samples", type=int, default=d.samples)
    ap.add_argument("--eval-every", type=int, default=d.eval_every)
    ap.add_argument("--size", default=d.size)
    add_bootstrap_flag(ap)
    ap.add_argument("--cache-dir", default=None, help="bootstrap build cache (default: the usual)")
    ap.add_argument("--label", default=None, help="the run's key in decision.json (default: its "
                    "reward, steps, groups per step, lr and recipe)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    overrides = bootstrap_flag_overrides(ap, args)
    try:
        dc = DecisionConfig(
            reward=args.reward, steps=args.steps, groups_per_step=args.groups_per_step,
            group_size=args.group_size, sync_interval=args.sync_interval, lr=args.lr,
            beta2=args.beta2, keep_zero_variance_groups=args.keep_zero_variance_groups,
            prompts=args.prompts, samples=args.samples,
            eval_every=args.eval_every, size=args.size, bootstrap_overrides=overrides,
            cache_dir=args.cache_dir)
    except ValueError as exc:
        ap.error(str(exc))
    label = args.label or (
        f"{dc.reward} reward, {dc.steps} steps × {dc.groups_per_step} groups, lr {dc.lr:g}"
        + "".join(f", {k} {v}" for k, v in overrides))
    out_dir = results_dir(args.out)
    path = out_dir / "decision.json"
    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    results["runs"][label] = run_probe(dc) | {"machine": machine()}
    write_json(path, results)
    plot(results["runs"], out_dir / "decision.png")
    print(json.dumps({k: results["runs"][label]["history"][-1][k]
                      for k in ("correct", "parse_rate", "parsed_accuracy", "bayes_agreement")}))


if __name__ == "__main__":
    main()
