"""The bundled tiny model: built from a seed, no hub, no internet.

``bootstrap_model`` trains (1) a byte-level BPE tokenizer on the clinical task corpus, saved as a
``PreTrainedTokenizerFast`` with a chat template, and (2) a small Qwen2-architecture causal LM,
warm-started by supervised fine-tuning on *noisy* demonstrations (``workers.clinical.task``): the
reasoning looks sensible, the overall call is wrong 15% of the time and only ~14% of demonstrations
end with the exact ``ANSWER: YES|NO`` contract. The resulting baseline is the blog's starting
point: it rarely follows the contract and is rarely correct end-to-end. The demonstrations (and so
the tokenizer) are written in the task's SEEN styles, mixed; the unseen style
(``task.UNSEEN_STYLE``) is never shown to the model before evaluation.

Results are cached by a content hash of the recipe (``workers.learner.recipe``: config, code
version, task corpus version — which covers the set of styles) under ``cache_dir`` (default
``~/.cache/tracelearn/models``; the service passes its ``model_cache`` setting), so the second call
with the same arguments returns in milliseconds. The default recipe's build is also shipped in the
package (``workers.learner.bundled``), so a first start need not build at all.

Sizes (parameters include the tied embedding) and build time on this 2-core CPU (each build
records its own ``seconds_total`` in the model's ``bootstrap.json``):
    test   ~  60 k params, vocab 384,  ~10 s   (unit tests)
    tiny   476 k params, vocab 715, 400 SFT steps × 32 demos of ~135 tokens: on one thread
           (every build) 14 min with the box's load average near 9; shipped in the package
    small  ~ 4.6 M params, vocab 1024 (more capacity, slower benchmark)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

from workers.clinical import task
from workers.graders.contract import parse_answer
from workers.inference.base import SamplingParams
from workers.inference.chat import encode_prompt
from workers.inference.local import LocalBackend
from workers.learner import bundled
from workers.learner.recipe import CODE_VERSION, SIZES, BootstrapConfig, ModelSize

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MANIFEST = "bootstrap.json"

BuildProgress = Callable[[str, int, int], None]
"""progress(stage, done, total): "demonstrations", "tokenizer", "warm-start" (optimizer steps),
"saving" — each reported when it starts (done 0) and when it ends (done == total)."""


def default_cache_dir() -> Path:
    """Where builds are cached when the caller names no directory (the service passes its
    ``model_cache`` setting)."""
    return Path.home() / ".cache" / "tracelearn" / "models"


def demonstrations(cfg: BootstrapConfig) -> list[tuple[list[dict[str, str]], str]]:
    # A seed offset keeps demo cases disjoint from the benchmark's (seed 0..99) train streams.
    examples = task.generate(100_000 + cfg.seed, cfg.n_demos, "train", task.SEEN_STYLES)
    rng = random.Random(f"demos/{cfg.seed}")
    return [(ex.messages, task.weak_response(ex.case, rng, cfg.call_noise)) for ex in examples]


def train_tokenizer(
    demos: list[tuple[list[dict[str, str]], str]], vocab_size: int
) -> PreTrainedTokenizerFast:
    # transformers loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer, which puts its own
    # normalizer and pre-tokenizer over the ones in tokenizer.json (so does vLLM, through
    # AutoTokenizer). The BPE is trained under those same ones: the ids the warm-start learns from
    # are then the ids the model is served and trained on. Under plain byte-level pre-tokenizing,
    # the build learned "ECOG 2" as " ECOG", " 2" and "LDH 340" as " LDH", " 34", "0", while the
    # served model saw " ", "2" and " ", "3", "4", "0": every number in a prompt was new to it, and
    # it never learned to read ECOG, the line or the labs.
    served = Qwen2Tokenizer().backend_tokenizer
    tok = Tokenizer(models.BPE())
    tok.normalizer = served.normalizer
    tok.pre_tokenizer = served.pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    corpus = [m["content"] for msgs, _ in demos for m in msgs] + [r for _, r in demos]
    tok.train_from_iterator(corpus, trainer=trainer)
    # Byte-level BPE never needs an unknown token. Saying so in tokenizer_config.json (null)
    # matters: transformers 5 loads a qwen2 model's tokenizer as Qwen2Tokenizer, whose default
    # unk "<|endoftext|>" would otherwise get the id one past the embedding's last row.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|end|>",
        pad_token="<|pad|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def build_model(size: ModelSize, tokenizer: PreTrainedTokenizerFast, seed: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def encode_demo(
    tokenizer: PreTrainedTokenizerFast, messages: list[dict[str, str]], response: str
) -> tuple[list[int], list[int]]:
    completion = tokenizer(response, add_special_tokens=False)["input_ids"]
    return encode_prompt(tokenizer, messages), [*completion, tokenizer.eos_token_id]


def answer_line_start(tokenizer: PreTrainedTokenizerFast, response: str,
                      completion: list[int]) -> int:
    """Where in ``completion`` (the response's tokens) its final answer line starts; its length
    when the response stops after the reasoning (two lines: factors, overall call)."""
    lines = response.split("\n")
    if len(lines) <= 2:
        return len(completion)
    head = tokenizer("\n".join(lines[:-1]) + "\n", add_special_tokens=False)["input_ids"]
    if completion[: len(head)] != head:
        # The pre-tokenizer splits at newlines, so the head's tokens open the response's.
        raise ValueError(f"the final line of {response!r} does not start on a token boundary")
    return len(head)


def weighted_lm_loss(logits: torch.Tensor, labels: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy with a weight per label token:

        L = Σ_t w_t · CE(logits_{t-1}, y_t) / #{t : y_t ≠ −100}

    (labels −100 are ignored; all weights 1 give the mean loss ``Qwen2ForCausalLM`` computes).
    A weight w counts its token w times without changing the step size of the others."""
    shifted, target, w = logits[:, :-1], labels[:, 1:], weights[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)).float(), target.reshape(-1), ignore_index=-100,
        reduction="none").view_as(target)
    counted = target != -100
    return (ce * w * counted).sum() / counted.sum().clamp(min=1)


