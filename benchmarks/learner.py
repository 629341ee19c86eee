"""OAPL update cost per completion token and peak learner memory, against plain supervised
fine-tuning on the same tokens with the same LoRA, in one run.

    python -m benchmarks.learner [--size tiny] [--prompts 32] [--steps 5] [--profile]

Inputs (deterministic): the bundled model (``bootstrap_model``, size ``--size``), ``--prompts``
clinical train prompts (seed 0), G completions each sampled by the base model (seed 0) and graded
by the contract grader. Both arms see the very same micro-batches (``flatten_groups`` →
``micro_batches`` with the trainer's default micro-batch size), the same LoRA configuration and
AdamW:

- **OAPL**: ``workers.learner.trainer.train`` (the product code path, full batch every step,
  no zero-variance filter so the token set is identical), timed per optimizer step from its
  progress callback.
- **SFT**: the plain supervised step on the completion tokens: ``model(input_ids, attention_mask,
  labels)`` (HF's shifted cross-entropy), backward, clip, AdamW.

The arms alternate for ``--rounds`` rounds; per-step times are the medians over rounds and steps
after the first (warm-up) step. ``oapl_vs_sft_cost_ratio`` = OAPL s/token ÷ SFT s/token.

Peak RSS: each arm runs in a fresh subprocess (``--rss-child``). Once the libraries, tokenizer
and groups are loaded, the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``) and the
RSS noted (baseline); the learner's own peak is VmHWM − baseline after the run (model load
included). The floor is model weights + LoRA weights + AdamW state (2 × LoRA), all float32.
``learner_peak_rss_vs_floor`` = OAPL own peak ÷ floor.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from app.settings import get_settings
from benchmarks._common import agg_backend, machine, print_ratios, results_dir, write_json


@dataclass(frozen=True)
class LearnerBenchConfig:
    size: str = "tiny"
    """Bootstrap model size (``workers.learner.bootstrap.SIZES``)."""
    prompts: int = 16
    group_size: int = 8
    max_new_tokens: int = 80
    steps: int = 4
    """Optimizer steps per arm per round (the first one is warm-up, not counted)."""
    rounds: int = 2
    micro_batch_size: int = 64
    """The trainer's default."""
    seed: int = 0
    rss: bool = True
    profile: bool = False
    bootstrap_overrides: tuple[tuple[str, Any], ...] = ()
    """Extra ``BootstrapConfig`` fields (the smoke test builds a very small model)."""


# ------------------------------------------------------------------ inputs


def model_dir_for(cfg: LearnerBenchConfig) -> Path:
    from workers.learner.bootstrap import BootstrapConfig, bootstrap_model

    return bootstrap_model(config=BootstrapConfig(size=cfg.size, **dict(cfg.bootstrap_overrides)),
                           cache_dir=get_settings().model_cache)


def trainer_config(cfg: LearnerBenchConfig, steps: int) -> Any:
    from workers.learner.trainer import TrainerConfig

    return TrainerConfig(
        # ``steps`` full-batch steps: one step per epoch over all the groups.
        algorithm="oapl", epochs=steps, groups_per_step=max(1, cfg.prompts),
        micro_batch_size=cfg.micro_batch_size, keep_zero_variance_groups=True, seed=cfg.seed,
    )


def make_groups(model_dir: Path, cfg: LearnerBenchConfig) -> list[Any]:
    from workers.clinical import task
    from workers.graders.contract import ContractGrader
    from workers.inference.base import SamplingParams
    from workers.inference.local import LocalBackend
    from workers.learner.data import PromptItem, make_rollout_groups

    grader = ContractGrader()

    def grade(messages: Any, text: str, outcome: Any) -> tuple[float, bool]:
        r = grader.grade(messages, text, outcome)
        return r.reward, r.parse_ok

    prompts = [
        PromptItem(e.external_id, e.messages, {"name": task.OUTCOME_NAME, "value": e.outcome})
        for e in task.generate(cfg.seed, cfg.prompts, "train")
    ]
    backend = LocalBackend(model_dir)
    params = SamplingParams(cfg.max_new_tokens, 1.0, seed=cfg.seed)
    return make_rollout_groups(backend, prompts, cfg.group_size, params, grade)


# ------------------------------------------------------------------ the two arms


