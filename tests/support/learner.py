"""Fixtures for the learner tests: one very small bootstrapped model per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from workers.clinical import task
from workers.graders import ContractGrader
from workers.inference.base import SamplingParams
from workers.inference.local import LocalBackend
from workers.learner.bootstrap import BootstrapConfig, bootstrap_model
from workers.learner.data import PromptItem, TrainingGroup, make_rollout_groups

# Small enough to build in ~10 s on 2 cores; it learns the format only partly, which is all the
# mechanics tests need.
TEST_BOOTSTRAP = BootstrapConfig(size="test", n_demos=600, sft_steps=80, batch_size=16, lr=1e-2)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache: Path) -> Path:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return bootstrap_model(config=TEST_BOOTSTRAP, cache_dir=model_cache)


@pytest.fixture(scope="session")
def backend(tiny_model_dir: Path) -> LocalBackend:
    return LocalBackend(tiny_model_dir)


def reached_overall(
    messages: list[dict[str, str]], text: str, outcome: dict[str, Any] | None
) -> tuple[float, bool]:
    """A reward the weak test model earns sometimes: +1 if it reached an overall call."""
    ok = "Overall" in text
    return (1.0 if ok else -1.0), ok


def contract_grade(
    messages: list[dict[str, str]], text: str, outcome: dict[str, Any] | None
) -> tuple[float, bool]:
    r = ContractGrader().grade(messages, text, outcome)
    return r.reward, r.parse_ok


def prompt_items(seed: int, n: int, split: str = "train") -> list[PromptItem]:
    return [
        PromptItem(e.external_id, e.messages, {"name": task.OUTCOME_NAME, "value": e.outcome})
        for e in task.generate(seed, n, split)
    ]


@pytest.fixture(scope="session")
def make_groups(
    backend: LocalBackend,
) -> Callable[..., list[TrainingGroup]]:
    def _make(
        n_prompts: int = 8, group_size: int = 6, seed: int = 0, max_tokens: int = 48
    ) -> list[TrainingGroup]:
        return make_rollout_groups(
            backend,
            prompt_items(seed, n_prompts),
            group_size,
            SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed),
            reached_overall,
        )

    return _make
