"""The bundled model's warm-start sees the seen styles only, and its cache key follows them."""

from __future__ import annotations

import pytest

from workers.clinical import task
from workers.learner import bootstrap
from workers.learner.bootstrap import BootstrapConfig


def test_demonstrations_mix_the_seen_styles_and_never_show_the_unseen_one() -> None:
    cfg = BootstrapConfig(size="test", n_demos=300)
    prompts = [msgs[1]["content"] for msgs, _ in bootstrap.demonstrations(cfg)]
    unseen = {task.render(e.case, task.UNSEEN_STYLE)
              for e in task.generate(100_000 + cfg.seed, cfg.n_demos, "train")}
    assert not any(p.split("\n" + task.QUESTION)[0] in unseen for p in prompts)
    assert not any("µkat" in p or "haemoglobin" in p for p in prompts)
    # each seen style's own marker shows up
    assert any(p.startswith("Age: ") for p in prompts)  # fields
    assert any(" NSCLC, " in p for p in prompts)  # clinic note
    assert any(p.startswith("Planned: ") for p in prompts)  # long form
    assert any("-year-old" in p and p[0].isdigit() for p in prompts)  # narrative


def test_cache_key_changes_with_the_task_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    before = BootstrapConfig(size="test").cache_key()
    assert before == BootstrapConfig(size="test").cache_key()
    monkeypatch.setattr(task, "corpus_digest", lambda: "another-corpus")
    assert BootstrapConfig(size="test").cache_key() != before


def test_cache_key_covers_the_seen_style_set(monkeypatch: pytest.MonkeyPatch) -> None:
    before = BootstrapConfig(size="test").cache_key()
    monkeypatch.setattr(task, "SEEN_STYLES", task.SEEN_STYLES[:-1])
    assert BootstrapConfig(size="test").cache_key() != before