def oapl_step_times(model_dir: Path, groups: list[Any], cfg: LearnerBenchConfig, tok: Any) -> list[float]:
    from workers.learner.trainer import train

    stamps: list[float] = []
    train(groups, model_dir, None, trainer_config(cfg, cfg.steps), tokenizer=tok,
          progress=lambda step, total, m: stamps.append(time.perf_counter()))
    return [b - a for a, b in itertools.pairwise(stamps)]


def sft_step_times(model_dir: Path, groups: list[Any], cfg: LearnerBenchConfig, tok: Any) -> list[float]:
    """Plain supervised steps on the same micro-batches with the same LoRA and optimizer."""
    import torch

    from workers.learner.data import flatten_groups, micro_batches
    from workers.learner.trainer import load_policy

    tcfg = trainer_config(cfg, cfg.steps)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    records = flatten_groups(groups, tok, "oapl", tcfg.beta1)
    batches = micro_batches(records, tcfg.micro_batch_size, pad_id)
    labels = []
    for mb in batches:
        lab = torch.full_like(mb.input_ids, -100)
        # target_mask[:, t] marks input_ids[:, t+1] as a completion token
        lab[:, 1:] = torch.where(mb.target_mask.bool(), mb.input_ids[:, 1:], -100)
        labels.append(lab)
    n_tokens = sum(int(mb.target_mask.sum()) for mb in batches)
    model = load_policy(model_dir, tcfg, None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(tcfg.adam_beta1, tcfg.adam_beta2), eps=tcfg.adam_eps)
    model.train()
    stamps = [time.perf_counter()]
    for _ in range(cfg.steps):
        opt.zero_grad(set_to_none=False)
        for mb, lab in zip(batches, labels, strict=True):
            out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, labels=lab,
                        use_cache=False)
            # HF's loss is the token mean of this micro-batch; weight it to the step's token mean
            loss = out.loss * (int(mb.target_mask.sum()) / n_tokens)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
        opt.step()
        stamps.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(stamps[1:])]


def token_stats(groups: list[Any], cfg: LearnerBenchConfig, tok: Any) -> dict[str, Any]:
    from workers.learner.data import flatten_groups, micro_batches

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    records = flatten_groups(groups, tok, "oapl", 1.0)
    batches = micro_batches(records, cfg.micro_batch_size, pad_id)
    completion = sum(len(r.completion_ids) for r in records)
    real = sum(len(r.prompt_ids) + len(r.completion_ids) for r in records)
    padded = sum(int(mb.input_ids.numel()) for mb in batches)
    return {
        "sequences": len(records),
        "completion_tokens_per_step": completion,
        "prompt_plus_completion_tokens": real,
        "padded_tokens": padded,
        "padding_share": round(1 - real / max(padded, 1), 4),
        "completion_share_of_logits": round(completion / max(padded, 1), 4),
    }


# ------------------------------------------------------------------ peak RSS in fresh processes


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_child(mode: str, model_dir: str, groups_path: str, cfg_json: str) -> None:
    """Runs in a fresh interpreter; prints one JSON line: RSS once the libraries, tokenizer and
    groups are loaded (the baseline) and the peak RSS of the learner run that follows."""
    import gc

    import torch  # noqa: F401  (the same libraries in every mode)
    import transformers  # noqa: F401
    from transformers import AutoTokenizer

    from workers.learner import trainer  # noqa: F401
    from workers.learner.data import load_groups_jsonl

    cfg = LearnerBenchConfig(**json.loads(cfg_json))
    tok = AutoTokenizer.from_pretrained(model_dir)
    groups = load_groups_jsonl(groups_path)
    gc.collect()
    reset = _reset_peak_rss()
    base_kib = _proc_status_kib("VmRSS")
    if mode == "oapl":
        oapl_step_times(Path(model_dir), groups, cfg, tok)
    elif mode == "sft":
        sft_step_times(Path(model_dir), groups, cfg, tok)
    peak_kib = _proc_status_kib("VmHWM") if reset else None
    if peak_kib is None or base_kib is None:  # no /proc: the lifetime peak, an overestimate
        peak_kib = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        base_kib = base_kib or 0
    print(json.dumps({"mode": mode, "baseline_bytes": base_kib * 1024,
                      "peak_bytes": peak_kib * 1024, "peak_reset": reset}))


