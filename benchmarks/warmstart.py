"""Does the bundled model read the case? A probe of the warm-start, before any RL.

    python -m benchmarks.warmstart [--prompts 300] [--sft-steps N] [--demos N] [--lr X]
                                   [--batch-size N] [--size tiny]
    python -m benchmarks.warmstart --after-round [--round-prompts 128] [--group-size 8]
                                   [--samples 4] [--tuned results/tune_round.json]

A round of OAPL can teach the answer contract (format) from a ±1 reward; it cannot teach the
model to read fields it never learned to copy. This probe tells the two apart on the warm-start
itself: it builds (or fetches from the cache) the bundled model for a recipe, answers held-out
prompts (seen styles, mixed) greedily and at T=1, and compares each answer's reasoning with the
task's reference reasoning (``task.reasoning`` without call noise):

- **factor accuracy by kind** (ECOG, stage, line, regimen-for-biomarker, prior response, LDH,
  albumin, brain metastases): the share of answers whose ``Factors:`` line states that kind as
  the case has it (or leaves it out where the case's factor is neutral), beside **guessing**,
  what a model that never reads the case scores by always writing the commonest state;
- **call agreement**: how often the answer's ``Overall:`` call equals the sign of the hidden
  logit (what the demonstrations' call is, before their 15% noise);
- **answer follows call**: how often the ``ANSWER:`` line says what the answer's own call says,
  and how often that call matches the outcome (the accuracy among parsed answers a model would
  have if its answer line copied its call) — the decision may sit in the reasoning and still not
  reach the line the grader reads;
- parse rate, correctness and accuracy among parsed answers.

With ``--after-round`` the same measures are taken on the recipe's model and on one round of
each algorithm trained on it, at the round tuning's chosen points, as the quality benchmark's
headline row runs it (128 training prompts × 8 baseline rollouts at T=1, seed 0; ``--samples``
answers per prompt at T=1): does a round make the answer line follow the call, sharpen the call,
or neither? Those go under ``after_round`` in ``warmstart.json`` and into
``warmstart_after_round.png`` (4–6 min on two cores).

Results of every recipe probed go into ``benchmarks/results/warmstart.json`` (keyed by the
recipe's cache key, so runs of several recipes accumulate) and ``warmstart.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import machine, results_dir, write_json
from benchmarks.quality import (
    ALGORITHMS,
    EVAL_SEED,
    HEADLINE_ROW,
    MAX_TOKENS,
    TUNED,
    grade,
    items,
    load_tuned,
    merged_backend,
    round_config,
)
from benchmarks.quality_stats import answer_summary, majority_rate
from workers.clinical import task
from workers.graders import parse_answer
from workers.inference.base import AdapterRef, SamplingParams
from workers.inference.local import LocalBackend
from workers.learner.bootstrap import bootstrap_info, bootstrap_model
from workers.learner.data import make_rollout_groups
from workers.learner.recipe import BootstrapConfig
from workers.learner.trainer import train

KINDS = ("ECOG", "stage", "line", "regimen", "prior", "LDH", "albumin", "brain mets")
_OVERALL = re.compile(r"^Overall: (favorable|unfavorable)\.?$", re.MULTILINE)


def factor_kind(factor: str) -> str:
    """The kind of one stated factor (``"ECOG 1 +"`` → ``"ECOG"``, ``"osimertinib for EGFR +"`` →
    ``"regimen"``, ``"no brain mets -"`` → ``"brain mets"``)."""
    if " for " in factor:
        return "regimen"
    if "brain mets" in factor:
        return "brain mets"
    head = factor.split()[0]
    return head if head in KINDS else "other"


def reference_factors(case: task.Case) -> dict[str, str]:
    """The case's non-neutral factors as the demonstrations state them, by kind."""
    text, _ = task.reasoning(case, random.Random(0), call_noise=0.0)
    return {factor_kind(f): f for f in stated_factors(text)}


def stated_factors(text: str) -> list[str]:
    """The factors of an answer's first ``Factors:`` line (empty when it has none)."""
    for line in text.splitlines():
        if line.startswith("Factors:"):
            body = line.removeprefix("Factors:").strip().rstrip(".")
            return [f.strip() for f in body.split(";") if f.strip()]
    return []


def stated_call(text: str) -> bool | None:
    """The answer's overall call: favorable → True, unfavorable → False, none → None."""
    m = _OVERALL.search(text)
    return None if m is None else m.group(1) == "favorable"


