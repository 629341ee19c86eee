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
- **SFT**: the plain supervised step on the completion tokens: the mean negative log-likelihood
  of the completion tokens, backward, clip, AdamW. Its forward is the learner's own
  (``sequence_logprobs``: each distinct prompt runs once and its completions continue its KV
  cache), so the ratio prices what OAPL adds to a supervised step, not a difference in how the
  tokens are run (until 2026-12-06 SFT was HF's one-pass ``labels=`` loss, which OAPL also was).

The arms alternate for ``--rounds`` rounds; per-step times are the medians over rounds and steps
after the first (warm-up) step. ``oapl_vs_sft_cost_ratio`` = OAPL s/token ÷ SFT s/token.

Peak RSS: every measurement runs in a fresh subprocess (``--rss-child``) that imports the same
libraries and loads the same tokenizer and groups, so peaks never mix and the torch runtime is on
both sides of the ratio. The training peak is the OAPL process's VmHWM over 2 optimizer steps.
The floor is the VmHWM of a process that loads model + LoRA + AdamW state without training
(``hold_state``), plus the analytic activation bytes of the step's largest micro-batch
(float32; ``shared_activation_bytes`` for the trainer's shared-prompt layout, which a batch of
whole groups takes, ``activation_bytes`` for one pass per sequence). Ratio = training peak ÷ floor, for:

- the bundled model (``learner_peak_rss_vs_floor_bundled``; SFT's ratio alongside);
- a ~100M-parameter random-init model of the same architecture and tokenizer
  (``LearnerBenchConfig.scale``, default hidden 768, 12 layers, intermediate 3072, 12 heads /
  6 KV heads: 107M parameters), trained on the first ``scale_groups`` groups in micro-batches of
  ``scale_micro_batch_size`` (memory only; the sequences are the bundled run's: ~140 padded
  tokens): ``learner_peak_rss_vs_floor``, target ≤ 1.5.

Both are measured twice, floor and peak alike: under the environment the product's learner
processes start with (``workers.learner.allocator``: jemalloc with decay off where installed),
which gives the ratios above, and under the C library's malloc, the baseline of the same run
(``learner_peak_rss_vs_floor_system_malloc``, ``rss.*_system``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
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
from workers.learner.allocator import allocator_in_use, learner_environment

# ~100M parameters with the bundled model's architecture and vocabulary (715 tokens, tied
# embeddings): 12 × (attention 1.77M + MLP 7.08M) + embeddings.
SCALE_100M: tuple[tuple[str, Any], ...] = (
    ("hidden_size", 768), ("num_hidden_layers", 12), ("intermediate_size", 3072),
    ("num_attention_heads", 12), ("num_key_value_heads", 6),
)
RSS_TARGET = 1.5


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
    scale: tuple[tuple[str, Any], ...] = SCALE_100M
    """Qwen2Config fields of the random-init model whose peak RSS is measured against its floor
    (on top of the bundled model's config); () skips it."""
    scale_groups: int = 1
    """Groups (G sequences each) per optimizer step of the scaled model."""
    scale_micro_batch_size: int = 8


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
    from workers.learner.trainer import load_policy, sequence_logprobs

    tcfg = trainer_config(cfg, cfg.steps)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    records = flatten_groups(groups, tok, "oapl", tcfg.beta1)
    batches = micro_batches(records, tcfg.micro_batch_size, pad_id)
    n_tokens = sum(int(mb.target_mask.sum()) for mb in batches)
    model = load_policy(model_dir, tcfg, None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(tcfg.adam_beta1, tcfg.adam_beta2), eps=tcfg.adam_eps)
    model.train()
    stamps = [time.perf_counter()]
    for _ in range(cfg.steps):
        opt.zero_grad(set_to_none=False)
        for mb in batches:
            seq_logp, _ = sequence_logprobs(model, mb)
            (-seq_logp.sum() / n_tokens).backward()  # the step's token-mean NLL
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


def hold_state(model_dir: Path, cfg: LearnerBenchConfig) -> tuple[Any, Any]:
    """Model + LoRA + AdamW state as training holds them, without a forward or backward pass.

    AdamW allocates its state on the first ``step()``: a step on zero gradients allocates it
    (and the gradient buffers training keeps, ``zero_grad(set_to_none=False)``) and moves no
    weight (zero update; the benchmark's weight decay is 0)."""
    import torch

    from workers.learner.trainer import load_policy, make_optimizer

    tcfg = trainer_config(cfg, 1)
    model = load_policy(model_dir, tcfg, None)
    # Weights loaded from safetensors can stay file-backed pages that count in RSS only once
    # read; training reads every one, so the floor reads them too.
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, tcfg)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    return model, opt


def rss_child(mode: str, model_dir: str, groups_path: str, cfg_json: str) -> None:
    """Runs in a fresh interpreter; prints one JSON line: RSS once the libraries, tokenizer and
    groups are loaded (the baseline) and the process's peak RSS (VmHWM) at the end of ``mode``:
    ``oapl`` / ``sft`` train, ``floor`` only holds the training state (``hold_state``)."""
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
    base_kib = _proc_status_kib("VmRSS") or 0
    if mode == "oapl":
        oapl_step_times(Path(model_dir), groups, cfg, tok)
    elif mode == "sft":
        sft_step_times(Path(model_dir), groups, cfg, tok)
    elif mode == "floor":
        hold_state(Path(model_dir), cfg)
    # VmHWM is the process's peak RSS; ru_maxrss (Linux: KiB) is the same figure without /proc.
    peak_kib = _proc_status_kib("VmHWM") or int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(json.dumps({"mode": mode, "baseline_bytes": base_kib * 1024,
                      "peak_bytes": peak_kib * 1024, "allocator": allocator_in_use()}))


def activation_bytes(model_config: Any, batch: int, width: int, lora_rank: int,
                     lora_modules: int) -> int:
    """Float32 bytes autograd saves for backward in one micro-batch of ``batch`` sequences padded
    to ``width`` tokens through a Qwen2-style decoder (SDPA attention, LoRA on ``lora_modules``
    linears per layer), with the trainer's log-softmax over the vocabulary on top:

        4 · [ L · B·W · (8h + 4i + m·r + W + a + 2)  +  B·(W−1)·V ]

    per layer and token: 8h = both RMSNorms' input and output (4h), q and k, v repeated to all
    ``a`` heads (3h, head_dim · a = h), the attention output (h); 4i = gate, SiLU(gate), up and
    their product; m·r = each LoRA A output; W = the float attention mask SDPA keeps per layer
    (B·W² in all); a = the attention log-sum-exp; 2 = the RMSNorm reciprocal RMS. On top: the
    log-probabilities over the vocabulary. Checked against ``torch.autograd.graph.
    saved_tensors_hooks`` (distinct storages, parameters excluded; 2 and 4 layers, h 96 and 192,
    i 256 and 512, B 8, W 100 with padding): the formula is 0.1–0.3% under (the rotary cos/sin
    and the final norm, left out). Transients (one layer's gradients in backward, the logits
    before the log-softmax) are not in it; the ratio is what they and the allocator add."""
    mc = model_config
    h, i, a = mc.hidden_size, mc.intermediate_size, mc.num_attention_heads
    n_layers, vocab = mc.num_hidden_layers, mc.vocab_size
    per_token = 8 * h + 4 * i + lora_modules * lora_rank + width + a + 2
    return 4 * (n_layers * batch * width * per_token + batch * (width - 1) * vocab)


def shared_activation_bytes(model_config: Any, prompts: int, prompt_width: int, batch: int,
                            completion_width: int, lora_rank: int, lora_modules: int) -> int:
    """``activation_bytes`` for a micro-batch whose ``batch`` rows continue ``prompts`` distinct
    prompts (the learner's shared-prompt pass): the prompts once (U × P tokens), then the
    completions (B × C tokens) attending to their prompt's cache:

        4 · [ L · ( U·P · (8h + 4i + m·r + P + a + 2)
                    + B·C · (6h + 4i + m·r + a + 2) + B·(P+C) · (2h + C) )  +  B·C·V ]

    The prompt pass is the one-pass formula on U × P. A completion token saves the same as there
    but its k and v (2h fewer); the keys and values SDPA keeps are each row's whole context,
    the prompt's cache reindexed to the row and the row's own (2h · B·(P+C)), with a B·C·(P+C)
    float mask; the vocabulary log-probs are the completions' only. Checked against
    ``saved_tensors_hooks`` on the bundled model (0.5% under at 8 prompts × 8 completions, P 125,
    C 41; ``tests/benchmarks/test_activation_bytes.py``). Like ``activation_bytes`` it assumes
    the bundled architecture's SDPA path (4 heads to 2 key-value heads): a model with another
    ratio saves other copies of k and v (the tests' 2-to-1 model: ~9% less than this)."""
    mc = model_config
    h, i, a = mc.hidden_size, mc.intermediate_size, mc.num_attention_heads
    n_layers, vocab = mc.num_hidden_layers, mc.vocab_size
    u, p, b, c = prompts, prompt_width, batch, completion_width
    lora = lora_modules * lora_rank
    per_layer = (u * p * (8 * h + 4 * i + lora + p + a + 2)
                 + b * c * (6 * h + 4 * i + lora + a + 2) + b * (p + c) * (2 * h + c))
    return 4 * (n_layers * per_layer + b * c * vocab)


def largest_activation_bytes(model_dir: Path, groups: list[Any], cfg: LearnerBenchConfig,
                             tok: Any) -> tuple[int, list[int]]:
    """(activation bytes of the step's largest micro-batch, its [sequences, padded width,
    distinct prompts])."""
    from transformers import AutoConfig

    from workers.learner.data import flatten_groups, micro_batches

    tcfg = trainer_config(cfg, 1)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = micro_batches(flatten_groups(groups, tok, "oapl", tcfg.beta1),
                            tcfg.micro_batch_size, pad_id)
    mc = AutoConfig.from_pretrained(str(model_dir))
    m, r = len(tcfg.target_modules), tcfg.lora_rank
    # the layout the trainer runs: its prompts once when rows share them, else one pass
    sized = [
        (shared_activation_bytes(mc, int(mb.prompts.shape[0]), int(mb.prompts.shape[1]),
                                 len(mb), int(mb.completions.shape[1]), r, m)
         if mb.shares_prompts else
         activation_bytes(mc, len(mb), int(mb.input_ids.shape[1]), r, m),
         [len(mb), int(mb.input_ids.shape[1]), len(mb.prompts)])
        for mb in batches
    ]
    best = max(sized, key=lambda s: s[0])
    return best[0], best[1]


def scale_model(model_dir: Path, cfg: LearnerBenchConfig, out: Path) -> tuple[Path, int]:
    """The bundled model's architecture and tokenizer at ``cfg.scale`` (Qwen2Config fields),
    random-initialised (seeded) and saved to ``out``: memory only, its quality means nothing."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    bundled = AutoConfig.from_pretrained(str(model_dir))
    # Rebuilt rather than edited: per-layer fields (layer_types) follow the new layer count.
    fields = {k: v for k, v in bundled.to_dict().items() if k != "layer_types"}
    mc = type(bundled)(**(fields | dict(cfg.scale)))
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(mc)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out))
    return out, n_params


def allocator_environments() -> dict[str, dict[str, str]]:
    """The environments the RSS children run under: ``learner``, the one the product's learner
    processes get (``learner_environment`` with the default ``auto``: jemalloc with decay off
    where installed), and ``system``, the C library's malloc (the baseline, same run)."""
    system = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    return {"learner": learner_environment(system, "auto"), "system": system}


def _rss_children(model_dir: Path, groups_path: Path, child_cfg: dict[str, Any],
                  modes: tuple[str, ...], env: dict[str, str]) -> dict[str, dict[str, Any]]:
    res: dict[str, dict[str, Any]] = {}
    for mode in modes:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.learner", "--rss-child", mode, str(model_dir),
             str(groups_path), json.dumps(child_cfg)],
            capture_output=True, text=True, timeout=1800, env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
        if proc.returncode != 0:
            raise RuntimeError(f"rss child {mode} failed:\n{proc.stderr[-3000:]}")
        res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return res


def _vs_floor(res: dict[str, dict[str, Any]], act: int, shape: list[int],
              n_params: int | None) -> dict[str, Any]:
    mib = 1 / 2**20
    floor = res["floor"]["peak_bytes"] + act
    out: dict[str, Any] = {
        "allocator": res["floor"]["allocator"],
        "params": n_params,
        "micro_batch": {"sequences": shape[0], "padded_tokens": shape[1],
                        "distinct_prompts": shape[2]},
        "state_peak_rss_mib": round(res["floor"]["peak_bytes"] * mib, 1),
        "activation_mib": round(act * mib, 1),
        "floor_mib": round(floor * mib, 1),
    }
    for mode in ("oapl", "sft"):
        if mode in res:
            out[f"{mode}_peak_rss_mib"] = round(res[mode]["peak_bytes"] * mib, 1)
            out[f"{mode}_vs_floor"] = round(res[mode]["peak_bytes"] / floor, 3)
    return out


def measure_rss(model_dir: Path, groups: list[Any], cfg: LearnerBenchConfig,
                tok: Any) -> dict[str, Any]:
    """Peak vs floor for the bundled and the scaled model, each under both allocator
    environments (``allocator_environments``): ``bundled`` / ``scaled`` are the product's learner
    environment, ``bundled_system`` / ``scaled_system`` the C library's malloc."""
    from workers.learner.data import dump_groups_jsonl

    child_cfg = {k: v for k, v in asdict(cfg).items() if k not in ("bootstrap_overrides", "scale")}
    child_cfg |= {"steps": 2, "rss": False, "profile": False}
    out: dict[str, Any] = {
        "method": "fresh subprocess per measurement; peak = the process's VmHWM; floor = the "
        "peak of a process that loads the same libraries, tokenizer, groups, model, LoRA and "
        "AdamW state without training, plus the analytic activation bytes of the largest "
        "micro-batch (activation_bytes); ratio = training peak ÷ floor. Floor and peak are "
        "measured under the same allocator: the learner processes' (bundled, scaled) and the "
        "C library's malloc (bundled_system, scaled_system)",
        "scaled": None, "scaled_system": None,
    }
    with tempfile.TemporaryDirectory(prefix="tl-bench-rss-") as tmp:
        path = Path(tmp) / "groups.jsonl"
        dump_groups_jsonl(groups, path)
        act, shape = largest_activation_bytes(model_dir, groups, cfg, tok)
        if cfg.scale:
            sub = groups[: cfg.scale_groups]
            scfg = replace(cfg, prompts=len(sub), micro_batch_size=cfg.scale_micro_batch_size)
            spath = Path(tmp) / "scale-groups.jsonl"
            dump_groups_jsonl(sub, spath)
            sdir, n_scaled = scale_model(model_dir, cfg, Path(tmp) / "scale-model")
            sact, sshape = largest_activation_bytes(sdir, sub, scfg, tok)
        environments = allocator_environments()
        for suffix, env in (("", environments["learner"]), ("_system", environments["system"])):
            res = _rss_children(model_dir, path, child_cfg, ("floor", "oapl", "sft"), env)
            bundled = _vs_floor(res, act, shape, _n_params(model_dir))
            bundled["interpreter_baseline_mib"] = round(res["oapl"]["baseline_bytes"] / 2**20, 1)
            bundled["oapl_vs_sft_peak"] = round(
                res["oapl"]["peak_bytes"] / res["sft"]["peak_bytes"], 3)
            out[f"bundled{suffix}"] = bundled
            if cfg.scale:
                sres = _rss_children(sdir, spath, child_cfg | {
                    "prompts": scfg.prompts, "micro_batch_size": scfg.micro_batch_size},
                    ("floor", "oapl"), env)
                scaled = _vs_floor(sres, sact, sshape, n_scaled)
                scaled |= {"config": dict(cfg.scale), "sequences_per_step": sum(
                    len(g.completions) for g in sub), "optimizer_steps": 2}
                out[f"scaled{suffix}"] = scaled
    return out



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
    rss = measure_rss(model_dir, groups, cfg, tok) if cfg.rss else None
    bundled_ratio = rss["bundled"]["oapl_vs_floor"] if rss else None
    scaled_ratio = rss["scaled"]["oapl_vs_floor"] if rss and rss["scaled"] else None
    scaled_system = (rss["scaled_system"]["oapl_vs_floor"]
                     if rss and rss["scaled_system"] else None)
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
            "learner_peak_rss_vs_floor": scaled_ratio,
            "learner_peak_rss_vs_floor_bundled": bundled_ratio,
            "learner_peak_rss_vs_floor_system_malloc": scaled_system,
        },
        "targets": {
            "oapl_vs_sft_cost_ratio": {"target": "<= 1.15", "met": ratio <= 1.15},
            "learner_peak_rss_vs_floor": {
                "target": f"<= {RSS_TARGET} (the ~100M model, the learner processes' allocator: "
                f"{rss['scaled']['allocator'] if rss and rss['scaled'] else 'n/a'})",
                "met": None if scaled_ratio is None else scaled_ratio <= RSS_TARGET,
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

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=(1, 2))
    a.bar(["OAPL update", "SFT fwd+bwd"],
          [result["oapl_us_per_completion_token"], result["sft_us_per_completion_token"]],
          color=["tab:blue", "tab:gray"])
    a.set_ylabel("µs per completion token")
    a.set_title(f"cost ratio {result['ratios']['oapl_vs_sft_cost_ratio']:.2f} (target ≤1.15)")
    rss = result["rss"]
    if rss:
        models = [(f"bundled\n{m['allocator']}", m)
                  for m in (rss["bundled"], rss.get("bundled_system")) if m]
        models += [(f"{m['params'] / 1e6:.0f}M random\n{m['allocator']}", m)
                   for m in (rss["scaled"], rss.get("scaled_system")) if m]
        x = list(range(len(models)))
        w = 0.35
        state = [m["state_peak_rss_mib"] for _, m in models]
        b.bar([i - w / 2 for i in x], state, w, label="state, no training", color="tab:green")
        b.bar([i - w / 2 for i in x], [m["activation_mib"] for _, m in models], w, bottom=state,
              label="+ activations (analytic)", color="tab:olive")
        b.bar([i + w / 2 for i in x], [m["oapl_peak_rss_mib"] for _, m in models], w,
              label="OAPL training", color="tab:blue")
        b.set_xticks(list(x), [f"{n}\n{m['oapl_vs_floor']:.2f}× floor" for n, m in models],
                     fontsize=8)
        b.set_ylabel("peak RSS (MiB, whole process)")
        b.set_title(f"peak RSS / floor (target ≤{RSS_TARGET} at ~100M)")
        b.legend(fontsize=8)
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
    p.add_argument("--no-scale", action="store_true", help="skip the ~100M-parameter RSS run")
    p.add_argument("--scale-groups", type=int, default=d.scale_groups)
    p.add_argument("--scale-micro-batch-size", type=int, default=d.scale_micro_batch_size)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    cfg = LearnerBenchConfig(
        size=a.size, prompts=a.prompts, group_size=a.group_size, max_new_tokens=a.max_new_tokens,
        steps=a.steps, rounds=a.rounds, micro_batch_size=a.micro_batch_size, rss=not a.no_rss,
        profile=a.profile, scale=() if a.no_scale else d.scale, scale_groups=a.scale_groups,
        scale_micro_batch_size=a.scale_micro_batch_size,
    )
    result = run(cfg, a.out)
    print(f"OAPL {result['oapl_us_per_completion_token']} µs/token, "
          f"SFT {result['sft_us_per_completion_token']} µs/token "
          f"({result['tokens']['completion_tokens_per_step']} completion tokens/step)")
    if result["rss"]:
        for name, r in result["rss"].items():
            if isinstance(r, dict):
                print(f"RSS {name} ({r['params']} params): floor {r['floor_mib']} MiB (state "
                      f"{r['state_peak_rss_mib']} + activations {r['activation_mib']}), OAPL peak "
                      f"{r['oapl_peak_rss_mib']} MiB = {r['oapl_vs_floor']}× floor")
    print_ratios("learner", result["ratios"])
    return result


if __name__ == "__main__":
    main()