def floor_bytes(model_dir: Path, cfg: LearnerBenchConfig) -> dict[str, int]:
    """Model weights + LoRA weights + AdamW state (exp_avg, exp_avg_sq: 2 × LoRA)."""
    from workers.learner.trainer import load_policy

    model = load_policy(model_dir, trainer_config(cfg, 1), None)
    lora = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"model_bytes": total - lora, "lora_bytes": lora, "optimizer_bytes": 2 * lora}


def measure_rss(model_dir: Path, groups: list[Any], cfg: LearnerBenchConfig) -> dict[str, Any]:
    from workers.learner.data import dump_groups_jsonl

    fl = floor_bytes(model_dir, cfg)
    floor = fl["model_bytes"] + fl["lora_bytes"] + fl["optimizer_bytes"]
    with tempfile.TemporaryDirectory(prefix="tl-bench-rss-") as tmp:
        path = Path(tmp) / "groups.jsonl"
        dump_groups_jsonl(groups, path)
        child_cfg = {k: v for k, v in asdict(cfg).items() if k != "bootstrap_overrides"}
        child_cfg |= {"steps": 2, "rss": False, "profile": False}
        res: dict[str, Any] = {}
        for mode in ("oapl", "sft"):
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.learner", "--rss-child", mode, str(model_dir),
                 str(path), json.dumps(child_cfg)],
                capture_output=True, text=True, timeout=900,
                cwd=Path(__file__).resolve().parents[1],
            )
            if proc.returncode != 0:
                raise RuntimeError(f"rss child {mode} failed:\n{proc.stderr[-3000:]}")
            res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    own = {m: res[m]["peak_bytes"] - res[m]["baseline_bytes"] for m in res}
    mib = 1 / 2**20
    return {
        "method": "fresh subprocess per arm; peak = VmHWM after resetting it (clear_refs) once "
        "libraries, tokenizer and groups are loaded; own peak = peak − RSS at that point",
        "peak_reset": all(r["peak_reset"] for r in res.values()),
        "interpreter_baseline_mib": round(res["oapl"]["baseline_bytes"] * mib, 1),
        "floor_mib": round(floor * mib, 3),
        "model_mib": round(fl["model_bytes"] * mib, 3),
        "lora_mib": round(fl["lora_bytes"] * mib, 3),
        "optimizer_mib": round(fl["optimizer_bytes"] * mib, 3),
        "oapl_peak_rss_mib": round(res["oapl"]["peak_bytes"] * mib, 1),
        "sft_peak_rss_mib": round(res["sft"]["peak_bytes"] * mib, 1),
        "oapl_own_peak_mib": round(own["oapl"] * mib, 2),
        "sft_own_peak_mib": round(own["sft"] * mib, 2),
        "oapl_own_vs_floor": round(own["oapl"] / floor, 3),
        "sft_own_vs_floor": round(own["sft"] / floor, 3),
        "oapl_vs_sft_own_peak": round(own["oapl"] / max(own["sft"], 1), 3),
        "micro_batch_size": cfg.micro_batch_size,
    }


# ------------------------------------------------------------------ the whole benchmark


def run(cfg: LearnerBenchConfig, out_dir: str | Path | None = None) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    started_on = machine()
    out = results_dir(out_dir)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model_dir = model_dir_for(cfg)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    groups = make_groups(model_dir, cfg)
    stats = token_stats(groups, cfg, tok)
    oapl: list[float] = []
    sft: list[float] = []
    for _ in range(cfg.rounds):
        oapl += oapl_step_times(model_dir, groups, cfg, tok)
        sft += sft_step_times(model_dir, groups, cfg, tok)
    n = stats["completion_tokens_per_step"]
    oapl_step, sft_step = statistics.median(oapl), statistics.median(sft)
    ratio = oapl_step / sft_step
    profile_text = profile_oapl(model_dir, groups, cfg, tok, out) if cfg.profile else None
    rss = measure_rss(model_dir, groups, cfg) if cfg.rss else None
    rewards = [c.reward for g in groups for c in g.completions]
    result: dict[str, Any] = {
        "benchmark": "learner",
        "config": asdict(cfg),
        "machine": started_on,
        "torch_threads": torch.get_num_threads(),
        "model": {"size": cfg.size, "dir": str(model_dir),
                  "params": _n_params(model_dir)},
        "tokens": stats,
        "mean_reward": round(sum(rewards) / len(rewards), 4),
        "oapl_step_seconds": [round(x, 4) for x in oapl],
        "sft_step_seconds": [round(x, 4) for x in sft],
        "oapl_us_per_completion_token": round(oapl_step / n * 1e6, 2),
        "sft_us_per_completion_token": round(sft_step / n * 1e6, 2),
        "rss": rss,
        "profile_top": profile_text,
        "seconds": round(time.perf_counter() - t0, 1),
        "ratios": {
            "oapl_vs_sft_cost_ratio": round(ratio, 4),
            "learner_peak_rss_vs_floor": rss["oapl_own_vs_floor"] if rss else None,
        },
        "targets": {
            "oapl_vs_sft_cost_ratio": {"target": "<= 1.15", "met": ratio <= 1.15},
            "learner_peak_rss_vs_floor": {
                "target": "<= 2",
                "met": (rss["oapl_own_vs_floor"] <= 2) if rss else None,
            },
        },
    }
    write_json(out / "learner.json", result)
    plot(result, out / "learner.png")
    return result