def sft(
    model: Qwen2ForCausalLM,
    data: list[tuple[list[int], list[int]]],
    cfg: BootstrapConfig,
    pad_id: int,
    progress: BuildProgress | None = None,
    answer_from: list[int] | None = None,
) -> list[float]:
    """Completion-only next-token loss; returns the loss curve (one value per step). With
    ``cfg.answer_line_weight`` ≠ 1, the tokens of each demonstration's final line (from
    ``answer_from[i]`` of its completion on, EOS excluded) count that many times."""
    weighted = cfg.answer_line_weight != 1.0
    if weighted and (answer_from is None or len(answer_from) != len(data)):
        raise ValueError("an answer-line weight needs where each demonstration's final line starts")
    rng = random.Random(f"sft/{cfg.seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, cfg.sft_steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, cfg.sft_steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    order: list[int] = []
    losses = []
    model.train()
    for step in range(cfg.sft_steps):
        if len(order) < cfg.batch_size:
            fresh = list(range(len(data)))
            rng.shuffle(fresh)
            order.extend(fresh)
        picked = [order.pop() for _ in range(cfg.batch_size)]
        batch = [data[j] for j in picked]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, c) in enumerate(batch):
            seq = p + c
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p) : len(seq)] = torch.tensor(c)
            attn[i, : len(seq)] = 1
        if weighted:
            assert answer_from is not None
            weights = torch.ones((len(batch), width))
            for i, ((p, c), j) in enumerate(zip(batch, picked, strict=True)):
                weights[i, len(p) + answer_from[j] : len(p) + len(c) - 1] = cfg.answer_line_weight
            loss = weighted_lm_loss(model(input_ids=ids, attention_mask=attn).logits, labels,
                                    weights)
        else:  # the loss every model before the knob was built with, bit for bit
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress("warm-start", step + 1, cfg.sft_steps)
    model.eval()
    return losses


