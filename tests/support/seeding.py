"""Seeding helpers shared by the promotion and dashboard tests: a very small real base model, real
LoRA adapters written through the learner's adapter module, snapshots and evaluations as rows."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import func, insert, select

from app.db import Database
from app.models import (
    Evaluation,
    GroupStatus,
    Policy,
    RolloutGroup,
    RunStatus,
    Snapshot,
    SnapshotStatus,
    Trace,
    TrainingRun,
    training_run_groups,
)
from app.policies.service import served_name
from workers.inference.base import SamplingParams
from workers.inference.serving import (
    EngineChunk,
    EngineCompletion,
    EngineUnavailable,
    LocalServingEngine,
)
from workers.inference.tool_calls import ParsedCall
from workers.learner.adapters import model_digest, write_adapter
from workers.learner.bootstrap import BootstrapConfig, bootstrap_model

# The learner tests' configuration: builds in ~10 s on 2 cores.
TEST_BOOTSTRAP = BootstrapConfig(size="test", n_demos=600, sft_steps=80, batch_size=16, lr=1e-2)


def build_model(cache_dir: Path) -> Path:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return bootstrap_model(config=TEST_BOOTSTRAP, cache_dir=cache_dir)


def make_adapter(base_dir: Path, out_dir: Path, seed: int = 0) -> dict[str, Any]:
    """A real LoRA adapter whose B matrices are non-zero, so it changes what the model says."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    torch.manual_seed(seed)
    model = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return write_adapter(
        lambda d: model.save_pretrained(str(d)),
        out_dir,
        base_model_digest=model_digest(base_dir),
        parent=None,
        group_ids=[f"g{seed}"],
        config={"algorithm": "oapl", "lora_rank": 2, "seed": seed},
        metrics={"loss": 0.5},
    )


def add_snapshot(
    database: Database,
    policy_name: str,
    adapter_dir: Path | None,
    status: SnapshotStatus = SnapshotStatus.awaiting_approval,
    sha256: str | None = None,
) -> int:
    """A new snapshot (next version) of ``policy_name`` in ``status``; returns its id."""
    with database.session() as s:
        policy = s.scalars(select(Policy).where(Policy.name == policy_name)).one()
        version = (
            s.scalar(select(func.max(Snapshot.version)).where(Snapshot.policy_id == policy.id))
            or 0
        ) + 1
        manifest: dict[str, Any] = {}
        if adapter_dir is not None:
            import json

            manifest = json.loads((adapter_dir / "manifest.json").read_text())
        snap = Snapshot(
            policy_id=policy.id,
            version=version,
            parent_id=policy.serving_snapshot_id,
            adapter_path=str(adapter_dir) if adapter_dir else None,
            adapter_sha256=sha256 or manifest.get("weights_sha256"),
            served_name=served_name(policy.name, version),
            status=status,
            manifest=manifest,
        )
        s.add(snap)
        s.flush()
        return snap.id


