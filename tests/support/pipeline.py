"""Fixtures for the pipeline tests: a small model vLLM can serve, real Postgres, real Redis, real
Celery worker/beat subprocesses, and a real vLLM server (when a Python with vLLM is available)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from app.auth.service import Principal, Scope
from app.cli.processes import beat_argv, settings_env, worker_argv
from app.db import Database, set_database
from app.engines import reset, set_backend_override
from app.models import Outcome, OutcomeSource, Policy, Split, Trace
from app.policies.schemas import GraderSpec, PolicyCreate, SamplingSpec, TrainingSpec
from app.policies.service import create_policy
from app.settings import Settings, set_settings
from tests.conftest import make_settings, skip_or_fail
from workers.clinical import task
from workers.inference.vllm_server import VllmServer

REDIS_URL = os.environ.get("TRACELEARN_TEST_REDIS", "redis://127.0.0.1:6379/13")

# Head size 32: vLLM's CPU attention supports 32, 64, 80, … only (the learner's "test" size has
# 16). Random init is enough for the mechanics tested here (shapes, ids, log-probs, adapters).
VLLM_SIZE = dict(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, vocab=384)


# --- model -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.learner.bootstrap import (
        BootstrapConfig,
        ModelSize,
        build_model,
        demonstrations,
        train_tokenizer,
    )

    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = tmp_path_factory.mktemp("models") / "pipeline"
    demos = demonstrations(BootstrapConfig(size="test", n_demos=200))
    tokenizer = train_tokenizer(demos, VLLM_SIZE["vocab"])
    model = build_model(ModelSize(**VLLM_SIZE), tokenizer, seed=0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A real LoRA adapter with non-zero B (so it changes outputs), written with its manifest."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from workers.learner import adapters

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                   task_type="CAUSAL_LM"),
    )
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    adapters.write_adapter(
        lambda d: peft_model.save_pretrained(str(d)), out,
        base_model_digest=adapters.model_digest(model_dir), parent=None, group_ids=[],
        config={"lora_rank": 8}, metrics={},
    )
    return out


@pytest.fixture(scope="session")
def adapter_dirs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(model_dir, root / f"adapter-{i}", seed=i) for i in range(2)]


# --- services ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL)
    for _ in range(2):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            subprocess.run(
                ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379",
                 "--save", "", "--appendonly", "no"],
                check=False, capture_output=True,
            )
            time.sleep(1)
    client.ping()
    client.flushdb()
    return REDIS_URL


def _swap(settings: Settings) -> Iterator[Settings]:
    set_settings(settings)
    set_database(Database(settings))
    reset()
    yield settings
    set_backend_override(None)
    reset()
    set_database(None)
    set_settings(None)


@pytest.fixture
def pg_settings(pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Postgres + Redis, tasks really sent to the broker (no eager execution), short leases."""
    s = make_settings(pg_url, tmp_path / "data", broker_url=redis_url, task_always_eager=False,
                      job_lease_s=5, reaper_interval_s=1)
    yield from _swap(s)


@pytest.fixture
def sqlite_settings(sqlite_url: str, tmp_path: Path) -> Iterator[Settings]:
    """SQLite + eager execution: the embedded default's code paths in one process."""
    s = make_settings(sqlite_url, tmp_path / "data", job_lease_s=5)
    yield from _swap(s)


# --- data --------------------------------------------------------------------------------------


def seed_policy(
    settings: Settings,
    base_model: Path,
    *,
    n_traces: int = 4,
    group_size: int = 4,
    max_tokens: int = 16,
    grader: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    schedule: str | None = None,
    with_outcomes: bool = True,
    heldout: int = 0,
) -> tuple[str, list[int]]:
    """A policy on ``base_model`` with ``n_traces`` clinical train traces (+ outcomes)."""
    from app.db import get_database

    tenant = f"t-{uuid.uuid4().hex[:8]}"
    name = f"p-{uuid.uuid4().hex[:8]}"
    principal = Principal(key_id=0, tenant=tenant, scopes=frozenset({Scope.admin}), name="test")
    body = PolicyCreate(
        name=name,
        base_model=str(base_model),
        grader=GraderSpec(**(grader or {"kind": "contract", "outcome": task.OUTCOME_NAME})),
        sampling=SamplingSpec(temperature=1.0, max_tokens=max_tokens),
        group_size=group_size,
        schedule=schedule,
        training=TrainingSpec(**(training or {"min_groups": 1})),
    )
    ids = []
    with get_database().session() as session:
        policy = create_policy(session, principal, body)
        examples = task.generate(abs(hash(name)) % 10_000, n_traces + heldout, "train")
        for i, ex in enumerate(examples):
            trace = Trace(
                tenant=tenant, external_id=f"{name}-{i}", policy_id=policy.id,
                messages=ex.messages, response="ANSWER: NO", split=Split.train if i < n_traces
                else Split.heldout, content_hash=uuid.uuid4().hex, meta={},
            )
            session.add(trace)
            session.flush()
            ids.append(trace.id)
            if with_outcomes:
                session.add(Outcome(
                    tenant=tenant, trace_external_id=trace.external_id, trace_id=trace.id,
                    name=task.OUTCOME_NAME, value=ex.outcome, source=OutcomeSource.api,
                ))
    return name, ids