def _build(cfg: BootstrapConfig, dest: Path, progress: BuildProgress) -> None:
    t0 = time.perf_counter()
    progress("demonstrations", 0, cfg.n_demos)
    demos = demonstrations(cfg)
    progress("demonstrations", cfg.n_demos, cfg.n_demos)
    progress("tokenizer", 0, 1)
    tokenizer = train_tokenizer(demos, SIZES[cfg.size].vocab)
    progress("tokenizer", 1, 1)
    t_tok = time.perf_counter() - t0
    model = build_model(SIZES[cfg.size], tokenizer, cfg.seed)
    data = [encode_demo(tokenizer, m, r) for m, r in demos]
    answer_from = ([answer_line_start(tokenizer, r, c[:-1]) for (_, r), (_, c) in
                    zip(demos, data, strict=True)] if cfg.answer_line_weight != 1.0 else None)
    progress("warm-start", 0, cfg.sft_steps)
    losses = sft(model, data, cfg, tokenizer.pad_token_id, progress, answer_from)
    t_total = time.perf_counter() - t0
    progress("saving", 0, 1)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    n_params = sum(p.numel() for p in model.parameters())
    lengths = [len(p) + len(c) for p, c in data]
    info: dict[str, Any] = {
        "cache_key": cfg.cache_key(),
        "code_version": CODE_VERSION,
        "styles": list(task.SEEN_STYLES),
        "config": dataclasses.asdict(cfg),
        "size": dataclasses.asdict(SIZES[cfg.size]),
        "n_params": n_params,
        "vocab_size": len(tokenizer),
        "mean_sequence_tokens": sum(lengths) / len(lengths),
        "sft_loss_first": losses[0] if losses else None,
        "sft_loss_last": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "seconds_tokenizer": round(t_tok, 2),
        "seconds_total": round(t_total, 2),
        "torch_threads": torch.get_num_threads(),
    }
    (dest / MANIFEST).write_text(json.dumps(info, indent=2, sort_keys=True))
    progress("saving", 1, 1)


def bootstrap_model(
    out: str | Path | None = None,
    config: BootstrapConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: BuildProgress | None = None,
    *,
    from_package: bool = True,
) -> Path:
    """Build (or fetch from cache) the bundled model and return its directory.

    A recipe the package ships a build of (``workers.learner.bundled``) is copied from there,
    not built, unless ``from_package`` is False (a rebuild to ship or to check). Any other is
    built into ``cache_dir/<size>-<key>`` (atomically: temp dir then rename) unless it
    is already there. With ``out`` the cached directory is also copied to ``out``, which must not
    exist unless it already holds the same build (then it is returned unchanged).
    """
    cfg = config or BootstrapConfig()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache / f"{cfg.size}-{cfg.cache_key()}"
    if (from_package and not (cached / MANIFEST).is_file()
            and bundled.unusable_reason(cfg) is None):
        bundled.install(cached)  # the package ships this very recipe's build: no minutes of SFT
    if not (cached / MANIFEST).is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cached.name}.tmp-", dir=cache))
        try:
            threads = torch.get_num_threads()
            # One thread: float sums come out in one order whatever the core count, so a rebuild
            # is the same bytes (two threads gave other weights, with the same loss curve). It is
            # also the quicker way through on a busy box (14 min vs 39 min measured).
            torch.set_num_threads(1)
            try:
                _build(cfg, tmp, progress or (lambda stage, done, total: None))
            finally:
                torch.set_num_threads(threads)
            try:
                os.rename(tmp, cached)
            except OSError:
                # Another process finished the same build first; its result is identical.
                if not (cached / MANIFEST).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if out is None:
        return cached
    dest = Path(out)
    if dest.exists():
        info = json.loads((dest / MANIFEST).read_text()) if (dest / MANIFEST).is_file() else {}
        if info.get("cache_key") == cfg.cache_key():
            return dest
        raise FileExistsError(f"{dest} exists and is not this bootstrap build")
    shutil.copytree(cached, dest)
    return dest


def bootstrap_info(model_dir: str | Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads((Path(model_dir) / MANIFEST).read_text())
    return info


def baseline(
    model_dir: str | Path, prompts: int, seed: int = 0, temperature: float = 1.0,
    max_tokens: int = 80,
) -> dict[str, Any]:
    """How the model does before any training: one sample per held-out prompt (every style, the
    unseen one included), the share whose last line is the exact contract and the share that is
    also the right call."""
    examples = task.generate(seed, prompts, "heldout", list(task.STYLES))
    backend = LocalBackend(model_dir)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    outs = backend.generate([ex.messages for ex in examples], 1, params)
    answers = [parse_answer(group[0].text) for group in outs]
    return {
        "prompts": prompts,
        "seed": seed,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "parse_rate": sum(a is not None for a in answers) / prompts,
        "correct": sum(a == ex.outcome for a, ex in zip(answers, examples, strict=True)) / prompts,
    }
