"""Tune one learner round for both algorithms, on validation prompts (same budget for each).

    python -m benchmarks.tune_round [--prompts 128] [--group-size 8] [--val 256] [--samples 2] [--resume]

Samples one pool of baseline rollouts (train seed 0, the quality benchmark's headline row: 128
prompts × 8, seen styles), then trains one round per grid point and scores it on the
*validation* split (``task.generate(VALIDATION_SEED, n, "validation")``: its own stream, disjoint
from the benchmark's held-out evaluation prompts). OAPL: lr × β₂ × epochs; GRPO: its own lr ×
epochs grid with as many runs and the same epochs (a matched baseline is a tuned baseline); one
run per (lr[, β₂]) scored after each epoch gives every epoch count (see ``EPOCHS``). Then the best point of
each algorithm is trained again with the other ``keep_zero_variance_groups`` setting (the grid
drops them by default), and the better of the two is chosen: both numbers are kept. Writes ``benchmarks/results/tune_round.json``; ``benchmarks.quality`` reads
its ``best``. ``--bootstrap KEY=VALUE`` (repeatable) tunes on a warm-start recipe other than the
shipped one (write it elsewhere with ``--out``; the file records the recipe and the model).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._common import add_bootstrap_flag, bootstrap_flag_overrides, write_json
from benchmarks.quality import (
    MAX_TOKENS,
    ROUND,
    answers,
    grade,
    items,
    round_config,
)
from benchmarks.quality_stats import answer_summary, majority_rate
from workers.inference.base import AdapterRef, SamplingParams
from workers.inference.local import LocalBackend
from workers.learner.bootstrap import BootstrapConfig, bootstrap_model
from workers.learner.data import PromptItem, TrainingGroup, make_rollout_groups
from workers.learner.trainer import train

RESULTS = Path(__file__).parent / "results"
VALIDATION_SEED = 7

EPOCHS = (2, 4, 8)
EXTEND_EPOCHS = (2, 4, 8, 12, 16)
"""Epoch counts scored per grid point. With a constant lr (no warm-up) the first e epochs of a
run are exactly an e-epoch run (same permutations, same optimizer state), so one run of
max(EPOCHS) epochs, scored after each epoch, covers every epoch count of the grid."""
GRIDS: dict[str, dict[str, list[dict[str, Any]]]] = {
    "full": {
        "oapl": [{"lr": lr, "beta2": b2} for lr, b2 in itertools.product((1e-3, 3e-3), (0.03, 0.1, 0.3))],
        "grpo": [{"lr": lr} for lr in (3e-4, 1e-3, 2e-3, 3e-3, 1e-2, 3e-2)],
    },
    # Past the edge of "full" (its OAPL best sat at its largest lr and epoch count), with as many
    # new runs for GRPO as for OAPL; run with ``--merge``, scored up to 16 epochs.
    "extend": {
        "oapl": [{"lr": lr, "beta2": b2} for lr, b2 in itertools.product((5e-3, 1e-2), (0.03, 0.1))],
        "grpo": [{"lr": lr} for lr in (5e-3, 7e-3, 1.5e-2, 2e-2)],
    },
    # Every code path, seconds per point: for checking the script, not for choosing.
    "smoke": {
        "oapl": [{"lr": 2e-3, "beta2": 0.1}, {"lr": 5e-3, "beta2": 0.3}],
        "grpo": [{"lr": 2e-3}, {"lr": 5e-3}],
    },
}


@dataclass(frozen=True)
class TuneConfig:
    size: str = "tiny"
    bootstrap_overrides: tuple[tuple[str, Any], ...] = ()
    cache_dir: str | None = None
    grid: str = "full"
    prompts: int = 128
    group_size: int = 8
    val: int = 256
    samples: int = 2
    """Answers per validation prompt at T=1."""
    max_tokens: int = MAX_TOKENS
    epochs: tuple[int, ...] = EPOCHS
    grid_keeps_zero_variance: bool = False
    """``keep_zero_variance_groups`` of the grid points; the best point is retried with the other
    value."""
    resume: bool = False
    """Skip the grid points ``tune_round.partial.json`` (written after every point) already has
    for this same setup."""
    merge: bool = False
    """Add this grid's records to those of the ``tune_round.json`` already in the output folder
    (same model, pool and validation prompts, checked) and choose the best over all of them."""


def val_score(
    backend: LocalBackend, val: list[PromptItem], samples: int, max_tokens: int = MAX_TOKENS,
    adapter: AdapterRef | None = None,
) -> dict[str, Any]:
    parsed, length = answers(backend, val, samples, 1.0, 30_000, adapter, max_tokens)
    s = answer_summary(parsed, [bool(p.outcome["value"]) for p in val if p.outcome is not None])
    return {k: s[k] for k in ("correct", "parse_rate", "parsed_accuracy", "yes_share")} | {
        "mean_length": length}


def trial(
    model_dir: Path, backend: LocalBackend, pool: list[TrainingGroup], val: list[PromptItem],
    algo: str, hp: dict[str, Any], samples: int, max_tokens: int = MAX_TOKENS,
    epochs: tuple[int, ...] = EPOCHS,
) -> list[dict[str, Any]]:
    """One run of max(epochs) epochs at ``hp``, scored on the validation prompts after each
    epoch; one record per epoch count in ``epochs`` (the collapse guard is off: we want the
    numbers, not a stop)."""
    cfg = round_config(algo, {algo: hp | {"epochs": max(epochs)}}, seed=0)
    kept = [g for g in pool if cfg.keep_zero_variance_groups or len({c.reward for c in g.completions}) > 1]
    if not kept:
        return [{"algorithm": algo, **hp, "epochs": e, "correct": None,
                 "skipped": "every rollout group has zero reward variance"} for e in epochs]
    per_epoch = math.ceil(len(kept) / cfg.groups_per_step)
    cfg = dataclasses.replace(cfg, eval_every=per_epoch, guard_parse_drop=2.0,
                              guard_length_ratio=1e-9, max_new_tokens=10**9)

    def heldout_eval(adapter: AdapterRef | None) -> dict[str, float]:
        s = val_score(backend, val, samples, max_tokens, adapter)
        return {k: float("nan") if v is None else v for k, v in s.items()}

    res = train(pool, model_dir, None, cfg, tokenizer=backend.tokenizer, heldout_eval=heldout_eval)
    out = []
    for h in res.history:
        e = round(h["step"] / per_epoch) if "heldout_correct" in h else 0
        if e in epochs:
            out.append({"algorithm": algo, **hp, "epochs": e, "optimizer_steps": e * per_epoch,
                        "groups_used": len(kept), "groups_dropped": len(pool) - len(kept),
                        "run_seconds": res.metrics["seconds"]}
                       | {k[len("heldout_"):]: (None if math.isnan(v) else v)
                          for k, v in h.items() if k.startswith("heldout_")})
    return out


def resumed_trials(partial: Path, setup: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid points a cut-short run finished, when it ran the same setup (same grid, pool,
    model, validation prompts); nothing otherwise."""
    if not partial.is_file():
        return []
    held = json.loads(partial.read_text())
    return list(held["trials"]) if held.get("setup") == setup else []


