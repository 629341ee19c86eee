"""Tune the one-update hyperparameters of ``benchmarks/quality.py`` (both algorithms alike).

    python -m benchmarks.tune_one_step [--prompts 128] [--group-size 8] [--val 200]

Samples one pool of baseline rollouts (seed 0, the quality benchmark's headline row: 128 prompts ×
8), then trains one update per grid point and scores it on a *validation* split (held-out prompts
of another seed, disjoint from the benchmark's evaluation prompts). Writes
``benchmarks/results/tune_one_step.json``; the chosen values are then frozen in ``quality.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

from app.settings import get_settings
from benchmarks.quality import MAX_TOKENS, evaluate, grade, items
from workers.inference.base import SamplingParams
from workers.inference.local import LocalBackend
from workers.learner.bootstrap import BootstrapConfig, bootstrap_model
from workers.learner.data import make_rollout_groups
from workers.learner.trainer import TrainerConfig, train

RESULTS = Path(__file__).parent / "results"
VALIDATION_SEED = 7  # quality.py evaluates on items(0, n, "heldout")

# One AdamW step moves every parameter by about ±lr whatever the loss's scale (the first step of
# Adam is a sign step), so β₂ and the advantage scale only matter through SGD.
GRID: dict[str, list[dict[str, Any]]] = {
    "oapl": [
        *({"lr": lr, "beta1": b1, "beta2": b2}
          for lr in (3e-3, 1e-2, 2e-2, 3e-2) for b1 in (1.0, 10.0) for b2 in (0.01, 0.1)),
        *({"optimizer": "sgd", "lr": lr, "beta1": 1.0, "beta2": 0.1} for lr in (1.0, 10.0, 100.0)),
    ],
    "grpo": [
        *({"lr": lr} for lr in (3e-3, 1e-2, 2e-2, 3e-2)),
        *({"optimizer": "sgd", "lr": lr} for lr in (0.1, 1.0, 10.0)),
    ],
}
FIXED = dict(micro_batch_size=128, lora_rank=16, lora_alpha=32.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    t_start = time.perf_counter()
    model_dir = bootstrap_model(config=BootstrapConfig(size="tiny"), cache_dir=get_settings().model_cache)
    backend = LocalBackend(model_dir)
    val = items(VALIDATION_SEED, args.val, "heldout")
    pool = make_rollout_groups(backend, items(0, args.prompts, "train"), args.group_size,
                               SamplingParams(MAX_TOKENS, 1.0, 0), grade)
    base = evaluate(backend, val, 1, seed=30_000)
    print(f"baseline val correct={base['correct']:.3f} parse={base['parse_rate']:.3f}", flush=True)
    trials: list[dict[str, Any]] = []
    for algo, grid in GRID.items():
        for hp in grid:
            cfg = TrainerConfig(algorithm=algo, epochs=1, groups_per_step=len(pool), seed=0,  # type: ignore[arg-type]
                                **FIXED, **hp)
            res = train(pool, model_dir, None, cfg, tokenizer=backend.tokenizer)
            merged = copy.deepcopy(res.model).merge_and_unload()
            ev = evaluate(LocalBackend.from_model(merged, backend.tokenizer), val, 1, seed=30_000)
            trials.append({"algorithm": algo, **hp, "correct": ev["correct"],
                           "parse_rate": ev["parse_rate"], "mean_length": ev["mean_length"]})
            print(f"{algo} {hp}: correct={ev['correct']:.3f} parse={ev['parse_rate']:.3f} "
                  f"len={ev['mean_length']:.1f}", flush=True)
    best = {a: max((t for t in trials if t["algorithm"] == a), key=lambda t: t["correct"])
            for a in GRID}
    out = {"baseline": {k: base[k] for k in ("correct", "parse_rate")}, "trials": trials,
           "best": best, "fixed": FIXED, "pool": [args.prompts, args.group_size],
           "validation": {"seed": VALIDATION_SEED, "n": args.val},
           "seconds": time.perf_counter() - t_start}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune_one_step.json").write_text(json.dumps(out, indent=2))
    print("best:", json.dumps(best), flush=True)


if __name__ == "__main__":
    main()