def factor_accuracy(cases: Sequence[task.Case], texts: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per kind, over every case: the share of answers whose factor of that kind is the case's
    (both absent counts: a neutral factor is left out, as the demonstrations do), and ``guess``,
    the share that writing the commonest state of that kind (a value, or nothing) would get."""
    refs = [reference_factors(c) for c in cases]
    answers = [{factor_kind(f): f for f in reversed(stated_factors(t))} for t in texts]
    out: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        truth = [r.get(kind) for r in refs]
        commonest = Counter(truth).most_common(1)[0][1]
        hits = sum(a.get(kind) == t for a, t in zip(answers, truth, strict=True))
        out[kind] = {"n": len(truth), "accuracy": hits / len(truth), "guess": commonest / len(truth)}
    return out


def call_agreement(cases: Sequence[task.Case], texts: Sequence[str]) -> dict[str, Any]:
    """Share of answers whose overall call equals sign(hidden logit), among answers with a call."""
    pairs = [(call, task.true_logit(c) > 0) for c, t in zip(cases, texts, strict=True)
             if (call := stated_call(t)) is not None]
    return {"n_calls": len(pairs),
            "agreement": sum(a == b for a, b in pairs) / len(pairs) if pairs else None}


def answer_follows_call(texts: Sequence[str], outcomes: Sequence[bool]) -> dict[str, Any]:
    """Whether the answer line says what the answer's own overall call says: ``follows``, the
    share of answers with both a call and a parseable answer whose answer equals the call; and
    ``call_correct``, how often the stated call matches the outcome among answers that state one
    — what accuracy among parsed answers would be if every answer line copied its call."""
    stated = [(call, t, outcome) for t, outcome in zip(texts, outcomes, strict=True)
              if (call := stated_call(t)) is not None]
    both = [(call, answer) for call, t, _ in stated if (answer := parse_answer(t)) is not None]
    calls = [(call, outcome) for call, _, outcome in stated]
    return {"n_both": len(both),
            "follows": sum(c == a for c, a in both) / len(both) if both else None,
            "n_calls": len(calls),
            "call_correct": sum(c == o for c, o in calls) / len(calls) if calls else None}


def measure(
    backend: LocalBackend, examples: Sequence[task.Example], samples: int = 1,
    adapter: AdapterRef | None = None,
) -> dict[str, Any]:
    """One model's answers to ``examples``, greedily (one each) and at T=1 (``samples`` each):
    correctness, parse rate and accuracy among parsed answers, factors, call and whether the
    answer line follows the call."""
    cases = [e.case for e in examples]
    outcomes = [e.outcome for e in examples]
    out: dict[str, Any] = {}
    for name, temperature, k in (("greedy", 0.0, 1), ("t1", 1.0, samples)):
        outs = backend.generate([e.messages for e in examples], k,
                                SamplingParams(MAX_TOKENS, temperature, EVAL_SEED), adapter)
        texts = [c.text for group in outs for c in group]
        each_case = [c for c in cases for _ in range(k)]
        each_outcome = [o for o in outcomes for _ in range(k)]
        summary = answer_summary([[parse_answer(c.text) for c in group] for group in outs],
                                 outcomes)
        out[name] = {key: summary[key] for key in ("correct", "parse_rate", "parsed_accuracy")} | {
            "samples": k, "factors": factor_accuracy(each_case, texts),
            "call": call_agreement(each_case, texts),
            "answer_follows_call": answer_follows_call(texts, each_outcome)}
    return out


def heldout_examples(prompts: int) -> list[task.Example]:
    return task.generate(EVAL_SEED, prompts, "heldout", list(task.SEEN_STYLES))


def probe(cfg: BootstrapConfig, prompts: int, cache_dir: str | None = None) -> dict[str, Any]:
    """Build or fetch the model of ``cfg`` and measure it greedily and at T=1."""
    t0 = time.perf_counter()
    model_dir = bootstrap_model(config=cfg, cache_dir=cache_dir)
    info = bootstrap_info(model_dir)
    out: dict[str, Any] = {
        "recipe": dataclasses.asdict(cfg), "cache_key": cfg.cache_key(),
        "code_version": info["code_version"],
        "n_params": info["n_params"], "build_seconds": info["seconds_total"],
        "sft_loss_last": info["sft_loss_last"], "prompts": prompts,
    }
    out |= measure(LocalBackend(model_dir), heldout_examples(prompts))
    out["seconds"] = time.perf_counter() - t0
    return out


def after_round(
    cfg: BootstrapConfig, prompts: int, samples: int, round_prompts: int, group_size: int,
    seed: int = 0, cache_dir: str | None = None, tuned_path: Path | None = TUNED,
) -> dict[str, Any]:
    """The same measures on the warm-start and on one tuned round of each algorithm trained on
    it, as the quality benchmark's headline row runs it (``round_prompts`` training prompts ×
    ``group_size`` baseline rollouts at T=1, one seed): does the round make the answer line
    follow the call, or sharpen the call, or neither?"""
    t0 = time.perf_counter()
    model_dir = bootstrap_model(config=cfg, cache_dir=cache_dir)
    backend = LocalBackend(model_dir)
    examples = heldout_examples(prompts)
    torch.manual_seed(seed)
    pool = make_rollout_groups(backend, items(seed, round_prompts, "train"), group_size,
                               SamplingParams(MAX_TOKENS, 1.0, seed), grade)
    tuned = load_tuned(tuned_path)
    out: dict[str, Any] = {
        "recipe": dataclasses.asdict(cfg), "cache_key": cfg.cache_key(), "prompts": prompts,
        "round_prompts": round_prompts, "group_size": group_size, "seed": seed, "tuned": tuned,
        "majority_rate": majority_rate([e.outcome for e in examples]),
        "models": {"warm-start": measure(backend, examples, samples)},
    }
    for algo in ALGORITHMS:
        res = train(pool, model_dir, None, round_config(algo, tuned, seed),
                    tokenizer=backend.tokenizer)
        out["models"][algo] = measure(merged_backend(res.model, backend.tokenizer), examples,
                                      samples) | {"optimizer_steps": res.metrics["optimizer_steps"]}
    out["seconds"] = time.perf_counter() - t0
    return out


def version(entry: dict[str, Any]) -> str:
    """The build code an entry was probed on (entries from before it was recorded: bootstrap-3,
    whose tokenizer did not match the one the model is served with)."""
    return str(entry.get("code_version", "bootstrap-3"))


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(results["recipes"].values(),
                  key=lambda r: (version(r), r["recipe"]["n_demos"], r["recipe"]["sft_steps"],
                                 r["recipe"]["lr"]))
    fig, ax = plt.subplots(figsize=(10, 6))
    width = 0.8 / (len(runs) + 1)
    xs = range(len(KINDS))
    guess = [runs[0]["greedy"]["factors"].get(k, {}).get("guess", 0.0) for k in KINDS]
    ax.bar([x - 0.4 + width / 2 for x in xs], guess, width, color="lightgray",
           label="guessing (commonest value)")
    for i, r in enumerate(runs, start=1):
        accuracy = [r["greedy"]["factors"].get(k, {}).get("accuracy", 0.0) for k in KINDS]
        rc, agreement = r["recipe"], r["greedy"]["call"]["agreement"]
        ax.bar([x - 0.4 + width / 2 + i * width for x in xs], accuracy, width,
               label=(f"{version(r)}: {rc['size']} {rc['n_demos']} demos, "
                      f"{rc['sft_steps']} steps × {rc['batch_size']}, "
                      f"lr {rc['lr']:g}"
                      f" (call agreement {'—' if agreement is None else f'{agreement:.2f}'})"))
    ax.set_xticks(list(xs), KINDS)
    ax.set_ylabel("greedy factor accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Does the warm-start read the case? ({runs[0]['prompts']} held-out prompts)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def recipe_label(recipe: dict[str, Any]) -> str:
    """What sets a recipe apart from the shipped defaults ("shipped recipe" when nothing does)."""
    d = dataclasses.asdict(BootstrapConfig())
    changed = [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
               for k, v in recipe.items() if k in d and d[k] != v]
    return ", ".join(changed) or "shipped recipe"


def plot_after_round(entries: Sequence[dict[str, Any]], path: Path) -> None:
    """One row per recipe; per model, greedy and at T=1: how often the call is right, how often
    the answer line follows it, and the accuracy among parsed answers, against the majority."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = (("call right", lambda m: m["answer_follows_call"]["call_correct"]),
                ("answer follows call", lambda m: m["answer_follows_call"]["follows"]),
                ("accuracy among parsed", lambda m: m["parsed_accuracy"]))
    fig, axes = plt.subplots(len(entries), 2, figsize=(11, 3.8 * len(entries)), sharey=True,
                             squeeze=False)
    width = 0.8 / len(measures)
    for row, entry in zip(axes, entries, strict=True):
        # The warm-start first, then the rounds (a saved entry's keys come back sorted).
        names = sorted(entry["models"], key=lambda n: (n != "warm-start", n))
        for ax, mode in zip(row, ("greedy", "t1"), strict=True):
            for i, (label, get) in enumerate(measures):
                values = [get(entry["models"][n][mode]) or 0.0 for n in names]
                ax.bar([x - 0.4 + width * (i + 0.5) for x in range(len(names))], values, width,
                       label=label)
            ax.axhline(entry["majority_rate"], color="gray", ls="--", lw=1, label="majority rate")
            ax.axhline(entry["majority_rate"] + 0.10, color="black", ls=":", lw=1,
                       label="majority + 0.10")
            k = entry["models"][names[0]][mode]["samples"]
            ax.set_title(f"{recipe_label(entry['recipe'])}: "
                         f"{'greedy' if mode == 'greedy' else f'T=1, {k} per prompt'}", fontsize=9)
            ax.set_xticks(range(len(names)), names)
            ax.set_ylim(0.3, 1.05)
        row[0].set_ylabel("share")
    axes[0][1].legend(fontsize=7, loc="upper right", ncol=2)
    first = entries[0]
    fig.suptitle(f"One round ({first['round_prompts']} prompts × {first['group_size']}, seed "
                 f"{first['seed']}; {first['prompts']} held-out prompts): the call, the answer "
                 "line, the decision (a bar at 0: nothing to measure)", fontsize=10)
    # Half an inch on top for the title, whatever the number of rows.
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    d = BootstrapConfig()
    ap.add_argument("--size", default=d.size)
    ap.add_argument("--sft-steps", type=int, default=d.sft_steps)
    ap.add_argument("--demos", type=int, default=d.n_demos)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--call-noise", type=float, default=d.call_noise,
                    help="share of demonstrations whose overall call is flipped")
    ap.add_argument("--answer-line-weight", type=float, default=d.answer_line_weight,
                    help="weight of the demonstrations' final-line tokens in the SFT loss")
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--cache-dir", default=None, help="bootstrap build cache (default: the usual)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--after-round", action="store_true",
                    help="also train one tuned OAPL and one tuned GRPO round on the recipe's "
                         "model and probe them (results under after_round)")
    # The round the probe copies: the quality benchmark's headline row.
    ap.add_argument("--round-prompts", type=int, default=HEADLINE_ROW.prompts)
    ap.add_argument("--group-size", type=int, default=HEADLINE_ROW.group_size)
    ap.add_argument("--samples", type=int, default=4, help="answers per prompt at T=1, after "
                    "a round (the recipe probe keeps one)")
    ap.add_argument("--tuned", type=Path, default=TUNED, help="the round tuning's JSON")
    args = ap.parse_args()
    cfg = BootstrapConfig(size=args.size, sft_steps=args.sft_steps, n_demos=args.demos,
                          lr=args.lr, batch_size=args.batch_size, call_noise=args.call_noise,
                          answer_line_weight=args.answer_line_weight)
    out_dir = results_dir(args.out)
    path = out_dir / "warmstart.json"
    results = json.loads(path.read_text()) if path.is_file() else {"recipes": {}}
    if args.after_round:
        entry = after_round(cfg, args.prompts, args.samples, args.round_prompts, args.group_size,
                            cache_dir=args.cache_dir, tuned_path=args.tuned)
        results.setdefault("after_round", {})[entry["cache_key"]] = entry | {"machine": machine()}
        write_json(path, results)
        plot_after_round(sorted(results["after_round"].values(),  # in the order they were run
                                key=lambda e: e["machine"]["time"]),
                         out_dir / "warmstart_after_round.png")
        print(json.dumps({name: {mode: {"correct": m[mode]["correct"],
                                        "parsed_accuracy": m[mode]["parsed_accuracy"],
                                        **m[mode]["answer_follows_call"]}
                                 for mode in ("greedy", "t1")}
                          for name, m in entry["models"].items()}, indent=1))
        return
    result = probe(cfg, args.prompts, args.cache_dir)
    results["recipes"][result["cache_key"]] = result | {"machine": machine()}
    write_json(path, results)
    plot(results, out_dir / "warmstart.png")
    g = result["greedy"]
    print(json.dumps({"recipe": result["recipe"], "greedy_correct": g["correct"],
                      "greedy_call_agreement": g["call"]["agreement"],
                      "greedy_answer_follows_call": g["answer_follows_call"],
                      "greedy_parsed_accuracy": g["parsed_accuracy"],
                      "greedy_factor_accuracy": {k: round(v["accuracy"], 3) for k, v in g["factors"].items()},
                      "guess": {k: round(v["guess"], 3) for k, v in g["factors"].items()}},
                     indent=1))


if __name__ == "__main__":
    main()