def merged_trials(earlier: Path, tc: TuneConfig, model_name: str) -> list[dict[str, Any]]:
    """The earlier ``tune_round.json`` (its trials tagged with its grid) for ``--merge``; refused
    when it was not measured on the same model, pool and validation prompts."""
    if not earlier.is_file():
        raise SystemExit(f"--merge: no earlier results at {earlier}")
    held = json.loads(earlier.read_text())
    same = {"model": Path(held["model_dir"]).name == model_name,
            "pool": held["pool"] == [tc.prompts, tc.group_size],
            "validation": [held["validation"][k] for k in ("seed", "n", "samples")]
            == [VALIDATION_SEED, tc.val, tc.samples]}
    if not all(same.values()):
        raise SystemExit(f"--merge: {earlier} differs in {[k for k, v in same.items() if not v]}")
    grid = held["grid"]
    return [{"grid": grid, "zero_variance": held["zero_variance"],
             "trials": [t if "grid" in t else t | {"grid": grid} for t in held["trials"]]}]


def run(tc: TuneConfig, out_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    t_start = time.perf_counter()
    model_dir = bootstrap_model(
        config=BootstrapConfig(size=tc.size, **dict(tc.bootstrap_overrides)), cache_dir=tc.cache_dir)
    earlier = merged_trials(out_dir / "tune_round.json", tc, model_dir.name) if tc.merge else []
    backend = LocalBackend(model_dir)
    val = items(VALIDATION_SEED, tc.val, "validation")
    pool = make_rollout_groups(backend, items(0, tc.prompts, "train"), tc.group_size,
                               SamplingParams(tc.max_tokens, 1.0, 0), grade)
    base = val_score(backend, val, tc.samples, tc.max_tokens)
    log(f"baseline val correct={base['correct']:.3f} parse={base['parse_rate']:.3f}")
    setup = {"grid": tc.grid, "round": ROUND, "pool": [tc.prompts, tc.group_size], "size": tc.size,
             "model": model_dir.name, "val": [VALIDATION_SEED, tc.val, tc.samples],
             "epochs": list(tc.epochs), "max_tokens": tc.max_tokens,
             "grid_keeps_zero_variance": tc.grid_keeps_zero_variance}
    partial = out_dir / "tune_round.partial.json"
    trials = resumed_trials(partial, setup) if tc.resume else []
    if trials:
        log(f"resuming: {len(trials)} trial records from {partial}")
    for algo, grid in GRIDS[tc.grid].items():
        for hp in grid:
            if any(t["algorithm"] == algo and all(t.get(k) == v for k, v in hp.items())
                   for t in trials):
                continue
            ts = trial(model_dir, backend, pool, val, algo,
                       hp | {"keep_zero_variance_groups": tc.grid_keeps_zero_variance},
                       tc.samples, tc.max_tokens, tc.epochs)
            trials.extend(ts)
            # Every finished grid point is kept, so a run cut short loses at most one point.
            write_json(partial, {"setup": setup, "baseline": base, "trials": trials})
            for t in ts:
                log(f"{algo} {hp} epochs={t['epochs']}: " + (t.get("skipped") or (
                    f"correct={t['correct']:.3f} parse={t['parse_rate']:.3f} "
                    f"steps={t['optimizer_steps']} (run {t['run_seconds']:.0f}s)")))
    best: dict[str, dict[str, Any]] = {}
    zero_variance: dict[str, list[dict[str, Any]]] = {}
    grids = [tc.grid] + ([earlier[0]["grid"]] if earlier else [])
    if earlier:
        trials = [t | {"grid": tc.grid} for t in trials] + [t for e in earlier for t in e["trials"]]
    for algo in GRIDS[tc.grid]:
        ran = [t for t in trials if t["algorithm"] == algo and t["correct"] is not None]
        if not ran:
            raise RuntimeError(f"no {algo} grid point could train: {trials[-1].get('skipped')}")
        top = max(ran, key=lambda t: t["correct"])
        hp = {k: top[k] for k in ("lr", "beta2", "epochs") if k in top}
        held = [z for e in earlier for z in e["zero_variance"].get(algo, [])]
        if held and all(held[0].get(k) == v for k, v in hp.items()):
            zero_variance[algo] = held  # the best point did not move: its other-way run stands
            best[algo] = max((t for t in held if t["correct"] is not None), key=lambda t: t["correct"])
            continue
        other = trial(model_dir, backend, pool, val, algo,
                      {k: v for k, v in hp.items() if k != "epochs"}
                      | {"keep_zero_variance_groups": not tc.grid_keeps_zero_variance},
                      tc.samples, tc.max_tokens, (hp["epochs"],))[0]
        log(f"{algo} best {hp} (zero-variance groups kept: {tc.grid_keeps_zero_variance}) "
            f"correct={top['correct']:.3f}; the other way: {other.get('skipped') or other['correct']}")
        zero_variance[algo] = [top, other]
        best[algo] = max((t for t in (top, other) if t["correct"] is not None),
                         key=lambda t: t["correct"])
    val_outcomes = [bool(p.outcome["value"]) for p in val if p.outcome is not None]
    out: dict[str, Any] = {
           "baseline": base, "trials": trials, "best": best, "zero_variance": zero_variance,
           "grid": "+".join(grids), "round": ROUND, "pool": [tc.prompts, tc.group_size],
           "validation": {"seed": VALIDATION_SEED, "split": "validation", "n": tc.val,
                          "samples": tc.samples, "majority_rate": majority_rate(val_outcomes)},
           "size": tc.size, "bootstrap_overrides": dict(tc.bootstrap_overrides),
           "model_dir": str(model_dir), "seconds": time.perf_counter() - t_start}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tune_round.json").write_text(json.dumps(out, indent=2))
    partial.unlink(missing_ok=True)
    log(f"best: {json.dumps(best)} ({out['seconds'] / 60:.1f} min)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    d = TuneConfig()
    ap.add_argument("--size", default=d.size)
    add_bootstrap_flag(ap)
    ap.add_argument("--grid", choices=sorted(GRIDS), default=d.grid)
    ap.add_argument("--prompts", type=int, default=d.prompts)
    ap.add_argument("--group-size", type=int, default=d.group_size)
    ap.add_argument("--val", type=int, default=d.val)
    ap.add_argument("--samples", type=int, default=d.samples)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--resume", action="store_true",
                    help="keep the grid points an interrupted run of the same setup finished")
    ap.add_argument("--merge", action="store_true",
                    help="add to the tune_round.json in --out (same model, pool, validation) and "
                         "choose the best over both; the extend grid needs it")
    args = ap.parse_args()
    if args.grid == "extend" and not args.merge:
        ap.error("--grid extend only extends an earlier run: add --merge")
    overrides = bootstrap_flag_overrides(ap, args)
    run(TuneConfig(size=args.size, bootstrap_overrides=overrides, cache_dir=args.cache_dir,
                   grid=args.grid, prompts=args.prompts, group_size=args.group_size,
                   val=args.val, samples=args.samples, resume=args.resume, merge=args.merge,
                   epochs=EXTEND_EPOCHS if args.grid == "extend" else EPOCHS), args.out)


if __name__ == "__main__":
    main()