def add_evaluation(database: Database, snapshot_id: int, gain: float = 0.1,
                   example_id: str = "clin-1") -> int:
    """A stored evaluation (what the eval job writes) with the champion slightly behind."""

    def metrics(correct: float, parse: float, reward: float) -> dict[str, Any]:
        def iv(v: float) -> dict[str, float]:
            return {"value": v, "ci_low": v - 0.08, "ci_high": v + 0.08}

        return {"correct": iv(correct), "parse_rate": iv(parse), "mean_reward": iv(reward),
                "pass@1": iv(correct), "pass@4": iv(min(1.0, correct + 0.2))}

    with database.session() as s:
        snap = s.get(Snapshot, snapshot_id)
        assert snap is not None
        row = Evaluation(
            snapshot_id=snapshot_id,
            champion_snapshot_id=snap.policy.serving_snapshot_id,
            dataset="heldout",
            n=40,
            metrics=metrics(0.5 + gain, 0.9, 0.3 + gain),
            comparison={
                "champion": metrics(0.5, 0.4, -0.2),
                "champion_served_name": "v0",
                "paired": {
                    m: {"diff": gain, "ci_low": gain - 0.05, "ci_high": gain + 0.05,
                        "p_value": 0.03}
                    for m in ("correct", "parse_rate", "mean_reward")
                },
                "mcnemar": {"candidate_only": 9, "champion_only": 3, "p_value": 0.146},
                "reward_hist": {"candidate": [[-1.0, 10.0], [0.0, 30.0], [1.0, 40.0]],
                                "champion": [[-1.0, 50.0], [0.0, 10.0], [1.0, 20.0]]},
                "k": 2,
                "grader_version": "contract-1.0",
            },
            breakdown={"key": "case.biomarker", "groups": {
                "EGFR": {"n": 8, "candidate": {"correct": 0.75, "parse_rate": 1.0,
                                               "mean_reward": 0.5},
                         "champion": {"correct": 0.5, "parse_rate": 0.5, "mean_reward": 0.0}}}},
            examples=[{
                "prompt_id": example_id, "prompt": "64-year-old man, ECOG 1 …",
                "outcome": {"pfs_gt_180d": True},
                "candidate": {"text": "Overall: favorable.\nANSWER: YES", "reward": 1.0,
                              "correct": True, "parse_ok": True},
                "champion": {"text": "Overall: favorable.\nAnswer: yes", "reward": -1.0,
                             "correct": False, "parse_ok": False},
                "winner": "candidate",
            }],
            gate_passed=True,
            gate_reasons=[],
        )
        s.add(row)
        s.flush()
        return row.id


