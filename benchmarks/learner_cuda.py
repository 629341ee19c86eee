"""The learner on a GPU (``TrainerConfig.device = "cuda"``), checked against the same round on CPU.

    python -m benchmarks.learner_cuda [--prompts 64] [--group-size 8] [--epochs 2] [--out DIR]

Needs a CUDA GPU. CI has none, so this is not part of ``benchmarks/run_all`` and no test depends
on it: run it where a GPU is lent (``results/learner_cuda.json`` says where it last ran).

1. **Groups.** The bundled model, on the GPU through ``LocalBackend(device="cuda")``, samples G
   completions at T=1 for N training prompts of the clinical task; the contract grader scores
   them (the rollout worker's path, on a GPU).
2. **The same round on both devices.** The groups are trained twice with one config (fp32, same
   seed, so the same schedule and LoRA init): ``device="cpu"`` and ``device="cuda"``. Reported:
   the loss curves step by step (max difference relative to the largest |loss|; verdict against
   ``LOSS_RTOL``), and the mean log-ratio log πθ/π_ref at step 1, where θ = θ_ref: behaviour
   log-probs from the GPU sampler against the trainer's scoring on each device (0 up to
   rounding; the CPU tests hold it below 1e-4 nats a token).
3. **Step time.** Median seconds per optimizer step (from the round's progress hook) for CPU fp32
   (all this machine's cores), GPU fp32 and GPU bf16.
4. **The GPU-trained adapter serves.** It is written to disk by the trainer (from GPU tensors)
   and loaded by the backend: held-out correctness and parse rate of base and adapter (T=1, one
   answer per prompt, ``--heldout`` prompts), so the file round-trip is checked end to end.

Writes ``learner_cuda.json`` and ``learner_cuda.png`` (the two loss curves) to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import agg_backend, machine, results_dir, write_json
from benchmarks.quality import ROUND, grade, items, quick_eval
from workers.inference.base import AdapterRef, SamplingParams
from workers.inference.local import LocalBackend
from workers.learner.bundled import SHIPPED_DIR
from workers.learner.data import TrainingGroup, make_rollout_groups
from workers.learner.trainer import TrainerConfig, TrainResult, train

LOSS_RTOL = 1e-3
"""Loss curves of the two devices may differ by this share of the largest |loss|: the GPU sums
in another order (fp32; TF32 stays off, torch's default for matmuls), and AdamW's first steps
(m̂/√v̂ ≈ ±1 per entry) turn rounding in near-zero gradient entries into visible steps. Measured
on an H200: 9e-7 over 8 steps, 1.8e-5 over 136; over 268 steps the two runs drift apart from
step 162 (1.6e-2 at the end), as two CPU runs with other thread counts would: the verdict is
meant for rounds of up to ~150 steps."""
MAX_TOKENS = 80


@dataclass(frozen=True)
class Config:
    prompts: int = 64
    group_size: int = 8
    epochs: int = 2
    heldout: int = 256
    seed: int = 0


def timed_round(groups: list[TrainingGroup], model_dir: Path, cfg: TrainerConfig, tokenizer: Any,
                out_dir: Path | None) -> tuple[TrainResult, list[float]]:
    """The round and the wall-clock seconds of each optimizer step after the first (which pays
    for allocation and kernel selection)."""
    marks: list[float] = []
    result = train(groups, model_dir, out_dir, cfg, tokenizer=tokenizer,
                   progress=lambda step, total, m: marks.append(time.perf_counter()))
    return result, [b - a for a, b in itertools.pairwise(marks)]


def run(c: Config, out_dir: str | Path | None = None) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.learner_cuda needs a CUDA GPU; torch sees none here")
    out = results_dir(out_dir)
    model_dir = SHIPPED_DIR
    backend = LocalBackend(model_dir, device="cuda")
    t0 = time.perf_counter()
    groups = make_rollout_groups(backend, items(c.seed, c.prompts, "train"), c.group_size,
                                 SamplingParams(MAX_TOKENS, 1.0, seed=c.seed), grade)
    sampling_s = time.perf_counter() - t0
    base_cfg = TrainerConfig(algorithm="oapl", **ROUND, epochs=c.epochs, lr=3e-3, beta2=0.1,
                             seed=c.seed)
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tl-learner-cuda-") as tmp:
        adapter_dir = Path(tmp) / "adapter-cuda"
        arms = {"cpu_fp32": dataclasses.replace(base_cfg, device="cpu"),
                "cuda_fp32": dataclasses.replace(base_cfg, device="cuda"),
                "cuda_bf16": dataclasses.replace(base_cfg, device="cuda", dtype="bfloat16")}
        for name, cfg in arms.items():
            result, step_s = timed_round(groups, model_dir, cfg, backend.tokenizer,
                                         adapter_dir if name == "cuda_fp32" else None)
            losses = [h["loss"] for h in result.history if "loss" in h]
            runs[name] = {
                "device": result.metrics["device"], "dtype": cfg.dtype,
                "optimizer_steps": result.metrics["optimizer_steps"],
                "groups_used": result.metrics["groups_used"],
                "median_step_s": round(statistics.median(step_s), 4) if step_s else None,
                "first_step_mean_log_ratio": result.history[0].get("mean_log_ratio"),
                "losses": losses,
            }
            print(f"{name}: {runs[name]['optimizer_steps']} steps, median "
                  f"{runs[name]['median_step_s']} s/step, step-1 log-ratio "
                  f"{runs[name]['first_step_mean_log_ratio']:.2e}", flush=True)
        cpu, gpu = runs["cpu_fp32"]["losses"], runs["cuda_fp32"]["losses"]
        scale = max(abs(x) for x in cpu)
        loss_rdiff = max(abs(a - b) for a, b in zip(cpu, gpu, strict=True)) / scale
        heldout = items(c.seed, c.heldout, "heldout")
        base_eval = quick_eval(backend, heldout, c.seed, None, MAX_TOKENS)
        adapter_eval = quick_eval(backend, heldout, c.seed,
                                  AdapterRef(adapter_dir.name, str(adapter_dir)), MAX_TOKENS)
    speedup = (runs["cpu_fp32"]["median_step_s"] / runs["cuda_fp32"]["median_step_s"]
               if runs["cpu_fp32"]["median_step_s"] and runs["cuda_fp32"]["median_step_s"]
               else None)
    report = {
        "benchmark": "learner_cuda",
        "config": dataclasses.asdict(c) | {"trainer": base_cfg.to_dict()},
        "machine": machine() | {"gpu": torch.cuda.get_device_name(0),
                                "torch": torch.__version__},
        "groups": {"n": len(groups), "group_size": c.group_size, "sampling_s": round(sampling_s, 2),
                   "mean_reward": statistics.fmean(r for g in groups for r in g.rewards)},
        "runs": runs,
        "loss_curve_max_rel_diff_cpu_vs_cuda": loss_rdiff,
        "loss_rtol": LOSS_RTOL,
        "loss_curves_agree": loss_rdiff <= LOSS_RTOL,
        "step_speedup_cuda_fp32_vs_cpu": round(speedup, 2) if speedup else None,
        "heldout": {"n": c.heldout, "base": base_eval, "cuda_adapter": adapter_eval},
    }
    write_json(out / "learner_cuda.json", report)
    plot(report, out / "learner_cuda.png")
    print(f"loss curves: max relative difference {loss_rdiff:.2e} (tolerance {LOSS_RTOL}); "
          f"held-out correct base {base_eval['correct']:.3f} → GPU adapter "
          f"{adapter_eval['correct']:.3f}", flush=True)
    return report


def plot(result: dict[str, Any], path: Path) -> None:
    agg_backend()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, style in (("cpu_fp32", "o-"), ("cuda_fp32", "x--"), ("cuda_bf16", ":")):
        r = result["runs"][name]
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], style,
                label=f"{name} ({r['median_step_s']} s/step)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("OAPL loss")
    ax.set_title(f"same round on CPU and {result['machine']['gpu']}: max rel. diff "
                 f"{result['loss_curve_max_rel_diff_cpu_vs_cuda']:.1e}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=d.prompts)
    p.add_argument("--group-size", type=int, default=d.group_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--heldout", type=int, default=d.heldout)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    return run(Config(a.prompts, a.group_size, a.epochs, a.heldout, a.seed), a.out)


if __name__ == "__main__":
    main()