def policy_row(name: str) -> Policy:
    from sqlalchemy import select

    from app.db import get_database

    with get_database().session() as session:
        return session.scalars(select(Policy).where(Policy.name == name)).one()


# --- Celery subprocesses -------------------------------------------------------------------------


class Proc:
    """A Celery worker or beat child process with its log, killable the hard way."""

    def __init__(self, argv: list[str], settings: Settings, log: Path) -> None:
        self.log = log
        env = os.environ | settings_env(settings) | {"PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(
            argv, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return
            if self.popen.poll() is not None:
                raise RuntimeError(f"process exited: {self.text()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"{needle!r} not seen in {timeout}s: {self.text()[-3000:]}")

    def kill9(self) -> None:
        # The whole process group: a prefork child must not survive its parent.
        os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill9()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    procs: list[Proc] = []

    def _start(settings: Settings, queues: str, name: str = "w", wait: bool = True) -> Proc:
        argv = worker_argv(queues, name=f"{name}-{uuid.uuid4().hex[:6]}", loglevel="INFO")
        proc = Proc(argv, settings, tmp_path / f"{name}-{len(procs)}.log")
        procs.append(proc)
        if wait:
            proc.wait_for("ready.")
        return proc

    yield _start
    for p in procs:
        p.stop()


@pytest.fixture
def start_beat(tmp_path: Path) -> Iterator[Callable[[Settings], Proc]]:
    procs: list[Proc] = []

    def _start(settings: Settings) -> Proc:
        proc = Proc(beat_argv("INFO"), settings, tmp_path / f"beat-{len(procs)}.log")
        procs.append(proc)
        proc.wait_for("beat: Starting")
        return proc

    yield _start
    for p in procs:
        p.stop()


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not met in time")


# --- vLLM --------------------------------------------------------------------------------------


def vllm_python() -> str | None:
    """A Python that can import vLLM: ``TRACELEARN_TEST_VLLM_PYTHON`` or this one."""
    configured = os.environ.get("TRACELEARN_TEST_VLLM_PYTHON")
    if configured:
        return configured if Path(configured).exists() else None
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


@pytest.fixture(scope="session")
def vllm(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """One real vLLM OpenAI server per test session (CPU build), serving ``model_dir``."""
    python = vllm_python()
    if python is None:
        skip_or_fail("vllm is not importable (pip install 'tracelearn[vllm]', or point "
                    "TRACELEARN_TEST_VLLM_PYTHON at a Python that has it)")
    served = tmp_path_factory.mktemp("vllm") / "model"
    shutil.copytree(model_dir, served)
    with VllmServer(python, served, tmp_path_factory.mktemp("vllm-log") / "vllm.log") as server:
        yield server


def vary_rewards(policy_name: str) -> int:
    """Give every graded group of the policy alternating rewards 1, 0, 1, … (then restat it).

    A random-init model's completions make any real grader's rewards nearly constant, so tests
    that need trainable (non-zero-variance) groups set the rewards; the trainer still trains on
    the real sampled token ids and behaviour log-probs. Returns the number of groups changed."""
    from sqlalchemy import select

    from app.db import get_database
    from app.models import GroupStatus, RolloutGroup, RolloutStatus, Snapshot
    from app.rollouts.service import finish_group

    with get_database().session() as session:
        policy = session.scalars(select(Policy).where(Policy.name == policy_name)).one()
        groups = list(session.scalars(
            select(RolloutGroup).join(Snapshot, Snapshot.id == RolloutGroup.snapshot_id)
            .where(Snapshot.policy_id == policy.id, RolloutGroup.status == GroupStatus.graded)
        ))
        for g in groups:
            for r in g.rollouts:
                r.status, r.reward, r.parse_ok = RolloutStatus.graded, float(r.index % 2), True
            finish_group(g, g.grader_version or "test", 1.0)
    return len(groups)