def add_training_run(
    database: Database, snapshot_id: int, *, used: int, flat: int, steps: int = 24
) -> int:
    """A succeeded training run that made ``snapshot_id`` (what the train job records): graded
    groups from the parent snapshot on the policy's first ``used + flat`` traces, ``used`` of
    them trained on and ``flat`` with equal rewards; a per-step history of ``steps`` rows."""
    with database.session() as s:
        snap = s.get(Snapshot, snapshot_id)
        assert snap is not None and snap.parent_id is not None
        traces = list(s.scalars(select(Trace.id).where(Trace.policy_id == snap.policy_id)
                                .order_by(Trace.id).limit(used + flat)))
        assert len(traces) == used + flat, "post the traces first"
        groups = [RolloutGroup(trace_id=t, snapshot_id=snap.parent_id, group_size=4,
                               status=GroupStatus.graded, zero_variance=i >= used,
                               grader_version="contract-1.0")
                  for i, t in enumerate(traces)]
        s.add_all(groups)
        s.flush()
        history = [{"step": float(k), "epoch": float(1 + (k - 1) * 2 // steps),
                    "loss": 0.5 / k, "train_reward": -0.8 + 0.03 * k,
                    "mean_log_ratio": -0.002 * k} for k in range(1, steps + 1)]
        run = TrainingRun(
            policy_id=snap.policy_id, algorithm="oapl", status=RunStatus.succeeded,
            config={"algorithm": "oapl", "epochs": 2, "groups_per_step": 4, "lr": 0.002,
                    "lr_schedule": "constant", "beta1": 1.0, "beta2": 0.1, "lora_rank": 8,
                    "keep_zero_variance_groups": False, "group_size": 4, "temperature": 1.0},
            parent_snapshot_id=snap.parent_id, output_snapshot_id=snap.id,
            trace_ids=traces[:used],
            metrics={"summary": {"optimizer_steps": steps, "epochs": 2.0, "groups_used": used,
                                 "groups_dropped_zero_variance": flat},
                     "history": history},
        )
        s.add(run)
        s.flush()
        s.execute(insert(training_run_groups),
                  [{"training_run_id": run.id, "group_id": g.id} for g in groups[:used]])
        snap.training_run_id = run.id
        return run.id


class DownEngine:
    """An engine that cannot be reached at all."""

    def load_adapter(self, name: str, path: str) -> None:
        raise EngineUnavailable("connection refused")

    def unload_adapter(self, name: str) -> None:
        raise EngineUnavailable("connection refused")

    def list_models(self) -> list[str]:
        raise EngineUnavailable("connection refused")

    def complete(
        self, model: str | None, messages: list[dict[str, str]], params: SamplingParams
    ) -> EngineCompletion:
        raise EngineUnavailable("connection refused")

    def stream(
        self, model: str | None, messages: list[dict[str, str]], params: SamplingParams
    ) -> Iterator[EngineChunk]:
        raise EngineUnavailable("connection refused")


class ScriptedEngine:
    """A serving engine whose model writes a fixed script, one piece per token, through the same
    interface as the real engines: for proxy tests that need a known answer (tool calls, which
    the tiny model never writes) or need to watch generation as it happens.

    ``max_tokens`` cuts the script (``length``). ``calls`` counts generations; ``generated`` is
    how many pieces the last one produced and ``closed`` whether its reader ended it, so a test
    sees a stop string end generation. With ``resume`` given, the engine waits after the first
    piece until ``resume`` is set (at most ``wait_s``) before writing the rest, and
    ``resumed`` says whether it was: a client that sets it on receiving the first piece shows
    that the piece reached it while the rest did not exist yet. ``tool_calls``: calls the engine
    splits off itself, as a vLLM server with a tool-call parser does.
    """

    def __init__(self, pieces: Sequence[str], *, finish_reason: str = "stop",
                 prompt_tokens: int = 3, resume: threading.Event | None = None,
                 wait_s: float = 20.0, tool_calls: Sequence[ParsedCall] = ()) -> None:
        self.pieces = list(pieces)
        self.tool_calls = tuple(tool_calls)
        self.finish_reason = finish_reason
        self.prompt_tokens = prompt_tokens
        self.resume = resume
        self.wait_s = wait_s
        self.resumed: bool | None = None
        self.calls = 0
        self.generated = 0
        self.closed = False
        self.messages: list[dict[str, Any]] = []

    def load_adapter(self, name: str, path: str) -> None:
        pass

    def unload_adapter(self, name: str) -> None:
        pass

    def list_models(self) -> list[str]:
        return []

    def complete(
        self, model: str | None, messages: list[dict[str, str]], params: SamplingParams
    ) -> EngineCompletion:
        chunks = list(self.stream(model, messages, params))
        return EngineCompletion(text="".join(c.text for c in chunks),
                                finish_reason=chunks[-1].finish_reason or "stop",
                                prompt_tokens=self.prompt_tokens,
                                completion_tokens=chunks[-1].completion_tokens)

    def stream(
        self, model: str | None, messages: list[dict[str, str]], params: SamplingParams
    ) -> Iterator[EngineChunk]:
        self.calls += 1
        self.generated, self.closed, self.messages = 0, False, list(messages)
        script = self.pieces[: params.max_tokens]
        try:
            for i, piece in enumerate(script):
                if i == 1 and self.resume is not None:
                    self.resumed = self.resume.wait(self.wait_s)
                self.generated = i + 1
                yield EngineChunk(piece, self.prompt_tokens, i + 1)
            cut = len(script) < len(self.pieces)
            yield EngineChunk("", self.prompt_tokens, len(script),
                              "length" if cut else self.finish_reason, self.tool_calls)
        except GeneratorExit:
            self.closed = True
            raise


class CanaryFailsEngine(LocalServingEngine):
    """Loads adapters for real, but the canary for ``bad_name`` comes back empty."""

    def __init__(self, inner: LocalServingEngine, bad_name: str) -> None:
        super().__init__(inner.base_model_dir, backend=inner.backend)
        self.bad_name = bad_name

    def complete(
        self, model: str | None, messages: list[dict[str, str]], params: SamplingParams
    ) -> EngineCompletion:
        if model == self.bad_name:
            return EngineCompletion(text="", finish_reason="error", prompt_tokens=3,
                                    completion_tokens=0)
        return super().complete(model, messages, params)


class ForgetfulEngine(LocalServingEngine):
    """Accepts the load but never lists the adapter (a load that silently did nothing)."""

    def __init__(self, inner: LocalServingEngine) -> None:
        super().__init__(inner.base_model_dir, backend=inner.backend)

    def list_models(self) -> list[str]:
        return ["base"]