def _n_params(model_dir: Path) -> int | None:
    try:
        from workers.learner.bootstrap import bootstrap_info

        return int(bootstrap_info(model_dir)["n_params"])
    except (OSError, KeyError, ValueError):
        return None


def profile_oapl(model_dir: Path, groups: list[Any], cfg: LearnerBenchConfig, tok: Any,
                 out: Path) -> str:
    from pyinstrument import Profiler

    prof = Profiler(interval=0.002)
    prof.start()
    oapl_step_times(model_dir, groups, replace(cfg, steps=3), tok)
    prof.stop()
    text = prof.output_text(unicode=False, color=False, show_all=False)
    (out / "learner_profile_oapl.txt").write_text(text)
    prof = Profiler(interval=0.002)
    prof.start()
    sft_step_times(model_dir, groups, replace(cfg, steps=3), tok)
    prof.stop()
    (out / "learner_profile_sft.txt").write_text(
        prof.output_text(unicode=False, color=False, show_all=False)
    )
    return "\n".join(text.splitlines()[:60])


def plot(result: dict[str, Any], path: Path) -> None:
    agg_backend()
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(["OAPL update", "SFT fwd+bwd"],
          [result["oapl_us_per_completion_token"], result["sft_us_per_completion_token"]],
          color=["tab:blue", "tab:gray"])
    a.set_ylabel("µs per completion token")
    a.set_title(f"cost ratio {result['ratios']['oapl_vs_sft_cost_ratio']:.2f} (target ≤1.15)")
    rss = result["rss"]
    if rss:
        b.bar(["floor", "OAPL", "SFT"],
              [rss["floor_mib"], rss["oapl_own_peak_mib"], rss["sft_own_peak_mib"]],
              color=["tab:green", "tab:blue", "tab:gray"])
        b.set_ylabel("MiB above interpreter baseline")
        b.set_title(f"peak RSS / floor {rss['oapl_own_vs_floor']:.1f} (target ≤2)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--rss-child":
        rss_child(*argv[1:5])
        return None
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    d = LearnerBenchConfig()
    p.add_argument("--size", default=d.size)
    p.add_argument("--prompts", type=int, default=d.prompts)
    p.add_argument("--group-size", type=int, default=d.group_size)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    cfg = LearnerBenchConfig(
        size=a.size, prompts=a.prompts, group_size=a.group_size, max_new_tokens=a.max_new_tokens,
        steps=a.steps, rounds=a.rounds, micro_batch_size=a.micro_batch_size, rss=not a.no_rss,
        profile=a.profile,
    )
    result = run(cfg, a.out)
    print(f"OAPL {result['oapl_us_per_completion_token']} µs/token, "
          f"SFT {result['sft_us_per_completion_token']} µs/token "
          f"({result['tokens']['completion_tokens_per_step']} completion tokens/step)")
    if result["rss"]:
        r = result["rss"]
        print(f"RSS: baseline {r['interpreter_baseline_mib']} MiB, floor {r['floor_mib']} MiB, "
              f"OAPL own peak {r['oapl_own_peak_mib']} MiB, SFT own peak {r['sft_own_peak_mib']} MiB")
    print_ratios("learner", result["ratios"])
    return result


if __name__ == "__main__":
    main()
