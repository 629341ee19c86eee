"""How well does a warm-start read the case? A probe of the bootstrap recipe, before any RL.

    python -m benchmarks.reading [--bootstrap KEY=VALUE ...] [--size tiny] [--prompts 300]
                                 [--samples 2] [--label NAME] [--out DIR]

The warm-start's demonstrations reason before they answer: a signed factor list, then
``Overall: favorable|unfavorable`` (the Bayes side of the case), then a final line in one of nine
forms, mostly outside the answer contract. RL can fix the final line; what it can only sharpen is
the call the model reaches in its reasoning. So this probe reads the reasoning of the recipe's
model on validation prompts, greedily and at T=1:

- ``overall_stated``: share of answers with an ``Overall:`` call;
- ``overall_bayes_agreement``: stated calls on the Bayes side (95% CI by bootstrap over prompts,
  a prompt's answers one cluster); the ceiling a policy that keeps this reasoning and fixes the
  answer line reaches on the Bayes side;
- ``overall_correct_if_stated``: stated calls equal to the drawn outcome (the Bayes rule itself
  is right ``bayes_rate`` of the time);
- ``factor_recall``: share of the case's signed factors written exactly as the template has them;
- the contract at T=1 (``correct``, ``parse_rate``): the issue's bound for a baseline is ≤ 10%
  correct and ≤ 20% parsed;
- the build's seconds (the issue's bound is ≤ 5 min on two cores).

Every recipe is stored under its label in ``benchmarks/results/reading.json`` and drawn in
``reading.png`` (a build 3–5 min when not cached, the probe ~1 min).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import (
    add_bootstrap_flag,
    bootstrap_flag_overrides,
    machine,
    results_dir,
    write_json,
)
from benchmarks.decision import VALIDATION_SEED, bayes_rate, bayes_side, decision_summary
from benchmarks.quality import MAX_TOKENS
from benchmarks.quality_stats import answer_summary
from workers.clinical import task
from workers.graders.contract import parse_answer
from workers.inference.base import SamplingParams
from workers.inference.local import LocalBackend
from workers.learner.bootstrap import BootstrapConfig, bootstrap_info, bootstrap_model

_OVERALL = re.compile(r"Overall:\s*(favorable|unfavorable)\b")


def overall_call(text: str) -> bool | None:
    """The call a reasoning states (True = favorable), or None when it states none."""
    m = _OVERALL.search(text)
    return None if m is None else m.group(1) == "favorable"


def factor_recall(text: str, case: task.Case) -> float:
    """Share of the case's signed factors (the template's non-neutral ones) written exactly."""
    parts = task.signed_factors(case)
    if not parts:
        return 1.0
    head = text.split("\n", 1)[0]
    return sum(p in head for p in parts) / len(parts)


def reading_summary(
    texts: Sequence[Sequence[str]], cases: Sequence[task.Case], outcomes: Sequence[bool]
) -> dict[str, Any]:
    """What k answers per prompt say about the reading (see the module docstring)."""
    calls = [[overall_call(t) for t in ts] for ts in texts]
    # a stated call is scored as the decision probe scores a parsed answer
    d = decision_summary(calls, outcomes, [bayes_side(c) for c in cases])
    flat = [c for cs in calls for c in cs]
    return {
        "overall_stated": sum(c is not None for c in flat) / len(flat),
        "overall_bayes_agreement": d["bayes_agreement"],
        "overall_bayes_agreement_ci95": d["bayes_agreement_ci95"],
        "overall_correct_if_stated": d["parsed_accuracy"],
        "overall_favorable_share": d["yes_share"],
        "factor_recall": sum(factor_recall(t, c) for ts, c in zip(texts, cases, strict=True)
                             for t in ts) / len(flat),
    }


def run_reading(
    recipe: BootstrapConfig, prompts: int, samples: int, cache_dir: str | None = None
) -> dict[str, Any]:
    """Build (or take from the cache) ``recipe``'s model and read its answers to ``prompts``
    validation prompts: one greedy, ``samples`` at T=1."""
    t0 = time.perf_counter()
    model_dir = bootstrap_model(config=recipe, cache_dir=cache_dir)
    info = bootstrap_info(model_dir)
    backend = LocalBackend(model_dir)
    examples = task.generate(VALIDATION_SEED, prompts, "validation")
    cases = [e.case for e in examples]
    outcomes = [e.outcome for e in examples]
    messages = [e.messages for e in examples]
    out: dict[str, Any] = {
        "recipe": info.get("config"),
        "cache_key": info.get("cache_key"),
        "build_seconds": info.get("seconds_total"),
        "sft_loss_last": info.get("sft_loss_last"),
        "prompts": prompts,
        "bayes_rate": bayes_rate([bayes_side(c) for c in cases], outcomes),
    }
    for cond, n, temperature in (("greedy", 1, 0.0), ("t1", samples, 1.0)):
        comps = backend.generate(messages, n, SamplingParams(MAX_TOKENS, temperature, 11))
        texts = [[c.text for c in cs] for cs in comps]
        contract = answer_summary([[parse_answer(t) for t in ts] for ts in texts], outcomes)
        out[cond] = reading_summary(texts, cases, outcomes) | {
            "correct": contract["correct"], "parse_rate": contract["parse_rate"],
        }
    out["seconds"] = time.perf_counter() - t0
    return out


def plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    """Each recipe's stated calls on the Bayes side, greedy and at T=1, with their 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(runs)
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(labels) + 1.6))
    for offset, cond, color in ((-0.18, "greedy", "tab:blue"), (0.18, "t1", "tab:orange")):
        ys = [i + offset for i in range(len(labels))]
        points = [runs[label][cond] for label in labels]
        # a recipe that stated no call has no bar, not a bar at 0
        xs = [math.nan if p["overall_bayes_agreement"] is None else p["overall_bayes_agreement"]
              for p in points]
        cis = [p["overall_bayes_agreement_ci95"] or [math.nan] * 2 for p in points]
        err = [[x - lo for x, (lo, _) in zip(xs, cis, strict=True)],
               [hi - x for x, (_, hi) in zip(xs, cis, strict=True)]]
        ax.barh(ys, xs, height=0.34, xerr=err, color=color, capsize=2,
                label="greedy" if cond == "greedy" else "T=1")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.axvline(0.5, color="gray", ls="--", lw=1)
    ax.set_xlim(0.4, 1.0)
    ax.set_xlabel("stated Overall calls on the Bayes side (validation prompts)")
    ax.set_title("How well does each warm-start recipe read the case? (before RL)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", default="tiny")
    add_bootstrap_flag(ap)
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--samples", type=int, default=2, help="answers per prompt at T=1")
    ap.add_argument("--cache-dir", default=None, help="bootstrap build cache (default: the usual)")
    ap.add_argument("--label", default=None, help="the recipe's key in reading.json (default: "
                    "its overrides, or 'shipped')")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    overrides = bootstrap_flag_overrides(ap, args)
    if args.prompts < 1 or args.samples < 1:
        ap.error("--prompts and --samples must be at least 1")
    recipe = BootstrapConfig(size=args.size, **dict(overrides))
    label = args.label or (" ".join(f"{k}={v}" for k, v in overrides) or "shipped")
    result = run_reading(recipe, args.prompts, args.samples, args.cache_dir)
    result["machine"] = machine()
    path = results_dir(args.out) / "reading.json"
    runs = json.loads(path.read_text()) if path.exists() else {}
    runs[label] = result
    write_json(path, runs)
    plot(runs, path.with_suffix(".png"))
    for cond in ("greedy", "t1"):
        r = result[cond]
        print(f"{label} {cond}: Overall stated {r['overall_stated']:.3f}, on the Bayes side "
              f"{r['overall_bayes_agreement']} {r['overall_bayes_agreement_ci95']}, factors "
              f"{r['factor_recall']:.3f}; contract correct {r['correct']:.3f} parse "
              f"{r['parse_rate']:.3f}")
    print(f"build {result['build_seconds']} s; written {path}")


if __name__ == "__main__":
    main()
